"""What ``/get_reward`` (OpenRLHF) and ``/classify`` (vLLM, as verl calls it) share: texts a policy rendered with its
chat template, split into the conversation and the response and scored as in-process scoring scores them."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from ...backends.base import RewardModel
from ...conversation import Message
from ...policy_text import split_policy_text


class PolicyOutput(NamedTuple):
    """One policy output read from a templated text: the conversation, the response, the pairwise reference."""

    messages: list[Message]
    completion: str
    reference: Optional[str]


def split_queries(model: RewardModel, texts: list[str], prompts: Optional[list[Any]],
                  references: Optional[list[Any]], text_field: str, reference_field: str) -> list[PolicyOutput]:
    """Each text split into conversation and response (:func:`~rlhf_rewards.policy_text.split_policy_text`),
    checked to be renderable by ``model``, with its reference when the model is pairwise (a string
    ``references[i]``). The first text that cannot be scored raises ``ValueError`` naming ``text_field[i]`` (or
    ``reference_field[i]``, ``prompts[i]``): the whole request is a 422."""
    out = []
    for i, text in enumerate(texts):
        where = f"{text_field}[{i}]"
        messages, response = split_policy_text(text, where, prompts[i] if prompts is not None else None,
                                               f"prompts[{i}]")
        reference = None
        if model.kind == "pairwise":
            reference = references[i] if references is not None else None
            if not isinstance(reference, str):
                raise ValueError(f"{reference_field}[{i}]: {model.preset.name} is a pairwise model and scores a "
                                 f"response against a reference response: send {reference_field}[{i}] as a "
                                 f"string (got {type(reference).__name__})")
        try:
            model.format(messages, response, *([reference] if reference is not None else []))
        except ValueError as err:
            raise ValueError(f"{where}: {model.preset.name} cannot render this conversation: {err}") from None
        out.append(PolicyOutput(messages, response, reference))
    return out


def score_outputs(model: RewardModel, outputs: list[PolicyOutput]) -> list[float]:
    """Rewards of split policy outputs: the model's score, or for a pairwise model ``logodds(P(response better
    than reference))``."""
    if not outputs:
        return []
    messages = [s.messages for s in outputs]
    responses = [s.completion for s in outputs]
    if model.kind == "pairwise":
        return model.score(messages, responses, baselines=[s.reference for s in outputs])
    return model.score(messages, responses)

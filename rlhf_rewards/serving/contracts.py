"""What each endpoint computes, on a model view (see :meth:`RewardEngine.view`), in plain Python: no HTTP here.

Each function raises ``ValueError`` naming the field and index for input the model cannot score (HTTP 422).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, Optional

from ..backends.base import RewardModel
from ..chat_parsing import detect_chat_format, parse_chat, strip_completion, strip_tokens
from ..conversation import Message, normalize_prompt
from ..pairwise import preferences
from ..trainers.reward_function import RewardFunction
from .schemas import CompareRequest, RewardsRequest, ScoreRequest

logger = logging.getLogger(__name__)

# Padding tokens a policy's decode can leave around a query (left padding before the prompt, right padding after
# the response), beyond the EOS/end-of-turn markers of each chat format that chat_parsing already knows.
PAD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]")


def score(model: RewardModel, body: ScoreRequest) -> list[float]:
    """``/v1/score``: ``model.score`` (pairwise: against ``baselines``, through ``transform``)."""
    extra = {"transform": body.transform} if model.kind == "pairwise" else {}
    return model.score(body.prompts, body.completions, baselines=body.baselines, **extra)


def compare(model: RewardModel, body: CompareRequest) -> list[float]:
    """``/v1/compare``: preference probabilities (scalar models: Bradley-Terry of their two scores)."""
    return preferences(model, body.prompts, body.completions_a, body.completions_b)


class RewardsResult(NamedTuple):
    rewards: list[Optional[float]]
    errors: list[Optional[str]]
    stats: dict[str, float]


def rewards(model: RewardModel, body: RewardsRequest) -> RewardsResult:
    """``/v1/rewards``: exactly a :class:`~rlhf_rewards.RewardFunction` call with the request's options, plus the
    reason of each ``None`` and this call's share of the model's counters."""
    function = RewardFunction(model, baseline_column="baselines" if body.baselines is not None else None,
                              pairing=body.pairing, group_size=body.group_size, group_mode=body.group_mode,
                              transform=body.transform, parse_templates=body.parse_templates)
    columns = {"baselines": body.baselines} if body.baselines is not None else {}
    values, errors = function.rewards_with_reasons(body.prompts, body.completions, **columns)
    return RewardsResult(values, errors, model.stats.as_dict())


class Scorable(NamedTuple):
    """One policy output located in a templated text: the conversation, the response, the pairwise reference."""

    messages: list[Message]
    completion: str
    reference: Optional[str]


def split_conversation(text: str, where: str, prompt: Any = None, prompt_field: str = "prompt"
                       ) -> tuple[list[Message], str]:
    """A prompt+response rendered with a chat template (and decoded with its special tokens) as ``(messages,
    response)``: the response is the last assistant turn, without the EOS/end-of-turn/pad tokens the decode left;
    the messages before it must end with a user turn. Untemplated text is split at ``prompt`` when the text starts
    with it (OpenRLHF's ``prompts[i]``, named ``prompt_field`` in errors)."""
    text = strip_tokens(text, PAD_TOKENS, leading=True)
    fmt = detect_chat_format(text)
    if fmt == "plain":
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"{prompt_field}: expected the prompt as text (a string), got {type(prompt).__name__}; "
                             f"{where} is not rendered with a chat template, so it is split at its prompt")
        if isinstance(prompt, str) and prompt and text.startswith(prompt):
            return normalize_prompt(prompt, where), text[len(prompt):]
        raise ValueError(f"{where}: not rendered with a chat template rlhf_rewards can parse (ChatML, Llama-3, "
                         "Mistral/Llama-2, Gemma, Zephyr, Phi-3), and does not start with its prompt, so the "
                         "response cannot be told from the prompt")
    messages, fmt = parse_chat(text, where=where)
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the text ends with a {messages[-1]['role']} turn; expected the policy's "
                         "response as the last (assistant) turn")
    response = strip_tokens(strip_completion(messages[-1]["content"], fmt), PAD_TOKENS, leading=True)
    return normalize_prompt(messages[:-1], where), response


def locate(model: RewardModel, texts: list[str], prompts: Optional[list[Any]], references: Optional[list[Any]],
           text_field: str, reference_field: str) -> list[Scorable]:
    """Each text split into conversation and response, checked to be renderable by ``model``, with its
    reference when the model is pairwise (a string ``references[i]``, else an error naming the field)."""
    out = []
    for i, text in enumerate(texts):
        where = f"{text_field}[{i}]"
        messages, response = split_conversation(text, where, prompts[i] if prompts is not None else None,
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
        out.append(Scorable(messages, response, reference))
    return out


def score_located(model: RewardModel, samples: list[Scorable]) -> list[float]:
    """Rewards of located samples: the model's score, or for a pairwise model ``logodds(P(response better than
    reference))``."""
    if not samples:
        return []
    messages = [s.messages for s in samples]
    responses = [s.completion for s in samples]
    if model.kind == "pairwise":
        return model.score(messages, responses, baselines=[s.reference for s in samples])
    return model.score(messages, responses)

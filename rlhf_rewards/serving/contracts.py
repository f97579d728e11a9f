"""What each endpoint computes, on a model view (see :meth:`RewardEngine.view`), in plain Python: no HTTP here.

Each function raises ``ValueError`` naming the field and index for input the model cannot score (HTTP 422).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, Optional

from ..backends.base import RewardModel
from ..policy_text import split_policy_text
from ..conversation import Message
from ..pairwise import preferences
from ..trainers.reward_function import RewardFunction
from .schemas import CompareRequest, RewardsRequest, ScoreRequest

logger = logging.getLogger(__name__)

def score(model: RewardModel, body: ScoreRequest) -> list[float]:
    """``/v1/score``: ``model.score`` (pairwise: against ``baselines``, through ``transform``; with ``objectives``,
    the model's :meth:`~rlhf_rewards.RewardModel.with_objectives`)."""
    extra = {"transform": body.transform} if model.kind == "pairwise" else {}
    if body.objectives is not None:
        model = model.with_objectives(body.objectives)
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
                              transform=body.transform, parse_templates=body.parse_templates,
                              objectives=body.objectives)
    columns = {"baselines": body.baselines} if body.baselines is not None else {}
    values, errors = function.rewards_with_reasons(body.prompts, body.completions, **columns)
    return RewardsResult(values, errors, model.stats.as_dict())


class Scorable(NamedTuple):
    """One policy output located in a templated text: the conversation, the response, the pairwise reference."""

    messages: list[Message]
    completion: str
    reference: Optional[str]


def locate(model: RewardModel, texts: list[str], prompts: Optional[list[Any]], references: Optional[list[Any]],
           text_field: str, reference_field: str) -> list[Scorable]:
    """Each text split into conversation and response, checked to be renderable by ``model``, with its
    reference when the model is pairwise (a string ``references[i]``, else an error naming the field)."""
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

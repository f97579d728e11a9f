"""``POST /v1/score``: ``rm.score(prompts, completions, baselines=...)``; for a pairwise model, against the
baselines and through ``transform``."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, model_validator

from ...backends.base import RewardModel
from ..routing import Route, Served
from .fields import AggregateName, Completion, Objectives, StrictBody, Text, TransformName, same_length

PATH = "/v1/score"


class ScoreRequest(StrictBody):
    """Prompts (text, one user turn as it is, or message lists), one completion each, and optionally one baseline
    each: the reward is then ``r(completion) - r(baseline)``. A pairwise model needs ``baselines``. A process reward
    model takes a completion as text or a list of step strings, and ``aggregate`` (its step rewards into one)."""

    prompts: list[Text]
    completions: list[Completion]
    baselines: Optional[list[Text]] = None
    transform: TransformName = "logodds"
    objectives: Objectives = None
    aggregate: AggregateName = None

    @model_validator(mode="after")
    def _lengths(self) -> ScoreRequest:
        same_length(self, "prompts", "completions", "baselines")
        return self


class ScoreResponse(BaseModel):
    """``rewards[i]``: the model's reward of ``completions[i]`` (a scalar model's logit scale; a pairwise model's
    ``transform`` of ``P(completion better than baseline)``; a process model's ``aggregate`` of its step rewards, in
    [0, 1])."""

    rewards: list[float]


def score(model: RewardModel, body: ScoreRequest) -> ScoreResponse:
    """What ``/v1/score`` answers, computed on ``model`` (a view): ``ValueError`` for input it cannot score. With
    ``objectives``, the model's :meth:`~rlhf_rewards.RewardModel.with_objectives` scores."""
    extra = {"transform": body.transform} if model.kind == "pairwise" else {}
    if body.aggregate is not None:
        if model.kind != "process":
            raise ValueError(f"aggregate: only process reward models take it; {model.preset.name} is a "
                             f"{model.kind} model")
        extra["aggregate"] = body.aggregate
    if body.objectives is not None:
        model = model.with_objectives(body.objectives)
    return ScoreResponse(rewards=model.score(body.prompts, body.completions, baselines=body.baselines, **extra))


async def handler(served: Served, body: ScoreRequest) -> ScoreResponse:
    return await served.ready().run(lambda model: score(model, body))


ROUTE = Route(PATH, ("POST",), handler, ScoreRequest, ScoreResponse)

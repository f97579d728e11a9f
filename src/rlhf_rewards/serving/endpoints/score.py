"""``POST /v1/score``: ``rm.score(prompts, completions, baselines=...)``; for a pairwise model, against the
baselines and through ``transform``; normalised as ``normalize`` asks (:mod:`rlhf_rewards.normalization`)."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field, StrictInt, model_validator

from ...backends.base import RewardModel
from ...normalization import RewardScale, make_normalizer
from ..routing import Route, Served
from .fields import (AggregateName, Completion, NormalizeName, Objectives, StrictBody, Text, TransformName,
                     same_length)

PATH = "/v1/score"


class ScoreRequest(StrictBody):
    """Prompts (text, one user turn as it is, or message lists), one completion each, and optionally one baseline
    each: the reward is then ``r(completion) - r(baseline)``. A pairwise model needs ``baselines``. A process reward
    model takes a completion as text or a list of step strings, and ``aggregate`` (its step rewards into one).

    ``normalize``: ``"stats"`` gives ``(r - mean) / std`` with the statistics ``/v1/models`` states (a 422 without
    any, or for statistics of another reward); ``"group"`` normalises within each group of ``group_size``
    consecutive samples (default: each run of equal consecutive prompts) as ``RewardFunction(normalize="group")``
    does."""

    prompts: list[Text]
    completions: list[Completion]
    baselines: Optional[list[Text]] = None
    transform: TransformName = "logodds"
    objectives: Objectives = None
    aggregate: AggregateName = None
    normalize: NormalizeName = None
    group_size: Optional[StrictInt] = Field(default=None, ge=2)

    @model_validator(mode="after")
    def _lengths(self) -> ScoreRequest:
        same_length(self, "prompts", "completions", "baselines")
        if self.group_size is not None and self.normalize != "group":
            raise ValueError("group_size needs normalize='group'")
        return self


class ScoreResponse(BaseModel):
    """``rewards[i]``: the model's reward of ``completions[i]`` (a scalar model's logit scale; a pairwise model's
    ``transform`` of ``P(completion better than baseline)``; a process model's ``aggregate`` of its step rewards, in
    [0, 1]), normalised when ``normalize`` asked."""

    rewards: list[float]


def score(model: RewardModel, body: ScoreRequest, calibration: Optional[RewardScale] = None) -> ScoreResponse:
    """What ``/v1/score`` answers, computed on ``model`` (a view): ``ValueError`` for input it cannot score. With
    ``objectives``, the model's :meth:`~rlhf_rewards.RewardModel.with_objectives` scores; ``calibration`` is the
    server's (``serve --calibration``), for ``normalize="stats"``."""
    extra = {"transform": body.transform} if model.kind == "pairwise" else {}
    if body.aggregate is not None:
        if model.kind != "process":
            raise ValueError(f"aggregate: only process reward models take it; {model.preset.name} is a "
                             f"{model.kind} model")
        model = model.with_aggregate(body.aggregate)  # type: ignore[attr-defined]
    if body.objectives is not None:
        model = model.with_objectives(body.objectives)
    normalizer = make_normalizer(body.normalize, model, calibration=calibration if body.normalize == "stats" else None,
                                 baseline=body.baselines is not None, transform=body.transform,
                                 objectives=body.objectives, group_size=body.group_size)
    groups = normalizer.layout(body.prompts)
    rewards = model.score(body.prompts, body.completions, baselines=body.baselines, **extra)
    return ScoreResponse(rewards=normalizer.apply(rewards, groups))


async def handler(served: Served, body: ScoreRequest) -> ScoreResponse:
    engine = served.ready()
    return await engine.run(lambda model: score(model, body, engine.calibration))


ROUTE = Route(PATH, ("POST",), handler, ScoreRequest, ScoreResponse)

"""``POST /v1/rewards``: one :class:`~rlhf_rewards.RewardFunction` call with the request's options (what
``RemoteRewardFunction`` and ``RayRewardFunction`` send), with the reason of each unscored sample."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, StrictBool, StrictInt, model_validator

from ...backends.base import RewardModel
from ...normalization import RewardScale
from ...stats import RewardStats
from ...trainers.reward_function import RewardFunction
from ..engine import RewardEngine
from ..routing import Route, Served
from .fields import AggregateName, NormalizeName, Objectives, StrictBody, TransformName, same_length

PATH = "/v1/rewards"


class RewardsRequest(StrictBody):
    """A :class:`~rlhf_rewards.RewardFunction` call (its options, one batch).

    Each sample's values may be any JSON: as in-process, a sample that is not a prompt and completion (``null``, a
    number, an object) is one ``null`` reward with its reason in ``errors``, and the others are scored. Only the
    request's shape (lists of equal length, the options) is a 422."""

    prompts: list[Any]
    completions: list[Any]
    baselines: Optional[list[Any]] = None
    pairing: Optional[Literal["group", "halves"]] = None
    group_size: Optional[StrictInt] = Field(default=None, ge=1)
    group_mode: Literal["round-robin", "anchor"] = "round-robin"
    transform: TransformName = "logodds"
    parse_templates: StrictBool = True
    objectives: Objectives = None
    aggregate: AggregateName = None
    normalize: NormalizeName = None

    @model_validator(mode="after")
    def _lengths(self) -> RewardsRequest:
        same_length(self, "prompts", "completions", "baselines")
        return self


class RewardsResponse(BaseModel):
    """``rewards[i]``: what ``RewardFunction`` returns for completion ``i`` (``None``: not scored), ``errors[i]``
    why it is ``None`` (else ``None``), and ``stats`` this call's share of the model's counters (integers, but
    ``seconds``; a merged model call's counters are shared between its requests by input count)."""

    rewards: list[Optional[float]]
    errors: list[Optional[str]]
    stats: RewardStats


def call_reward_function(model: RewardModel, body: RewardsRequest, calibration: Optional[RewardScale] = None
                         ) -> RewardsResponse:
    """What ``/v1/rewards`` answers, computed on ``model`` (a view, whose ``stats`` count this request only):
    ``ValueError`` for options the batch does not fit (e.g. groups that do not split). ``calibration`` is the
    server's (``serve --calibration``), for ``normalize="stats"``."""
    function = RewardFunction(model, baseline_column="baselines" if body.baselines is not None else None,
                              pairing=body.pairing, group_size=body.group_size, group_mode=body.group_mode,
                              transform=body.transform, parse_templates=body.parse_templates,
                              objectives=body.objectives, aggregate=body.aggregate, normalize=body.normalize,
                              calibration=calibration if body.normalize == "stats" else None)
    columns = {"baselines": body.baselines} if body.baselines is not None else {}
    values, errors = function.rewards_with_reasons(body.prompts, body.completions, **columns)
    return RewardsResponse(rewards=values, errors=errors, stats=dataclasses.replace(model.stats))


async def run(engine: RewardEngine, body: RewardsRequest, endpoint: str) -> RewardsResponse:
    """Answer ``body`` on ``engine``, counting its unscored samples under ``endpoint`` (the HTTP path, or the Ray
    deployment handle's label)."""
    answer = await engine.run(lambda model: call_reward_function(model, body, engine.calibration))
    engine.metrics.unscored.labels(endpoint).inc(sum(r is None for r in answer.rewards))
    return answer


async def handler(served: Served, body: RewardsRequest) -> RewardsResponse:
    return await run(served.ready(), body, PATH)


ROUTE = Route(PATH, ("POST",), handler, RewardsRequest, RewardsResponse)

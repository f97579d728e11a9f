"""OpenRLHF's ``POST /get_reward`` (its ``--remote_rm_url``): ``query[i]`` is the policy's prompt+response token ids
decoded with their special tokens; the reward of its response, as in-process scoring gives it."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, StrictStr, model_validator

from ...backends.base import RewardModel
from ..routing import Route, Served
from .fields import RequestBody, same_length
from .queries import score_outputs, split_queries

PATH = "/get_reward"


class GetRewardRequest(RequestBody):
    """``query[i]``: the policy's prompt+response decoded with special tokens; ``labels[i]``, when a string, is the
    reference a pairwise model compares against. ``prompts`` (the prompt as the policy saw it) locates the response
    in an untemplated query. Other fields are ignored, as OpenRLHF's own server ignores them."""

    model_config = ConfigDict(extra="ignore")

    query: list[StrictStr]
    prompts: Optional[list[Any]] = None
    labels: Optional[list[Any]] = None

    @model_validator(mode="after")
    def _lengths(self) -> GetRewardRequest:
        same_length(self, "query", "prompts", "labels")
        return self


class GetRewardResponse(BaseModel):
    """What OpenRLHF reads: ``rewards`` (and the same numbers as ``scores``), one per query: a scalar model's
    score, a pairwise model's ``logodds(P(response better than labels[i]))``; ``extra_logs`` is empty."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, Any]


def get_reward(model: RewardModel, body: GetRewardRequest) -> GetRewardResponse:
    """What ``/get_reward`` answers, computed on ``model`` (a view): ``ValueError`` naming ``query[i]`` (or
    ``labels[i]``, ``prompts[i]``) for a query it cannot score."""
    values = score_outputs(model, split_queries(model, body.query, body.prompts, body.labels, "query", "labels"))
    return GetRewardResponse(rewards=values, scores=values, extra_logs={})


async def handler(served: Served, body: GetRewardRequest) -> GetRewardResponse:
    return await served.ready().run(lambda model: get_reward(model, body))


ROUTE = Route(PATH, ("POST",), handler, GetRewardRequest, GetRewardResponse)

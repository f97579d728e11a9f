"""``POST /v1/compare``: ``P(completions_a[i] better than completions_b[i])``; for a scalar model, the
Bradley-Terry probability of its two scores, ``sigmoid(r_a - r_b)``."""

from __future__ import annotations

from pydantic import BaseModel, model_validator

from ...backends.base import RewardModel
from ...pairwise import preferences
from ..routing import Route, Served
from .fields import StrictBody, Text, same_length

PATH = "/v1/compare"


class CompareRequest(StrictBody):
    """Prompts and two completions of each to compare."""

    prompts: list[Text]
    completions_a: list[Text]
    completions_b: list[Text]

    @model_validator(mode="after")
    def _lengths(self) -> CompareRequest:
        same_length(self, "prompts", "completions_a", "completions_b")
        return self


class CompareResponse(BaseModel):
    """``probabilities[i]``: ``P(completions_a[i] better than completions_b[i])``, in [0, 1]."""

    probabilities: list[float]


def compare(model: RewardModel, body: CompareRequest) -> CompareResponse:
    """What ``/v1/compare`` answers, computed on ``model`` (a view): ``ValueError`` for input it cannot score."""
    return CompareResponse(probabilities=preferences(model, body.prompts, body.completions_a, body.completions_b))


async def handler(served: Served, body: CompareRequest) -> CompareResponse:
    return await served.ready().run(lambda model: compare(model, body))


ROUTE = Route(PATH, ("POST",), handler, CompareRequest, CompareResponse)

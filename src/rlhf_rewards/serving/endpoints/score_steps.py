"""``POST /v1/score_steps``: a process reward model's ``score_steps_samples``: per completion its step rewards, or
the reason it has none."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, model_validator

from ...backends.base import RewardModel
from ...errors import SampleError
from ..routing import Route, Served
from .fields import Completion, StrictBody, Text, same_length

PATH = "/v1/score_steps"


class ScoreStepsRequest(StrictBody):
    """Prompts (text or message lists) and one completion each: text, split into steps by the model's
    ``step_separator``, or an explicit list of step strings."""

    prompts: list[Text]
    completions: list[Completion]

    @model_validator(mode="after")
    def _lengths(self) -> ScoreStepsRequest:
        same_length(self, "prompts", "completions")
        return self


class ScoreStepsResponse(BaseModel):
    """``steps[i]``: the step rewards of ``completions[i]`` (each in [0, 1], the model's probability that the step
    is correct, in step order), or ``None`` with the reason in ``errors[i]`` (else ``None``)."""

    steps: list[Optional[list[float]]]
    errors: list[Optional[str]]


def score_steps(model: RewardModel, body: ScoreStepsRequest) -> ScoreStepsResponse:
    """What ``/v1/score_steps`` answers, computed on ``model`` (a view): ``ValueError`` (a 422) for a model that
    is not a process reward model or a request wrong as a whole."""
    if model.kind != "process":
        raise ValueError(f"/v1/score_steps needs a process reward model; {model.preset.name} is a {model.kind} "
                         "model (use /v1/score)")
    results = model.score_steps_samples(body.prompts, body.completions)  # type: ignore[attr-defined]
    return ScoreStepsResponse(steps=[None if isinstance(r, SampleError) else r for r in results],
                              errors=[str(r) if isinstance(r, SampleError) else None for r in results])


async def handler(served: Served, body: ScoreStepsRequest) -> ScoreStepsResponse:
    return await served.ready().run(lambda model: score_steps(model, body))


ROUTE = Route(PATH, ("POST",), handler, ScoreStepsRequest, ScoreStepsResponse)

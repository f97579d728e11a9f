"""vLLM's ``POST /classify``, as verl's reward loop calls it: ``input`` is a conversation rendered with a chat
template, its last assistant turn the response; verl reads ``data[-1]["probs"][-1]``, the reward."""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr, model_validator

from ...backends.base import RewardModel
from ...transforms import sigmoid
from ..routing import Route, Served
from .fields import RequestBody
from .queries import score_outputs, split_queries

PATH = "/classify"


class ClassifyRequest(RequestBody):
    """vLLM's ``POST /classify`` as verl's reward loop sends it: ``input`` rendered with a chat template, the last
    turn the response. ``activation`` / ``use_activation`` (vLLM's two spellings, default on) apply the sigmoid of
    a one-label classifier to the reward. ``labels`` (not part of vLLM's contract) gives a pairwise model its
    reference response(s). Other vLLM fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[StrictStr] = None
    input: Union[StrictStr, list[StrictStr]]
    activation: Optional[StrictBool] = None
    use_activation: Optional[StrictBool] = None
    labels: Optional[Union[StrictStr, list[Any]]] = None

    def inputs(self) -> list[str]:
        """``input`` as a list (vLLM takes one string or a list)."""
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def references(self) -> Optional[list[Any]]:
        """``labels`` as one per input (one string is the reference of a single input)."""
        if self.labels is None or not isinstance(self.labels, str):
            return self.labels
        return [self.labels]

    def columns(self) -> dict[str, list[Any]]:
        refs = self.references()
        return {"input": self.inputs(), **({"labels": refs} if refs is not None else {})}

    @model_validator(mode="after")
    def _lengths(self) -> ClassifyRequest:
        refs = self.references()
        if refs is not None and len(refs) != len(self.inputs()):
            raise ValueError(f"length mismatch: {len(self.inputs())} inputs, {len(refs)} labels")
        return self


class ClassifyData(BaseModel):
    """One input's answer: ``probs`` holds its one number (the reward, or its sigmoid with activation on)."""

    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyUsage(BaseModel):
    """Tokens the model read for the request (``completion_tokens`` is always 0: nothing is generated)."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int


class ClassifyResponse(BaseModel):
    """vLLM's classification answer: ``data[i]`` for ``input[i]``, in order."""

    id: str
    object: str
    created: int
    model: str
    data: list[ClassifyData]
    usage: ClassifyUsage


def classify(model: RewardModel, body: ClassifyRequest, *, model_id: str, label: str) -> ClassifyResponse:
    """What ``/classify`` answers, computed on ``model`` (a view, whose ``stats`` count this request's tokens):
    ``ValueError`` naming ``input[i]`` (or ``labels[i]``) for an input it cannot score. ``model_id`` and ``label``
    are what the answer reports as the model and its one class."""
    values = score_outputs(model, split_queries(model, body.inputs(), None, body.references(), "input", "labels"))
    tokens = model.stats.real_tokens
    activation = body.use_activation if body.use_activation is not None else body.activation
    if activation is None or activation:
        values = [sigmoid(v) for v in values]  # vLLM's activation for a one-label classifier
    return ClassifyResponse(
        id=f"classify-{uuid.uuid4().hex}", object="list", created=int(time.time()), model=model_id,
        data=[ClassifyData(index=i, label=label, probs=[v], num_classes=1) for i, v in enumerate(values)],
        usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens, completion_tokens=0))


async def handler(served: Served, body: ClassifyRequest) -> ClassifyResponse:
    engine = served.ready()
    model_id, label = engine.model_id, engine.label()
    return await engine.run(lambda model: classify(model, body, model_id=model_id, label=label))


ROUTE = Route(PATH, ("POST",), handler, ClassifyRequest, ClassifyResponse)

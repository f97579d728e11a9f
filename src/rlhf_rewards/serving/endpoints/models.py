"""The routes about the server itself: ``GET``/``HEAD /health`` (open without the API key), ``GET /v1/models``
(the model and the limits clients shard by) and ``GET /metrics`` (Prometheus text)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from fastapi.responses import Response
from pydantic import BaseModel

from ..engine import RewardEngine
from ..middleware import error_response
from ..routing import Route, Served
from ..settings import ServerSettings

HEALTH_PATH = "/health"
MODELS_PATH = "/v1/models"
METRICS_PATH = "/metrics"


class HealthResponse(BaseModel):
    """``{"status": "ok"}`` once the model is loaded (before: 503 ``{"detail": "loading"}``)."""

    status: Literal["ok"]


class RequestLimits(BaseModel):
    """What one request may carry, so that clients shard to it. An item is what the queue counts: one model input
    of a scalar model (a completion, a baseline), one comparison (both orders) of a pairwise model.

    Attributes:
        max_queue: items that may wait for the model at once (``--max-queue``).
        max_request_items: the most items (and samples) one request may bring (``--max-request-items``).
        max_request_bytes: the largest body read, in bytes (``--max-request-mb``).
        max_sample_chars: the most characters of one sample, all its fields together (``--max-sample-chars``).
    """

    max_queue: int
    max_request_items: int
    max_request_bytes: int
    max_sample_chars: int


class Normalization(BaseModel):
    """What ``normalize=`` can use on this server: ``modes`` (``"group"`` always; ``"stats"`` with statistics), and
    ``stats``: the mean and sample std ``"stats"`` divides by, where they come from (``serve --calibration``, which
    takes precedence, else the checkpoint config's OpenRLHF ``mean``/``std``), the model and preset they were
    measured on, and the reward they describe (requests for another reward get a 422); ``None`` without any."""

    modes: list[str]
    stats: Optional[dict[str, Any]]


class ModelCard(BaseModel):
    """The served model: ``id`` (the name clients see), its preset and kind (``"scalar"``/``"pairwise"``), device,
    weights' dtype (``None`` when unknown), token limit per input, the request limits, and what reward
    normalisation can use."""

    id: str
    object: str
    preset: str
    kind: str
    device: str
    dtype: Optional[str]
    max_length: int
    limits: RequestLimits
    normalization: Normalization


class ModelList(BaseModel):
    """vLLM's and OpenAI's model list, with the one served model."""

    object: str
    data: list[ModelCard]


def request_limits(engine: RewardEngine, settings: ServerSettings) -> RequestLimits:
    """The limits of requests to ``engine`` behind an app with ``settings``."""
    return RequestLimits(max_queue=engine.max_queue, max_request_items=engine.max_request_items,
                         max_request_bytes=settings.max_request_bytes, max_sample_chars=settings.max_sample_chars)


def model_card(engine: RewardEngine, settings: ServerSettings) -> ModelCard:
    """The ``/v1/models`` entry of ``engine``."""
    return ModelCard(**engine.describe(), limits=request_limits(engine, settings))


async def health(served: Served, body: None) -> HealthResponse | Response:
    if served.engine is None:
        return error_response(503, "loading")
    return HealthResponse(status="ok")


async def models(served: Served, body: None) -> ModelList:
    return ModelList(object="list", data=[model_card(served.ready(), served.settings)])


async def metrics(served: Served, body: None) -> Response:
    content, media_type = served.ready().metrics.render()
    return Response(content, media_type=media_type)


ROUTES = (Route(HEALTH_PATH, ("GET", "HEAD"), health, None, HealthResponse),
          Route(MODELS_PATH, ("GET",), models, None, ModelList),
          Route(METRICS_PATH, ("GET",), metrics, None, None))

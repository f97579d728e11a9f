"""The FastAPI app around a :class:`~rlhf_rewards.serving.engine.RewardEngine`: routes, auth, limits, errors.

:func:`build_app` is the factory; it does not start a server, so the same app runs under ``uvicorn`` (``rlhf-rewards
serve``) or inside a Ray Serve replica (``@serve.ingress(build_app(engine, settings))``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from ..transforms import sigmoid
from . import contracts, limits
from .batcher import QueueFull, RequestTooLarge
from .engine import RewardEngine
from .middleware import GuardMiddleware, HTTPError, error_response
from .schemas import ClassifyRequest, CompareRequest, GetRewardRequest, RewardsRequest, ScoreRequest

logger = logging.getLogger(__name__)

B = TypeVar("B", bound=BaseModel)

OPEN_PATHS = frozenset({"/health"})
"""Paths served without the API key (load balancers and orchestrators probe them)."""

CLIENT_GONE = 499
"""The status recorded (in ``requests_total``) for a request whose client disconnected before its answer."""


@dataclass(frozen=True)
class ServerSettings:
    """What the app (and :func:`~rlhf_rewards.serving.serve`'s uvicorn) enforces in front of the engine. Every
    value is checked when the settings are made (``ValueError`` naming it).

    Attributes:
        api_key: when set, every path but ``/health`` needs ``Authorization: Bearer <api_key>`` (else 401; the
            scheme is case-insensitive).
        max_request_mb: bodies larger than this many MiB get 413 before they are read into memory or parsed. It
            also bounds a request's characters (each takes at least one byte of JSON).
        max_sample_chars: characters one sample may hold, all its fields at one index together (prompt, messages,
            completion, baseline; query, prompt, label; input, label); beyond it the request gets 413. It bounds
            the tokens made before truncation, and the memory one sample's tokenization takes.
        body_timeout_s: seconds the whole body may take to arrive after the request's headers; slower uploads get
            408 and their connection is closed.
        header_timeout_s: seconds a connection may stay open without completing a request's headers (a new
            connection, or one after its last answer); it is then closed. Applied by :func:`serve` (uvicorn);
            under Ray Serve its proxy has its own.
        shutdown_timeout_s: after SIGTERM, seconds requests in flight may take to finish; the rest are cancelled
            and the server exits. Applied by :func:`serve`.
        retry_after_s: the ``Retry-After`` sent with 503 (queue full, model not loaded yet).
    """

    api_key: Optional[str] = None
    max_request_mb: float = 32.0
    max_sample_chars: int = 1_000_000
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    shutdown_timeout_s: float = 30.0
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string (or None for no key)")
        for name in ("max_request_mb", "body_timeout_s", "header_timeout_s", "shutdown_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_mb={self.max_request_mb!r} allows no byte at all")
        for name, low in (("max_sample_chars", 1), ("retry_after_s", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

    @property
    def max_request_bytes(self) -> int:
        """``max_request_mb`` in bytes."""
        return int(self.max_request_mb * 1024 * 1024)


class _State:
    def __init__(self, engine: Optional[RewardEngine], settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.routes: frozenset[str] = frozenset()


def build_app(engine: Optional[RewardEngine], settings: Optional[ServerSettings] = None) -> FastAPI:
    """The reward-model server as an ASGI app (FastAPI).

    Args:
        engine: the loaded model and its batcher; ``None`` while the model is still loading (``/health`` answers
            503 and scoring routes 503 with ``Retry-After`` until :func:`set_engine` installs it).
        settings: API key, limits, timeouts (see :class:`ServerSettings`).

    Routes: ``GET``/``HEAD /health``, ``GET /v1/models``, ``POST /v1/score``, ``/v1/compare``, ``/v1/rewards``,
    ``/get_reward`` (OpenRLHF), ``/classify`` (vLLM's contract, as verl calls it), ``GET /metrics`` (Prometheus).
    The app starts nothing at import or build time: the engine's batcher starts on the first request, on whatever
    event loop serves it.
    """
    settings = settings or ServerSettings()
    state = _State(engine, settings)
    app = FastAPI(title="rlhf-rewards", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.rlhf_rewards = state

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, err: HTTPError):
        return error_response(err.status, err.detail, err.headers, **err.fields)

    def ready_engine() -> RewardEngine:
        if state.engine is None:
            raise HTTPError(503, "the reward model is still loading", {"Retry-After": str(settings.retry_after_s)})
        return state.engine

    async def handle(request: Request, schema: type[B], endpoint: str,
                     work: Callable[[RewardEngine, B], Awaitable[Any]]) -> Any:
        engine = ready_engine()
        body = await _parse(request, schema)
        limits.check(body, max_request_items=engine.max_request_items, max_sample_chars=settings.max_sample_chars)
        try:
            answer = await _unless_disconnected(request, work(engine, body))
        except QueueFull as err:
            raise HTTPError(503, str(err), {"Retry-After": str(settings.retry_after_s)}) from None
        except RequestTooLarge as err:
            raise HTTPError(413, str(err), limit=err.limit, max=err.maximum, count=err.count) from None
        except ValueError as err:
            raise HTTPError(422, str(err)) from None
        except HTTPError:
            raise
        except Exception as err:  # noqa: BLE001 - a bad request must never be a 500 or kill the worker
            logger.exception("%s failed", endpoint)
            raise HTTPError(503, f"the server could not score this request ({type(err).__name__}); retry",
                            {"Retry-After": str(settings.retry_after_s)}) from None
        engine.metrics.samples.labels(endpoint).inc(limits.samples(body))
        return answer

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if state.engine is None:
            return error_response(503, "loading")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        engine = ready_engine()
        return {"object": "list", "data": [{**engine.describe(), "limits": request_limits(engine, settings)}]}

    @app.get("/metrics")
    async def metrics():
        content, media_type = ready_engine().metrics.render()
        return Response(content, media_type=media_type)

    @app.post("/v1/score")
    async def score(request: Request):
        async def work(engine: RewardEngine, body: ScoreRequest):
            return {"rewards": await engine.run(lambda m: contracts.score(m, body))}
        return await handle(request, ScoreRequest, "/v1/score", work)

    @app.post("/v1/compare")
    async def compare(request: Request):
        async def work(engine: RewardEngine, body: CompareRequest):
            return {"probabilities": await engine.run(lambda m: contracts.compare(m, body))}
        return await handle(request, CompareRequest, "/v1/compare", work)

    @app.post("/v1/rewards")
    async def rewards(request: Request):
        async def work(engine: RewardEngine, body: RewardsRequest):
            result = await engine.run(lambda m: contracts.rewards(m, body))
            engine.metrics.unscored.labels("/v1/rewards").inc(sum(r is None for r in result.rewards))
            return {"rewards": result.rewards, "errors": result.errors, "stats": result.stats}
        return await handle(request, RewardsRequest, "/v1/rewards", work)

    @app.post("/get_reward")
    async def get_reward(request: Request):
        async def work(engine: RewardEngine, body: GetRewardRequest):
            def run(m):
                located = contracts.locate(m, body.query, body.prompts, body.labels, "query", "labels")
                return contracts.score_located(m, located)

            values = await engine.run(run)
            return {"rewards": values, "scores": values, "extra_logs": {}}
        return await handle(request, GetRewardRequest, "/get_reward", work)

    @app.post("/classify")
    async def classify(request: Request):
        async def work(engine: RewardEngine, body: ClassifyRequest):
            def run(m):
                located = contracts.locate(m, body.inputs(), None, body.references(), "input", "labels")
                values = contracts.score_located(m, located)
                return values, m.stats.real_tokens

            values, tokens = await engine.run(run)
            activation = body.use_activation if body.use_activation is not None else body.activation
            if activation is None or activation:
                values = [sigmoid(v) for v in values]  # vLLM's activation for a one-label classifier
            label = engine.label()
            return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                    "model": engine.model_id,
                    "data": [{"index": i, "label": label, "probs": [v], "num_classes": 1}
                             for i, v in enumerate(values)],
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}
        return await handle(request, ClassifyRequest, "/classify", work)

    state.routes = frozenset(route.path for route in app.routes)
    app.add_middleware(GuardMiddleware, state=state, open_paths=OPEN_PATHS)
    return app


def request_limits(engine: RewardEngine, settings: ServerSettings) -> dict[str, int]:
    """The ``limits`` of a ``/v1/models`` entry, what clients shard by: ``max_queue``, items that may wait for the
    model at once; ``max_request_items``, the most items (and samples) one request may bring; ``max_request_bytes``,
    the largest body read; ``max_sample_chars``, the most characters of one sample, all its fields together. An item
    is what the queue counts: one model input of a scalar model (a completion, a baseline), one comparison (both
    orders) of a pairwise model."""
    return {"max_queue": engine.batcher.max_queue, "max_request_items": engine.max_request_items,
            "max_request_bytes": settings.max_request_bytes, "max_sample_chars": settings.max_sample_chars}


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``, unless the client disconnects first: then cancel it (the engine drops the request's queued
    inputs) and answer :data:`CLIENT_GONE` (nobody reads it; the metrics do)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is stopping: the request's work is abandoned too
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: its failure no longer matters to anyone
        raise HTTPError(CLIENT_GONE, "the client disconnected; the request's queued work was dropped")
    return task.result()


async def _disconnect(request: Request) -> None:
    """Return when the client disconnects (after the body, an ASGI server's next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def set_engine(app: FastAPI, engine: RewardEngine) -> None:
    """Install the engine once the model has loaded (for an app built with ``engine=None``)."""
    app.state.rlhf_rewards.engine = engine


def get_engine(app: FastAPI) -> Optional[RewardEngine]:
    """The engine behind ``app`` (``None`` while loading)."""
    return app.state.rlhf_rewards.engine


async def _parse(request: Request, schema: type[B]) -> B:
    """Read and validate the body: 400 for bytes that are not JSON (or not UTF-8, or nested past the parser's
    depth), 422 naming field and index for JSON of the wrong shape."""
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise HTTPError(CLIENT_GONE, "the client disconnected before sending the whole body") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise HTTPError(400, f"the body is not valid JSON: {type(err).__name__}: {str(err)[:200]}") from None
    try:  # JSON's \ud800-style escapes can smuggle in lone surrogates, which no tokenizer accepts
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise HTTPError(400, f"the body is not valid JSON: a string holds a lone surrogate at {err.start}") from None
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise HTTPError(422, [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                               for e in err.errors(include_url=False, include_input=False)]) from None
    except RecursionError:
        raise HTTPError(400, "the body is nested too deeply") from None

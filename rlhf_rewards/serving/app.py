"""The FastAPI app around a :class:`~rlhf_rewards.serving.engine.RewardEngine`: routes, auth, limits, errors.

:func:`build_app` is the factory; it does not start a server, so the same app runs under ``uvicorn`` (``rlhf-rewards
serve``) or inside a Ray Serve replica (``@serve.ingress(build_app(engine, settings))``).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from ..transforms import sigmoid
from . import contracts
from .batcher import QueueFull
from .engine import RewardEngine
from .schemas import ClassifyRequest, CompareRequest, GetRewardRequest, RewardsRequest, ScoreRequest

logger = logging.getLogger(__name__)

B = TypeVar("B", bound=BaseModel)

OPEN_PATHS = frozenset({"/health"})
"""Paths served without the API key (load balancers and orchestrators probe them)."""


@dataclass(frozen=True)
class ServerSettings:
    """What the app enforces in front of the engine.

    Attributes:
        api_key: when set, every path but ``/health`` needs ``Authorization: Bearer <api_key>`` (else 401).
        max_request_mb: bodies larger than this get 413 before they are read into memory or parsed.
        retry_after_s: the ``Retry-After`` sent with 503 (queue full, model not loaded yet).
    """

    api_key: Optional[str] = None
    max_request_mb: float = 32.0
    retry_after_s: int = 1

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)


class _HTTPError(Exception):
    def __init__(self, status: int, detail: Any, headers: Optional[dict[str, str]] = None):
        self.status, self.detail, self.headers = status, detail, headers


class _LimitsMiddleware:
    """Pure ASGI: API key, body size (413 from Content-Length, or as soon as a streamed body passes the limit),
    and the per-request metrics, before any route code runs."""

    def __init__(self, app, state: "_State"):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root + "/"):  # under a mount or a Ray Serve route prefix: the app's own path
            path = path[len(root):]
        start = time.perf_counter()
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted, path)
        finally:
            engine = self.state.engine
            if engine is not None:
                endpoint = path if path in self.state.routes else "other"
                engine.metrics.requests.labels(endpoint, str(status["code"])).inc()
                engine.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)

    async def _guarded(self, scope, receive, send, path):
        settings = self.state.settings
        headers = {k.lower(): v for k, v in scope["headers"]}
        if settings.api_key is not None and path not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            expected = b"Bearer " + settings.api_key.encode()
            if not hmac.compare_digest(given, expected):
                return await _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                    {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        limit = settings.max_request_bytes
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _error(413, f"request body over the server's limit of {limit} bytes")(scope, receive, send)
        seen = 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _HTTPError(413, f"request body over the server's limit of {limit} bytes")
            return message

        engine = self.state.engine
        if engine is None or scope["method"] != "POST":
            return await self.app(scope, receive_limited, send)
        with engine.request():
            await self.app(scope, receive_limited, send)


def _error(status: int, detail: Any, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


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
        settings: API key, body limit (see :class:`ServerSettings`).

    Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/score``, ``/v1/compare``, ``/v1/rewards``,
    ``/get_reward`` (OpenRLHF), ``/classify`` (vLLM's contract, as verl calls it), ``GET /metrics`` (Prometheus).
    The app starts nothing at import or build time: the engine's batcher starts on the first request, on whatever
    event loop serves it.
    """
    settings = settings or ServerSettings()
    state = _State(engine, settings)
    app = FastAPI(title="rlhf-rewards", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.rlhf_rewards = state

    @app.exception_handler(_HTTPError)
    async def _http_error(request: Request, err: _HTTPError):
        return _error(err.status, err.detail, err.headers)

    def ready_engine() -> RewardEngine:
        if state.engine is None:
            raise _HTTPError(503, "the reward model is still loading", {"Retry-After": str(settings.retry_after_s)})
        return state.engine

    async def handle(request: Request, schema: type[B], endpoint: str,
                     work: Callable[[RewardEngine, B], Awaitable[Any]]) -> Any:
        engine = ready_engine()
        body = await _parse(request, schema)
        try:
            return await work(engine, body)
        except QueueFull as err:
            raise _HTTPError(503, str(err), {"Retry-After": str(settings.retry_after_s)}) from None
        except ValueError as err:
            raise _HTTPError(422, str(err)) from None
        except _HTTPError:
            raise
        except Exception as err:  # noqa: BLE001 - a bad request must never be a 500 or kill the worker
            logger.exception("%s failed", endpoint)
            raise _HTTPError(503, f"the server could not score this request ({type(err).__name__}); retry",
                             {"Retry-After": str(settings.retry_after_s)}) from None

    @app.get("/health")
    async def health():
        if state.engine is None:
            return _error(503, "loading")
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
            engine.metrics.samples.labels("/v1/score").inc(len(body.prompts))
            return {"rewards": await engine.run(lambda m: contracts.score(m, body))}
        return await handle(request, ScoreRequest, "/v1/score", work)

    @app.post("/v1/compare")
    async def compare(request: Request):
        async def work(engine: RewardEngine, body: CompareRequest):
            engine.metrics.samples.labels("/v1/compare").inc(len(body.prompts))
            return {"probabilities": await engine.run(lambda m: contracts.compare(m, body))}
        return await handle(request, CompareRequest, "/v1/compare", work)

    @app.post("/v1/rewards")
    async def rewards(request: Request):
        async def work(engine: RewardEngine, body: RewardsRequest):
            engine.metrics.samples.labels("/v1/rewards").inc(len(body.prompts))
            result = await engine.run(lambda m: contracts.rewards(m, body))
            engine.metrics.unscored.labels("/v1/rewards").inc(sum(r is None for r in result.rewards))
            return {"rewards": result.rewards, "errors": result.errors, "stats": result.stats}
        return await handle(request, RewardsRequest, "/v1/rewards", work)

    @app.post("/get_reward")
    async def get_reward(request: Request):
        async def work(engine: RewardEngine, body: GetRewardRequest):
            engine.metrics.samples.labels("/get_reward").inc(len(body.query))

            def run(m):
                located = contracts.locate(m, body.query, body.prompts, body.labels, "query", "labels")
                return contracts.score_located(m, located)

            values = await engine.run(run)
            return {"rewards": values, "scores": values, "extra_logs": {}}
        return await handle(request, GetRewardRequest, "/get_reward", work)

    @app.post("/classify")
    async def classify(request: Request):
        async def work(engine: RewardEngine, body: ClassifyRequest):
            texts = body.inputs()
            engine.metrics.samples.labels("/classify").inc(len(texts))

            def run(m):
                located = contracts.locate(m, texts, None, body.references(), "input", "labels")
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
                    "usage": {"prompt_tokens": round(tokens), "total_tokens": round(tokens),
                              "completion_tokens": 0}}
        return await handle(request, ClassifyRequest, "/classify", work)

    state.routes = frozenset(route.path for route in app.routes)
    app.add_middleware(_LimitsMiddleware, state=state)
    return app


def request_limits(engine: RewardEngine, settings: ServerSettings) -> dict[str, int]:
    """The ``limits`` of a ``/v1/models`` entry, what clients shard by: ``max_queue``, items that may wait for the
    model at once; ``max_request_items``, the most items one request may bring; ``max_request_bytes``, the largest
    body read. An item is what the queue counts: one model input of a scalar model (a completion, a baseline), one
    comparison (both orders) of a pairwise model."""
    return {"max_queue": engine.batcher.max_queue, "max_request_items": engine.batcher.max_queue,
            "max_request_bytes": settings.max_request_bytes}


def set_engine(app: FastAPI, engine: RewardEngine) -> None:
    """Install the engine once the model has loaded (for an app built with ``engine=None``)."""
    app.state.rlhf_rewards.engine = engine


def get_engine(app: FastAPI) -> Optional[RewardEngine]:
    """The engine behind ``app`` (``None`` while loading)."""
    return app.state.rlhf_rewards.engine


async def _parse(request: Request, schema: type[B]) -> B:
    """Read and validate the body: 400 for bytes that are not JSON (or not UTF-8, or nested past the parser's
    depth), 422 naming field and index for JSON of the wrong shape."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise _HTTPError(400, f"the body is not valid JSON: {type(err).__name__}: {str(err)[:200]}") from None
    try:  # JSON's \ud800-style escapes can smuggle in lone surrogates, which no tokenizer accepts
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise _HTTPError(400, f"the body is not valid JSON: a string holds a lone surrogate at {err.start}") from None
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise _HTTPError(422, [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                               for e in err.errors(include_url=False, include_input=False)]) from None
    except RecursionError:
        raise _HTTPError(400, "the body is nested too deeply") from None

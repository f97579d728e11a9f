"""The HTTP plumbing every endpoint shares: a :class:`Route` (one row of the route table), the app's state
(:class:`Served`), and what runs around an endpoint's handler: reading and validating the body, the per-request
limits, dropping the work of a client that disconnected, mapping errors to statuses, and the samples metric.

Endpoints (:mod:`rlhf_rewards.serving.endpoints`) hold no HTTP: their handlers take the app's state and a validated
body and return their typed response model; this module turns it into JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from . import limits
from .batcher import QueueFull, RequestTooLarge
from .endpoints.fields import RequestBody
from .engine import RewardEngine
from .middleware import HTTPError
from .settings import ServerSettings

logger = logging.getLogger(__name__)

CLIENT_GONE = 499
"""The status recorded (in ``requests_total``) for a request whose client disconnected before its answer."""


class Served:
    """The app's state, which handlers and the middleware read: the engine (``None`` while the model loads), the
    settings, and the paths of the app's routes (the metrics count other paths as ``"other"``)."""

    def __init__(self, engine: Optional[RewardEngine], settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.routes: frozenset[str] = frozenset()

    def ready(self) -> RewardEngine:
        """The engine, or the 503 (with ``Retry-After``) of a model still loading."""
        if self.engine is None:
            raise HTTPError(503, "the reward model is still loading",
                            {"Retry-After": str(self.settings.retry_after_s)})
        return self.engine


Handler = Callable[[Served, Any], Awaitable[Union[BaseModel, Response]]]
"""``handler(served, body)``: ``body`` is the validated request model (``None`` for a route without one); returns
the route's response model, or a ready :class:`~fastapi.responses.Response` (non-JSON content, an error body)."""


@dataclass(frozen=True)
class Route:
    """One row of the route table.

    Attributes:
        path: the URL path (``"/v1/score"``); also the ``endpoint`` label of the metrics.
        methods: the HTTP methods served (``("POST",)``).
        handler: see :data:`Handler`. A ``ValueError`` it raises is the request's fault (422 with its message);
            any other failure is a 503 with ``Retry-After``, never a 500.
        request_model: the body's model; ``None`` for routes that read no body (``GET``).
        response_model: the model of a 200 answer; ``None`` when the answer is not JSON (``/metrics``).
    """

    path: str
    methods: tuple[str, ...]
    handler: Handler
    request_model: Optional[type[RequestBody]]
    response_model: Optional[type[BaseModel]]


def add_route(app: FastAPI, served: Served, route: Route) -> None:
    """Serve ``route`` on ``app``: a body route through :func:`handle`, its answer serialised as JSON."""
    async def endpoint(request: Request) -> Response:
        if route.request_model is None:
            answer = await route.handler(served, None)
        else:
            answer = await handle(request, served, route)
        if isinstance(answer, Response):
            return answer
        if route.response_model is None or not isinstance(answer, route.response_model):
            raise TypeError(f"{route.path} answered a {type(answer).__name__}, not its {route.response_model}")
        return JSONResponse(answer.model_dump())

    app.add_api_route(route.path, endpoint, methods=list(route.methods), response_model=None)


async def handle(request: Request, served: Served, route: Route) -> Any:
    """Run ``route``'s handler on the request's validated body, within the server's limits: 400/422 for a body
    that is not JSON or not the route's model, 413 over a limit, 503 + ``Retry-After`` for a full queue or a
    failure that is not the request's fault, :data:`CLIENT_GONE` when the client disconnects first."""
    engine = served.ready()
    settings = served.settings
    body = await _parse(request, route.request_model)
    fields = body.columns()
    limits.check(fields, max_request_items=engine.max_request_items, max_sample_chars=settings.max_sample_chars)
    try:
        answer = await _unless_disconnected(request, route.handler(served, body))
    except QueueFull as err:
        raise HTTPError(503, str(err), {"Retry-After": str(settings.retry_after_s)}) from None
    except RequestTooLarge as err:
        raise HTTPError(413, str(err), limit=err.limit, max=err.maximum, count=err.count) from None
    except ValueError as err:
        raise HTTPError(422, str(err)) from None
    except HTTPError:
        raise
    except Exception as err:  # noqa: BLE001 - a bad request must never be a 500 or kill the worker
        logger.exception("%s failed", route.path)
        raise HTTPError(503, f"the server could not score this request ({type(err).__name__}); retry",
                        {"Retry-After": str(settings.retry_after_s)}) from None
    engine.metrics.samples.labels(route.path).inc(limits.samples(fields))
    return answer


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


async def _parse(request: Request, schema: type[RequestBody]) -> RequestBody:
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

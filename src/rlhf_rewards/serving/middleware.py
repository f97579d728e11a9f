"""What the server checks before any route code runs (pure ASGI): the API key, the body's size and how long it may
take to arrive, and the per-request metrics. Also the error type and JSON error body every route shares."""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Any, Optional

from fastapi.responses import JSONResponse

CLOSE = {"Connection": "close"}
"""Sent with errors raised while the body is still arriving: the rest of it is never read, so the connection
cannot carry another request."""


class HTTPError(Exception):
    """An error answer: ``status``, ``detail`` (the message) and ``fields`` (more JSON members, e.g. the limit a
    413 is about: ``{"limit": "max_request_items", "max": 4096, "count": 7936}``)."""

    def __init__(self, status: int, detail: Any, headers: Optional[dict[str, str]] = None, **fields: Any):
        super().__init__(detail)
        self.status, self.detail, self.headers, self.fields = status, detail, headers, fields


def error_response(status: int, detail: Any, headers: Optional[dict[str, str]] = None, **fields: Any
                   ) -> JSONResponse:
    """The JSON body of every error: ``{"detail": ..., **fields}``."""
    return JSONResponse({"detail": detail, **fields}, status_code=status, headers=headers)


def too_large(limit: int, length: Optional[int]) -> HTTPError:
    """The 413 of a body over ``max_request_bytes`` (``length``: its Content-Length, when the client sent one)."""
    return HTTPError(413, f"request body over the server's limit of {limit} bytes (max_request_bytes; "
                          "--max-request-mb): send fewer samples per request", CLOSE,
                     limit="max_request_bytes", max=limit, count=length)


def bearer_token(header: bytes) -> Optional[bytes]:
    """The credentials of an ``Authorization: Bearer <token>`` header (the scheme is case-insensitive, RFC 7235),
    or ``None`` for another scheme or none."""
    scheme, _, token = header.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


class GuardMiddleware:
    """API key (every path but ``open_paths``), body size (413 from Content-Length, or as soon as a streamed body
    passes the limit), body deadline (408 when the whole body has not arrived ``body_timeout_s`` after the
    headers), and the request metrics.

    ``state`` is the app's state (:class:`~rlhf_rewards.serving.routing.Served`): ``settings``, ``engine`` (or
    ``None`` while loading) and ``routes`` (paths counted under their own name in the metrics; others as
    ``"other"``).
    """

    def __init__(self, app, state, open_paths: frozenset[str]):
        self.app = app
        self.state = state
        self.open_paths = open_paths

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

        endpoint = path if path in self.state.routes else "other"
        engine = self.state.engine
        if engine is None:
            return await self._guarded(scope, receive, send_counted, path)
        metrics = engine.metrics
        metrics.in_progress.labels(endpoint).inc()
        try:
            await self._guarded(scope, receive, send_counted, path)
        finally:
            metrics.in_progress.labels(endpoint).dec()
            metrics.requests.labels(endpoint, str(status["code"])).inc()
            metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)

    async def _guarded(self, scope, receive, send, path):
        settings = self.state.settings
        headers = {k.lower(): v for k, v in scope["headers"]}
        if settings.api_key is not None and path not in self.open_paths:
            given = bearer_token(headers.get(b"authorization", b"")) or b""
            if not hmac.compare_digest(given, settings.api_key.encode()):
                return await error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                            {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        limit = settings.max_request_bytes
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            err = too_large(limit, int(length) if length.isdigit() else None)
            return await error_response(err.status, err.detail, err.headers, **err.fields)(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.body_timeout_s
        seen = 0
        body_done = False

        async def receive_guarded():
            nonlocal seen, body_done
            if body_done:  # after the body only a disconnect can come: waiting for it is not a slow upload
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPError(408, f"the request body did not arrive within {settings.body_timeout_s:g} s "
                                     "(body_timeout_s; --body-timeout)", CLOSE, limit="body_timeout_s",
                                max=settings.body_timeout_s) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(limit, None)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        engine = self.state.engine
        if engine is None or scope["method"] != "POST":
            return await self.app(scope, receive_guarded, send)
        with engine.request():
            await self.app(scope, receive_guarded, send)

"""Running the app with uvicorn: the model loads behind a live ``/health`` (503 until ready); connections that
never complete a request are closed; SIGTERM drains in-flight requests for a bounded time and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import threading
from typing import Callable, Optional

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .app import build_app, get_engine, set_engine
from .engine import RewardEngine
from .settings import ServerSettings

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process would die with -15 even
    though every in-flight request was answered; a drained stop is the intended outcome, so exit normally."""

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            self._captured_signals.remove(sig)


class _NoQueryStrings(logging.Filter):
    """No route reads a query string, but a client may put a secret there (``?api_key=...``): the access log
    shows the path only."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) > 2 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?<query hidden>", *args[3:])
        return True


def _timed_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection that has not completed a request's headers within
    ``header_timeout_s`` of opening or of its last answer (uvicorn itself waits forever for a first request, and
    for a request whose headers trickle in)."""

    class TimedProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        _header_timer: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            if self.transport.is_closing():
                return
            waiting_after = self.cycle  # the request answered last (None: none yet)

            def expire() -> None:
                current = self.cycle  # a new request whose headers completed is a new cycle: it is no stall
                if current is waiting_after and (current is None or current.response_complete) \
                        and not self.transport.is_closing():
                    self.transport.close()

            self._header_timer = self.loop.call_later(header_timeout_s, expire)

    return TimedProtocol


def uvicorn_config(app, settings: ServerSettings, *, host: str, port: int, log_level: str = "info",
                   lifespan: str = "on") -> uvicorn.Config:
    """The uvicorn configuration :func:`serve` runs ``app`` with: ``settings``' header timeout and shutdown grace
    period, and an access log without query strings."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan=lifespan,
                            http=_timed_protocol(settings.header_timeout_s),
                            timeout_graceful_shutdown=settings.shutdown_timeout_s)  # type: ignore[arg-type]
    access = logging.getLogger("uvicorn.access")  # configured by uvicorn.Config, which keeps filters
    if not any(isinstance(f, _NoQueryStrings) for f in access.filters):
        access.addFilter(_NoQueryStrings())
    return config


def check_host(host: str, settings: ServerSettings) -> None:
    """Refuse (``ValueError``) a non-loopback ``host`` without an API key in ``settings``."""
    if not is_loopback(host) and not settings.api_key:
        raise ValueError(f"refusing to listen on {host}: other machines could use the reward model without "
                         "credentials. Give an API key (--api-key-file or RLHF_REWARDS_API_KEY) or bind 127.0.0.1")


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (``ValueError`` saying why it cannot be): bound before the model loads, so
    a wrong or busy address fails at once."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int from 0 to 65535, got {port!r}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port}: {err}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def serve(load: Callable[[], RewardEngine], *, host: str = "127.0.0.1", port: int = 8000,
          settings: Optional[ServerSettings] = None, log_level: str = "info") -> int:
    """Serve until SIGTERM/SIGINT and return the exit code (0 after a graceful stop, 1 if the model failed to load).

    ``load`` builds the engine (loads the model); it runs on a thread while the server already answers ``/health``
    with 503. Raises ``ValueError`` before anything loads for a non-loopback ``host`` without an API key in
    ``settings``, or an address that cannot be bound. After SIGTERM, requests in flight get
    ``settings.shutdown_timeout_s`` to finish; the rest are cancelled (their clients see the connection close).
    """
    settings = settings or ServerSettings()
    check_host(host, settings)
    sock = listen(host, port)
    failed = threading.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()

        def load_then_install():
            try:
                engine = load()
            except Exception:  # noqa: BLE001 - reported, and the server stops with exit code 1
                logger.exception("the reward model failed to load")
                failed.set()
                server.should_exit = True
                return
            loop.call_soon_threadsafe(set_engine, app, engine)
            logger.info("reward model ready: %s", engine.describe())

        loader = threading.Thread(target=load_then_install, name="rlhf-rewards-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            engine = get_engine(app)
            if engine is not None:
                await engine.close()

    app = build_app(None, settings)
    app.router.lifespan_context = lifespan
    server = _Server(uvicorn_config(app, settings, host=host, port=port, log_level=log_level))
    with sock:
        server.run(sockets=[sock])
    return 1 if failed.is_set() else 0

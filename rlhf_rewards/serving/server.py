"""Running the app with uvicorn: the model loads behind a live ``/health`` (503 until ready), SIGTERM drains
in-flight requests and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import threading
from typing import Callable, Optional

import uvicorn

from .app import ServerSettings, build_app, get_engine, set_engine
from .engine import RewardEngine

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


def serve(load: Callable[[], RewardEngine], *, host: str = "127.0.0.1", port: int = 8000,
          settings: Optional[ServerSettings] = None, log_level: str = "info") -> int:
    """Serve until SIGTERM/SIGINT and return the exit code (0 after a graceful stop, 1 if the model failed to load).

    ``load`` builds the engine (loads the model); it runs on a thread while the server already answers ``/health``
    with 503. Refuses a non-loopback ``host`` without an API key in ``settings``.
    """
    settings = settings or ServerSettings()
    if not is_loopback(host) and not settings.api_key:
        raise ValueError(f"refusing to listen on {host}: other machines could use the reward model without "
                         "credentials. Give an API key (--api-key-file or RLHF_REWARDS_API_KEY) or bind 127.0.0.1")
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
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
    server.run()
    return 1 if failed.is_set() else 0

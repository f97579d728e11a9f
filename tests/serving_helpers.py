"""Loopback servers for the serving tests: in-process on a thread (fast, shares loaded models) or as a
``python -m rlhf_rewards serve`` subprocess (for signals and kills). Always stopped by their context managers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Optional

import httpx
import uvicorn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 60
"""Seconds any wait in the serving tests is bounded by; reaching it fails the test."""


def until(condition: Callable[[], bool], what: str) -> None:
    """Bounded polling of server or client state (not a sleep standing in for synchronisation)."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_unread(url: str, path: str, body: dict) -> socket.socket:
    """Send a JSON ``POST path`` to the server at ``url`` on a raw connection and return it unread: the caller
    closes it to disconnect mid-request."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=WAIT)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), len(payload), payload))
    return sock


class ServerThread:
    """``with ServerThread(app) as url:`` serves ``app`` with uvicorn on 127.0.0.1 in a thread; with ``settings``,
    configured as ``rlhf-rewards serve`` configures uvicorn (header timeout, shutdown grace period)."""

    def __init__(self, app, port: Optional[int] = None, settings=None, log_level: str = "warning"):
        from rlhf_rewards.serving.server import uvicorn_config

        self.app = app
        self.port = port or free_port()
        if settings is None:
            config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level=log_level, lifespan="off")
        else:
            config = uvicorn_config(app, settings, host="127.0.0.1", port=self.port, log_level=log_level,
                                    lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "test server did not stop"


class ServerProcess:
    """``rlhf-rewards serve`` in a subprocess on a free loopback port; killed on exit if still running."""

    def __init__(self, model_path: str, preset: str, *args: str, port: Optional[int] = None):
        self.port = port or free_port()
        env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.cmd = [sys.executable, "-m", "rlhf_rewards", "serve", model_path, "--preset", preset, "--device", "cpu",
                    "--port", str(self.port), "--log-level", "warning", *args]
        self.env = env
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def wait_ready(self, timeout: float = 300) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __enter__(self) -> "ServerProcess":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.kill()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()


class StalledServer:
    """A TCP listener that accepts connections and never answers: a server stuck mid-request. ``held`` lists the
    connections it accepted, :meth:`requests` what each asked. With ``hold``, a connection is closed unanswered
    after that many seconds, so a client with no timeout of its own fails instead of hanging the test."""

    def __init__(self, hold: Optional[float] = None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.hold = hold
        self.held: list[socket.socket] = []
        self._accepted_at: list[float] = []
        self._asked: dict[int, str] = {}  # request lines of the connections already closed
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.held.append(conn)
                self._accepted_at.append(time.monotonic())
            except OSError:
                pass
            if self.hold is None:
                continue
            for i, conn in enumerate(self.held):
                if i not in self._asked and time.monotonic() - self._accepted_at[i] > self.hold:
                    self._asked[i] = self._request_line(conn)
                    conn.close()

    @staticmethod
    def _request_line(conn: socket.socket) -> str:
        try:
            data = conn.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:  # nothing sent yet
            data = b""
        return data.split(b"\r\n", 1)[0].decode("latin-1")

    def requests(self) -> list[str]:
        """The request line each connection sent (``"GET /v1/models HTTP/1.1"``; ``""`` for one that sent
        nothing), in the order they were accepted; complete once the server is stopped."""
        return [self._asked[i] if i in self._asked else self._request_line(conn)
                for i, conn in enumerate(list(self.held))]

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.setblocking(False)
        while True:  # connections the client made that the thread had not accepted yet count too
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                break
        for i, conn in enumerate(self.held):
            self._asked.setdefault(i, self._request_line(conn))
            conn.close()
        self.sock.close()


class GatedModel:
    """Wraps a :class:`~rlhf_rewards.serving.RewardEngine`'s model call: records the texts of every call, and
    holds the first call until :meth:`release` (so requests pile up behind it in a known state)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.forward = engine.batcher._run
        self.calls: list[list[str]] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        engine.batcher._run = self

    def __call__(self, items: list[Any]):
        self.calls.append([str(item) for item in items])
        if len(self.calls) == 1:
            self.started.set()
            assert self.gate.wait(WAIT), "the test never released the model"
        return self.forward(items)

    def release(self) -> None:
        self.gate.set()

    def calls_with(self, marker: str) -> list[int]:
        """Indexes of the calls that held a text containing ``marker``."""
        return [i for i, texts in enumerate(self.calls) if any(marker in t for t in texts)]

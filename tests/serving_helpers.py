"""Loopback servers for the serving tests: in-process on a thread (fast, shares loaded models) or as a
``python -m rlhf_rewards serve`` subprocess (for signals and kills). Always stopped by their context managers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

import httpx
import uvicorn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """A TCP listener that accepts connections and never answers: a server stuck mid-request."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
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
            except OSError:
                continue

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for conn in self.held:
            conn.close()
        self.sock.close()

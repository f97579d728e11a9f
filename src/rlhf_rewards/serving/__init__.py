"""``rlhf-rewards serve``: reward models behind HTTP, with the contracts RL frameworks already call, batching
concurrent requests into shared forward passes. Needs the ``serve`` extra (``pip install "rlhf-rewards[serve]"``).

- :class:`RewardEngine`: one loaded model plus the cross-request batcher (one per process / Ray replica).
- :func:`build_app`: the FastAPI app around an engine and :class:`ServerSettings` (no server started).
- :func:`serve`: run the app with uvicorn, graceful on SIGTERM (exit code 0).
- :class:`RemoteRewardFunction` / :class:`AsyncRemoteRewardFunction`: TRL reward functions scoring through servers.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {"RewardEngine": "engine", "ServerSettings": "settings", "build_app": "app", "get_engine": "app",
            "set_engine": "app", "serve": "server", "RemoteRewardFunction": "client",
            "AsyncRemoteRewardFunction": "client"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # imported on use: the client needs only httpx, the server fastapi/uvicorn/prometheus-client
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)

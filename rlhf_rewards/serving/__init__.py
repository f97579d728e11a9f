"""``rlhf-rewards serve``: reward models behind HTTP, with the contracts RL frameworks already call, batching
concurrent requests into shared forward passes. Needs the ``serve`` extra (``pip install "rlhf-rewards[serve]"``).

- :class:`RewardEngine`: one loaded model plus the cross-request batcher (one per process / Ray replica).
- :func:`build_app`: the FastAPI app around an engine and :class:`ServerSettings` (no server started).
- :func:`serve`: run the app with uvicorn, graceful on SIGTERM (exit code 0).
- :class:`RemoteRewardFunction` / :class:`AsyncRemoteRewardFunction`: TRL reward functions scoring through servers.
"""

from .app import ServerSettings, build_app, get_engine, set_engine
from .engine import RewardEngine

__all__ = ["RewardEngine", "ServerSettings", "build_app", "get_engine", "set_engine"]

""":class:`RayRewardFunction` / :class:`AsyncRayRewardFunction`: TRL reward functions that score through a Ray
Serve deployment's handle (:func:`rlhf_rewards.serving.ray.deploy`), inside the cluster, with no HTTP hop.

They are :class:`~rlhf_rewards.serving.client.RemoteRewardFunction` with the handle as transport: the same options,
the same sharding (groups and online-DPO pairs kept whole), the same retries with backoff and jitter, the same
``None`` for samples not scored before the deadline, the same metrics.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional, Union

from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from .batcher import QueueFull
from .client import AsyncRemoteRewardFunction, RemoteRewardFunction
from .dispatch import Failure, Fatal
from .sharding import ServerLimits, Shard

_HANDLE = "http://ray-serve-deployment-handle"
"""What stands in :class:`AsyncRemoteRewardFunction`'s URL list: one entry per shard, all sent to the handle."""


class AsyncRayRewardFunction(AsyncRemoteRewardFunction):
    """An async TRL reward function scored by a Ray Serve deployment through its handle. Same arguments and results
    as :class:`RayRewardFunction`."""

    def __init__(self, handle: DeploymentHandle, *, shards: int = 1, **options: Any):
        if not isinstance(handle, DeploymentHandle):
            raise TypeError(f"handle must be a Ray Serve DeploymentHandle (deploy(...).handle), got "
                            f"{type(handle).__name__}")
        if shards < 1:
            raise ValueError(f"shards must be at least 1, got {shards}")
        options.setdefault("name", "reward_ray")
        super().__init__([_HANDLE] * shards, **options)
        self.handle = handle

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.__name__}, app={self.handle.app_name!r}, "
                f"deployment={self.handle.deployment_name!r}, shards={len(self.urls)})")

    async def _probe(self, client: Any, url: str, timeout: float) -> Union[ServerLimits, Failure]:
        """What a replica takes per request (its ``models``), or why the handle did not say."""
        response = self.handle.models.remote()
        try:
            return ServerLimits.parse(await asyncio.wait_for(response, timeout))
        except Exception as err:  # noqa: BLE001 - a lost replica, a timeout: probe again later
            response.cancel()
            return Failure(f"{self.handle.deployment_name}: {type(err).__name__}: {err}")

    async def _attempt(self, client: Any, shard: Shard, url: str, body: dict[str, Any], timeout: float,
                       limits: ServerLimits) -> Optional[Failure]:
        """One try through the handle (Ray Serve's router picks the replica); see the HTTP client's ``_attempt``."""
        response = self.handle.rewards.remote(body)
        try:
            data = await asyncio.wait_for(response, timeout)
            rewards = data["rewards"]
            if len(rewards) != len(shard.indices):
                raise RuntimeError(f"{len(rewards)} rewards for {len(shard.indices)} samples")
            shard.rewards, shard.errors, shard.stats = rewards, data["errors"], data["stats"]
            shard.url = f"replica {data['replica']} of {self.handle.app_name}"  # names it in the reasons logged
            return None
        except RayTaskError as err:
            if isinstance(err.cause, QueueFull):
                return Failure(f"the replica is busy: {err.cause}", alive=True)
            if isinstance(err.cause, ValueError):
                # the replica refused the request itself (options the model cannot use, groups not whole):
                # in-process this is RewardFunction's ValueError, and no retry can fix it
                raise Fatal(422, f"{self.handle.deployment_name}: {err.cause}") from None
            return Failure(f"the replica failed: {type(err.cause).__name__}: {err.cause}")
        except Exception as err:  # noqa: BLE001 - a lost replica, a timeout: retry
            response.cancel()
            return Failure(f"{type(err).__name__}: {err}")


class RayRewardFunction(AsyncRayRewardFunction, RemoteRewardFunction):
    """A TRL reward function (``reward_funcs=[...]``) scored by a Ray Serve deployment of a reward model, through
    its handle: inside the cluster, no HTTP, no API key.

    It returns exactly what :class:`~rlhf_rewards.RewardFunction` with the same options returns in-process (one
    float per completion, ``None`` for a sample that could not be scored) and retries what a lost replica, a full
    queue or a timeout failed, as :class:`~rlhf_rewards.serving.client.RemoteRewardFunction` does over HTTP.

    Args:
        handle: ``deploy(...).handle``, or ``serve.get_deployment_handle("RewardModel", app_name=...)``.
        shards: requests each call is split into (whole groups and pairs), sent concurrently; Ray Serve routes each
            to a replica. Default 1: the batch goes to one replica, which batches it with other ranks' requests.
        timeout, max_retries, deadline, backoff, max_backoff, max_shard_size, name, baseline_column, pairing,
            group_size, group_mode, transform, parse_templates, objectives, aggregate: as for
            ``RemoteRewardFunction`` (``name`` defaults to ``"reward_ray"``).

    It pickles with its handle, so it can be passed to Ray tasks and actors of the same cluster.
    """

""":class:`RemoteStepRewards`: a process reward model's step rewards from servers' ``POST /v1/score_steps``, with
the HTTP client's retries, deadline, failover and ``None`` rules (only the endpoint and its answer differ)."""

from __future__ import annotations

from typing import Any

from ..serving.client import RemoteRewardFunction
from ..serving.sharding import Shard


class RemoteStepRewards(RemoteRewardFunction):
    """Called as a reward function (``fn(prompts, completions)``), it returns per completion its step rewards (each
    in [0, 1], the model's probability that the step is correct, in step order), or ``None`` when it has none (the
    reason logged, as for :class:`~rlhf_rewards.serving.client.RemoteRewardFunction`). The completion is text,
    split into steps at the model's ``step_separator``, or a list of step strings. Takes the client's transport
    arguments (``urls``, ``api_key``, ``timeout``, ``max_retries``, ``deadline``, ...); a server whose model is not
    a process reward model refuses (``ValueError``)."""

    route = "/v1/score_steps"

    def __init__(self, urls: Any, **options: Any):
        options.setdefault("name", "step_rewards_remote")
        super().__init__(urls, **options)

    def _request_options(self) -> dict[str, Any]:
        return {}  # the endpoint takes prompts and completions only

    @staticmethod
    def _read_answer(data: Any, shard: Shard) -> None:
        steps, errors = data["steps"], data["errors"]
        if len(steps) != len(shard.indices) or len(errors) != len(steps):
            raise ValueError(f"{len(steps)} step lists for {len(shard.indices)} samples")
        if not all(s is None or (isinstance(s, list) and all(_is_number(r) for r in s)) for s in steps):
            raise ValueError("step rewards that are not lists of numbers")
        shard.rewards = [None if s is None else [float(r) for r in s] for s in steps]  # type: ignore[misc]
        shard.errors = errors
        shard.stats = {}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

"""rlhf_rewards: open reward models, scored exactly as their model cards do, as fast reward functions for TRL.

The main entry points:

- :func:`load_reward_model` loads a scalar or pairwise reward model on its own device.
- :func:`list_presets` lists the models it knows.
- :class:`RemoteRewardFunction` scores through ``rlhf-rewards serve`` servers (the ``serve`` extra).
- :func:`best_of_n` and :func:`rank` pick or order candidates; :func:`group_rewards` turns preferences within a
  group of completions into rewards.
"""

from .backends.base import PairwiseRewardModel, RewardModel, ScalarModelBase
from .backends.sample_errors import NonFiniteRewardError, TooLongError
from .conversation import SampleError
from .trainers import PPORewardAdapter, RewardFunction
from .loading import load_reward_model
from .pairwise import apply_transform, best_of_n, group_rewards, rank
from .presets import Preset, list_presets
from .stats import RewardStats

__version__ = "0.1.0"

_REMOTE = ("RemoteRewardFunction", "AsyncRemoteRewardFunction")


def __getattr__(name: str):
    # the remote reward functions need httpx (the "serve" extra); the core install stays without it
    if name in _REMOTE:
        from importlib import import_module

        try:
            client = import_module(".serving.client", __name__)
        except ImportError as err:
            raise ImportError(f"rlhf_rewards.{name} needs the 'serve' extra: pip install \"rlhf-rewards[serve]\" "
                              f"({err})") from err
        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AsyncRemoteRewardFunction",
    "NonFiniteRewardError",
    "PPORewardAdapter",
    "PairwiseRewardModel",
    "Preset",
    "RemoteRewardFunction",
    "RewardFunction",
    "RewardModel",
    "RewardStats",
    "SampleError",
    "ScalarModelBase",
    "TooLongError",
    "apply_transform",
    "best_of_n",
    "group_rewards",
    "list_presets",
    "load_reward_model",
    "rank",
]

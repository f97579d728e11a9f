"""rlhf_rewards: open reward models, scored exactly as their model cards do, as fast reward functions for TRL.

The main entry points:

- :func:`load_reward_model` loads a scalar or pairwise reward model on its own device.
- :func:`list_presets` lists the models it knows.
- :class:`RemoteRewardFunction` scores through ``rlhf-rewards serve`` servers (the ``serve`` extra).
- :func:`best_of_n` and :func:`rank` pick or order candidates; :func:`group_rewards` turns preferences within a
  group of completions into rewards.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Names are imported on first use, so `import rlhf_rewards` (and `rlhf-rewards --help`) loads neither torch nor
# transformers; each entry is the submodule that defines the name.
_EXPORTS = {
    "PairwiseRewardModel": ".backends.pairwise_base",
    "ProcessRewardModel": ".backends.process_base",
    "RewardModel": ".backends.base",
    "ScalarModelBase": ".backends.scalar_base",
    "SampleError": ".errors",
    "TooLongError": ".errors",
    "NonFiniteRewardError": ".errors",
    "PPORewardAdapter": ".trainers",
    "RewardFunction": ".trainers",
    "load_reward_model": ".loading",
    "best_of_n": ".pairwise",
    "group_rewards": ".pairwise",
    "rank": ".pairwise",
    "apply_transform": ".transforms",
    "Preset": ".presets",
    "list_presets": ".presets",
    "RewardStats": ".stats",
    # the remote reward functions need httpx (the "serve" extra); the core install stays without it
    "RemoteRewardFunction": ".serving.client",
    "AsyncRemoteRewardFunction": ".serving.client",
}

if TYPE_CHECKING:
    from .backends.base import RewardModel
    from .backends.pairwise_base import PairwiseRewardModel
    from .backends.process_base import ProcessRewardModel
    from .backends.scalar_base import ScalarModelBase
    from .errors import NonFiniteRewardError, SampleError, TooLongError
    from .loading import load_reward_model
    from .pairwise import best_of_n, group_rewards, rank
    from .presets import Preset, list_presets
    from .serving.client import AsyncRemoteRewardFunction, RemoteRewardFunction
    from .stats import RewardStats
    from .trainers import PPORewardAdapter, RewardFunction
    from .transforms import apply_transform


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        value = getattr(import_module(module, __name__), name)
    except ImportError as err:
        if module != ".serving.client":
            raise
        raise ImportError(f"rlhf_rewards.{name} needs the 'serve' extra, rlhf-rewards[serve] (in a checkout: "
                          f"pip install -e \".[serve]\") ({err})") from err
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "AsyncRemoteRewardFunction",
    "NonFiniteRewardError",
    "PPORewardAdapter",
    "PairwiseRewardModel",
    "Preset",
    "ProcessRewardModel",
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

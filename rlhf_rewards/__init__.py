"""rlhf_rewards: open reward models, scored exactly as their model cards do, as fast reward functions for TRL.

The main entry points:

- :func:`load_reward_model` loads a scalar or pairwise reward model on its own device.
- :func:`list_presets` lists the models it knows.
- :func:`best_of_n` and :func:`rank` pick or order candidates; :func:`group_rewards` turns preferences within a
  group of completions into rewards.
"""

from .backends.base import PairwiseRewardModel, RewardModel, ScalarModelBase, TooLongError
from .conversation import SampleError
from .trainers import PPORewardAdapter, RewardFunction
from .loading import load_reward_model
from .pairwise import apply_transform, best_of_n, group_rewards, rank
from .presets import Preset, list_presets
from .stats import RewardStats

__version__ = "0.1.0"

__all__ = [
    "PPORewardAdapter",
    "PairwiseRewardModel",
    "Preset",
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

"""Adapters to TRL's trainers: :class:`RewardFunction` for ``reward_funcs`` (GRPO, RLOO, online DPO and the other
callable-taking trainers) and :class:`PPORewardAdapter` for the legacy PPO ``reward_model`` contract."""

from .ppo import PPORewardAdapter
from .reward_function import Pairing, RewardFunction

__all__ = ["Pairing", "PPORewardAdapter", "RewardFunction"]

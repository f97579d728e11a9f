"""Adapters for RL frameworks that call a reward function of their own shape rather than TRL's: each one reads the
framework's arguments and scores through ``rlhf-rewards serve`` with the package's HTTP client
(:mod:`rlhf_rewards.serving.client`), so the framework's processes hold no reward model and load no torch for it.

- :mod:`rlhf_rewards.integrations.verl`: ``compute_score`` / ``async_compute_score`` for verl's reward loop
  (``custom_reward_function``); see docs/verl.md.
"""

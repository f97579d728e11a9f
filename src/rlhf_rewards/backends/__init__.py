"""Model backends: how each family of reward model is loaded and run. Which backend a model uses is preset data
(``Preset.backend``); this table maps that name to the backend's loader."""

from __future__ import annotations

from typing import Callable


def _lazy(module: str, name: str) -> Callable:
    def load(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{module}"), name)(*args, **kwargs)

    return load


LOADERS: dict[str, Callable] = {
    "sequence-classification": _lazy("scalar", "load_sequence_classifier"),
    "value-head": _lazy("scalar", "load_value_head"),
    "causal-lm-pair": _lazy("pair_pm", "load_pair_pm"),
    "pairrm": _lazy("pairrm_loading", "load_pairrm_reward_model"),
    "armorm": _lazy("armorm", "load_armorm"),
    "qwen2-prm": _lazy("qwen_prm", "load_qwen2_prm"),
    "llama-step-label-prm": _lazy("rlhflow_prm", "load_step_label_prm"),
    "math-shepherd": _lazy("math_shepherd", "load_math_shepherd"),
    "inform": _lazy("inform", "load_inform"),
    "first-token-score": _lazy("first_token", "load_first_token_model"),
}

SPLITTABLE: frozenset[str] = frozenset({"sequence-classification", "value-head", "inform", "first-token-score"})
"""Backends whose loader takes ``device_map`` (a :class:`~rlhf_rewards.backends.placement.Split`): their layers can
be spread over several devices."""

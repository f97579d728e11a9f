"""What each supported reward model needs, as data: one :class:`Preset` per model card, registered by one module per
family of cards (:mod:`.seeds`: the first four cards and their siblings; a new family adds a module, importing the
registry from :mod:`.base`, and its import at the end of this file).

A preset says which backend runs the model, which text format renders a conversation for it, where its tokenizer
comes from, how its card tokenizes, truncates and pads, which position its card reads the reward from, and token ids
that its real tokenizer must produce. A backend runs a family of architectures (a sequence classifier, a backbone with
a value head, a causal LM comparing two responses, PairRM's encoder) and reads what differs between models of that
family from the preset: a model of a known family needs only a preset here (and, if its text format is new, a
renderer in :mod:`rlhf_rewards.rendering`); a new family needs a backend implementing the per-sample protocol of
:mod:`rlhf_rewards.backends.base`.
"""

from .base import (PRESETS, GoldenIds, Kind, Preset, canonical_hub_id, check_directory_matches, get_preset,
                   list_presets, preset_for_directory, preset_for_hub_id, register, resolve_preset)

# each family's module registers its presets on import
from . import armorm, inform, math_shepherd, nemotron, qwen_prm, rlhflow_prm, seeds, skywork  # noqa: E402,F401

__all__ = ["GoldenIds", "Kind", "PRESETS", "Preset", "canonical_hub_id", "check_directory_matches", "get_preset",
           "list_presets", "preset_for_directory", "preset_for_hub_id", "register", "resolve_preset"]

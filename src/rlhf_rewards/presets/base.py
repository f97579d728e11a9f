"""The :class:`Preset` record, the registry every family module adds to, and the look-ups from a name, a hub id or a
local directory to a preset."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ..sources import check_local, read_json_file

Kind = Literal["scalar", "pairwise", "process"]


@dataclass(frozen=True)
class GoldenIds:
    """Token ids the real model's tokenizer gives for ``text``; checked at load to catch tokenizer drift.

    Only checked when the loaded tokenizer's vocabulary has ``vocab_size`` entries (``len(tokenizer)``), so the
    small tokenizers of tiny test checkpoints, trained at build time, are not held to the real vocabulary.
    """

    text: str
    ids: tuple[int, ...]
    vocab_size: int
    add_special_tokens: bool = False


@dataclass(frozen=True)
class Preset:
    """Everything model-specific about one reward model.

    Attributes:
        name: the preset's name, e.g. ``"starling-rm-34b"``.
        kind: ``"scalar"`` (a score per completion), ``"pairwise"`` (a preference between two completions) or
            ``"process"`` (a reward per step of a completion).
        hub_ids: hub repositories this preset is chosen for automatically.
        backend: which model backend runs it (see :mod:`rlhf_rewards.backends`).
        text_format: which renderer in :mod:`rlhf_rewards.rendering` builds the model's input text.
        tokenizer_source: where the tokenizer comes from when the model directory has none (the card's choice).
        add_special_tokens: whether the card's code lets the tokenizer add BOS/EOS when tokenizing the text.
        max_length: the card's token limit per input (``None``: the model's position limit).
        truncation_side: which end over-long inputs lose tokens from; ``"left"`` keeps the scored end.
        reward_position: which position's output is the reward:
            ``"last-non-pad"``: the rightmost token whose id is not the config's ``pad_token_id`` (transformers'
            sequence-classification pooling); ``"before-first-pad-id"``: one before the first occurrence of
            ``card_pad_id`` in the sequence padded to ``max_length``, wrapping to the last padded position when
            that occurrence is the first token (the Starling cards' loop); ``"before-first-config-pad"``: one before
            the first occurrence of the config's ``pad_token_id`` in the unpadded input, else (no occurrence, or at
            position 0) the last token (``argmax(input_ids == pad) - 1`` modulo the length, as INF-ORM's class
            computes it); ``"last"``: the last token.
        card_pad_id: for ``"before-first-pad-id"``: an id, or ``"first-id-of-pad-token"`` for cards that compute
            ``tokenizer(tokenizer.pad_token)["input_ids"][0]`` (which is BOS when the tokenizer adds one).
        pad_token: the token to pad with when the tokenizer has none (cards that set ``pad_token = unk_token``).
        accelerator_dtype: the card's dtype on GPU; on CPU models run in float32 unless ``dtype`` is given.
        config_architectures: ``config.json`` architectures that identify this preset for a local directory.
        config_model_types: ``config.json`` ``model_type`` values (prefixes) this preset can load; a directory of
            another type is refused before loading, naming both (empty: any).
        golden_ids: token ids the real tokenizer must give (see :class:`GoldenIds`).
        single_tokens: strings the template relies on that must each be one token in any tokenizer used.
        sentencepiece_truth: the model was trained with a sentencepiece tokenizer run on each stretch of text
            between special tokens (transformers 4's legacy Llama-family tokenizers); a tokenizer that comes with
            its ``tokenizer.model`` is compared with sentencepiece at load (see :mod:`rlhf_rewards.tokenization`).
        fallback_chat_template: for ``"chat-template"`` formats, the template to use when the tokenizer has none.
        doc: one line for ``list_presets``.
    """

    name: str
    kind: Kind
    hub_ids: tuple[str, ...]
    backend: str
    text_format: str
    tokenizer_source: Optional[str] = None
    add_special_tokens: bool = True
    max_length: Optional[int] = None
    truncation_side: Literal["left", "right"] = "left"
    reward_position: Literal["last-non-pad", "before-first-pad-id", "before-first-config-pad", "last"] = "last-non-pad"
    card_pad_id: Union[int, Literal["first-id-of-pad-token"], None] = None
    pad_token: Optional[str] = None
    accelerator_dtype: str = "bfloat16"
    config_architectures: tuple[str, ...] = ()
    config_model_types: tuple[str, ...] = ()
    golden_ids: tuple[GoldenIds, ...] = ()
    single_tokens: tuple[str, ...] = ()
    sentencepiece_truth: bool = False
    fallback_chat_template: Optional[str] = None
    doc: str = ""
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    """Add ``preset`` to :data:`PRESETS` (family modules call this at import) and return it."""
    PRESETS[preset.name] = preset
    return preset


def list_presets() -> dict[str, str]:
    """Return ``{preset name: one-line description}`` for every known preset."""
    return {name: p.doc for name, p in PRESETS.items()}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name`` (case-insensitive); raise ``ValueError`` listing the known names otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"preset must be a preset name or a Preset, got {type(name).__name__}")
    for key, preset in PRESETS.items():
        if key.lower() == name.strip().lower():
            return preset
    hub = preset_for_hub_id(name)
    hint = f" ({name!r} is the hub id of preset {hub.name!r})" if hub else ""
    raise ValueError(f"unknown preset {name!r}{hint}; known presets: {', '.join(PRESETS)}")


def preset_for_hub_id(repo_id: str) -> Optional[Preset]:
    """The preset registered for hub id ``repo_id``, compared case-insensitively as the hub compares ids."""
    wanted = repo_id.strip().lower()
    return next((p for p in PRESETS.values() for h in p.hub_ids if h.lower() == wanted), None)


def canonical_hub_id(repo_id: str) -> str:
    """``repo_id`` spelled as a preset registers it (``nexusflow/starling-rm-34b`` -> ``Nexusflow/Starling-RM-34B``),
    so the local cache, whose folder names keep the case, finds it; other ids are returned unchanged."""
    preset = preset_for_hub_id(repo_id)
    if preset is None:
        return repo_id
    return next(h for h in preset.hub_ids if h.lower() == repo_id.strip().lower())


def _read_config(name_or_path: str) -> Optional[dict]:
    config_path = os.path.join(name_or_path, "config.json")
    if not os.path.isfile(config_path):
        return None
    config = read_json_file(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds a JSON {type(config).__name__}, not an object of config fields")
    return config


def preset_for_directory(name_or_path: str) -> Optional[Preset]:
    """The preset a local directory's ``config.json`` names (``rlhf_rewards_preset``) or its architecture identifies
    (only when exactly one preset claims it); ``None`` otherwise."""
    config = _read_config(name_or_path)
    if config is None:
        return None
    hint = config.get("rlhf_rewards_preset")
    if hint:
        return get_preset(hint)
    archs = set(config.get("architectures") or ())
    matches = [p for p in PRESETS.values() if archs & set(p.config_architectures)]
    return matches[0] if len(matches) == 1 else None


def check_directory_matches(name_or_path: str, preset: Preset) -> None:
    """Refuse a local directory whose ``config.json`` holds a model type the preset cannot load, naming both and
    the preset the directory itself points to, if any."""
    config = _read_config(name_or_path)
    if config is None or not preset.config_model_types:
        return
    model_type = str(config.get("model_type", ""))
    if any(model_type.startswith(t) for t in preset.config_model_types):
        return
    archs = ", ".join(config.get("architectures") or ()) or "no architectures listed"
    found = preset_for_directory(name_or_path)
    hint = f"; this directory looks like preset {found.name!r}" if found is not None else ""
    raise ValueError(f"{name_or_path!r} holds a {model_type or 'untyped'!r} model ({archs}); preset {preset.name!r} "
                     f"loads {' / '.join(repr(t) for t in preset.config_model_types)} models{hint}")


def resolve_preset(name_or_path: str, preset: Union[str, Preset, None]) -> Preset:
    """Pick the preset for ``name_or_path``: the one given, the one registered for a hub id (case-insensitive), or
    one inferred from a local directory's ``config.json`` (only when exactly one preset claims its architecture)."""
    if isinstance(preset, Preset):
        return preset
    if preset is not None:
        return get_preset(preset)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model: expected a local directory or a hub id (a str or os.PathLike), got "
                        f"{type(name_or_path).__name__}")
    name_or_path = os.fspath(name_or_path)
    found = preset_for_hub_id(name_or_path) or preset_for_directory(os.path.expanduser(name_or_path))
    if found is not None:
        return found
    directory = check_local(name_or_path, "model")  # a path that cannot hold a model says so rather than this
    if directory is None:
        why = "it is no local directory, and no preset is registered for it as a hub id"
    else:
        config = _read_config(directory)
        why = ("its directory has no config.json" if config is None else
               f"its config.json names {', '.join(config.get('architectures') or ()) or 'no architectures'} "
               f"(model type {config.get('model_type')!r}), which no single preset claims")
    raise ValueError(f"cannot tell which preset {name_or_path!r} needs: {why}; pass preset=... "
                     f"(command line: --preset NAME), one of {', '.join(PRESETS)}")

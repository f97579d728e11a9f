"""Tiny randomly initialised checkpoints of the supported reward models, for tests and examples.

Each has its preset's real architecture at toy size (hidden size 32, 2 layers, float32), a working tokenizer and
the file layout of the real hub repository, loads offline with plain transformers or torch, and is the same bytes
for the same seed. What differs per preset is data, in :data:`TINY_CHECKPOINTS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForSequenceClassification,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from .files import update_config
from ..backends.inform import INFORMRewardModel
from ..backends.value_head import ValueHeadRewardModel
from . import skywork, tokenizers
from .llama31 import write_llama31_tokenizer

# Toy dimensions shared by every tiny model; presets override the number of key/value heads where the real model
# uses grouped-query attention.
_TOY_SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, dtype="float32")


@dataclass(frozen=True)
class TinyCheckpoint:
    """How one preset's tiny checkpoint is built.

    Attributes:
        write_tokenizer: writes the tokenizer files into the checkpoint directory; returns the tokenizer, whose
            ``len``, BOS/EOS/pad ids fill the config, or ``None`` when ``config`` states them.
        config_class: the transformers config class of the real model.
        model_class: the module whose parameter names the real checkpoint uses.
        config: config fields of the real model (besides the toy sizes), overriding the tokenizer's ids.
        weights: ``"safetensors"``: ``save_pretrained`` (``model.safetensors`` + ``config.json``);
            ``"state-dict"``: ``torch.save`` of the state dict as ``pytorch_model.bin`` + ``config.json``.
        architectures: what ``config.json`` names the architecture when the real repository says something other
            than ``model_class`` (``None``: as saved).
        preset_hint: whether ``config.json`` carries ``"rlhf_rewards_preset"``, for checkpoints whose architecture
            alone does not identify the preset.
    """

    write_tokenizer: Callable[[str], Optional[PreTrainedTokenizerBase]]
    config_class: type[PretrainedConfig]
    model_class: type[torch.nn.Module]
    config: dict[str, Any] = field(default_factory=dict)
    weights: Literal["safetensors", "state-dict"] = "safetensors"
    architectures: Optional[tuple[str, ...]] = None
    preset_hint: bool = False


TINY_CHECKPOINTS: dict[str, TinyCheckpoint] = {
    # Mistral-7B-Instruct-v0.2 with a one-label score head; [PAD] added at 32000; tokenizer files as reported.
    "ray2333-mistral-7b": TinyCheckpoint(
        write_tokenizer=tokenizers.write_ray2333_tokenizer,
        config_class=MistralConfig,
        model_class=MistralForSequenceClassification,
        config=dict(vocab_size=32001, pad_token_id=32000, bos_token_id=1, eos_token_id=2, num_labels=1,
                    max_position_embeddings=32768, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False),
    ),
    # Yi-34B-Chat backbone (Llama architecture) + v_head; the real config names LlamaForSequenceClassification.
    "starling-rm-34b": TinyCheckpoint(
        write_tokenizer=lambda path: tokenizers.write_sentencepiece_tokenizer(path, tokenizers.YI),
        config_class=LlamaConfig,
        model_class=ValueHeadRewardModel,
        config=dict(max_position_embeddings=4096, rope_theta=5e6, tie_word_embeddings=False),
        architectures=("LlamaForSequenceClassification",),
        preset_hint=True,
    ),
    # Llama-2-7b-chat backbone + v_head, shipped as a plain state dict; Llama-2 has no pad token (the card pads
    # with unk) and full multi-head attention.
    "starling-rm-7b-alpha": TinyCheckpoint(
        write_tokenizer=lambda path: tokenizers.write_sentencepiece_tokenizer(path, tokenizers.LLAMA2),
        config_class=LlamaConfig,
        model_class=ValueHeadRewardModel,
        config=dict(max_position_embeddings=4096, num_key_value_heads=4, tie_word_embeddings=False),
        weights="state-dict",
        preset_hint=True,
    ),
    # Any transformers sequence classifier with its own ChatML tokenizer.
    "sequence-classifier": TinyCheckpoint(
        write_tokenizer=tokenizers.write_chatml_bpe_tokenizer,
        config_class=LlamaConfig,
        model_class=LlamaForSequenceClassification,
        config=dict(num_labels=1, tie_word_embeddings=False),
    ),
    # Meta-Llama-3-8B-Instruct fine-tuned as a causal LM that answers "A" or "B".
    "rlhflow-pair-pm-llama3-8b": TinyCheckpoint(
        write_tokenizer=tokenizers.write_llama3_tokenizer,
        config_class=LlamaConfig,
        model_class=LlamaForCausalLM,
        config=dict(max_position_embeddings=8192, rope_theta=5e5, tie_word_embeddings=False),
        preset_hint=True,
    ),
    # Llama-3.1-70B-Instruct + INF-ORM's Linear-ReLU-Linear score head. The real config's pad_token_id could not be
    # read offline: Llama-3.1's <|finetune_right_pad_id|> stands in (the package reads the checkpoint's own value).
    "inf-orm-llama3.1-70b": TinyCheckpoint(
        write_tokenizer=write_llama31_tokenizer,
        config_class=LlamaConfig,
        model_class=INFORMRewardModel,
        config=dict(num_labels=1, pad_token_id=128004, max_position_embeddings=131072, rope_theta=5e5,
                    tie_word_embeddings=False),
        architectures=("INFORMForSequenceClassification",),
    ),
    # Llama-3.1-70B-Instruct as a causal LM whose logit of id 0 is the reward; Llama-3.1's three end ids.
    "nemotron-reward": TinyCheckpoint(
        write_tokenizer=write_llama31_tokenizer,
        config_class=LlamaConfig,
        model_class=LlamaForCausalLM,
        config=dict(eos_token_id=[128001, 128008, 128009], max_position_embeddings=131072, rope_theta=5e5,
                    tie_word_embeddings=False),
        preset_hint=True,
    ),
}


TINY_BASES: dict[str, dict[str, TinyCheckpoint]] = {}
"""For presets whose cards cover several base models (Skywork-Reward-V2 on Llama-3.1, Llama-3.2 and Qwen3): each
base's tiny checkpoint by name; :data:`TINY_CHECKPOINTS` holds the default one."""


def make_tiny_checkpoint(preset: str, path: str, *, seed: int = 0, base: Optional[str] = None) -> str:
    """Write a tiny random checkpoint of ``preset`` into directory ``path`` (created if missing) and return ``path``.

    The weights are drawn from ``seed`` without touching the global torch random state; the same preset, seed and
    library versions give the same files. ``base`` picks the base model for presets covering several
    (:data:`TINY_BASES`; default: the preset's first).

    Raises:
        ValueError: ``preset`` has no tiny checkpoint, or no base called ``base``.
    """
    if base is not None:
        bases = TINY_BASES.get(preset, {})
        if base not in bases:
            raise ValueError(f"preset {preset!r} has no tiny checkpoint on base {base!r}; known: "
                             f"{', '.join(bases) or 'none (it has one base)'}")
    if preset == "pairrm":
        # PairRM (DeBERTa-v3 + pairwise head) has its own builder module; imported only when asked for.
        from .pairrm import write_tiny_pairrm

        return write_tiny_pairrm(path, seed)
    if preset == "armorm-llama3-8b":
        # ArmoRM (Llama-3 + objective regression + gating, the hub's remote-code layout) has its own builder module.
        from .armorm import write_tiny_armorm

        return write_tiny_armorm(path, seed)
    if preset == "qwen2.5-math-prm":
        # Qwen2.5-Math-PRM (Qwen2 + two-label head, the hub's remote-code layout) has its own builder module.
        from .qwen_prm import write_tiny_qwen_prm

        return write_tiny_qwen_prm(path, seed)
    if preset == "rlhflow-prm":
        # RLHFlow's PRM (a Llama-3.1 causal LM whose "+"/"-" head rows are drawn wide) has its own builder module.
        from .rlhflow_prm import write_tiny_rlhflow_prm

        return write_tiny_rlhflow_prm(path, seed)
    if preset == "math-shepherd":
        # Math-Shepherd (a Mistral causal LM, its "+"/"-" head rows drawn wide) has its own builder module.
        from .math_shepherd import write_tiny_math_shepherd

        return write_tiny_math_shepherd(path, seed)
    try:
        spec = TINY_BASES[preset][base] if base is not None else TINY_CHECKPOINTS[preset]
    except KeyError:
        known = ", ".join([*TINY_CHECKPOINTS, "pairrm", "armorm-llama3-8b", "qwen2.5-math-prm", "rlhflow-prm",
                           "math-shepherd"])
        raise ValueError(f"no tiny checkpoint for preset {preset!r}; known: {known}") from None

    os.makedirs(path, exist_ok=True)
    tok = spec.write_tokenizer(path)
    token_ids = {} if tok is None else dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = spec.config_class(**{**_TOY_SIZE, **token_ids, **spec.config})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.model_class(config).eval()

    if spec.weights == "safetensors":
        model.save_pretrained(path)
    else:
        config.save_pretrained(path)
        torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))

    updates: dict[str, Any] = {}
    if spec.architectures is not None:
        updates["architectures"] = list(spec.architectures)
    if spec.preset_hint:
        updates["rlhf_rewards_preset"] = preset
    if updates:
        update_config(path, **updates)
    return path



def _register_bases(family: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Add a family module's checkpoints (``{preset: {base: TinyCheckpoint fields}}``, the first base the default)."""
    for name, bases in family.items():
        TINY_BASES[name] = {base: TinyCheckpoint(**fields) for base, fields in bases.items()}
        TINY_CHECKPOINTS[name] = next(iter(TINY_BASES[name].values()))


_register_bases(skywork.TINY_BASES)

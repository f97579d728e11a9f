"""A tiny Math-Shepherd checkpoint in the hub repository's layout: ``config.json`` naming ``MistralForCausalLM``
(Mistral-7B v0.1's ids, position limit and sliding window), safetensors with transformers' weight names, and
Mistral-7B's real tokenizer (``tokenizer.model`` from ``mistral-common``, a ``LlamaTokenizer`` config, no pad token, no
chat template, no ``tokenizer.json``), so the real vocabulary's ids (648 "+", 387 "-", 12902 "▁ки") are the card's."""

from __future__ import annotations

import os

import torch
from transformers import MistralConfig, MistralForCausalLM

from .files import update_config
from .tokenizers import write_mistral_tokenizer

PRESET = "math-shepherd"
MISTRAL_V01_CONFIG = dict(vocab_size=32000, bos_token_id=1, eos_token_id=2, max_position_embeddings=32768,
                          rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=4096, tie_word_embeddings=False)
GOOD_BAD_IDS = (648, 387)


def write_tiny_math_shepherd(path: str, seed: int = 0) -> str:
    """Write a tiny random Math-Shepherd into directory ``path`` and return ``path``. The LM-head rows of "+" and "-"
    are drawn (from ``seed``) large enough that step rewards spread over (0, 1) rather than sit at 0.5, so reading a
    wrong position changes them well beyond float noise. ``config.json`` carries ``"rlhf_rewards_preset"``: the
    generic ``MistralForCausalLM`` does not identify the preset."""
    os.makedirs(path, exist_ok=True)
    write_mistral_tokenizer(path)
    config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, dtype="float32", **MISTRAL_V01_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MistralForCausalLM(config).eval()
        with torch.no_grad():
            rows = model.lm_head.weight[list(GOOD_BAD_IDS)]
            model.lm_head.weight[list(GOOD_BAD_IDS)] = torch.randn_like(rows) * 0.6 / config.hidden_size ** 0.5
    model.save_pretrained(path)
    update_config(path, rlhf_rewards_preset=PRESET)
    return path

"""A tiny ArmoRM checkpoint in the hub repository's layout: ``config.json`` naming ``LlamaForRewardModelWithGating``
with its ``auto_map`` and gating keys, safetensors with the remote code's weight names, and Meta's Llama-3 tokenizer
with RLHFlow's ``[PAD]`` added at 128256 and Llama-3-Instruct's chat template."""

from __future__ import annotations

import os

import torch
from transformers import LlamaConfig, PreTrainedTokenizerFast

from .files import update_config
from ..backends.armorm import ArmoRMModel
from ..presets.armorm import ARMORM_OBJECTIVES
from . import tokenizers

PAD = "[PAD]"

# The real config's ArmoRM keys; the gate's width is toy-sized like the rest (the real one is 1024).
ARMORM_CONFIG = dict(num_objectives=len(ARMORM_OBJECTIVES), gating_temperature=10, gating_hidden_dim=16,
                     gating_n_hidden=3, max_position_embeddings=8192, rope_theta=5e5, tie_word_embeddings=False,
                     bos_token_id=128000, eos_token_id=128009)
AUTO_MAP = {"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"}


def write_armorm_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Meta-Llama-3's tokenizer (see :func:`tokenizers.write_llama3_tokenizer`) with ``[PAD]`` added after its
    256 special tokens as the pad token, as RLHFlow's Llama-3 reward models add it (vocabulary 128257)."""
    tok = tokenizers.write_llama3_tokenizer(path)
    tok.add_special_tokens({"pad_token": PAD})
    tokenizers._save_fast(tok, path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def write_tiny_armorm(path: str, seed: int = 0) -> str:
    """Write a tiny random ArmoRM into directory ``path`` and return ``path``. Beyond the usual initialisation, the
    gate, the regression layer, the transform matrix and ``logit_scale`` get values large enough (drawn from
    ``seed``) that reading a wrong position or skipping a step changes the score well beyond float noise."""
    os.makedirs(path, exist_ok=True)
    tok = write_armorm_tokenizer(path)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, dtype="float32", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         **ARMORM_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ArmoRMModel(config).eval()
        n = model.num_objectives
        with torch.no_grad():
            model.regression_layer.weight.normal_(0.0, 0.5)
            for layer in model.gating.layers:
                layer.weight.normal_(0.0, 2.0 / layer.in_features ** 0.5)
                layer.bias.normal_(0.0, 1.0)
            model.reward_transform_matrix.copy_(torch.eye(n) + 0.3 * torch.randn(n, n))
            model.gating.logit_scale.fill_(1.7)
    model.save_pretrained(path)
    update_config(path, architectures=["LlamaForRewardModelWithGating"], auto_map=AUTO_MAP)
    return path

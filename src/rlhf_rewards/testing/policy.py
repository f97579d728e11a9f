"""A tiny policy for tests and examples: a randomly initialised Llama causal LM with a ChatML tokenizer, small
enough that TRL's GRPO, RLOO and online-DPO trainers run an optimisation step on the CPU in well under a second."""

from __future__ import annotations

import os

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from .tokenizers import write_chatml_bpe_tokenizer


def make_tiny_policy(path: str, seed: int = 0) -> str:
    """Write a tiny policy into directory ``path`` (created if missing) and return ``path``.

    The model is a ``LlamaForCausalLM`` (hidden size 32, 2 layers, float32) whose weights are drawn from ``seed``
    without touching the global torch random state. Its tokenizer is a byte-level BPE (about 400 tokens) with a ChatML
    chat template, ``<|im_end|>`` as EOS and ``<|endoftext|>`` as pad token, as Qwen-style instruct models have.
    Everything loads offline with ``from_pretrained(path)``.
    """
    os.makedirs(path, exist_ok=True)
    tok = write_chatml_bpe_tokenizer(path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False, dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    return path

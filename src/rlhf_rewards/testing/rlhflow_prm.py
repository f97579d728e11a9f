"""A tiny RLHFlow Llama3.1-8B-PRM checkpoint in the hub repository's layout: ``config.json`` (``LlamaForCausalLM``,
Llama-3.1's ids and three end-of-turn ids), ``model.safetensors`` with transformers' Llama weight names, and Meta's
Llama-3.1 tokenizer and chat template (:func:`~rlhf_rewards.testing.llama31.write_llama31_tokenizer`)."""

from __future__ import annotations

import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .llama31 import write_llama31_tokenizer

GOOD_ID, BAD_ID = 10, 12  # "+" and "-" in Llama-3's vocabulary


# a question's first step, and later steps: the user turns of the probe conversation
_PROBE = ("Sue has 6 white and 12 pink flamingos. How many more pink than white? Pink: 12.", "White: 6.", "12 - 6 = 6.",
          "The answer is 6.", "", "Check: 6 + 6 = 12.")


def write_tiny_rlhflow_prm(path: str, seed: int = 0) -> str:
    """Write a tiny random RLHFlow PRM into directory ``path`` and return ``path``.

    A random 2-layer model's hidden state where a reward is read is mostly that of the token there (always the
    ``\\n\\n`` after an assistant header), so random "+"/"-" rows would give every step nearly the same reward. The
    rows are drawn (from ``seed``) so that their difference is orthogonal to the mean hidden state at those positions
    of a probe conversation and spreads its logit difference there to a standard deviation of 0.7: step rewards vary
    over (0, 1) with the context, and reading a wrong position changes them well beyond float noise."""
    os.makedirs(path, exist_ok=True)
    tok = write_llama31_tokenizer(path)
    # LlamaForCausalLM alone does not tell this preset from other Llama causal LMs: config.json names it
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, dtype="float32", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=[128001, 128008, 128009], max_position_embeddings=131072, rope_theta=5e5,
                         tie_word_embeddings=False, rlhf_rewards_preset="rlhflow-prm")
    turns = [turn for step in _PROBE for turn in ({"role": "user", "content": step},
                                                  {"role": "assistant", "content": "+"})]
    ids = tok.apply_chat_template(turns, tokenize=True, return_dict=False)
    ends = [j for j, t in enumerate(ids) if t == tok.convert_tokens_to_ids("<|eot_id|>")][2::2]  # after each "+"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, [e - 2 for e in ends]]
            mean = hidden.mean(0) / hidden.mean(0).norm()
            direction = torch.randn(config.hidden_size)
            direction -= (direction @ mean) * mean
            direction *= 0.7 / (hidden @ direction).std()
            good = torch.randn(config.hidden_size) * 3.0 / config.hidden_size ** 0.5
            model.lm_head.weight[GOOD_ID] = good
            model.lm_head.weight[BAD_ID] = good - direction
    model.save_pretrained(path)
    return path

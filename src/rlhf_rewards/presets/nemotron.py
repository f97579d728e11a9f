"""NVIDIA's Llama-Nemotron-70B reward models: causal LMs whose cards read the processed score of token id 0 at the
first generated position (docs/presets/nemotron-reward.md)."""

from __future__ import annotations

from .base import GoldenIds, Preset, register
from .inform import LLAMA3_VOCAB, LLAMA31_GOLDEN_IDS

register(Preset(
    name="nemotron-reward",
    kind="scalar",
    hub_ids=("nvidia/Llama-3.1-Nemotron-70B-Reward-HF", "nvidia/Llama-3.3-Nemotron-70B-Reward",
             "nvidia/Llama-3.3-Nemotron-70B-Reward-Multilingual"),
    backend="first-token-score",
    text_format="chat-template",
    add_special_tokens=False,  # apply_chat_template(tokenize=True): the template's BOS is the only one
    max_length=None,
    reward_position="last",
    accelerator_dtype="bfloat16",
    config_model_types=("llama",),
    golden_ids=LLAMA31_GOLDEN_IDS + (
        GoldenIds("!", (0,), LLAMA3_VOCAB),  # the token whose score is the reward
        GoldenIds("Hi!", (13347, 0), LLAMA3_VOCAB),
    ),
    single_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    extra={"token_id": 0},  # the cards' scores[0][0][0]
    doc="Llama-3.1/3.3-Nemotron-70B-Reward: the score generate() gives token id 0 first, from one forward pass.",
))

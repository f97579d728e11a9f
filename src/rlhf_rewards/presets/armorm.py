"""ArmoRM (RLHFlow's Absolute-Rating Multi-Objective reward model with Mixture-of-Experts gating) on Llama-3-8B."""

from __future__ import annotations

from .base import GoldenIds, Preset, register

# The card's 19 objectives, in the order of its `attributes` list (= the regression layer's outputs).
ARMORM_OBJECTIVES = (
    "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-complexity",
    "helpsteer-verbosity", "ultrafeedback-overall_score", "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness", "ultrafeedback-honesty", "ultrafeedback-helpfulness", "beavertails-is_safe",
    "prometheus-score", "argilla-overall_quality", "argilla-judge_lm", "code-complexity", "code-style",
    "code-explanation", "code-instruction-following", "code-readability",
)

# `<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n` in Llama-3's vocabulary, as the remote code
# hard-codes it: the gate reads the hidden state at the start of its last occurrence.
ARMORM_GATING_PATTERN = (128009, 128006, 78191, 128007, 271)

_LLAMA3_VOCAB = 128256

register(Preset(
    name="armorm-llama3-8b",
    kind="scalar",
    hub_ids=("RLHFlow/ArmoRM-Llama3-8B-v0.1",),
    backend="armorm",
    text_format="chat-template",
    add_special_tokens=False,  # apply_chat_template(tokenize=True): the template writes the one BOS
    max_length=None,  # the card does not truncate; the model's 8192 positions
    truncation_side="left",  # keeps the end: the reward position and the gate's assistant header
    reward_position="last-non-pad",
    accelerator_dtype="bfloat16",
    config_architectures=("LlamaForRewardModelWithGating",),
    config_model_types=("llama",),
    # Verified against tiktoken over Meta's Llama-3 tokenizer.model (shipped in llama-models); for Llama-3's
    # vocabulary and for RLHFlow's with [PAD] added at 128256.
    golden_ids=tuple(
        GoldenIds(text, ids, vocab_size)
        for vocab_size in (_LLAMA3_VOCAB, _LLAMA3_VOCAB + 1)
        for text, ids in (
            ("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", ARMORM_GATING_PATTERN),
            ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>"
             "user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4"
             "<|eot_id|>",
             (128000, 128006, 9125, 128007, 271, 3513, 10015, 13, 128009, 128006, 882, 128007, 271, 3923, 374, 220,
              17, 10, 17, 30, 128009, 128006, 78191, 128007, 271, 19, 128009)),
            (" milyon", (107667,)),  # one vocabulary entry, taken whole as tiktoken does
        )
    ),
    single_tokens=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    doc="ArmoRM-Llama3-8B-v0.1: 19 objective rewards gated by the prompt into the card's score (native, no remote "
        "code); RewardFunction(objectives=...) weighs chosen objectives instead.",
    extra={"objective_names": ARMORM_OBJECTIVES, "gating_pattern": ARMORM_GATING_PATTERN},
))

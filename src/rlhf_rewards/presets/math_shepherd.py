"""Math-Shepherd's process reward model (peiyi9979/math-shepherd-mistral-7b-prm, 2023): Mistral-7B as a causal LM
read at the tag ``ки`` that ends every step, P("+") against "-" (docs/presets/math-shepherd.md gives the card's
procedure)."""

from __future__ import annotations

from .base import GoldenIds, Preset, register

_MISTRAL_VOCAB = 32000

register(Preset(
    name="math-shepherd",
    kind="process",
    hub_ids=("peiyi9979/math-shepherd-mistral-7b-prm",),
    backend="math-shepherd",
    text_format="math-shepherd",
    add_special_tokens=True,  # the card's tokenizer.encode: BOS first
    max_length=None,
    truncation_side="right",  # unused: a process model refuses an over-long sample rather than cut its steps
    accelerator_dtype="bfloat16",
    # the repository names the generic MistralForCausalLM: claiming it would take any Mistral LM directory for this
    # PRM, so a local directory is recognised by its hub id's cache or "rlhf_rewards_preset" (or preset=...)
    config_architectures=(),
    config_model_types=("mistral",),
    # Mistral-7B v0.1's real tokenizer.model (mistral-common's tokenizer.model.v1) run by sentencepiece, as
    # transformers 4 encoded when the model was trained and as the card ran it.
    golden_ids=(
        GoldenIds("+ -", (648, 387), _MISTRAL_VOCAB),  # the card's candidate_tokens (after its BOS)
        GoldenIds("ки", (12902,), _MISTRAL_VOCAB),  # the card's step_tag_id: the piece "▁ки"
        # a question and two tagged steps as the card builds them: the tag after a space is 12902 each time
        GoldenIds("How many eggs? Step 1: 16 - 3 = 13. ки\nStep 2: The answer is: 13 ки",
                  (1, 1602, 1287, 14636, 28804, 7268, 28705, 28740, 28747, 28705, 28740, 28784, 387, 28705, 28770,
                   327, 28705, 28740, 28770, 28723, 12902, 13, 9977, 28705, 28750, 28747, 415, 4372, 349, 28747,
                   28705, 28740, 28770, 12902), _MISTRAL_VOCAB, True),
        # a leading space (its own "▁"), a newline (byte fallback), runs of spaces, digits one by one
        GoldenIds(" Hello\n    world  123", (28705, 22557, 13, 2287, 1526, 259, 28740, 28750, 28770), _MISTRAL_VOCAB),
    ),
    single_tokens=("<s>", "</s>"),
    sentencepiece_truth=True,
    doc="Math-Shepherd (Mistral-7B PRM): each step ends with ' ки', P('+') against '-' at each tag.",
    extra=dict(
        step_tag="ки",
        step_tag_id=12902,
        good_token="+",
        bad_token="-",
        candidate_ids=(648, 387),
        step_separator="\n",
    ),
))

"""RLHFlow pair preference model (card 003) against an oracle that runs the card's own loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_rewards import load_reward_model

CARD_PLAIN_TEMPLATE = (
    "\n{% for message in messages %}{% if loop.index0 % 2 == 0 %}\n\n<turn> user\n {{ message['content'] }}"
    "{% else %}\n\n<turn> assistant\n {{ message['content'] }}{% endif %}{% endfor %}\n\n\n"
)
CARD_PROMPT_TEMPLATE = "[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \n"


def card003_prob(path, instruction, response_chosen, response_rejected, temperature=1.0):
    """Card 003's code, step by step (float32, CPU): the probability that ``response_chosen`` is better."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    tokenizer_plain = AutoTokenizer.from_pretrained(path, use_fast=True)
    tokenizer_plain.chat_template = CARD_PLAIN_TEMPLATE
    token_id_A = tokenizer.encode("A", add_special_tokens=False)
    token_id_B = tokenizer.encode("B", add_special_tokens=False)
    assert len(token_id_A) == 1 and len(token_id_B) == 1
    token_id_A, token_id_B = token_id_A[0], token_id_B[0]
    context = tokenizer_plain.apply_chat_template(instruction, tokenize=False)
    responses = [response_chosen, response_rejected]
    probs_chosen = []
    for chosen_position in [0, 1]:
        response_A = responses[chosen_position]
        response_B = responses[1 - chosen_position]
        prompt = CARD_PROMPT_TEMPLATE.format(context=context, response_A=response_A, response_B=response_B)
        message = [{"role": "user", "content": prompt}]
        input_ids = tokenizer.encode(tokenizer.apply_chat_template(message, tokenize=False).replace(
            tokenizer.bos_token, ""), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model(input_ids)
        logit_A = output.logits[0, -1, token_id_A].item()
        logit_B = output.logits[0, -1, token_id_B].item()
        Z = np.exp(logit_A / temperature) + np.exp(logit_B / temperature)
        logit_chosen = [logit_A, logit_B][chosen_position]
        probs_chosen.append(np.exp(logit_chosen / temperature) / Z)
    return float(np.mean(probs_chosen))


CASES = [
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris.", "I think it is Lyon, maybe."),
    ([{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
      {"role": "user", "content": "Another?"}], "Green.", ""),
    ([{"role": "user", "content": "Write  a\nhaiku "}], " Leaves fall\nslowly ", "no"),
]


@pytest.fixture(scope="module")
def pm(tiny_dir):
    return load_reward_model(tiny_dir("rlhflow-pair-pm-llama3-8b"), device="cpu")


def test_compare_matches_card(pm, tiny_dir):
    path = tiny_dir("rlhflow-pair-pm-llama3-8b")
    assert pm.kind == "pairwise" and pm.preset.name == "rlhflow-pair-pm-llama3-8b"
    ours = pm.compare([c for c, _, _ in CASES], [a for _, a, _ in CASES], [b for _, _, b in CASES])
    card = [card003_prob(path, c, a, b) for c, a, b in CASES]
    assert ours == pytest.approx(card, abs=1e-4)
    assert all(0.0 <= p <= 1.0 for p in ours)


def test_temperature_matches_card(tiny_dir):
    path = tiny_dir("rlhflow-pair-pm-llama3-8b")
    from rlhf_rewards.backends.pair_pm import PairPMRewardModel

    base = load_reward_model(path, device="cpu")
    hot = PairPMRewardModel(model=base.model, temperature=3.0, preset=base.preset, tokenizer=base.tokenizer,
                            device=base.device, max_length=base.max_length, max_batch_tokens=None)
    context, a, b = CASES[0]
    assert hot.compare([context], [a], [b])[0] == pytest.approx(card003_prob(path, context, a, b, 3.0), abs=1e-4)


def test_format_is_the_card_text(pm):
    first, second = pm.format("Hi", "A1", "B1")
    assert not first.startswith("<|begin_of_text|>")
    assert "[CONTEXT] \n\n<turn> user\n Hi" in first or "[CONTEXT] \n<turn> user\n Hi" in first
    assert "[RESPONSE A] A1 [RESPONSE B] B1" in first and "[RESPONSE A] B1 [RESPONSE B] A1" in second
    assert first.endswith("<|eot_id|>")


def test_compare_is_batch_invariant_and_symmetric(pm):
    contexts = [c for c, _, _ in CASES] * 2
    a = [x for _, x, _ in CASES] + ["short"] * 3
    b = [y for _, _, y in CASES] + ["a much longer response " * 20] * 3
    together = pm.compare(contexts, a, b)
    alone = [pm.compare([c], [x], [y])[0] for c, x, y in zip(contexts, a, b)]
    assert together == pytest.approx(alone, abs=1e-5)
    swapped = pm.compare(contexts, b, a)
    assert [p + q for p, q in zip(together, swapped)] == pytest.approx([1.0] * len(together), abs=1e-6)


def test_ties_and_position_consistency_stats(pm):
    pm.stats.reset()
    assert pm.compare(["q"], ["same"], ["same"]) == [0.5]
    assert pm.stats.ties == 1 and pm.stats.samples == 0  # identical strings need no forward pass
    pm.compare(["q", "q"], ["x", "y"], ["y", "x"])
    assert pm.stats.comparisons == 3
    assert 0 <= pm.stats.order_disagreements <= 2


def test_system_prompt_is_folded_into_the_first_user_turn(pm):
    with_system = pm.format([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}], "a", "b")
    folded = pm.format([{"role": "user", "content": "Be kind.\n\nHi"}], "a", "b")
    assert with_system == folded


def test_non_alternating_context_is_rejected(pm):
    with pytest.raises(ValueError, match=r"prompts\[0\].*alternate"):
        pm.compare([[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]], ["x"], ["y"])


def test_long_context_is_cut_from_the_start_and_counted(tiny_dir):
    pm_small = load_reward_model(tiny_dir("rlhflow-pair-pm-llama3-8b"), device="cpu", max_length=120)
    p = pm_small.compare(["word " * 400], ["yes"], ["no"])[0]
    assert 0.0 <= p <= 1.0
    assert pm_small.stats.truncated == 2  # both orders
    with pytest.raises(ValueError, match=r"completions_a\[0\] and completions_b\[0\]: the two responses take "
                                         r"\d+ \+ \d+ tokens.*max_length=120"):
        pm_small.compare(["q"], ["long " * 200], ["no"])


def test_scalar_baseline_score_uses_logodds(pm):
    probs = pm.compare(["q1", "q2"], ["good", "bad"], ["ref", "ref"])
    rewards = pm.score(["q1", "q2"], ["good", "bad"], baselines=["ref", "ref"])
    assert rewards == pytest.approx([np.log(p / (1 - p)) for p in probs], abs=1e-6)
    with pytest.raises(ValueError, match="baselines"):
        pm.score(["q"], ["a"])

"""Packed (padding-free) scoring: several samples in one row, each at its own position ids under a block-diagonal
mask, read at its own position. Card parity of the packed path is in test_scalar_parity.py (run with packing on and
off); here: the packed path against the padded one, batch invariance, no attention across row-mates, the plans."""

from __future__ import annotations

import pytest

from rlhf_rewards import load_reward_model
from rlhf_rewards.batching import choose_packing, plan_batches, plan_packed, run_batched

from cases import CONVERSATIONS

SCALAR_PRESETS = ["ray2333-mistral-7b", "starling-rm-34b", "starling-rm-7b-alpha", "sequence-classifier"]
PROMPTS = [p for p, _ in CONVERSATIONS] * 2
COMPLETIONS = [c for _, c in CONVERSATIONS] + [f"Answer number {i}: " + "more words " * (3 * i)
                                               for i in range(len(CONVERSATIONS))]


@pytest.fixture(scope="module", params=SCALAR_PRESETS)
def pair(request, tiny_dir):
    """``(packed, padded)`` models of one preset, with a budget small enough to need several rows and batches."""
    path = tiny_dir(request.param)
    return tuple(load_reward_model(path, preset=request.param, device="cpu", packing=packing, max_batch_tokens=160)
                 for packing in (True, False))


def test_packed_equals_padded(pair):
    packed, padded = pair
    assert packed.packing and not padded.packing
    expected = padded.score(PROMPTS, COMPLETIONS)
    packed.stats.reset()
    assert packed.score(PROMPTS, COMPLETIONS) == pytest.approx(expected, abs=1e-4)
    stats = packed.stats
    assert stats.batches < len(PROMPTS)  # rows held several samples
    assert stats.computed_tokens <= 1.25 * stats.real_tokens  # tiny inputs: one short row per batch at most


def test_packed_scores_are_batch_invariant(pair):
    packed, _ = pair
    together = packed.score(PROMPTS, COMPLETIONS)
    alone = [packed.score([p], [c])[0] for p, c in zip(PROMPTS, COMPLETIONS)]
    reversed_order = packed.score(PROMPTS[::-1], COMPLETIONS[::-1])[::-1]
    assert together == pytest.approx(alone, abs=1e-5)
    assert together == pytest.approx(reversed_order, abs=1e-5)


@pytest.mark.parametrize("preset", ["starling-rm-34b", "starling-rm-7b-alpha"])
def test_row_mates_do_not_leak_into_each_other(tiny_dir, preset):
    """A short sample shares a row with a longer row-mate (rows are as wide as the longest sample, here a third one;
    packed longest first, the short sample sits after its row-mate and would see it through a plain causal mask):
    changing the row-mate must not change the short sample's score."""
    rm = load_reward_model(tiny_dir(preset), preset=preset, device="cpu", packing=True, max_batch_tokens=4096)
    rows = []
    handle = rm.backbone.register_forward_pre_hook(lambda m, a, k: rows.append(k["input_ids"].shape[0]),
                                                   with_kwargs=True)
    long_answer = "A much longer answer that sets the width of every row, " * 8
    scores = []
    try:
        for mate in ("What is the capital of France?", "Tell me a joke about ducks, please."):
            scores.append(rm.score(["Hello!", mate, "Write a lot."], ["Hi there.", "Sure, here it is: " * 3,
                                                                     long_answer])[0])
            assert sum(rows) == 2  # three samples, two rows: the short one and its row-mate share one
            rows.clear()
    finally:
        handle.remove()
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)
    alone = rm.score(["Hello!"], ["Hi there."])[0]
    assert scores[0] == pytest.approx(alone, abs=1e-5)


def test_choice_and_reason_are_visible(tiny_dir):
    rm = load_reward_model(tiny_dir("starling-rm-34b"), device="cpu")
    assert rm.packing is False and "auto: sdpa" in rm.packing_reason  # CPU with sdpa: padded batches are faster
    assert f"packing=False ({rm.packing_reason})" in repr(rm)
    on = load_reward_model(tiny_dir("starling-rm-34b"), device="cpu", packing=True)
    assert on.packing is True
    assert "packing=True (packing=True (sdpa: a block mask); checked: packed and padded scores" in repr(on)
    with pytest.raises(ValueError, match="packing must be"):
        load_reward_model(tiny_dir("starling-rm-34b"), device="cpu", packing="yes")


def test_pairrm_refuses_packing(tiny_dir):
    with pytest.raises(ValueError, match="packing=True is not possible"):
        load_reward_model(tiny_dir("pairrm"), device="cpu", packing=True)
    assert load_reward_model(tiny_dir("pairrm"), device="cpu").packing is False


def test_flash_attention_packs_except_where_the_card_pad_cannot_be_hidden():
    pack, reason = choose_packing("auto", "flash_attention_2")
    assert pack and "variable-length" in reason
    blocker = "the card's appended pad must be hidden as a key"
    assert choose_packing("auto", "flash_attention_2", blocker) == (False, f"auto: {blocker}")
    with pytest.raises(ValueError, match="appended pad"):
        choose_packing(True, "flash_attention_2", blocker)
    assert choose_packing("auto", "sdpa")[0] is False  # a dense block mask: padded batches on the causal kernel
    assert choose_packing(True, "eager") == (True, "packing=True (eager: a block mask)")
    with pytest.raises(ValueError, match="neither packed position ids nor a block mask"):
        choose_packing(True, "flex_attention")


def test_plan_packed_fills_rows_and_keeps_the_budget():
    lengths = [300, 20, 250, 40, 50, 290, 10, 5, 100, 60]
    batches = plan_packed(lengths, max_batch_tokens=700)
    flat = sorted(i for batch in batches for row in batch for i in row)
    assert flat == list(range(len(lengths)))  # every sample once
    for batch in batches:
        fills = [sum(lengths[i] for i in row) for row in batch]
        assert max(fills) <= 300  # no row wider than the longest sample
        assert len(batch) * max(fills) <= 700
    computed = sum(len(b) * max(sum(lengths[i] for i in row) for row in b) for b in batches)
    assert computed <= 1.1 * sum(lengths)
    # a cached prefix is part of the row: it counts in the row's width
    cached = plan_packed([10, 10, 10], max_batch_tokens=1000, cached=[100, 100, 100])
    assert all(sum(110 for _ in row) <= 110 for batch in cached for row in batch)


def test_plan_batches_caps_padding_and_counts_cached_prefixes():
    lengths = [100, 98, 95, 60, 58, 30, 29, 28]
    batches = plan_batches(lengths, max_batch_tokens=10_000, max_padding=0.1)
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) * width - sum(lengths[i] for i in batch) <= 0.1 * len(batch) * width
    assert [len(b) for b in batches] == [3, 2, 3]
    assert len(plan_batches(lengths, max_batch_tokens=10_000, max_padding=None)) == 1
    # two rows of 10 new tokens on caches of 90: 200 > 150
    assert plan_batches([10, 10], max_batch_tokens=150, cached=[90, 90]) == [[0], [1]]


def _computed(lengths, plan):
    return sum(len(batch) * max(sum(lengths[i] for i in row) for row in batch) for batch in plan)


@pytest.mark.parametrize("budget", [4096, 16384, 65536])
def test_dense_packed_plan_of_a_grpo_sized_batch(budget):
    """128 mixed-length samples (the benchmark's seeded lengths): computed / real tokens at most 1.01 at the CPU's
    default budget and across the CUDA range (the old grouping under the padded batches' 10% cap gave 1.01-1.07 at
    16k-64k); every sample in exactly one row, no row wider than the longest sample, every batch within budget."""
    from benchmarks.dense_packing import mixed_lengths

    lengths = mixed_lengths(128, seed=0)
    plan = plan_packed(lengths, budget)
    assert sorted(i for batch in plan for row in batch for i in row) == list(range(128))
    for batch in plan:
        fills = [sum(lengths[i] for i in row) for row in batch]
        assert max(fills) <= max(lengths) or len(batch[0]) == 1
        assert len(batch) * max(fills) <= budget or len(batch) == 1
    assert _computed(lengths, plan) <= 1.01 * sum(lengths)


def test_run_batched_gives_packed_results_back_in_the_callers_order():
    from benchmarks.dense_packing import mixed_lengths
    from rlhf_rewards.stats import RewardStats

    lengths = mixed_lengths(64, seed=1)
    items = [f"sample {i}" for i in range(len(lengths))]
    seen = []

    def forward(rows):
        seen.append([len(row) for row in rows])
        return [item.upper() for row in rows for item in row]

    stats = RewardStats()
    out = run_batched(items, lengths, forward, max_batch_tokens=16384, stats=stats, packed=True)
    assert out == [item.upper() for item in items]
    assert stats.real_tokens == sum(lengths) and stats.computed_tokens <= 1.01 * sum(lengths)
    assert any(n > 1 for rows in seen for n in rows)  # rows held several samples

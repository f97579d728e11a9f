"""rm.stats as people read it: RewardStats.summary() says what each counter means."""

from __future__ import annotations

from rlhf_rewards.stats import RewardStats


def test_summary_of_a_scalar_model():
    text = RewardStats(samples=12, batches=3, real_tokens=300, computed_tokens=400, truncated=2,
                       truncated_tokens=57, seconds=1.234).summary()
    assert text.splitlines() == [
        "12 model inputs scored in 3 forward passes, 1.23 s",
        "tokens: 300 in the inputs, 400 computed (25% of them padding)",
        "truncated: 2 of 12 inputs were longer than the model's limit and lost 57 tokens in all",
    ]


def test_summary_explains_fewer_computed_tokens_and_pairwise_counts():
    text = RewardStats(samples=12, batches=4, real_tokens=612, computed_tokens=530, comparisons=6,
                       order_disagreements=3, ties=1, oom_splits=1).summary()
    lines = text.splitlines()
    assert lines[0].endswith("(1 batches split in two after running out of memory)")
    assert lines[1] == "tokens: 612 in the inputs, 530 computed"
    assert "ran once" in lines[2] and "prefix shared by several inputs" in lines[2]
    assert lines[3] == "truncated: none"
    assert lines[4] == ("pairwise: 6 comparisons, each run in both orders; in 3 (50%) the two orders preferred "
                        "different responses; 1 exact ties (P = 0.5)")


def test_summary_of_nothing_scored():
    assert RewardStats().summary().splitlines() == [
        "0 model inputs scored in 0 forward passes, 0.00 s", "tokens: 0 in the inputs, 0 computed (0% of them padding)",
        "truncated: none"]

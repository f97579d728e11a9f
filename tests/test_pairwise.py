"""Pairwise-to-scalar transforms, group rewards, best-of-n and ranking, on a model whose preferences are known."""

from __future__ import annotations

import math

import pytest

from rlhf_rewards import apply_transform, best_of_n, group_rewards, rank
from rlhf_rewards.transforms import LOGODDS_BOUND


class LengthJudge:
    """A pairwise model preferring longer completions: P(a > b) = sigmoid(len(a) - len(b)). Records calls."""

    kind = "pairwise"

    def __init__(self):
        self.pairs = []

    def compare(self, prompts, a, b):
        self.pairs += list(zip(a, b))
        return [1 / (1 + math.exp(-(len(x) - len(y)))) for x, y in zip(a, b)]


class LengthScorer:
    kind = "scalar"

    def score(self, prompts, completions):
        return [float(len(c)) for c in completions]


def test_transforms():
    assert apply_transform([0.5, 0.75], "probability") == [0.5, 0.75]
    assert apply_transform([0.5, 0.75, 0.0], "centered") == [0.0, 0.5, -1.0]
    lo = apply_transform([0.5, 0.75, 1.0, 0.0, 1e-12], "logodds")
    assert lo[0] == 0.0  # a tie is the midpoint
    assert lo[1] == pytest.approx(math.log(3))
    assert lo[2:] == [LOGODDS_BOUND, -LOGODDS_BOUND, -LOGODDS_BOUND]
    with pytest.raises(ValueError, match="unknown transform"):
        apply_transform([0.5], "rank")


def test_round_robin_group_rewards():
    judge = LengthJudge()
    prompts = ["p"] * 3 + ["q"] * 3
    completions = ["a", "aaa", "aa", "b", "b", "bbbb"]
    rewards = group_rewards(judge, prompts, completions, 3, transform="centered")
    s = lambda d: 2 / (1 + math.exp(-d)) - 1  # noqa: E731
    assert rewards[0] == pytest.approx((s(-2) + s(-1)) / 2)
    assert rewards[1] == pytest.approx((s(2) + s(1)) / 2)
    assert rewards[3] == pytest.approx((s(0) + s(-3)) / 2)
    assert rewards[4] == rewards[3]
    assert len(judge.pairs) == 3 + 1  # n(n-1)/2 per group over its distinct texts ("b" twice: one text)


def test_anchor_group_rewards_are_linear():
    judge = LengthJudge()
    rewards = group_rewards(judge, ["p"] * 4, ["aa", "a", "aaa", "aa"], 4, mode="anchor", transform="logodds")
    assert rewards == pytest.approx([0.0, -1.0, 1.0, 0.0])
    assert judge.pairs == [("a", "aa"), ("aaa", "aa")]  # the member equal to the anchor is a tie, not compared


def test_group_checks():
    judge = LengthJudge()
    with pytest.raises(ValueError, match="groups of group_size=4"):
        group_rewards(judge, ["p"] * 6, ["a"] * 6, 4)
    with pytest.raises(ValueError, match=r"prompts\[1\] differs from prompts\[0\]"):
        group_rewards(judge, ["p", "q"], ["a", "b"], 2)


def test_best_of_n_knockout_is_linear_and_keeps_ties():
    judge = LengthJudge()
    best = best_of_n(judge, ["p", "q"], [["a", "aaa", "aa", "aaa"], ["bb", "bb"]])
    assert best == [1, 0]  # equal lengths tie: the earlier candidate keeps its place
    assert len(judge.pairs) == 2 + 0  # one per distinct text after the first: "aaa" and "bb" come once


def test_best_of_n_scalar_and_rank():
    scorer = LengthScorer()
    assert best_of_n(scorer, ["p"], [["aa", "a", "aa"]]) == [0]
    assert rank(scorer, ["p"], [["aa", "a", "aaa"]]) == [[2, 0, 1]]
    judge = LengthJudge()
    assert rank(judge, ["p", "q"], [["aa", "a", "aaa"], ["x"]]) == [[2, 0, 1], [0]]
    assert len(judge.pairs) == 3
    with pytest.raises(ValueError, match=r"candidates\[0\]"):
        best_of_n(judge, ["p"], [[]])


def test_scalar_models_in_groups_use_bradley_terry():
    rewards = group_rewards(LengthScorer(), ["p"] * 2, ["a", "aaa"], 2, transform="logodds")
    assert rewards == pytest.approx([-2.0, 2.0])


def test_best_of_n_with_real_pairwise_model_agrees_with_its_comparisons(tiny_dir):
    from rlhf_rewards import load_reward_model

    pm = load_reward_model(tiny_dir("rlhflow-pair-pm-llama3-8b"), device="cpu")
    cands = ["one", "two words", "three little words", "four"]
    winner = best_of_n(pm, ["Say something"], [cands])[0]
    holder = 0
    for j in range(1, 4):
        if pm.compare(["Say something"], [cands[j]], [cands[holder]])[0] > 0.5:
            holder = j
    assert winner == holder
    order = rank(pm, ["Say something"], [cands])[0]
    assert sorted(order) == [0, 1, 2, 3]


class TableJudge:
    """A pairwise model with a fixed preference table ``P[(a, b)]`` (not Bradley-Terry)."""

    kind = "pairwise"

    def __init__(self, table):
        self.table = dict(table)
        self.table.update({(b, a): 1 - p for (a, b), p in table.items()})

    def compare(self, prompts, a, b):
        return [0.5 if x == y else self.table[(x, y)] for x, y in zip(a, b)]


def test_rank_orders_by_mean_log_odds_not_summed_probabilities():
    judge = TableJudge({("a", "b"): 0.99, ("a", "c"): 0.3, ("b", "c"): 0.9})
    lo = lambda p: math.log(p / (1 - p))  # noqa: E731
    mean_log_odds = {"a": (lo(0.99) + lo(0.3)) / 2, "b": (lo(0.01) + lo(0.9)) / 2, "c": (lo(0.7) + lo(0.1)) / 2}
    summed = {"a": 0.99 + 0.3, "b": 0.01 + 0.9, "c": 0.7 + 0.1}
    cands = ["a", "b", "c"]
    expected = sorted(range(3), key=lambda k: -mean_log_odds[cands[k]])
    assert expected == [0, 2, 1] != sorted(range(3), key=lambda k: -summed[cands[k]])
    assert rank(judge, ["p"], [cands]) == [expected]


class NoisyJudge:
    """A pairwise model whose answers carry batch-position noise, as float kernels do (1e-7 per position)."""

    kind = "pairwise"

    def compare(self, prompts, a, b):
        return [min(1.0, 1 / (1 + math.exp(-(len(x) - len(y)))) + 1e-7 * k) if x != y else 0.5
                for k, (x, y) in enumerate(zip(a, b))]


class NoisyScorer:
    kind = "scalar"

    def score(self, prompts, completions):
        return [len(c) + 1e-7 * k for k, c in enumerate(completions)]


@pytest.mark.parametrize("model", [NoisyJudge(), NoisyScorer()], ids=["pairwise", "scalar"])
def test_duplicates_get_exactly_equal_values_and_keep_index_order(model):
    cands = ["aaa", "a", "aa", "bbbb", "aaa", "aa"]  # "aaa" at 0 and 4, "aa" at 2 and 5
    order = rank(model, ["p"], [cands])[0]
    assert order == [3, 0, 4, 2, 5, 1]
    assert best_of_n(model, ["p"], [["aaa", "a", "aaa"]]) == [0]
    rewards = group_rewards(model, ["p"] * 6, cands, 6)
    assert rewards[0] == rewards[4] and rewards[2] == rewards[5]
    # "aaa"'s log-odds against a, aa, bbbb, aa (length differences) and its twin (a tie), over 5 opponents
    assert rewards[0] == pytest.approx((2 + 1 - 1 + 1 + 0) / 5, abs=1e-5)
    anchor = group_rewards(model, ["p"] * 6, cands, 6, mode="anchor")
    assert anchor[0] == anchor[4] == 0.0 and anchor[2] == anchor[5]
    # a conversational completion is the same text as its string
    assert rank(model, ["p"], [["aa", [{"role": "assistant", "content": "aa"}], "a"]]) == [[0, 1, 2]]


def test_scalar_model_in_a_round_robin_scores_each_distinct_text_once(tiny_dir):
    from rlhf_rewards import load_reward_model

    rm = load_reward_model(tiny_dir("starling-rm-7b-alpha"), device="cpu")
    texts = ["Paris.", "It is Paris, on the Seine.", "Marseille?", "Paris."]
    direct = rm.score(["Capital of France?"] * 3, texts[:3])
    before = rm.stats.samples
    rewards = group_rewards(rm, ["Capital of France?"] * 4, texts, 4)
    assert rm.stats.samples - before == 3  # three distinct texts, each once, not once per comparison
    # Bradley-Terry oracle from the direct scores: mean over the other members of log-odds r_i - r_j
    r = [direct[0], direct[1], direct[2], direct[0]]
    expected = [sum(r[i] - r[j] for j in range(4) if j != i) / 3 for i in range(4)]
    assert rewards == pytest.approx(expected, abs=1e-4)

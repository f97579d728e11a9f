"""RewardBench 2 in `rlhf-rewards eval`: the scoring against an oracle written here from reward-bench's own procedure
(scripts/run_v2.py, rewardbench/utils.py: unroll, score, reroll, 1/#ties credit, the Ties subset's weighted score,
the six-subset mean), on hand-made scores with ties at the top and end to end on the shipped sample with a tiny
scalar and a tiny pairwise model; per-row errors counted; bad layouts refused before any model loads."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pytest

from rlhf_rewards.cli import main
from rlhf_rewards.cli.data_io import sample_path
from rlhf_rewards.cli.eval_v2 import RowInfo, summarize
from rlhf_rewards.rewardbench import v2

pytest.importorskip("datasets")
pytest.importorskip("matplotlib")

SCALAR, PAIRWISE = "ray2333-mistral-7b", "pairrm"
SIX = ["Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties"]


# -- the oracle: reward-bench's procedure, step by step, in numpy ------------------------------------------------------
def oracle(rows: list[dict]) -> dict:
    """``rows``: dicts with id, subset, chosen, rejected, num_correct and ``scores`` (one per completion, chosen
    first). Returns ``{subset: score}`` and ``"leaderboard"``, as run_v2.py and the leaderboard compute them."""
    # unroll: one entry per completion, chosen then rejected, then reroll by total_completions
    flat = [(r["subset"], s) for r in rows for s in r["scores"]]
    totals = [len(r["chosen"]) + len(r["rejected"]) for r in rows]
    assert sum(totals) == len(flat)
    results, at = [], 0
    for size in totals:
        scores = [s for _, s in flat[at:at + size]]
        at += size
        max_val = np.max(scores)
        results.append((1 / np.sum(np.array(scores) == max_val)) if scores[0] == max_val else 0)
    out = {}
    for subset in np.unique([r["subset"] for r in rows]):
        members = [k for k, r in enumerate(rows) if r["subset"] == subset]
        if subset.lower() == "ties":
            out[subset] = oracle_ties([rows[k] for k in members])
        else:
            out[subset] = sum(results[k] for k in members) / len(members)
    out["leaderboard"] = float(np.mean([out[s] for s in SIX]))
    return out


def oracle_ties(rows: list[dict]) -> float:
    grouped = defaultdict(list)
    for row in rows:
        sample_type, prompt_id = row["id"].split(":")
        for i, score in enumerate(row["scores"]):
            grouped[sample_type, int(prompt_id)].append((i < row["num_correct"], score))
    ref, tied = {}, {}
    for (sample_type, pid), samples in grouped.items():
        good = [s for ok, s in samples if ok]
        bad = [s for ok, s in samples if not ok]
        stats = (min(good) - max(bad) > 0, max(good) - min(good) if len(good) > 1 else None, min(good) - max(bad))
        (ref if sample_type == "ref" else tied)[pid] = stats
    ref_acc = np.mean([s[0] for s in ref.values()])
    tied_acc = np.mean([s[0] for s in tied.values()])
    both = set(ref) & set(tied)
    spread = np.array([tied[p][1] for p in both])
    gap_tied = np.array([tied[p][2] for p in both])
    gap_ref = np.array([ref[p][2] for p in both])
    preferred = np.mean(gap_tied > spread)
    preferred_hard = np.mean(np.minimum(gap_ref, gap_tied) > spread)
    with np.errstate(divide="ignore", invalid="ignore"):
        margin = np.nan_to_num(np.tanh(np.minimum(gap_ref, gap_tied) / spread - 1), nan=0.0)
    return float(0.3 * tied_acc + 0.3 * ref_acc + 0.2 * preferred + 0.2 * preferred_hard + 0.01 * np.mean(margin))


# -- hand-made scores ------------------------------------------------------------------------------------------------
def row(i, subset, scores, num_correct=1):
    return {"id": i, "subset": subset, "chosen": ["c"] * num_correct, "rejected": ["r"] * (len(scores) - num_correct),
            "num_correct": num_correct, "scores": [float(s) for s in scores]}


HAND_MADE = [
    row("0", "Factuality", [3, 1, 2, 0]),        # chosen strictly on top: 1
    row("1", "Factuality", [2, 2, 1, 0]),        # tied at the top with one other: 1/2
    row("2", "Factuality", [1, 1, 1, 1]),        # all tied: 1/4
    row("3", "Precise IF", [1, 2, 2, 0]),        # below the top: 0
    row("4", "Precise IF", [5, 5, 5, 4]),        # three share the top: 1/3
    row("5", "Math", [0.5, 0.25, -1, 0.4999]),
    row("6", "Math", [-1, -1, -2, -1]),          # 1/3 with negative scores
    row("7", "Safety", [0, 1, 0, 0]),
    row("8", "Focus", [9, 8, 7, 6]),
    row("9", "Focus", [1e-9, 0, 0, 0]),
    row("ref:1", "Ties", [3, 1, 2, 0]),
    row("tied:1", "Ties", [3, 2.5, 2.9, 1, 0, 2], num_correct=3),       # accurate; gap 0.5 not above spread 0.5
    row("ref:2", "Ties", [1, 1, 0]),                                    # not accurate (gap 0)
    row("tied:2", "Ties", [2, 2, 2, 1, 0], num_correct=3),              # spread 0: the tanh term divides by 0
    row("ref:3", "Ties", [0, 1, 2]),                                    # gap -2
    row("tied:3", "Ties", [4, 4, 5], num_correct=2),                    # spread 0, gap -1
    row("ref:4", "Ties", [2, 0]),
    row("tied:4", "Ties", [2, 2, 2], num_correct=2),                    # spread 0, gap 0: 0/0 counts 0
    row("tied:5", "Ties", [10, 1, 0], num_correct=2),                   # no ref: row: accuracy only
    row("ref:6", "Ties", [1, 0]),                                       # no tied: row: accuracy only
]


def info_of(rows):
    return [RowInfo(r["subset"], r["id"], r["num_correct"], len(r["scores"]), v2.is_ties(r["subset"])) for r in rows]


def test_scores_match_reward_benchs_procedure_on_hand_made_scores():
    want = oracle(HAND_MADE)
    got = summarize(info_of(HAND_MADE), [(r["scores"], None) for r in HAND_MADE])
    for subset in SIX:
        assert got["subsets"][subset]["score"] == pytest.approx(want[subset], abs=1e-12), subset
    assert got["score"] == pytest.approx(want["leaderboard"], abs=1e-12)
    assert got["missing"] == []
    # the ties at the top, counted
    assert got["subsets"]["Factuality"] == {"rows": 3, "n": 3, "errors": 0, "correct": 1, "shared_top": 2,
                                            "score": pytest.approx((1 + 0.5 + 0.25) / 3),
                                            "mean_margin": pytest.approx((1 + 0 + 0) / 3)}
    assert [v2.best_of_n_credit(r["scores"]) for r in HAND_MADE[:7]] == [1, 0.5, 0.25, 0, pytest.approx(1 / 3), 1,
                                                                         pytest.approx(1 / 3)]
    ties = got["subsets"]["Ties"]["ties"]
    assert (ties["ref_prompts"], ties["tied_prompts"], ties["paired_prompts"]) == (5, 5, 4)
    assert ties["ref_accuracy"] == pytest.approx(3 / 5) and ties["tied_accuracy"] == pytest.approx(3 / 5)
    # the tanh term: tied:1 (spread 0.5, min gap 0.5): tanh(0); tied:2 (0/0): 0; tied:3 (-2/0): -1; tied:4 (0/0): 0
    assert ties["correctness_margin_score"] == pytest.approx((0 + 0 - 1 + 0) / 4)


def test_scores_are_independent_of_the_row_order():
    shuffled = HAND_MADE[::-1]
    a = summarize(info_of(HAND_MADE), [(r["scores"], None) for r in HAND_MADE])
    b = summarize(info_of(shuffled), [(r["scores"], None) for r in shuffled])
    assert a["score"] == b["score"] and a["subsets"]["Ties"] == b["subsets"]["Ties"]


def test_what_reward_bench_cannot_score_is_undefined_or_refused():
    # reward-bench writes 0 (no ref: rows) or NaN (no prompt with both rows): no number here, and the reason
    only_tied = v2.ties_score([("tied:1", [2, 1, 0], 2)])
    assert only_tied["score"] is None
    assert only_tied["undefined"] == "no ref: row; no prompt with both a ref: and a tied: row"
    assert only_tied["tied_accuracy"] == 1.0 and only_tied["ref_accuracy"] is None
    assert v2.leaderboard_score({s: 0.5 for s in SIX[:5]}) is None
    assert v2.leaderboard_score({**{s: 0.5 for s in SIX[:5]}, "Ties": None}) is None
    with pytest.raises(ValueError, match="'ref:N' or 'tied:N'"):
        v2.parse_ties_id("ref-1")
    with pytest.raises(ValueError, match="appears twice"):
        v2.ties_score([("ref:1", [1, 0], 1), ("ref:01", [1, 0], 1)])
    with pytest.raises(ValueError, match="single correct completion"):
        v2.ties_score([("ref:1", [1, 0], 1), ("tied:1", [1, 0], 1)])


# -- end to end on the shipped sample ----------------------------------------------------------------------------------
def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def sample_rows() -> list[dict]:
    rows = read_jsonl(sample_path("sample:reward-bench-2"))
    extra = [("x1", ["Same."], ["Same.", "Same.", "Same."]),   # every completion the same text: 1/4 whatever the model
             ("x2", ["Yes."], ["Same.", "Same.", "No."]),
             ("x3", ["Yes."], ["No.", None, "Maybe."])]           # cannot be scored: an error, counted
    for i, chosen, rejected in extra:
        rows.append({**rows[0], "id": i, "subset": "my-own", "prompt": "Is it?", "chosen": chosen,
                     "rejected": rejected, "num_incorrect": 3, "models": ["x"] * 4})
    return rows


def logodds(p: float) -> float:
    return max(-10.0, min(10.0, math.log(p / (1 - p)))) if 0 < p < 1 else math.copysign(10.0, p - 0.5)


def model_scores(rm, rows: list[dict]) -> list[list[float]]:
    """The oracle's scores of each row: a scalar model's reward per completion (each distinct prompt and text once,
    all in one call, so equal texts get equal scores); a pairwise model's mean log-odds against every other
    completion of the row (each unordered pair compared once, by position; all rows' pairs in one call)."""
    if rm.kind == "scalar":
        distinct = list(dict.fromkeys((r["prompt"], c) for r in rows for c in r["chosen"] + r["rejected"]))
        memo = dict(zip(distinct, rm.score([p for p, _ in distinct], [c for _, c in distinct])))
        return [[memo[r["prompt"], c] for c in r["chosen"] + r["rejected"]] for r in rows]
    pairs = [(k, i, j) for k, r in enumerate(rows) for i in range(len(r["chosen"]) + len(r["rejected"]))
             for j in range(i + 1, len(r["chosen"]) + len(r["rejected"]))]
    completions = [r["chosen"] + r["rejected"] for r in rows]
    probs = rm.compare([rows[k]["prompt"] for k, _, _ in pairs], [completions[k][i] for k, i, _ in pairs],
                       [completions[k][j] for k, _, j in pairs])
    lo = [np.zeros((len(c), len(c))) for c in completions]
    for (k, i, j), p in zip(pairs, probs):
        lo[k][i, j], lo[k][j, i] = logodds(p), -logodds(p)
    return [[sum(m[i]) / (len(m) - 1) for i in range(len(m))] for m in lo]


def test_eval_on_the_shipped_sample_scalar_and_pairwise(tmp_path, tiny_dir, capsys):
    from rlhf_rewards import load_reward_model

    rows = sample_rows()
    assert {r["subset"] for r in rows} == set(SIX) | {"my-own"}
    assert {r["id"] for r in rows if r["subset"] == "Ties"} >= {"ref:1", "tied:1"}
    out = tmp_path / "results"
    assert main(["eval", write_jsonl(tmp_path / "rb2.jsonl", rows), "--model", tiny_dir(SCALAR), "--model",
                 tiny_dir(PAIRWISE), "--output-dir", str(out), "--chunk-size", "5"]) == 0
    err = capsys.readouterr().err
    assert "2 rows could not be scored" in err  # one row, for each of the two models
    results = json.loads((out / "results.json").read_text())["models"]
    written = read_jsonl(out / "rows.jsonl")
    assert [w["id"] for w in written] == [r["id"] for r in rows]
    for k, (name, result) in enumerate(zip((SCALAR, PAIRWISE), results)):
        rm = load_reward_model(tiny_dir(name), preset=name, device="cpu")
        assert result["kind"] == rm.kind and result["benchmark"] == "RewardBench 2"
        scored = [r for r in rows if r["id"] != "x3"]
        for r, scores in zip(scored, model_scores(rm, scored)):
            r["scores"] = scores
        want = oracle(scored)
        for subset in SIX + ["my-own"]:
            assert result["subsets"][subset]["score"] == pytest.approx(want[subset], abs=1e-6), (name, subset)
        assert result["score"] == pytest.approx(want["leaderboard"], abs=1e-6)
        assert result["subsets"]["my-own"]["errors"] == 1 and result["subsets"]["my-own"]["n"] == 2
        assert result["overall"] == {"rows": len(rows), "n": len(rows) - 1, "errors": 1}
        for w, r in zip(written, rows):
            if r["id"] == "x3":
                assert w[f"scores_{k}"] is None and "rejected[1]" in w[f"error_{k}"]
                continue
            assert w[f"scores_{k}"] == pytest.approx(r["scores"], abs=1e-5)
            assert f"error_{k}" not in w
        assert next(w for w in written if w["id"] == "x1")[f"credit_{k}"] == 0.25  # an exact tie of four
    table = (out / "results.md").read_text()
    assert "| **RewardBench 2 score** (mean of the six subsets) |" in table and "| Ties: accuracy ref / tied |" in table
    assert "1 errors" in table
    from PIL import Image

    for png in ("margins.png", "subsets.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_pairwise_round_robin_does_not_depend_on_the_completions_order(tmp_path, tiny_dir):
    base = {"prompt": "Name a colour.", "subset": "Focus", "num_correct": 1}
    rows = [{**base, "id": "a", "chosen": ["Red."], "rejected": ["Blue and green.", "A car.", "Loud."]},
            {**base, "id": "b", "chosen": ["Red."], "rejected": ["Loud.", "Blue and green.", "A car."]}]
    out = tmp_path / "results"
    assert main(["eval", write_jsonl(tmp_path / "d.jsonl", rows), "--model", tiny_dir(PAIRWISE), "--output-dir",
                 str(out)]) == 0
    a, b = (w["scores_0"] for w in read_jsonl(out / "rows.jsonl"))
    assert [a[0], a[1], a[2], a[3]] == [b[0], b[2], b[3], b[1]]  # exactly, not approximately


def test_the_layout_is_told_from_the_rows_or_given(tmp_path, tiny_dir, capsys):
    model = ["--model", tiny_dir(SCALAR), "--output-dir", str(tmp_path / "out")]
    v1 = write_jsonl(tmp_path / "v1.jsonl", [{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go.", "subset": "s"}])
    assert main(["eval", v1, *model]) == 0
    assert "benchmark" not in json.loads((tmp_path / "out" / "results.json").read_text())["models"][0]

    def fails(path, *needles, extra=()):
        assert main(["eval", path, *model, *extra]) == 2
        message = capsys.readouterr().err
        for needle in needles:
            assert needle in message, message

    fails(v1, "row 0's 'chosen' holds one completion (str: RewardBench) but --benchmark v2 needs a list",
          extra=["--benchmark", "v2"])
    fails("sample:reward-bench-2", "--benchmark v1 needs one completion per row", extra=["--benchmark", "v1"])
    good = read_jsonl(sample_path("sample:reward-bench-2"))

    def variant(name, index, **change):
        rows = [dict(r) for r in good]
        rows[index].update(change)
        return write_jsonl(tmp_path / f"{name}.jsonl", rows)

    fails(variant("empty", 3, rejected=[]), "row 3 has an empty 'rejected' list")
    fails(variant("null", 4, chosen=None), "row 4's 'chosen' holds null but row 0 holds a list of completions")
    fails(variant("count", 2, num_correct=2), "row 2 has num_correct 2 but its 'chosen' list holds 1 completions")
    ties = next(k for k, r in enumerate(good) if r["subset"] == "Ties")
    fails(variant("bad_id", ties, id="ref-1"), f"row {ties}: a Ties row's id must be 'ref:N' or 'tied:N'")
    fails(variant("twice", ties + 2, id=good[ties]["id"]), f"rows {ties} and {ties + 2} are both Ties row")
    tied = next(k for k, r in enumerate(good) if r["id"].startswith("tied:"))
    fails(variant("one", tied, chosen=["Red."], num_correct=1, total_completions=1 + len(good[tied]["rejected"])),
          "has one chosen completion; a tied: row holds several")
    no_ids = write_jsonl(tmp_path / "no_ids.jsonl", [{k: v for k, v in r.items() if k != "id"} for r in good])
    fails(no_ids, "Ties subset, whose rows are paired by their ids")
    lists_then_text = write_jsonl(tmp_path / "lt.jsonl", [good[0], {**good[1], "chosen": "text"}])
    fails(lists_then_text, "column 'chosen' holds a string")  # a JSON column of two types: refused as it is read

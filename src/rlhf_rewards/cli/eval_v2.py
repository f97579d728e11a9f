"""RewardBench 2 in ``rlhf-rewards eval``: its layout told from the rows and checked, each row's completions scored,
the subsets, Ties and leaderboard scores (:mod:`rlhf_rewards.rewardbench.v2`), the table, plots and per-row output.

A scalar model scores each completion (each distinct rendered text once per run). A pairwise model runs a round
robin within each row: every two distinct completions are compared once (both orders, combined as the model does;
the pair in an order fixed by the texts, not by their places in the row), and a completion's score is the mean over
the row's other completions of the log-odds that it is better, clipped to +-10; identical completions are ties
(log-odds 0) without running the model. A round robin, not a knockout: reward-bench's rules need a score for every
completion (the credit's ties at the top, the Ties subset's margins), and a knockout's winner depends on the order
it meets the others in."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

from .common import UsageError
from .eval_plots import percent

SCORE_UNITS = {"scalar": "the reward of each completion",
               "pairwise": "round robin: mean over the row's other completions of log(P(better) / P(worse)), each "
                           "clipped to +-10"}
"""What a completion's score is, by model kind."""

COUNT_COLUMNS = ("num_correct", "num_incorrect", "total_completions")
"""reward-bench's count columns: of the chosen, of the rejected and of all completions (checked when present)."""

Result = tuple[Optional[list[float]], Optional[str]]
"""A row's scores (chosen first, then rejected) and ``None``, or ``None`` and why the row could not be scored."""


class RowInfo(NamedTuple):
    """What scoring needs of a row besides its scores: its subset, its id (or row number), its numbers of correct
    and of all completions, and whether it is scored as Ties."""

    subset: str
    id: Any
    num_correct: int
    size: int
    ties: bool


def _kind(value: Any) -> str:
    """``"v2"`` for a list of completions, ``"v1"`` for one completion (a string or a list of messages)."""
    if isinstance(value, list) and not (value and all(isinstance(x, dict) for x in value)):
        return "v2"
    return "v1"


def _what(value: Any) -> str:
    if value is None:
        return "null"
    return "a list of completions (RewardBench 2)" if _kind(value) == "v2" else \
        f"one completion ({type(value).__name__}: RewardBench)"


def choose_layout(data, path: str, column: str, benchmark: str) -> str:
    """``"v1"`` or ``"v2"``: ``benchmark`` when given (every row must fit it), else what the rows hold: lists of
    completions under ``column`` (RewardBench 2) or one completion each (RewardBench)."""
    values = data[column]
    first = _kind(values[0])
    want = first if benchmark == "auto" else benchmark
    for number, value in enumerate(values):
        if _kind(value) != want:
            how = (f"row 0 holds {_what(values[0])}" if benchmark == "auto" else f"--benchmark {benchmark} needs "
                   + ("a list of completions" if want == "v2" else "one completion") + " per row")
            raise UsageError(f"{path}: row {number}'s {column!r} holds {_what(value)} but {how}; every row must have "
                             "one layout")
    return want


def _count(value: Any, path: str, number: int, column: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{path}: row {number} has {column!r} {value!r}; expected a whole number")
    return value


def check_rows(data, args: argparse.Namespace, path: str) -> list[RowInfo]:
    """Every row's :class:`RowInfo`, after checking the layout reward-bench's scoring relies on: non-empty
    ``chosen`` and ``rejected`` lists, the count columns (when present) matching them, and each Ties row an id
    ``ref:N`` / ``tied:N`` named once, a ``tied:`` row with several correct completions."""
    from ..rewardbench.v2 import is_ties, parse_ties_id

    chosen, rejected = data[args.chosen_column], data[args.rejected_column]
    subsets = data[args.subset_column]
    ids = data[args.id_column] if args.id_column else list(range(len(data)))
    counts = {c: data[c] for c in COUNT_COLUMNS if c in data.column_names}
    seen: dict[tuple[str, int], int] = {}
    out = []
    for number, (c, r, subset, row_id) in enumerate(zip(chosen, rejected, subsets, ids)):
        for column, items in ((args.chosen_column, c), (args.rejected_column, r)):
            if not items:
                raise UsageError(f"{path}: row {number} has an empty {column!r} list; a RewardBench 2 row needs at "
                                 "least one correct (chosen) and one incorrect (rejected) completion")
        have = dict(zip(COUNT_COLUMNS, ((len(c), f"its {args.chosen_column!r} list holds"),
                                        (len(r), f"its {args.rejected_column!r} list holds"),
                                        (len(c) + len(r), "its two lists hold"))))
        for column, values in counts.items():
            given, (count, where) = _count(values[number], path, number, column), have[column]
            if given != count:
                raise UsageError(f"{path}: row {number} has {column} {given} but {where} {count} completions")
        ties = is_ties(subset)
        if ties:
            if not args.id_column:
                raise UsageError(f"{path}: row {number} is in the Ties subset, whose rows are paired by their ids "
                                 "('ref:N' / 'tied:N'); name the id column with --id-column")
            try:
                key = parse_ties_id(row_id)
            except ValueError as err:
                raise UsageError(f"{path}: row {number}: {err}") from None
            if key in seen:
                raise UsageError(f"{path}: rows {seen[key]} and {number} are both Ties row {row_id!r}")
            seen[key] = number
            if key[0] == "tied" and len(c) < 2:
                raise UsageError(f"{path}: row {number} ({row_id!r}) has one chosen completion; a tied: row "
                                 "holds several equally correct ones")
        out.append(RowInfo(subset, row_id, len(c), len(c) + len(r), ties))
    return out


def row_scores(model, scorer, rows: list[dict], args: argparse.Namespace) -> list[Result]:
    """Each row's scores, chosen first then rejected; a row any of whose completions (or comparisons) cannot be
    scored is an error naming the completion, never a row scored on the others."""
    prompts = [r[args.prompt_column] for r in rows]
    members = [list(r[args.chosen_column]) + list(r[args.rejected_column]) for r in rows]
    names = [[f"{args.chosen_column}[{k}]" for k in range(len(r[args.chosen_column]))]
             + [f"{args.rejected_column}[{k}]" for k in range(len(r[args.rejected_column]))] for r in rows]
    if model.kind == "pairwise":
        return _round_robin(scorer, prompts, members, names)
    flat = scorer.rewards([p for p, m in zip(prompts, members) for _ in m], [c for m in members for c in m])
    out: list[Result] = []
    start = 0
    for m, where in zip(members, names):
        part = flat[start:start + len(m)]
        start += len(m)
        bad = next((f"{name}: {e}" for name, (v, e) in zip(where, part) if v is None), None)
        out.append((None, bad) if bad else ([v for v, _ in part], None))
    return out


def _text_key(completion: Any) -> str:
    return json.dumps(completion, sort_keys=True, ensure_ascii=False)


def _round_robin(scorer, prompts: list, members: list[list], names: list[list[str]]) -> list[Result]:
    from ..transforms import apply_transform

    keys = [[_text_key(c) for c in m] for m in members]
    first = [{k: i for i, k in reversed(list(enumerate(ks)))} for ks in keys]  # each text's first member
    items, where = [], []
    for row, (p, m, fst) in enumerate(zip(prompts, members, first)):
        order = sorted(fst)
        for a in range(len(order)):
            for b in range(a + 1, len(order)):
                items.append((p, m[fst[order[a]]], m[fst[order[b]]]))
                where.append((row, order[a], order[b]))
    found = scorer.preferences(*(list(col) for col in zip(*items))) if items else []
    log_odds: list[dict[tuple[str, str], float]] = [{} for _ in members]
    errors: dict[int, str] = {}
    for (row, a, b), (p, e) in zip(where, found):
        if p is None:
            errors.setdefault(row, f"comparing {names[row][first[row][a]]} with {names[row][first[row][b]]}: {e}")
        else:
            log_odds[row][a, b] = apply_transform([p])[0]
            log_odds[row][b, a] = -log_odds[row][a, b]
    out: list[Result] = []
    for row, ks in enumerate(keys):
        if row in errors:
            out.append((None, errors[row]))
            continue
        lo = log_odds[row]
        out.append(([math.fsum(lo.get((k, j), 0.0) for j in ks) / (len(ks) - 1) for k in ks], None))
    return out


def summarize(info: Sequence[RowInfo], results: Sequence[Result]) -> dict:
    """Per subset: ``rows``, ``n`` scored, ``errors`` (rows not scored, not in ``n``) and ``score`` (the mean credit
    of a best-of-N subset; the Ties score), with ``correct`` (credit 1), ``shared_top`` (credit between 0 and 1:
    the first chosen tied at the top) and ``mean_margin`` for best-of-N subsets, and the Ties parts under
    ``ties``; the leaderboard ``score`` (``None`` unless all six subsets have one) and the ``missing`` subsets."""
    from ..rewardbench.v2 import SUBSETS, best_of_n_credit, leaderboard_score, row_margin, ties_score

    names = [s for s in SUBSETS if any(i.subset == s for i in info)]
    names += sorted({i.subset for i in info} - set(names))
    per: dict[str, dict] = {}
    for name in names:
        rows = [(i, s) for i, (s, _) in zip(info, results) if i.subset == name]
        scored = [(i, s) for i, s in rows if s is not None]
        entry = {"rows": len(rows), "n": len(scored), "errors": len(rows) - len(scored)}
        if rows[0][0].ties:
            ties = ties_score((i.id, s, i.num_correct) for i, s in scored)
            entry.update(score=ties["score"], ties=ties)
        else:
            credits = [best_of_n_credit(s) for _, s in scored]
            margins = [row_margin(s, i.num_correct, False) for i, s in scored]
            entry.update(score=math.fsum(credits) / len(credits) if credits else None,
                         correct=sum(c == 1.0 for c in credits), shared_top=sum(0.0 < c < 1.0 for c in credits),
                         mean_margin=math.fsum(margins) / len(margins) if margins else None)
        per[name] = entry
    scored = sum(e["n"] for e in per.values())
    return {"subsets": per, "score": leaderboard_score({k: v["score"] for k, v in per.items()}),
            "missing": [s for s in SUBSETS if s not in per],
            "overall": {"rows": len(info), "n": scored, "errors": len(info) - scored}}


def row_records(info: Sequence[RowInfo], per_model: Sequence[Sequence[Result]]) -> list[dict]:
    """``rows.jsonl``: per row its id, subset and, per model ``k``, ``scores_k`` (chosen first), ``credit_k`` (a
    best-of-N row's credit; ``null`` for Ties rows, scored as a subset), ``margin_k`` and any ``error_k``."""
    from ..rewardbench.v2 import best_of_n_credit, row_margin

    out = []
    for n, i in enumerate(info):
        record = {"id": i.id, "subset": i.subset}
        for k, results in enumerate(per_model):
            scores, error = results[n]
            record[f"scores_{k}"] = scores
            record[f"credit_{k}"] = None if scores is None or i.ties else best_of_n_credit(scores)
            record[f"margin_{k}"] = None if scores is None else row_margin(scores, i.num_correct, i.ties)
            if error:
                record[f"error_{k}"] = error
        out.append(record)
    return out



def _cell(entry: Optional[dict]) -> str:
    if entry is None:
        return "-"
    text = f"{percent(entry['score'])} ({entry['n']}"
    if entry.get("shared_top"):
        text += f", {entry['shared_top']} shared top"
    text += ")"
    if entry.get("ties") and entry["ties"]["undefined"]:
        text += f" undefined: {entry['ties']['undefined']}"
    return text + (f" {entry['errors']} errors" if entry["errors"] else "")


def markdown(results: list[dict], names: list[str]) -> str:
    """One table, one column per model: the leaderboard score, then each subset as ``score (n, shared top)``, the
    Ties score's parts, and other subsets last."""
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(results) + 1) + "|"]
    lines.append("| **RewardBench 2 score** (mean of the six subsets) | " + " | ".join(percent(r["score"])
                 for r in results) + " |")
    subsets = list(results[0]["subsets"])
    for subset in subsets:
        lines.append(f"| {subset} | " + " | ".join(_cell(r["subsets"].get(subset)) for r in results) + " |")
        if "ties" in results[0]["subsets"][subset]:
            parts = [r["subsets"][subset]["ties"] for r in results]
            lines.append(f"| {subset}: accuracy ref / tied | "
                         + " | ".join(f"{percent(t['ref_accuracy'])} / {percent(t['tied_accuracy'])}" for t in parts) + " |")
            lines.append(f"| {subset}: correct preferred / hard / margin | "
                         + " | ".join(f"{percent(t['correctness_preferred'])} / {percent(t['correctness_preferred_hard'])}"
                                      f" / {percent(t['correctness_margin_score'])}" for t in parts) + " |")
    lines.append("")
    lines.append("Scores in %. Best-of-N subsets: a row counts 1 when its chosen completion scores strictly above all "
                 "others, 1/k when it shares the top score with k-1 others (\"shared top\"), else 0. Ties: 0.30 tied "
                 "accuracy + 0.30 ref accuracy + 0.20 correct preferred + 0.20 hard + 0.01 margin, as reward-bench's "
                 "run_v2.py. The score is the unweighted mean of the six subsets, as on the leaderboard"
                 + (f"; none without {', '.join(results[0]['missing'])}." if results[0]["missing"] else "."))
    return "\n".join(lines) + "\n"


def plots(results: list[dict], per_model: Sequence[Sequence[Result]], info: Sequence[RowInfo], names: list[str],
          out_dir: str) -> None:
    """``margins.png``: each model's per-row margins (:func:`~rlhf_rewards.rewardbench.v2.row_margin`);
    ``subsets.png``: each subset's score per model, the dashed line at a random scorer's best-of-N accuracy."""
    from ..rewardbench.v2 import SUBSETS, row_margin
    from .eval_plots import Bars, margin_histograms, subset_bars

    panels = []
    for name, r, results_k in zip(names, results, per_model):
        values = [row_margin(s, i.num_correct, i.ties) for i, (s, _) in zip(info, results_k) if s is not None]
        panels.append((f"{name}: RewardBench 2 score {percent(r['score'])}%, rows scored {len(values)}", values,
                       "best-of-N: first chosen - best other; Ties: worst correct - best incorrect ("
                       + ("reward" if r["kind"] == "scalar" else "round-robin log-odds") + ")"))
    margin_histograms(panels, os.path.join(out_dir, "margins.png"))
    subsets = list(results[0]["subsets"])
    groups = [("RewardBench 2", [s for s in SUBSETS if s in subsets]),
              ("Other subsets", [s for s in subsets if s not in SUBSETS])]
    values = [{s: (e["score"], "no score" if e["score"] is None else f"{100 * e['score']:.0f}% of {e['n']}")
               for s, e in r["subsets"].items()} for r in results]
    chance = [1.0 / i.size for i in info if not i.ties] or [0.0]  # a random scorer's expected credit per row
    chance_mean = math.fsum(chance) / len(chance)
    subset_bars(names, Bars([g for g in groups if g[1]], values, chance_mean,
                            f"{100 * chance_mean:.0f}%: a random scorer's best-of-N accuracy",
                            "score % (best-of-N: credit 1/k for a top shared by k; Ties: its weighted score)",
                            "RewardBench 2 score per subset"),
                os.path.join(out_dir, "subsets.png"))

"""``rlhf-rewards label``: n candidate completions per prompt in, one DPO pair (best, worst) per prompt out."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from contextlib import nullcontext

from .common import Progress, add_model_arguments, check_preset, load_model, reports_usage_errors
from .data_io import (add_data_arguments, check_output, chunks, open_output, read_rows, require_columns, unique_ids,
                      write_rows)

HELP = "turn n candidate completions per prompt into DPO pairs (chosen = best, rejected = worst)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--candidates-column", default="responses",
                        help="column holding each prompt's list of candidate completions (default: responses)")
    parser.add_argument("--output", help="JSONL file of DPO rows to write (default: stdout)")
    parser.add_argument("--skipped-output",
                        help="JSONL file listing the rows that gave no pair, with the reason (always counted in "
                             "the summary)")
    add_model_arguments(parser)


class Skip(Exception):
    """A row that gives no DPO pair: ``reason`` is its category (counted in the summary), ``detail`` the specifics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def distinct(candidates, where: str) -> list:
    """The candidates with their first occurrence of each distinct text, in order."""
    from ..conversation import normalize_completion

    if isinstance(candidates, str) or not isinstance(candidates, (list, tuple)):
        raise Skip("invalid candidates", f"expected a list of completions, got {type(candidates).__name__}")
    seen, out = set(), []
    for j, c in enumerate(candidates):
        try:
            text = normalize_completion(c, f"{where}[{j}]")
        except ValueError as err:
            raise Skip("invalid candidates", str(err)) from None
        if text not in seen:
            seen.add(text)
            out.append(c)
    if len(out) < 2:
        raise Skip("fewer than two distinct candidates", f"{len(out)} of {len(candidates)}")
    return out


def scalar_pairs(scorer, prompts: list, groups: list[list]) -> list:
    """``(chosen, rejected, r_chosen, r_rejected)`` or a :class:`Skip` per row: the candidates of highest and
    lowest reward (the first of equals)."""
    flat = scorer.rewards([p for p, g in zip(prompts, groups) for _ in g], [c for g in groups for c in g])
    out, start = [], 0
    for g in groups:
        results = flat[start:start + len(g)]
        start += len(g)
        bad = next(((j, e) for j, (r, e) in enumerate(results) if r is None), None)
        if bad is not None:
            out.append(Skip("could not be scored", f"candidate {bad[0]}: {bad[1]}"))
            continue
        rewards = [r for r, _ in results]
        best = max(range(len(g)), key=lambda k: (rewards[k], -k))
        worst = min(range(len(g)), key=lambda k: (rewards[k], k))
        out.append(Skip("tie", "every candidate has the same reward") if rewards[best] == rewards[worst]
                   else (g[best], g[worst], rewards[best], rewards[worst]))
    return out


def _knockouts(model, prompts: list, groups: list[list]) -> list:
    """``(best, worst)`` indices per row by the two knockouts; a failing batch is retried row by row."""
    from ..pairwise import knockout

    try:
        return list(zip(knockout(model, prompts, groups), knockout(model, prompts, groups, worst=True)))
    except Exception as err:
        if len(prompts) == 1:
            return [Skip("could not be scored", f"{type(err).__name__}: {err}")]
        return [r for p, g in zip(prompts, groups) for r in _knockouts(model, [p], [g])]


def pairwise_pairs(scorer, prompts: list, groups: list[list]) -> list:
    """Like :func:`scalar_pairs` for a pairwise model: best by a knockout, worst by a reverse knockout (``n - 1``
    comparisons each); the rewards are the log-odds of the pair's own comparison, ``log P(chosen better) /
    P(rejected better)`` and its negative."""
    from ..transforms import apply_transform

    ends = _knockouts(scorer.model, prompts, groups)
    live = [i for i, e in enumerate(ends) if not isinstance(e, Skip)]
    prefs = scorer.preferences([prompts[i] for i in live], [groups[i][ends[i][0]] for i in live],
                               [groups[i][ends[i][1]] for i in live])
    out: list = list(ends)
    for i, (p, err) in zip(live, prefs):
        best, worst = ends[i]
        if p is None:
            out[i] = Skip("could not be scored", err)
        elif best == worst or p < 0.5:
            out[i] = Skip("cyclic preferences", "the knockout's best does not beat its worst")
        elif p == 0.5:
            out[i] = Skip("tie", "the best and worst candidates tie")
        else:
            r_chosen, r_rejected = apply_transform([p, 1.0 - p])
            out[i] = (groups[i][best], groups[i][worst], r_chosen, r_rejected)
    return out


def label_chunk(scorer, make_pairs, first: int, rows: list[dict], args: argparse.Namespace
                ) -> tuple[list[dict], list[dict]]:
    """The DPO rows of a chunk, and its rows without a pair (``row`` number, id, ``reason``, ``detail``)."""
    groups: list = []
    for row in rows:
        try:
            groups.append(distinct(row[args.candidates_column], args.candidates_column))
        except Skip as skip:
            groups.append(skip)
    live = [k for k, g in enumerate(groups) if not isinstance(g, Skip)]
    results = list(groups)
    for k, r in zip(live, make_pairs(scorer, [rows[k][args.prompt_column] for k in live], [groups[k] for k in live])):
        results[k] = r
    pairs, skips = [], []
    for k, (row, r) in enumerate(zip(rows, results)):
        ident = {args.id_column: row[args.id_column]} if args.id_column else {}
        if isinstance(r, Skip):
            skips.append({"row": first + k, **ident, "reason": r.reason, "detail": str(r)})
        else:
            pairs.append({**ident, "prompt": row[args.prompt_column], "chosen": r[0], "rejected": r[1],
                          "chosen_reward": r[2], "rejected_reward": r[3]})
    return pairs, skips


@reports_usage_errors("label")
def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    check_preset(args.model, args.preset)
    check_output(args.output)
    check_output(args.skipped_output)
    data = read_rows(args.data, args.split)
    require_columns(data, args.data, (args.prompt_column, args.candidates_column, args.id_column))
    unique_ids(data, args.data, args.id_column)

    from .scoring import RowScorer

    model = load_model(args, args.model, args.preset, args.tokenizer)
    scorer = RowScorer(model)
    make_pairs = pairwise_pairs if model.kind == "pairwise" else scalar_pairs
    skipped: list[dict] = []
    written = 0
    with open_output(args.output) as out, open_output(args.skipped_output) if args.skipped_output else \
            nullcontext() as skipped_out, Progress(len(data), "label", model) as progress:
        for first, rows in chunks(data, args.chunk_size):
            pairs, skips = label_chunk(scorer, make_pairs, first, rows, args)
            write_rows(out, pairs)
            if skipped_out is not None:
                write_rows(skipped_out, skips)
            written += len(pairs)
            skipped += skips
            progress.update(len(rows))
    reasons = Counter(s["reason"] for s in skipped)
    print(f"rows: {len(data)}  DPO pairs written: {written}  rows without a pair: {len(skipped)}", file=sys.stderr)
    for reason, count in reasons.most_common():
        print(f"  {count} x {reason}", file=sys.stderr)
    for s in skipped[:10]:
        print(f"  row {s['row']}: {s['detail']}", file=sys.stderr)
    if len(skipped) > 10:
        print(f"  ... {len(skipped) - 10} more" + (f" in {args.skipped_output}" if args.skipped_output else
                                                   " (list them all with --skipped-output)"), file=sys.stderr)
    print(f"truncated inputs: {model.stats.truncated}  time: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0

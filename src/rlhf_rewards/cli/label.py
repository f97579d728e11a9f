"""``rlhf-rewards label``: n candidate completions per prompt in, one DPO pair (best, worst) per prompt out."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

from .common import Progress, UsageError, add_model_arguments, check_preset, load_model, reports_usage_errors, warn
from .data_io import add_data_arguments, chunks, input_path, read_rows, require_columns, unique_ids
from .outputs import check_outputs, check_record, describe_run, open_outputs, read_record, write_record, write_rows

HELP = "turn n candidate completions per prompt into DPO pairs (chosen = best, rejected = worst)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--candidates-column", default="responses",
                        help="column holding each prompt's list of candidate completions (default: responses)")
    parser.add_argument("--output", help="JSONL file of DPO rows to write (default: stdout)")
    parser.add_argument("--skipped-output",
                        help="JSONL file listing the rows that gave no pair, with the reason (always counted in "
                             "the summary)")
    parser.add_argument("--resume", action="store_true",
                        help="complete an existing --output (and --skipped-output) from the last chunk it finished; "
                             "refused unless the same model, options and input wrote it")
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
        if not text.strip():
            # usually a failed generation: whether "" should be the rejected answer is the user's call, not ours
            raise Skip("empty candidate", f"candidate {j} is {'empty' if not text else 'only whitespace'}")
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


def _resume_point(args: argparse.Namespace, record: dict) -> tuple[dict, int]:
    """The progress an interrupted run recorded after its last complete chunk, with the outputs cut back to what it
    had written then (rows of a chunk in flight are labelled again; a warning says what was dropped)."""
    old = read_record(args.output)
    check_record(args.output, old, record)
    progress = old["progress"]
    dropped_in_all = 0
    for flag, path in (("--output", args.output), ("--skipped-output", args.skipped_output)):
        if path is None:
            continue
        size, lines = progress["files"][flag]
        have = os.path.getsize(path)
        if have < size:
            raise UsageError(f"{path}: is shorter than the {size} bytes its last completed chunk left (changed since "
                             "it was written?); cannot resume it: write a new --output")
        if have > size:
            with open(path, "rb") as f:
                f.seek(size)
                tail = f.read()
            dropped = tail.count(b"\n") + (not tail.endswith(b"\n"))
            warn("label", f"{path}:{lines + 1}: dropped {dropped} line(s) ({have - size} bytes"
                          + (", the last one torn" if not tail.endswith(b"\n") else "") + ") an interrupted run "
                          f"wrote after its last completed chunk; input rows from {progress['rows']} on are labelled "
                          "again")
            os.truncate(path, size)
            dropped_in_all += dropped
    return progress, dropped_in_all


def _checkpoint(args: argparse.Namespace, record: dict, progress: dict, files: list) -> None:
    """Record, after a chunk's rows are all written, how far the outputs go: a resume starts from here."""
    for flag, path, f in zip(("--output", "--skipped-output"), (args.output, args.skipped_output), files):
        if path is not None:
            lines = progress["files"][flag][1]
            progress["files"][flag] = [os.fstat(f.fileno()).st_size, lines]
    write_record(args.output, {**record, "progress": progress})


@reports_usage_errors("label")
def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    preset = check_preset(args.model, args.preset)
    check_outputs({"--output": args.output, "--skipped-output": args.skipped_output}, input_path(args.data),
                  resume=args.resume)
    data = read_rows(args.data, args.split)
    require_columns(data, args.data, (args.prompt_column, args.candidates_column, args.id_column))
    unique_ids(data, args.data, args.id_column)
    record = describe_run("label", args, preset, input_path(args.data), **{
        "--prompt-column": args.prompt_column, "--candidates-column": args.candidates_column,
        "--id-column": args.id_column,
        "--skipped-output": None if args.skipped_output is None else os.path.abspath(args.skipped_output)})
    resuming = args.resume and os.path.exists(args.output)
    if args.resume and not resuming and args.skipped_output and os.path.exists(args.skipped_output):
        raise UsageError(f"{args.skipped_output}: exists but --output {args.output} does not, so nothing says how "
                         "far it goes; remove it or choose another --skipped-output")
    outputs = [args.output] + ([args.skipped_output] if args.skipped_output else [])
    with open_outputs(outputs, append=args.resume) as files:
        dropped = 0
        if resuming:
            progress, dropped = _resume_point(args, record)
        else:
            progress = {"rows": 0, "pairs": 0, "reasons": {},
                        "files": {flag: [0, 0] for flag in ("--output", "--skipped-output")}}
            if args.output is not None:
                _checkpoint(args, record, progress, files)
        resumed = progress["rows"]
        skipped: list[dict] = []
        model = None
        if resumed < len(data):
            from .row_scorer import RowScorer

            model = load_model(args, args.model, args.preset, args.tokenizer)
            scorer = RowScorer(model)
            make_pairs = pairwise_pairs if model.kind == "pairwise" else scalar_pairs
            with Progress(len(data), "label", model, initial=resumed) as progress_bar:
                for first, rows in chunks(data, args.chunk_size):
                    end = first + len(rows)
                    if end <= resumed:
                        continue
                    rows = rows[max(first, resumed) - first:]
                    pairs, skips = label_chunk(scorer, make_pairs, max(first, resumed), rows, args)
                    write_rows(files[0], pairs)
                    if args.skipped_output:
                        write_rows(files[1], skips)
                    skipped += skips
                    progress["rows"] = end
                    progress["pairs"] += len(pairs)
                    for s in skips:
                        progress["reasons"][s["reason"]] = progress["reasons"].get(s["reason"], 0) + 1
                    progress["files"]["--output"][1] += len(pairs)
                    progress["files"]["--skipped-output"][1] += len(skips)
                    if args.output is not None:
                        _checkpoint(args, record, progress, files)
                    progress_bar.update(len(rows))
    _report(args, data, progress, skipped, resumed, dropped, model, time.perf_counter() - start)
    return 0


def _report(args: argparse.Namespace, data, progress: dict, skipped: list[dict], resumed: int, dropped: int,
            model, seconds: float) -> None:
    """The summary on stderr: pairs and rows without a pair (by reason) over the whole file, the first few of this
    run's rows without a pair, truncations and time."""
    without = sum(progress["reasons"].values())
    print(f"rows: {len(data)}" + (f" ({resumed} labelled by an earlier run)" if resumed else "")
          + f"  DPO pairs written: {progress['pairs']}  rows without a pair: {without}", file=sys.stderr)
    if dropped:
        print(f"  lines an interrupted run wrote after its last completed chunk, dropped (rows labelled again): "
              f"{dropped}", file=sys.stderr)
    for reason, count in Counter(progress["reasons"]).most_common():
        print(f"  {count} x {reason}", file=sys.stderr)
    for s in skipped[:10]:
        print(f"  row {s['row']}: {s['detail']}", file=sys.stderr)
    if len(skipped) > 10:
        print(f"  ... {len(skipped) - 10} more" + (f" in {args.skipped_output}" if args.skipped_output else
                                                   " (list them all with --skipped-output)"), file=sys.stderr)
    truncated = model.stats.truncated if model is not None else 0
    print(f"truncated inputs (this run): {truncated}  time: {seconds:.1f} s", file=sys.stderr)

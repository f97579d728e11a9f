"""``rlhf-rewards score``: every row of a dataset with its reward, written as its chunk finishes, resumable."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from .common import Progress, UsageError, add_model_arguments, check_preset, load_model, reports_usage_errors
from .data_io import (add_data_arguments, check_output, chunks, id_key, open_output, read_rows, read_written,
                      require_columns, unique_ids, write_rows)

HELP = "add a reward to every row of a dataset (JSONL out, resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--completion-column", default="completion",
                        help="column of completions: text, or [{'role': 'assistant', ...}] (default: completion)")
    parser.add_argument("--baseline-column",
                        help="column of reference completions: a pairwise model's reward is transform(P(completion "
                             "better than baseline)); a scalar model's is r(completion) - r(baseline)")
    parser.add_argument("--transform", default="logodds", choices=("logodds", "centered", "probability"),
                        help="pairwise models: how P becomes a reward (default: logodds)")
    parser.add_argument("--reward-column", default="reward", help="name of the added field (default: reward)")
    parser.add_argument("--output", help="JSONL file to write (default: stdout)")
    parser.add_argument("--resume", action="store_true",
                        help="complete an existing --output: skip its rows (by --id-column, else by row number)")
    add_model_arguments(parser)


def _already_done(args: argparse.Namespace, data) -> tuple[list[dict], set[str] | int]:
    """The rows an output being resumed holds, and which input rows they are: a set of id keys, or (without
    ``--id-column``) the number of leading input rows."""
    written = read_written(args.output) if args.resume and args.output and os.path.exists(args.output) else []
    if args.id_column is None:
        if len(written) > len(data):
            raise UsageError(f"{args.output}: holds {len(written)} rows, more than the {len(data)} of {args.data}; "
                             "not an output of this input")
        columns = [c for c in (args.prompt_column, args.completion_column) if c]
        for number, (row, source) in enumerate(zip(written, data.select(range(len(written)))), start=1):
            if any(id_key(row.get(c)) != id_key(source[c]) for c in columns):
                raise UsageError(f"{args.output}:{number}: differs from row {number - 1} of {args.data}; not an "
                                 "output of this input (or the input changed): resume by --id-column instead")
        return written, len(written)
    input_ids = {id_key(v) for v in data[args.id_column]}
    done = set()
    for number, row in enumerate(written, start=1):
        if args.id_column not in row or id_key(row[args.id_column]) not in input_ids:
            raise UsageError(f"{args.output}:{number}: its {args.id_column!r} is not an id of {args.data}; "
                             "not an output of this input")
        done.add(id_key(row[args.id_column]))
    return written, done


def summary(rewards: list, reward_column: str, truncated: int, seconds: float, resumed: int) -> str:
    """The end-of-run summary: rows, reward statistics, truncations, unscored rows, time."""
    scored = [r for r in rewards if r is not None]
    lines = [f"rows: {len(rewards)}" + (f" ({resumed} already in the output, {len(rewards) - resumed} scored now)"
                                        if resumed else "")]
    if scored:
        sd = statistics.stdev(scored) if len(scored) > 1 else 0.0
        lines.append(f"{reward_column}: mean {statistics.fmean(scored):.4f}  sd {sd:.4f}  min {min(scored):.4f}  "
                     f"max {max(scored):.4f}")
    lines.append(f"unscored rows ({reward_column} null, see reward_error): {len(rewards) - len(scored)}")
    lines.append(f"truncated inputs (this run): {truncated}")
    lines.append(f"time: {seconds:.1f} s")
    return "\n".join(lines)


@reports_usage_errors("score")
def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    preset = check_preset(args.model, args.preset)
    if preset.kind == "pairwise" and args.baseline_column is None:
        raise UsageError(f"{args.model} is a pairwise model ({preset.name}): it scores a completion against a "
                         "baseline; pass --baseline-column")
    check_output(args.output, resume=args.resume)
    data = read_rows(args.data, args.split)
    require_columns(data, args.data, (args.prompt_column, args.completion_column, args.baseline_column,
                                      args.id_column))
    if args.reward_column in data.column_names:
        raise UsageError(f"{args.data}: already has a column {args.reward_column!r}; name the added field with "
                         "--reward-column")
    unique_ids(data, args.data, args.id_column)
    written, done = _already_done(args, data)
    rewards = [row.get(args.reward_column) for row in written]

    if len(written) == len(data):
        print(summary(rewards, args.reward_column, 0, time.perf_counter() - start, len(written)), file=sys.stderr)
        return 0  # nothing left to score: no need to load the model

    from .scoring import RowScorer

    model = load_model(args, args.model, args.preset, args.tokenizer)
    scorer = RowScorer(model)
    error_field = f"{args.reward_column}_error"
    with open_output(args.output, append=args.resume) as out, \
            Progress(len(data), "score", model, initial=len(written)) as progress:
        for first, rows in chunks(data, args.chunk_size):
            if isinstance(done, int):
                rows = rows[max(0, done - first):]
            else:
                rows = [r for r in rows if id_key(r[args.id_column]) not in done]
            if not rows:
                continue
            results = scorer.against([r[args.prompt_column] for r in rows],
                                     [r[args.completion_column] for r in rows],
                                     None if args.baseline_column is None
                                     else [r[args.baseline_column] for r in rows], args.transform)
            for row, (value, error) in zip(rows, results):
                row[args.reward_column] = value
                if error is not None:
                    row[error_field] = error
                rewards.append(value)
            write_rows(out, rows)
            progress.update(len(rows))
    print(summary(rewards, args.reward_column, model.stats.truncated, time.perf_counter() - start, len(written)),
          file=sys.stderr)
    return 0

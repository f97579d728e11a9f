"""``rlhf-rewards score``: every row of a dataset with its reward, written as its chunk finishes, resumable."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from ..presets import Preset
from ..reward_options import aggregate_steps
from .common import (Progress, UsageError, add_model_arguments, check_preset, field_name, load_model,
                     reports_usage_errors)
from .data_io import add_data_arguments, chunks, id_key, input_path, read_rows, require_columns, unique_ids
from .outputs import (WrittenRows, check_outputs, check_record, describe_run, open_outputs, read_record,
                      write_record, write_rows)

HELP = "add a reward to every row of a dataset (JSONL out, resumable)"


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    """The data and reward options of the commands that score each row (``score``, ``calibrate``); each adds its
    own ``--output`` and ``--resume``, then :func:`~rlhf_rewards.cli.common.add_model_arguments`."""
    add_data_arguments(parser)
    parser.add_argument("--completion-column", default="completion",
                        help="column of completions: text, or [{'role': 'assistant', ...}]; for a process reward "
                             "model also a list of step strings (default: completion)")
    parser.add_argument("--baseline-column",
                        help="column of reference completions: a pairwise model's reward is transform(P(completion "
                             "better than baseline)); a scalar model's is r(completion) - r(baseline)")
    parser.add_argument("--transform", default="logodds", choices=("logodds", "centered", "probability"),
                        help="pairwise models: how P becomes a reward (default: logodds)")
    parser.add_argument("--aggregate", choices=("min", "last", "mean", "product"),
                        help="process reward models: how the step rewards become the reward (default: the model's, "
                             "min); the step rewards go in <reward-column>_steps")
    parser.add_argument("--reward-column", default="reward", type=field_name,
                        help="name of the added field (default: reward)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_scoring_arguments(parser)
    parser.add_argument("--output", help="JSONL file to write (default: stdout)")
    parser.add_argument("--resume", action="store_true",
                        help="complete an existing --output: skip its rows (by --id-column, else by row number); "
                             "refused unless the same model, options and input wrote it")
    add_model_arguments(parser)


class RunningStats:
    """Count, mean, sample sd, min and max of the rewards, updated row by row (a resumed file is never held)."""

    def __init__(self) -> None:
        self.rows = self.scored = 0
        self.mean = self._m2 = 0.0
        self.min = self.max = math.nan

    def add(self, value) -> None:
        self.rows += 1
        if value is None:
            return
        self.scored += 1
        delta = value - self.mean
        self.mean += delta / self.scored
        self._m2 += delta * (value - self.mean)
        self.min = value if self.scored == 1 else min(self.min, value)
        self.max = value if self.scored == 1 else max(self.max, value)

    @property
    def sd(self) -> float:
        return math.sqrt(self._m2 / (self.scored - 1)) if self.scored > 1 else 0.0


_COMPARE_ROWS = 1024
"""Rows of a resumed output compared with the input at a time (without --id-column)."""


def _done_by_number(args: argparse.Namespace, output: str, data, written: WrittenRows, stats: RunningStats) -> int:
    """How many leading input rows the output holds, each checked against its input row."""
    columns = [c for c in (args.prompt_column, args.completion_column) if c]
    count = 0
    pending: list[tuple[int, dict]] = []

    def compare() -> None:
        source = data[count:count + len(pending)]
        for k, (number, row) in enumerate(pending):
            if any(id_key(row.get(c)) != id_key(source[c][k]) for c in columns):
                raise UsageError(f"{output}:{number}: differs from row {number - 1} of {args.data}; not an "
                                 "output of this input (or the input changed): resume by --id-column instead")

    for number, row in written:
        if number > len(data):
            raise UsageError(f"{output}: holds more rows than the {len(data)} of {args.data}; not an output "
                             "of this input")
        pending.append((number, row))
        stats.add(row.get(args.reward_column))
        if len(pending) == _COMPARE_ROWS:
            compare()
            count += len(pending)
            pending = []
    compare()
    return count + len(pending)


def _done_by_id(args: argparse.Namespace, output: str, data, written: WrittenRows, stats: RunningStats) -> set[str]:
    """The ids the output holds; each must be an input id, once."""
    input_ids = {id_key(v) for v in data[args.id_column]}
    done: dict[str, int] = {}
    for number, row in written:
        key = id_key(row.get(args.id_column))
        if args.id_column not in row or key not in input_ids:
            raise UsageError(f"{output}:{number}: its {args.id_column!r} is not an id of {args.data}; "
                             "not an output of this input")
        if key in done:
            raise UsageError(f"{output}:{number}: repeats the {args.id_column!r} {row[args.id_column]!r} of "
                             f"line {done[key]} (two runs wrote this file at once?); cannot resume it: keep one "
                             "row per id, or score into a new --output")
        done[key] = number
        stats.add(row.get(args.reward_column))
    return set(done)


def summary(stats: RunningStats, reward_column: str, truncated: int, seconds: float, resumed: int, torn: int) -> str:
    """The end-of-run summary: rows, reward statistics, truncations, unscored rows, time."""
    lines = [f"rows: {stats.rows}" + (f" ({resumed} already in the output, {stats.rows - resumed} scored now)"
                                      if resumed else "")]
    if torn:
        lines.append(f"torn last line dropped from the output and its row scored again: {torn}")
    if stats.scored:
        lines.append(f"{reward_column}: mean {stats.mean:.4f}  sd {stats.sd:.4f}  min {stats.min:.4f}  "
                     f"max {stats.max:.4f}")
    lines.append(f"unscored rows ({reward_column} null, see {reward_column}_error): {stats.rows - stats.scored}")
    lines.append(f"truncated inputs (this run): {truncated}")
    lines.append(f"time: {seconds:.1f} s")
    return "\n".join(lines)


def check_kind_options(args: argparse.Namespace) -> Preset:
    """The preset ``--model`` loads with, and the options its kind needs or refuses (before anything is read)."""
    preset = check_preset(args.model, args.preset)
    if preset.kind == "pairwise" and args.baseline_column is None:
        raise UsageError(f"{args.model} is a pairwise model ({preset.name}): it scores a completion against a "
                         "baseline; pass --baseline-column")
    if preset.kind == "process" and args.baseline_column is not None:
        raise UsageError(f"{args.model} is a process reward model ({preset.name}): it scores each completion's "
                         "steps on their own; --baseline-column does not apply")
    if preset.kind != "process" and args.aggregate is not None:
        raise UsageError(f"--aggregate: only process reward models take it; {preset.name} is a {preset.kind} model")
    return preset


@dataclass
class Scored:
    """What :func:`write_scores` did: the reward statistics of every row in the output (resumed rows included),
    inputs truncated in this run, rows found already done, a torn last line dropped, the run's sidecar record, and
    the model (``None`` when every row was already done)."""

    stats: RunningStats
    truncated: int
    resumed: int
    torn: int
    record: dict
    model: Any


def write_scores(args: argparse.Namespace, preset: Preset, *, command: str, output: Optional[str],
                 options: dict[str, Any], configure: Optional[Callable[[Any], Any]] = None) -> Scored:
    """Score every row of ``args.data`` into ``output`` (JSONL, ``None``: stdout) as ``score`` does, resumable with
    ``args.resume``; the sidecar record names ``command`` and ``options`` (by flag). ``configure(model)`` may return
    another view of the loaded model (``calibrate``'s objectives). The outputs must have been checked."""
    data = read_rows(args.data, args.split)
    require_columns(data, args.data, (args.prompt_column, args.completion_column, args.baseline_column,
                                      args.id_column))
    error_field = f"{args.reward_column}_error"
    steps_field = f"{args.reward_column}_steps" if preset.kind == "process" else None
    for field in filter(None, (args.reward_column, error_field, steps_field)):
        if field in data.column_names:
            raise UsageError(f"{args.data}: already has a column {field!r}; name the added field with "
                             "--reward-column")
    unique_ids(data, args.data, args.id_column)
    record = describe_run(command, args, preset, input_path(args.data), **{
        "--prompt-column": args.prompt_column, "--completion-column": args.completion_column,
        "--baseline-column": args.baseline_column, "--transform": args.transform,
        "--reward-column": args.reward_column, "--aggregate": args.aggregate, **options})
    resuming = args.resume and os.path.exists(output)
    stats = RunningStats()
    with open_outputs([output], append=args.resume) as (out,):
        done: set[str] | int = 0 if args.id_column is None else set()
        written = WrittenRows(output, command) if resuming else None
        if written is not None:
            check_record(output, read_record(output), record)
            done = (_done_by_number if args.id_column is None else _done_by_id)(args, output, data, written, stats)
        elif output is not None:
            write_record(output, record)
        resumed = stats.rows
        torn = written.torn if written is not None else 0
        if resumed == len(data):
            return Scored(stats, 0, resumed, torn, record, None)  # nothing left to score: no need to load the model

        from .row_scorer import RowScorer

        model = load_model(args, args.model, args.preset, args.tokenizer)
        if args.aggregate is not None:
            model.aggregate = args.aggregate
        if configure is not None:
            model = configure(model)
        scorer = RowScorer(model)
        with Progress(len(data), command, model, initial=resumed) as progress:
            for first, rows in chunks(data, args.chunk_size):
                if isinstance(done, int):
                    rows = rows[max(0, done - first):]
                else:
                    rows = [r for r in rows if id_key(r[args.id_column]) not in done]
                if not rows:
                    continue
                prompts = [r[args.prompt_column] for r in rows]
                completions = [r[args.completion_column] for r in rows]
                if steps_field is not None:
                    step_results = scorer.steps(prompts, completions)
                    results = [(None if s is None else aggregate_steps(s, model.aggregate), e)
                               for s, e in step_results]
                    for row, (steps, _) in zip(rows, step_results):
                        row[steps_field] = steps
                else:
                    results = scorer.against(prompts, completions, None if args.baseline_column is None
                                             else [r[args.baseline_column] for r in rows], args.transform)
                for row, (value, error) in zip(rows, results):
                    row[args.reward_column] = value
                    if error is not None:
                        row[error_field] = error
                    stats.add(value)
                write_rows(out, rows)
                progress.update(len(rows))
    return Scored(stats, model.stats.truncated, resumed, torn, record, model)


@reports_usage_errors("score")
def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    preset = check_kind_options(args)
    check_outputs({"--output": args.output}, input_path(args.data), resume=args.resume)
    scored = write_scores(args, preset, command="score", output=args.output, options={})
    print(summary(scored.stats, args.reward_column, scored.truncated, time.perf_counter() - start, scored.resumed,
                  scored.torn), file=sys.stderr)
    return 0

"""``rlhf-rewards calibrate``: a reward model's reward distribution over a reference dataset (mean, sample std,
quantiles), written as the calibration file ``normalize="stats"`` reads. The rows are scored as ``score`` scores
them, into a resumable scores file next to the output; the statistics are computed from that file at the end."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from typing import Any, Optional

from .common import UsageError, add_model_arguments, reports_usage_errors
from .data_io import input_path
from .options import json_object
from .outputs import WrittenRows, check_outputs
from .score import add_scoring_arguments, check_kind_options, write_scores

HELP = "the reward distribution of a model over a dataset (mean, std, quantiles): a calibration file for normalize="

SCORES_SUFFIX = ".scores.jsonl"
"""The default scores file beside ``--output``: every row with its reward, as ``score`` writes it."""

TOP_REASONS = 20
"""Distinct reasons for unscored rows listed by count; the rest are counted together."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_scoring_arguments(parser)
    parser.add_argument("--output", required=True,
                        help="the calibration file to write (JSON); its rows are scored into --scores first")
    parser.add_argument("--scores", help=f"JSONL file of the scored rows, as `score` writes them, kept for --resume "
                                         f"and inspection (default: OUTPUT{SCORES_SUFFIX})")
    parser.add_argument("--resume", action="store_true",
                        help="complete an interrupted run's --scores file (by --id-column, else by row number), "
                             "refused unless the same model, options and input wrote it; then write --output")
    parser.add_argument("--objectives", type=json_object,
                        help="multi-objective models (ArmoRM): the reward is the weighted sum of these objectives, "
                             "as RewardFunction(objectives=...) scores it, e.g. '{\"helpsteer-correctness\": 1}' "
                             "(default: the model's own reward)")
    add_model_arguments(parser)


def _check_objectives(objectives: Optional[dict], preset) -> None:
    if objectives is None:
        return
    names = preset.extra.get("objective_names") or ()
    if not names:
        raise UsageError(f"--objectives: {preset.name} has a single reward, no named objectives")
    unknown = sorted(set(objectives) - set(names))
    if unknown:
        raise UsageError(f"--objectives: {preset.name} has no objective {', '.join(map(repr, unknown))}; its "
                         f"objectives are: {', '.join(names)}")


def _with_objectives(objectives: dict):
    def configure(model):
        try:
            return model.with_objectives(objectives)
        except ValueError as err:
            raise UsageError(f"--objectives: {err}") from None
    return configure


def read_scores(path: str, column: str) -> tuple[list[float], Counter]:
    """The rewards of a scores file and, counted, the reasons of its rows without one."""
    values: list[float] = []
    reasons: Counter = Counter()
    for _, row in WrittenRows(path, "calibrate"):
        value = row.get(column)
        if value is None:
            reasons[str(row.get(f"{column}_error") or "no reward recorded")] += 1
        else:
            values.append(float(value))
    return values, reasons


def calibration_record(args: argparse.Namespace, preset, run: dict[str, Any], values: list[float],
                       reasons: Counter, rows: int) -> dict[str, Any]:
    """The calibration file's content (see docs/normalization.md for each field)."""
    from ..loading import model_identity
    from ..normalization import CALIBRATION_FORMAT, STD_KIND, reward_shape, summarize
    from ..reward_options import DEFAULT_AGGREGATE

    kind = preset.kind
    aggregate = None if kind != "process" else (args.aggregate or DEFAULT_AGGREGATE)
    summary = summarize(values)
    top = reasons.most_common(TOP_REASONS)
    rest = sum(reasons.values()) - sum(n for _, n in top)
    return {
        "format": CALIBRATION_FORMAT,
        "rlhf_rewards_version": run["rlhf-rewards version"],
        "model": {"name_or_path": model_identity(args.model), "preset": preset.name, "kind": kind,
                  "dtype": run["--dtype"], "tokenizer": run["--tokenizer"], "max_length": args.max_length},
        "data": {"path": os.path.abspath(input_path(args.data)), "split": args.split, "rows": rows,
                 **run["input"], "prompt_column": args.prompt_column, "completion_column": args.completion_column,
                 "baseline_column": args.baseline_column},
        "reward": reward_shape(kind, baseline=args.baseline_column is not None, transform=args.transform,
                               aggregate=aggregate, objectives=args.objectives),
        "n_scored": summary["n"], "n_unscored": sum(reasons.values()),
        "unscored_reasons": {**dict(top), **({"(other reasons)": rest} if rest else {})},
        "std_kind": STD_KIND,
        **{key: summary[key] for key in ("mean", "std", "min", "max", "quantiles")},
    }


def _write_json(path: str, record: dict) -> None:
    """Replace ``path`` atomically: a kill leaves the old file or the new one."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def report(record: dict, output: str, scores: str, seconds: float) -> str:
    """The end-of-run summary on stderr."""
    q = record["quantiles"]
    lines = [f"rows: {record['data']['rows']}  scored: {record['n_scored']}  unscored: {record['n_unscored']}"]
    lines += [f"  {n} x {why}" for why, n in record["unscored_reasons"].items()]
    if record["n_scored"]:
        std = "n/a (fewer than two rewards)" if record["std"] is None else f"{record['std']:.6g}"
        lines.append(f"mean {record['mean']:.6g}  std {std} (sample)  min {record['min']:.6g}  "
                     f"max {record['max']:.6g}")
        lines.append("quantiles: " + "  ".join(f"p{k} {v:.6g}" for k, v in q.items()))
    lines.append(f"calibration: {output}  (scored rows: {scores})")
    lines.append(f"time: {seconds:.1f} s")
    return "\n".join(lines)


@reports_usage_errors("calibrate")
def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    preset = check_kind_options(args)
    _check_objectives(args.objectives, preset)
    scores = args.scores or args.output + SCORES_SUFFIX
    # the calibration file is rewritten whole at the end: --resume may replace it, a fresh run may not
    check_outputs({"--output": args.output, "--scores": scores}, input_path(args.data), resume=args.resume)
    if args.resume and not os.path.exists(scores) and os.path.exists(args.output):
        raise UsageError(f"--resume: {scores} (the scored rows) is missing, so {args.output} cannot be completed; "
                         "calibrate into a new --output")
    configure = _with_objectives(args.objectives) if args.objectives is not None else None
    scored = write_scores(args, preset, command="calibrate", output=scores,
                          options={"--objectives": args.objectives}, configure=configure)
    values, reasons = read_scores(scores, args.reward_column)
    if len(values) + sum(reasons.values()) != scored.stats.rows:
        raise UsageError(f"{scores}: holds {len(values) + sum(reasons.values())} rows, {scored.stats.rows} were "
                         "scored: was it changed during the run? calibrate into a new --output")
    record = calibration_record(args, preset, scored.record["run"], values, reasons, scored.stats.rows)
    _write_json(args.output, record)
    print(report(record, args.output, scores, time.perf_counter() - start), file=sys.stderr)
    return 0

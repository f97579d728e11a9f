"""ProcessBench in ``rlhf-rewards eval``: its layout told from the rows and checked before any model loads, each
row's steps scored by a process reward model, the per-subset accuracies and F1
(:mod:`rlhf_rewards.rewardbench.processbench`), the table, plots and per-row output.

A process reward model (``kind == "process"``) scores a row's ``steps`` as an explicit list of step strings, with
the row's ``problem`` as the prompt, through ``score_steps_samples``: one list of step rewards in [0, 1] per row, or
the reason the row has none. Qwen/ProcessBench has no subset column (its splits are the subsets); its ids are
``SUBSET-N``, so a file exported from one or all of its splits keeps its subsets, and a ``save_to_disk`` directory of
its splits is read whole, each split's name its rows' subset."""

from __future__ import annotations

import argparse
import numbers
import os
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

from .common import UsageError, require
from .eval_plots import percent

Result = tuple[Optional[list[float]], Optional[str]]
"""A row's step rewards and ``None``, or ``None`` and why the row could not be scored."""

SCORE_UNITS = "a reward in [0, 1] per step; a step at or below the threshold is predicted wrong"
"""What the numbers in ``step_rewards_k`` are."""


class RowInfo(NamedTuple):
    """What scoring needs of a row besides its step rewards: its subset, its id (or row number), its label (the
    earliest wrong step, or -1) and its number of steps."""

    subset: str
    id: Any
    label: int
    steps: int


def threshold_arg(text: str) -> float:
    """A threshold for step rewards: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (step rewards are), got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """ProcessBench's own options of ``eval``."""
    parser.add_argument("--threshold", type=threshold_arg,
                        help="ProcessBench: a step whose reward is at or below this is predicted wrong (default: 0.5)")
    parser.add_argument("--problem-column", default="problem",
                        help="ProcessBench: column of problems (default: problem)")
    parser.add_argument("--steps-column", default="steps",
                        help="ProcessBench: column of solutions, each a list of step strings (default: steps)")
    parser.add_argument("--label-column", default="label",
                        help="ProcessBench: column of the index of the earliest wrong step, -1 for none "
                             "(default: label)")


def read_data(args: argparse.Namespace):
    """The rows, as :func:`~.data_io.read_rows` reads them, except that a ``save_to_disk`` directory holding several
    splits with a steps column (``load_dataset("Qwen/ProcessBench").save_to_disk(...)``) is read whole when no
    ``--split`` is given, each split's name its rows' subset."""
    from .data_io import input_path, read_rows

    path = input_path(args.data)
    if args.split is None and args.benchmark in ("auto", "processbench") and os.path.isdir(path):
        datasets = require("datasets")
        try:
            whole = datasets.load_from_disk(path)
        except Exception:  # not a dataset: read_rows says why
            whole = None
        if isinstance(whole, datasets.DatasetDict) and len(whole) > 1 and \
                all(args.steps_column in split.column_names for split in whole.values()):
            parts = [split if args.subset_column in split.column_names else
                     split.add_column(args.subset_column, [name] * len(split)) for name, split in whole.items()]
            try:
                return datasets.concatenate_datasets(parts)
            except ValueError as err:
                raise UsageError(f"{path}: its splits {', '.join(whole)} have different columns ({err}); choose "
                                 "one with --split") from None
    return read_rows(args.data, args.split)


def is_layout(data, args: argparse.Namespace) -> bool:
    """Whether the rows are scored as ProcessBench: ``--benchmark processbench``, or ``auto`` and a steps column
    without a chosen column."""
    if args.benchmark == "processbench":
        return True
    return args.benchmark == "auto" and args.steps_column in data.column_names and \
        args.chosen_column not in data.column_names


def check_models(specs: Sequence[tuple], presets: Sequence) -> None:
    """Refuse, before any model loads, a model whose preset is not a process reward model."""
    from ..presets import PRESETS

    for (name, _, _), preset in zip(specs, presets):
        if preset.kind != "process":
            known = [p.name for p in PRESETS.values() if p.kind == "process"]
            raise UsageError(f"{name}: preset {preset.name!r} is a {preset.kind} reward model (one reward per "
                             "completion); ProcessBench needs a process reward model, which rewards every step"
                             + (f" (presets: {', '.join(known)})" if known else ""))


def check_rows(data, args: argparse.Namespace, path: str) -> list[RowInfo]:
    """Every row's :class:`RowInfo`, after checking it: a problem string, a non-empty list of step strings, a whole
    number label from -1 to the last step's index, and a subset (the subset column's, else its ``SUBSET-N`` id's)."""
    from ..rewardbench.processbench import SUBSETS, subset_of_id
    from .data_io import require_columns

    if args.id_column is None and "id" in data.column_names:
        args.id_column = "id"
    require_columns(data, path, (args.problem_column, args.steps_column, args.label_column, args.id_column))
    ids = data[args.id_column] if args.id_column else list(range(len(data)))
    has_subsets = args.subset_column in data.column_names
    subsets = data[args.subset_column] if has_subsets else [subset_of_id(i) for i in ids]
    out = []
    for number, (problem, steps, label, subset, row_id) in enumerate(zip(
            data[args.problem_column], data[args.steps_column], data[args.label_column], subsets, ids)):
        where = f"{path}: row {number}"
        if not isinstance(problem, str) or not problem:
            raise UsageError(f"{where} has {args.problem_column!r} {problem!r}; expected the problem's text")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise UsageError(f"{where}'s {args.steps_column!r} is not a non-empty list of step strings")
        if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(steps):
            raise UsageError(f"{where} has {args.label_column!r} {label!r}; expected the index of its earliest wrong "
                             f"step (0 to {len(steps) - 1}) or -1 when every step is right")
        if not isinstance(subset, str) or not subset:
            raise UsageError(f"{where} has {args.subset_column!r} {subset!r}; every row needs a subset name" if
                             has_subsets else
                             f"{where}: no {args.subset_column!r} column, and its id {row_id!r} does not name a "
                             f"ProcessBench subset (ids are SUBSET-N, SUBSET one of {', '.join(SUBSETS)}); add a "
                             "subset column or name it with --subset-column")
        out.append(RowInfo(subset, row_id, label, len(steps)))
    return out


def _step_rewards(model, problems: list, steps: list[list[str]]) -> list:
    """``score_steps_samples`` on the rows; a call that raises is retried one row at a time to find the rows at
    fault (their exception is their result)."""
    try:
        found = model.score_steps_samples(problems, steps)
    except Exception as err:  # one bad row must not cost the others their rewards
        if len(problems) == 1:
            return [err]
        return [r for p, s in zip(problems, steps) for r in _step_rewards(model, [p], [s])]
    if len(found) != len(problems):
        raise RuntimeError(f"score_steps_samples returned {len(found)} results for {len(problems)} samples")
    return list(found)


def _checked(found: Any, steps: int) -> Result:
    """A row's result from what the model returned: its step rewards when there is one per step and each is a
    number in [0, 1] (a NaN would be read as above any threshold), else the reason."""
    if isinstance(found, Exception):
        return None, f"{type(found).__name__}: {found}"
    if len(found) != steps:
        return None, f"the model gave {len(found)} step rewards for {steps} steps"
    for k, r in enumerate(found):
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0.0 <= r <= 1.0:
            return None, f"step {k}'s reward {r!r} is not a number in [0, 1]"
    return [float(r) for r in found], None


def row_rewards(model, rows: list[dict], args: argparse.Namespace) -> list[Result]:
    """Each row's step rewards (one per step), or why it has none."""
    steps = [list(r[args.steps_column]) for r in rows]
    found = _step_rewards(model, [r[args.problem_column] for r in rows], steps)
    return [_checked(f, len(s)) for f, s in zip(found, steps)]


def summarize(info: Sequence[RowInfo], results: Sequence[Result], threshold: float) -> dict:
    """Per subset: ``rows``, ``n`` scored, ``errors`` (rows not scored, not in ``n``), ``erroneous`` and
    ``erroneous_matched`` (rows with a wrong step; of those, the earliest found exactly), ``correct`` and
    ``correct_matched`` (rows with none; of those, none flagged), ``error_accuracy``, ``correct_accuracy`` and their
    harmonic mean ``f1`` (fractions; ``None`` without the rows); ProcessBench's ``average_f1`` (``None`` unless all
    four subsets have an F1), the ``missing`` subsets and ``overall`` counts."""
    from ..rewardbench.processbench import SUBSETS, average_f1, first_error_step, subset_score

    names = [s for s in SUBSETS if any(i.subset == s for i in info)]
    names += sorted({i.subset for i in info} - set(names))
    per: dict[str, dict] = {}
    for name in names:
        rows = [(i, r) for i, (r, _) in zip(info, results) if i.subset == name]
        scored = [(i.label, first_error_step(r, threshold)) for i, r in rows if r is not None]
        score = subset_score([lab for lab, _ in scored], [pred for _, pred in scored])
        per[name] = {"rows": len(rows), "n": len(scored), "errors": len(rows) - len(scored), **score._asdict(),
                     "error_accuracy": score.error_accuracy, "correct_accuracy": score.correct_accuracy,
                     "f1": score.f1}
    scored = sum(e["n"] for e in per.values())
    return {"benchmark": "ProcessBench", "threshold": threshold, "score_units": SCORE_UNITS, "subsets": per,
            "average_f1": average_f1({k: v["f1"] for k, v in per.items()}),
            "missing": [s for s in SUBSETS if s not in per],
            "overall": {"rows": len(info), "n": scored, "errors": len(info) - scored}}


def row_margin(step_rewards: Sequence[float], label: int, threshold: float) -> float:
    """How far a row is from a miss: for a correct row, its lowest step reward minus the threshold; for an
    erroneous row, the smaller of (its lowest reward before the wrong step minus the threshold) and (the threshold
    minus the wrong step's reward). Positive: matched; negative: missed; 0: a reward exactly at the threshold."""
    if label == -1:
        return min(step_rewards) - threshold
    return min([r - threshold for r in step_rewards[:label]] + [threshold - step_rewards[label]])


def row_records(info: Sequence[RowInfo], per_model: Sequence[Sequence[Result]], threshold: float) -> list[dict]:
    """``rows.jsonl``: per row its id, subset and label and, per model ``k``, ``step_rewards_k``, ``prediction_k``
    (the first step at or below the threshold, or -1), ``match_k`` and any ``error_k``."""
    from ..rewardbench.processbench import first_error_step

    out = []
    for n, i in enumerate(info):
        record = {"id": i.id, "subset": i.subset, "label": i.label}
        for k, results in enumerate(per_model):
            rewards, error = results[n]
            prediction = None if rewards is None else first_error_step(rewards, threshold)
            record.update({f"step_rewards_{k}": rewards, f"prediction_{k}": prediction,
                           f"match_{k}": None if rewards is None else prediction == i.label})
            if error:
                record[f"error_{k}"] = error
        out.append(record)
    return out



def _cell(entry: Optional[dict]) -> str:
    if entry is None:
        return "-"
    text = (f"{percent(entry['f1'])} ({percent(entry['error_accuracy'])} / {percent(entry['correct_accuracy'])}; "
            f"{entry['erroneous']} + {entry['correct']})")
    return text + (f" {entry['errors']} errors" if entry["errors"] else "")


def markdown(results: list[dict], names: list[str]) -> str:
    """One table, one column per model: the average F1, then each subset as ``F1 (error accuracy / correct
    accuracy; erroneous + correct rows)``, other subsets last."""
    threshold = results[0]["threshold"]
    lines = ["| F1 (error accuracy / correct accuracy; erroneous + correct rows) | " + " | ".join(names) + " |",
             "|---" * (len(results) + 1) + "|",
             "| **ProcessBench average F1** (mean of the four subsets) | "
             + " | ".join(percent(r["average_f1"]) for r in results) + " |"]
    for subset in results[0]["subsets"]:
        lines.append(f"| {subset} | " + " | ".join(_cell(r["subsets"].get(subset)) for r in results) + " |")
    missing = results[0]["missing"]
    lines += ["", f"In %: F1 is the harmonic mean of the accuracy on erroneous rows (the earliest wrong step found "
                  f"exactly) and on correct rows (no step flagged), as ProcessBench reports it; a step is flagged "
                  f"when its reward is at or below {threshold:g}. The average is the unweighted mean of the four "
                  "subsets' F1" + (f"; none without {', '.join(missing)}." if missing else ".")]
    return "\n".join(lines) + "\n"


def plots(results: list[dict], per_model: Sequence[Sequence[Result]], info: Sequence[RowInfo], names: list[str],
          out_dir: str) -> None:
    """``margins.png``: each model's per-row :func:`row_margin`; ``subsets.png``: each subset's F1 per model."""
    from ..rewardbench.processbench import SUBSETS
    from .eval_plots import Bars, margin_histograms, subset_bars

    threshold = results[0]["threshold"]
    panels = []
    for name, r, results_k in zip(names, results, per_model):
        values = [row_margin(s, i.label, threshold) for i, (s, _) in zip(info, results_k) if s is not None]
        panels.append((f"{name}: ProcessBench average F1 {percent(r['average_f1'])}%, rows scored {len(values)}", values,
                       f"row margin: step rewards' distance to the threshold {threshold:g} on the side that "
                       "matches (> 0: matched, < 0: missed)"))
    margin_histograms(panels, os.path.join(out_dir, "margins.png"))
    subsets = list(results[0]["subsets"])
    groups = [("ProcessBench", [s for s in SUBSETS if s in subsets]),
              ("Other subsets", [s for s in subsets if s not in SUBSETS])]
    values = [{s: (e["f1"], "no F1" if e["f1"] is None else
                   f"F1 {100 * e['f1']:.0f}% (error {percent(e['error_accuracy'])} / correct "
                   f"{percent(e['correct_accuracy'])})") for s, e in r["subsets"].items()} for r in results]
    subset_bars(names, Bars([g for g in groups if g[1]], values, None, "",
                            f"F1 % (harmonic mean of the accuracies on erroneous and correct rows; threshold "
                            f"{threshold:g})", "ProcessBench F1 per subset"),
                os.path.join(out_dir, "subsets.png"))

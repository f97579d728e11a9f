"""``rlhf-rewards eval``: a reward model benchmark for one or more models, with a table and two plots: RewardBench's
preference accuracy per subset and section, RewardBench 2's best-of-N and Ties scores (:mod:`.eval_v2`), or
ProcessBench's per-subset F1 for process reward models (:mod:`.eval_processbench`), told apart by the rows' layout."""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import time
from collections import defaultdict
from typing import Optional

from . import eval_processbench, eval_v2
from .common import (Progress, UsageError, add_model_arguments, check_preset, load_model, model_specs,
                     reports_usage_errors, require)
from .data_io import add_data_arguments, check_output_dir, chunks, require_columns
from .eval_plots import model_names, percent
from .outputs import write_rows

HELP = ("RewardBench (v1: chosen and rejected texts) or RewardBench 2 (lists of chosen and rejected completions) "
        "scores per subset, section and leaderboard; ProcessBench F1 per subset for process reward models")

MARGIN_UNITS = {"scalar": "reward(chosen) - reward(rejected)",
                "pairwise": "log(P(chosen better) / P(rejected better)), clipped to +-10"}
"""What a row's margin is, by model kind (both are on the Bradley-Terry reward-difference scale)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, resumable=False)
    parser.add_argument("--chosen-column", default="chosen", help="column of preferred completions (default: chosen)")
    parser.add_argument("--rejected-column", default="rejected",
                        help="column of dispreferred completions (default: rejected)")
    parser.add_argument("--subset-column", default="subset", help="column of subset names (default: subset)")
    parser.add_argument("--benchmark", choices=("auto", "v1", "v2", "processbench"), default="auto",
                        help="v1: RewardBench (one chosen and one rejected completion per row); v2: RewardBench 2 "
                             "(lists of them; the id column defaults to 'id'); processbench: ProcessBench (a problem, "
                             "its steps and the earliest wrong step's index per row); auto (default): told from the "
                             "rows")
    eval_processbench.add_arguments(parser)
    parser.add_argument("--output-dir", default="eval-results",
                        help="where results.json, results.md, rows.jsonl, margins.png and subsets.png go "
                             "(default: eval-results)")
    add_model_arguments(parser, several=True)


def row_margins(model, scorer, rows: list[dict], args: argparse.Namespace) -> list[tuple]:
    """``(margin, error)`` per row: the chosen-minus-rejected reward of a scalar model, or the log-odds of a pairwise
    model's ``P(chosen better than rejected)`` (both orders, as the model combines them)."""
    from ..transforms import apply_transform

    prompts = [r[args.prompt_column] for r in rows]
    chosen = [r[args.chosen_column] for r in rows]
    rejected = [r[args.rejected_column] for r in rows]
    if model.kind == "pairwise":
        return [(None, e) if p is None else (apply_transform([p])[0], None)
                for p, e in scorer.preferences(prompts, chosen, rejected)]
    results = scorer.rewards(prompts + prompts, chosen + rejected)
    out = []
    for (rc, ec), (rr, er) in zip(results[:len(rows)], results[len(rows):]):
        if rc is None or rr is None:
            out.append((None, f"chosen: {ec}" if ec else f"rejected: {er}"))
        else:
            out.append((rc - rr, None))
    return out


def summarize(subsets: list[str], margins: list[tuple]) -> dict:
    """Per-subset and overall counts: ``n`` rows scored, ``correct`` (margin > 0, RewardBench's strict count),
    ``ties`` (margin exactly 0; counted wrong), ``errors`` (rows that could not be scored, not in ``n``),
    ``accuracy = correct / n`` and ``mean_margin``."""
    from ..rewardbench import overall_score, section_scores

    groups: dict[str, list[tuple]] = defaultdict(list)
    for subset, m in zip(subsets, margins):
        groups[subset].append(m)

    def counts(ms: list[tuple]) -> dict:
        values = [m for m, _ in ms if m is not None]
        return {"n": len(values), "correct": sum(v > 0 for v in values), "ties": sum(v == 0 for v in values),
                "errors": len(ms) - len(values),
                "accuracy": sum(v > 0 for v in values) / len(values) if values else None,
                "mean_margin": sum(values) / len(values) if values else None}

    per_subset = {name: counts(groups[name]) for name in sorted(groups)}
    sections = section_scores({k: v["accuracy"] for k, v in per_subset.items() if v["accuracy"] is not None})
    return {"subsets": per_subset, "overall": counts(margins), "sections": sections,
            "score": overall_score(sections)}


def evaluate(args: argparse.Namespace, spec: tuple, data, layout: str, info=None) -> tuple[dict, list[tuple]]:
    """One model's results and its per-row results: ``(margin, error)`` for RewardBench (``layout`` ``"v1"``),
    ``(scores, error)`` for RewardBench 2 (``"v2"``), ``(step rewards, error)`` for ProcessBench
    (``"processbench"``), ``info`` the rows' ``RowInfo`` for the last two; the model is freed afterwards."""
    from .row_scorer import RowScorer

    name, preset, tokenizer = spec
    model = load_model(args, name, preset, tokenizer)
    if layout == "processbench":
        score = functools.partial(eval_processbench.row_rewards, model, args=args)
    else:  # one RowScorer per model: each distinct input is scored once in the run
        score = functools.partial(row_margins if layout == "v1" else eval_v2.row_scores, model, RowScorer(model),
                                  args=args)
    values: list[tuple] = []
    with Progress(len(data), f"eval {os.path.basename(name.rstrip('/'))}", model) as progress:
        for _, rows in chunks(data, args.chunk_size):
            values += score(rows)
            progress.update(len(rows))
    result = {"model": name, "preset": model.preset.name, "kind": model.kind}
    if layout == "v1":
        result.update(margin=MARGIN_UNITS[model.kind], **summarize(data[args.subset_column], values))
    elif layout == "v2":
        result.update(benchmark="RewardBench 2", score_units=eval_v2.SCORE_UNITS[model.kind],
                      **eval_v2.summarize(info, values))
    else:
        result.update(eval_processbench.summarize(info, values, args.threshold))
    result["stats"] = model.stats.as_dict()
    del score, model  # the scorer's cache goes with it, so the accelerator memory can be freed
    gc.collect()
    _free_accelerator()
    return result, values


def _free_accelerator() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()



def markdown(results: list[dict]) -> str:
    """One table, one column per model: RewardBench sections, then every subset as ``accuracy (n, ties)``."""
    from ..rewardbench import SECTIONS

    names = model_names(results)
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(results) + 1) + "|"]
    if any(r["sections"] for r in results):
        partial = any(s["missing"] for r in results for s in r["sections"].values())
        lines.append("| **RewardBench score** (mean of the four sections) | "
                     + " | ".join(percent(r["score"]) + (" (partial)" if partial and r["score"] is not None else "")
                                  for r in results) + " |")
        for section in SECTIONS:
            if any(section in r["sections"] for r in results):
                cells = []
                for r in results:
                    s = r["sections"].get(section)
                    cells.append("-" if s is None else percent(s["score"]) + (" (partial)" if s["missing"] else ""))
                lines.append(f"| **{section}** | " + " | ".join(cells) + " |")
    overall = [r["overall"] for r in results]
    lines.append("| **all rows** accuracy % (n, ties) | "
                 + " | ".join(f"{percent(o['accuracy'])} ({o['n']}, {o['ties']})" for o in overall) + " |")
    for subset in results[0]["subsets"]:
        cells = [r["subsets"][subset] for r in results]
        lines.append(f"| {subset} | " + " | ".join(
            f"{percent(c['accuracy'])} ({c['n']}, {c['ties']})" + (f" {c['errors']} errors" if c["errors"] else "")
            for c in cells) + " |")
    lines.append("")
    lines.append("Accuracy in %: chosen strictly above rejected (ties count as wrong, as in RewardBench). Sections "
                 "weight subsets by RewardBench's example counts; \"(partial)\" when some of a section's subsets are "
                 "absent.")
    return "\n".join(lines) + "\n"


def plots(results: list[dict], margins: list[list[tuple]], out_dir: str) -> None:
    """``margins.png`` (each model's margin distribution) and ``subsets.png`` (accuracy per subset per model)."""
    from .eval_plots import Bars, margin_histograms, subset_bars

    names = model_names(results)
    panels = []
    for name, r, ms in zip(names, results, margins):
        values = [m for m, _ in ms if m is not None]
        panels.append((f"{name}: accuracy {percent(r['overall']['accuracy'])}%, n={len(values)}", values, r["margin"]))
    margin_histograms(panels, os.path.join(out_dir, "margins.png"))
    values = [{s: (c["accuracy"], "no rows scored" if c["accuracy"] is None else
                   f"{100 * c['accuracy']:.0f}% of {c['n']}") for s, c in r["subsets"].items()} for r in results]
    subset_bars(names, Bars(_sectioned(list(results[0]["subsets"])), values, 0.5, "50%: chance (a coin flip)",
                            "accuracy % (chosen strictly above rejected; ties count as wrong)",
                            "Preference accuracy per subset, by RewardBench section"),
                os.path.join(out_dir, "subsets.png"))


def _sectioned(subsets: list[str]) -> list[tuple[str, list[str]]]:
    """The subsets under their RewardBench section headings, in RewardBench's order; others last."""
    from ..rewardbench import SECTIONS

    groups = [(section, [s for s in members if s in subsets]) for section, members in SECTIONS.items()]
    known = {s for _, members in groups for s in members}
    groups.append(("Other subsets", [s for s in subsets if s not in known]))
    return [(section, members) for section, members in groups if members]


@reports_usage_errors("eval")
def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    specs = model_specs(args)
    presets = [check_preset(name, preset) for name, preset, _ in specs]
    check_output_dir(args.output_dir)
    require("matplotlib")  # the plots come last: fail before the scoring, not after
    data = eval_processbench.read_data(args)
    if len(data) == 0:
        raise UsageError(f"{args.data}: has no rows")
    if eval_processbench.is_layout(data, args):
        layout = "processbench"
        eval_processbench.check_models(specs, presets)
        info = eval_processbench.check_rows(data, args, args.data)
        if args.threshold is None:
            from ..rewardbench.processbench import DEFAULT_THRESHOLD

            args.threshold = DEFAULT_THRESHOLD
    else:
        if args.threshold is not None:
            raise UsageError("--threshold is ProcessBench's (step rewards); these rows are RewardBench's")
        layout, info = _check_rewardbench(data, args)
        for (name, _, _), preset in zip(specs, presets):
            if preset.kind == "process":
                raise UsageError(f"{name}: preset {preset.name!r} is a process reward model (a reward per step); "
                                 "evaluate it on ProcessBench rows (e.g. sample:processbench)")
    results, per_model = [], []
    for spec in specs:
        result, values = evaluate(args, spec, data, layout, info)
        results.append(result)
        per_model.append(values)
    out = args.output_dir
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"data": args.data, "rows": len(data), "models": results}, f, indent=2)
    with open(os.path.join(out, "rows.jsonl"), "w", encoding="utf-8") as f:
        if layout == "processbench":
            write_rows(f, eval_processbench.row_records(info, per_model, args.threshold))
        elif layout == "v2":
            write_rows(f, eval_v2.row_records(info, per_model))
        else:
            ids = data[args.id_column] if args.id_column else range(len(data))
            write_rows(f, [{"id": i, "subset": s, **{f"margin_{k}": ms[n][0] for k, ms in enumerate(per_model)},
                            **{f"error_{k}": ms[n][1] for k, ms in enumerate(per_model) if ms[n][1]}}
                           for n, (i, s) in enumerate(zip(ids, data[args.subset_column]))])
    if info is not None:
        names = model_names(results)
        bench = eval_v2 if layout == "v2" else eval_processbench
        table = bench.markdown(results, names)
        bench.plots(results, per_model, info, names, out)
    else:
        table = markdown(results)
        plots(results, per_model, out)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table)
    print(table)
    errors = sum(r["overall"]["errors"] for r in results)
    print(f"wrote {out}/results.json, results.md, rows.jsonl, margins.png, subsets.png in "
          f"{time.perf_counter() - start:.1f} s" + (f"; {errors} rows could not be scored (see rows.jsonl)"
                                                    if errors else ""), file=sys.stderr)
    return 0


def _check_rewardbench(data, args: argparse.Namespace) -> tuple[str, Optional[list]]:
    """The RewardBench layout of the rows (``"v1"`` or ``"v2"``), checked, and RewardBench 2's ``RowInfo`` list."""
    columns = (args.prompt_column, args.chosen_column, args.rejected_column, args.subset_column, args.id_column)
    require_columns(data, args.data, columns)
    for number, subset in enumerate(data[args.subset_column]):
        if not isinstance(subset, str) or not subset:
            raise UsageError(f"{args.data}: row {number} has {args.subset_column!r} {subset!r}; every row needs a "
                             "subset name")
    layout = eval_v2.choose_layout(data, args.data, args.chosen_column, args.benchmark)
    eval_v2.choose_layout(data, args.data, args.rejected_column, layout)
    if layout == "v1":
        return layout, None
    if args.id_column is None and "id" in data.column_names:
        args.id_column = "id"  # RewardBench 2's Ties rows are paired by their ids
    return layout, eval_v2.check_rows(data, args, args.data)

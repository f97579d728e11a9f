"""``rlhf-rewards eval``: preference accuracy on a RewardBench-layout file, per subset and per RewardBench section,
for one or more models, with a table and two plots."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import defaultdict

from .common import (Progress, UsageError, add_model_arguments, check_preset, load_model, model_specs,
                     reports_usage_errors, require)
from .data_io import add_data_arguments, check_output_dir, chunks, read_rows, require_columns
from .outputs import write_rows

HELP = "preference accuracy on a RewardBench-layout file (prompt, chosen, rejected, subset), per subset and section"

MARGIN_UNITS = {"scalar": "reward(chosen) - reward(rejected)",
                "pairwise": "log(P(chosen better) / P(rejected better)), clipped to +-10"}
"""What a row's margin is, by model kind (both are on the Bradley-Terry reward-difference scale)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, resumable=False)
    parser.add_argument("--chosen-column", default="chosen", help="column of preferred completions (default: chosen)")
    parser.add_argument("--rejected-column", default="rejected",
                        help="column of dispreferred completions (default: rejected)")
    parser.add_argument("--subset-column", default="subset", help="column of subset names (default: subset)")
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


def evaluate(args: argparse.Namespace, spec: tuple, data) -> tuple[dict, list[tuple]]:
    """One model's results and its per-row ``(margin, error)``; the model is freed afterwards."""
    from .row_scorer import RowScorer

    name, preset, tokenizer = spec
    model = load_model(args, name, preset, tokenizer)
    scorer = RowScorer(model)
    margins: list[tuple] = []
    with Progress(len(data), f"eval {os.path.basename(name.rstrip('/'))}", model) as progress:
        for _, rows in chunks(data, args.chunk_size):
            margins += row_margins(model, scorer, rows, args)
            progress.update(len(rows))
    result = {"model": name, "preset": model.preset.name, "kind": model.kind, "margin": MARGIN_UNITS[model.kind],
              **summarize(data[args.subset_column], margins), "stats": model.stats.as_dict()}
    del scorer, model
    gc.collect()
    _free_accelerator()
    return result, margins


def _free_accelerator() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(results: list[dict]) -> str:
    """One table, one column per model: RewardBench sections, then every subset as ``accuracy (n, ties)``."""
    from ..rewardbench import SECTIONS

    names = [os.path.basename(r["model"].rstrip("/")) or r["model"] for r in results]
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(results) + 1) + "|"]
    if any(r["sections"] for r in results):
        partial = any(s["missing"] for r in results for s in r["sections"].values())
        lines.append("| **RewardBench score** (mean of the four sections) | "
                     + " | ".join(_pct(r["score"]) + (" (partial)" if partial and r["score"] is not None else "")
                                  for r in results) + " |")
        for section in SECTIONS:
            if any(section in r["sections"] for r in results):
                cells = []
                for r in results:
                    s = r["sections"].get(section)
                    cells.append("-" if s is None else _pct(s["score"]) + (" (partial)" if s["missing"] else ""))
                lines.append(f"| **{section}** | " + " | ".join(cells) + " |")
    overall = [r["overall"] for r in results]
    lines.append("| **all rows** accuracy % (n, ties) | "
                 + " | ".join(f"{_pct(o['accuracy'])} ({o['n']}, {o['ties']})" for o in overall) + " |")
    for subset in results[0]["subsets"]:
        cells = [r["subsets"][subset] for r in results]
        lines.append(f"| {subset} | " + " | ".join(
            f"{_pct(c['accuracy'])} ({c['n']}, {c['ties']})" + (f" {c['errors']} errors" if c["errors"] else "")
            for c in cells) + " |")
    lines.append("")
    lines.append("Accuracy in %: chosen strictly above rejected (ties count as wrong, as in RewardBench). Sections "
                 "weight subsets by RewardBench's example counts; \"(partial)\" when some of a section's subsets are "
                 "absent.")
    return "\n".join(lines) + "\n"


def plots(results: list[dict], margins: list[list[tuple]], out_dir: str) -> None:
    """``margins.png`` (each model's margin distribution) and ``subsets.png`` (accuracy per subset per model)."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [os.path.basename(r["model"].rstrip("/")) or r["model"] for r in results]
    fig, axes = plt.subplots(len(results), 1, figsize=(7, 2.6 * len(results)), squeeze=False)
    for ax, name, r, ms in zip(axes[:, 0], names, results, margins):
        values = [m for m, _ in ms if m is not None]
        ax.hist(values, bins=min(40, max(5, len(values) // 3)), color="tab:blue", alpha=0.8)
        ax.axvline(0.0, color="black", linewidth=1)
        ax.set_title(f"{name}: accuracy {_pct(r['overall']['accuracy'])}%, n={len(values)}", fontsize=9)
        ax.set_xlabel(r["margin"], fontsize=8)
        ax.set_ylabel("rows")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "margins.png"), dpi=100)
    plt.close(fig)

    _subsets_plot(plt, names, results, out_dir)


def _sectioned(subsets: list[str]) -> list[tuple[str, list[str]]]:
    """The subsets under their RewardBench section headings, in RewardBench's order; others last."""
    from ..rewardbench import SECTIONS

    groups = [(section, [s for s in members if s in subsets]) for section, members in SECTIONS.items()]
    known = {s for _, members in groups for s in members}
    groups.append(("Other subsets", [s for s in subsets if s not in known]))
    return [(section, members) for section, members in groups if members]


def _subsets_plot(plt, names: list[str], results: list[dict], out_dir: str) -> None:
    """``subsets.png``: one bar per model and subset, grouped by section, each labelled with its accuracy (so a 0%
    bar is seen), the 50% chance line named in the legend, the legend above the bars."""
    groups = _sectioned(list(results[0]["subsets"]))
    labels: list[tuple[str, bool]] = []  # (text, is a section heading)
    for section, members in groups:
        labels.append((section, True))
        labels += [(s, False) for s in members]
    height = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(labels) * max(1, len(results) * 0.7) + 2.2))
    for k, (name, r) in enumerate(zip(names, results)):
        rows = [(i, r["subsets"][text]) for i, (text, heading) in enumerate(labels) if not heading]
        ys = [i + (k - (len(results) - 1) / 2) * height for i, _ in rows]
        acc = [100 * (c["accuracy"] or 0.0) for _, c in rows]
        bars = ax.barh(ys, acc, height=height * 0.95, label=name)
        for y, (_, c), bar in zip(ys, rows, bars):
            text = "no rows scored" if c["accuracy"] is None else f"{100 * c['accuracy']:.0f}% of {c['n']}"
            ax.text(bar.get_width() + 1, y, text, va="center", fontsize=7)
    ax.set_yticks(range(len(labels)), [t for t, _ in labels])
    for tick, (_, heading) in zip(ax.get_yticklabels(), labels):
        tick.set_fontweight("bold" if heading else "normal")
        tick.set_fontsize(9 if heading else 8)
    for i, (_, heading) in enumerate(labels):
        if heading and i:
            ax.axhline(i - 0.5, color="lightgrey", linewidth=0.8)
    ax.invert_yaxis()
    ax.axvline(50.0, color="grey", linestyle="--", linewidth=1, label="50%: chance (a coin flip)")
    ax.set_xlim(0, 118)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("accuracy % (chosen strictly above rejected; ties count as wrong)")
    ax.set_title("Preference accuracy per subset, by RewardBench section", fontsize=11, pad=28)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=min(4, len(results) + 1),
              frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "subsets.png"), dpi=100)
    plt.close(fig)


@reports_usage_errors("eval")
def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    specs = model_specs(args)
    for name, preset, _ in specs:
        check_preset(name, preset)
    check_output_dir(args.output_dir)
    require("matplotlib")  # the plots come last: fail before the scoring, not after
    data = read_rows(args.data, args.split)
    columns = (args.prompt_column, args.chosen_column, args.rejected_column, args.subset_column, args.id_column)
    require_columns(data, args.data, columns)
    if len(data) == 0:
        raise UsageError(f"{args.data}: has no rows")
    for number, subset in enumerate(data[args.subset_column]):
        if not isinstance(subset, str) or not subset:
            raise UsageError(f"{args.data}: row {number} has {args.subset_column!r} {subset!r}; every row needs a "
                             "subset name")
    results, margins = [], []
    for spec in specs:
        result, ms = evaluate(args, spec, data)
        results.append(result)
        margins.append(ms)
    out = args.output_dir
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"data": args.data, "rows": len(data), "models": results}, f, indent=2)
    with open(os.path.join(out, "rows.jsonl"), "w", encoding="utf-8") as f:
        ids = data[args.id_column] if args.id_column else range(len(data))
        write_rows(f, [{"id": i, "subset": s, **{f"margin_{k}": ms[n][0] for k, ms in enumerate(margins)},
                        **{f"error_{k}": ms[n][1] for k, ms in enumerate(margins) if ms[n][1]}}
                       for n, (i, s) in enumerate(zip(ids, data[args.subset_column]))])
    table = markdown(results)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table)
    plots(results, margins, out)
    print(table)
    errors = sum(r["overall"]["errors"] for r in results)
    print(f"wrote {out}/results.json, results.md, rows.jsonl, margins.png, subsets.png in "
          f"{time.perf_counter() - start:.1f} s" + (f"; {errors} rows could not be scored (see rows.jsonl)"
                                                    if errors else ""), file=sys.stderr)
    return 0

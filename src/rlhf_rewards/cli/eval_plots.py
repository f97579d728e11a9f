"""The two plots of ``rlhf-rewards eval``, for either benchmark: each model's distribution of per-row margins, and
one bar per model and subset, subsets grouped under headings, each bar labelled with its value."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple, Optional

from .common import require


class Bars(NamedTuple):
    """What ``subsets.png`` shows: ``groups`` are ``(heading, subsets)``; ``values[model][subset]`` is ``(fraction
    or None, the bar's label)``; a dashed line at ``chance`` (a fraction; none when ``None``) named ``chance_label``
    in the legend."""

    groups: list[tuple[str, list[str]]]
    values: list[dict[str, tuple[Optional[float], str]]]
    chance: Optional[float]
    chance_label: str
    xlabel: str
    title: str


def _pyplot():
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def margin_histograms(panels: Sequence[tuple[str, list[float], str]], path: str) -> None:
    """One histogram per model, each panel ``(title, margins, x-axis label)``, with a line at 0."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), squeeze=False)
    for ax, (title, values, xlabel) in zip(axes[:, 0], panels):
        ax.hist(values, bins=min(40, max(5, len(values) // 3)), color="tab:blue", alpha=0.8)
        ax.axvline(0.0, color="black", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("rows")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def subset_bars(names: Sequence[str], bars: Bars, path: str) -> None:
    """One bar per model and subset, grouped under headings, each labelled (so a 0 bar is seen), the chance line
    named in the legend, the legend above the bars."""
    plt = _pyplot()
    labels: list[tuple[str, bool]] = []  # (text, is a heading)
    for heading, members in bars.groups:
        labels.append((heading, True))
        labels += [(s, False) for s in members]
    height = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(labels) * max(1, len(names) * 0.7) + 2.2))
    for k, (name, values) in enumerate(zip(names, bars.values)):
        rows = [(i, values[text]) for i, (text, heading) in enumerate(labels) if not heading]
        ys = [i + (k - (len(names) - 1) / 2) * height for i, _ in rows]
        drawn = ax.barh(ys, [100 * (v or 0.0) for _, (v, _) in rows], height=height * 0.95, label=name)
        for y, (_, (_, text)), bar in zip(ys, rows, drawn):
            ax.text(bar.get_width() + 1, y, text, va="center", fontsize=7)
    ax.set_yticks(range(len(labels)), [t for t, _ in labels])
    for tick, (_, heading) in zip(ax.get_yticklabels(), labels):
        tick.set_fontweight("bold" if heading else "normal")
        tick.set_fontsize(9 if heading else 8)
    for i, (_, heading) in enumerate(labels):
        if heading and i:
            ax.axhline(i - 0.5, color="lightgrey", linewidth=0.8)
    ax.invert_yaxis()
    if bars.chance is not None:
        ax.axvline(100 * bars.chance, color="grey", linestyle="--", linewidth=1, label=bars.chance_label)
    ax.set_xlim(0, 118)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel(bars.xlabel)
    ax.set_title(bars.title, fontsize=11, pad=28)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0),
              ncol=min(4, len(names) + (bars.chance is not None)), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def percent(x: Optional[float]) -> str:
    """A share as a percentage with one decimal for the report tables, ``-`` when there is none."""
    return "-" if x is None else f"{100 * x:.1f}"


def model_names(results: Sequence[dict]) -> list[str]:
    """Each model's short name for tables and legends: its directory's or hub id's last part."""
    return [os.path.basename(r["model"].rstrip("/")) or r["model"] for r in results]

"""The report: one table per model and workload, the issue's targets marked met or missed, the machine."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from rlhf_rewards.batching import default_max_batch_tokens

from .measure import Measurement
from .workload import SCALAR_PRESETS

@dataclass
class Section:
    """One model and workload: its methods' measurements and the tokens of its inputs (``real_tokens``)."""

    title: str
    preset: str
    workload: str
    real_tokens: int
    inputs: int
    measurements: list[Measurement]

    def get(self, name: str) -> Optional[Measurement]:
        return next((m for m in self.measurements if m.name == name and not m.error), None)


def _max_diff(m: Measurement, ref: Optional[Measurement]) -> Optional[float]:
    if ref is None or not m.results or len(m.results) != len(ref.results):
        return None
    return max(abs(x - y) for x, y in zip(m.results, ref.results))


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def reference(section: Section) -> Optional[Measurement]:
    """What results are checked against: the card's procedure (llm-blender's for PairRM); for the generic
    sequence classifier, which has no card, TRL's path (the same text)."""
    for name in ("card", "llm-blender", "TRL"):
        m = section.get(name)
        if m is not None and m.card_exact:
            return m
    return None


def _packs(section: Section, name: str) -> bool:
    """Whether the method ``name`` of ``section`` scored packed rows: the other of "ours" and "ours, packing=X"."""
    other = next((m.name for m in section.measurements if m.name.startswith("ours, packing=")), None)
    return other is not None and (name == "ours, packing=True" or (name == "ours" and other.endswith("False")))


def section_rows(section: Section) -> list[dict[str, Any]]:
    """One row per method with the report's numbers (``None`` where not applicable)."""
    ours, floor = section.get("ours"), section.get("floor")
    ref = reference(section)
    rows = []
    for m in section.measurements:
        c = m.counts
        # without masks (right padding needs none in a causal model) padding shows against the floor: the same
        # token ids, none of them padding
        real = floor.counts.computed if c.unmasked and floor is not None else None if c.unmasked else c.real
        rows.append(dict(
            method=m.name, seconds=None if m.error else m.seconds,
            vs_ours=None if m.error or ours is None else m.seconds / ours.seconds,
            computed_per_real=None if m.error else c.computed / section.real_tokens,
            padded=None if m.error or not c.computed or real is None else (c.computed - real) / c.computed,
            overhead=None if m.error or not m.seconds else (m.seconds - c.model_seconds) / m.seconds,
            peak_mb=m.peak_mb, calls=None if m.error else c.calls,
            max_diff=_max_diff(m, ref) if m.card_exact and m is not ref else None,
            error=m.error,
        ))
    return rows


def section_notes(section: Section) -> list[str]:
    """What the table alone does not say: the results' reference, the card's LM-head share, the prefix-reuse gain,
    methods left out, out-of-memory events."""
    ref = reference(section)
    notes = [f"max abs diff: against {ref.name}'s results" + (" (no card: TRL's path reads the same text)"
                                                              if ref.name == "TRL" else "")] if ref else []
    card, ours = section.get("card"), section.get("ours")
    if card is not None and card.counts.head_seconds:
        share = card.counts.head_seconds / card.counts.model_seconds
        if section.preset == "rlhflow-pair-pm-llama3-8b":
            notes.append(f"card: the full-vocabulary LM head took {share:.1%} of its model time")
    if len(section.measurements) == 1 and ours is not None:
        notes.append("only ours runs on this workload (the other methods would add minutes): without prefix reuse "
                     "every input is computed whole (computed / real tokens >= 1.000), as the card does")
    if any(m.name.startswith("ours, max_batch_tokens=") for m in section.measurements):
        notes.append(f"ours runs with the CPU's default max_batch_tokens={default_max_batch_tokens(torch.device('cpu'))}"
                     "; the rows named after a budget differ only in it")
    if any(m.name.endswith("plain process") for m in section.measurements):
        notes.append("plain process: a fresh interpreter with glibc's default allocator that loads the model and "
                     "scores once, as a training job does; the other rows run in forked children with malloc keeping "
                     "freed memory and 1 GB faulted in (the model's work alone)")
    packed = [m for m in section.measurements if m.name.startswith("ours, packing=")]
    if packed and ours is not None:
        other = packed[0]
        default = "packs" if other.name.endswith("False") else "does not pack"
        notes.append(f"ours {default} by default here (packing='auto'); {other.name}: "
                     f"{other.seconds / ours.seconds:.2f}x the time of ours")
    if section.preset in ("ray2333-mistral-7b", "sequence-classifier"):
        notes.append("TRL's path is one forward of every input right-padded to the longest")
    trl, card = section.get("TRL"), section.get("card")
    if trl is not None and card is not None and not trl.card_exact and len(trl.results) == len(card.results):
        gap = max(abs(x - y) for x, y in zip(trl.results, card.results))
        notes.append(f"TRL's path (the card's text, right-padded, padding with EOS when the tokenizer has no pad "
                     f"token, as TRL's trainer sets it) differs from the card by up to {gap:.1e}")
    if section.workload == "solutions":
        notes.append("a process model: each input is a question and its solution's lines as steps; results are the "
                     "step rewards")
    if section.preset in ("starling-rm-34b", "starling-rm-7b-alpha"):
        notes.append("TRL's path does not apply: TRL loads reward models with AutoModelForSequenceClassification, "
                     "which has no Starling value head")
    if section.preset == "ray2333-mistral-7b":
        notes.append("the card pads to max_length, but Mistral's tokenizer has no length limit, so it pads "
                     "nothing: batch size 1 at the exact length, the floor's work plus its formatting")
    for m in section.measurements:
        if m.out_of_memory:
            notes.append(f"{m.name}: out of memory under the per-method cap ({m.error})")
        if m.stats.get("oom_splits"):
            notes.append(f"{m.name}: {m.stats['oom_splits']:.0f} batches split after running out of memory")
    return notes


def markdown(sections: Sequence[Section]) -> str:
    """The report's tables, one per model and workload."""
    lines = []
    for s in sections:
        lines += [f"### {s.title}", "",
                  f"{s.inputs} model inputs, {s.real_tokens} real tokens "
                  f"({s.real_tokens / max(1, s.inputs):.0f} per input).", "",
                  "| method | time (s) | x ours | computed / real tokens | padded | overhead | peak MB | calls "
                  "| max abs diff |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in section_rows(s):
            if r["error"]:
                lines.append(f"| {r['method']} | {r['error']} |  |  |  |  |  |  |  |")
                continue
            lines.append(
                f"| {r['method']} | {_fmt(r['seconds'], '.2f')} | {_fmt(r['vs_ours'], '.2f')} "
                f"| {_fmt(r['computed_per_real'], '.3f')} | {_fmt(r['padded'], '.1%')} | {_fmt(r['overhead'], '.1%')} "
                f"| {_fmt(r['peak_mb'], '.0f')} | {_fmt(r['calls'], 'd')} | {_fmt(r['max_diff'], '.1e')} |")
        lines += [*(f"- {n}" for n in section_notes(s)), ""]
    return "\n".join(lines)


def targets(sections: Sequence[Section]) -> list[tuple[str, bool, str]]:
    """``(target, met, measured)`` for each of the issue's targets this run can check."""
    out = []
    for s in sections:
        rows = {r["method"]: r for r in section_rows(s)}
        ours = rows.get("ours")
        if ours is None or ours["error"]:
            continue

        def ratio(name: str) -> Optional[float]:
            r = rows.get(name)
            return None if r is None or r["error"] else r["vs_ours"]

        if s.preset in SCALAR_PRESETS:
            if ratio("floor"):
                out.append((f"{s.preset}: ours within 1.15x of the floor", 1 / ratio("floor") <= 1.15,
                            f"ours / floor = {1 / ratio('floor'):.2f}"))
            plain, plain_floor = rows.get("ours, plain process"), rows.get("floor, plain process")
            if plain and plain_floor and plain["seconds"] and plain_floor["seconds"]:
                share = plain["seconds"] / plain_floor["seconds"]
                out.append((f"{s.preset}: ours within 1.15x of the floor in a plain process", share <= 1.15,
                            f"ours / floor = {share:.2f}"))
            packed = next((rows[n] for n in ("ours", "ours, packing=True") if n in rows
                           and rows[n]["computed_per_real"] is not None and _packs(s, n)), None)
            if packed is not None:
                out.append((f"{s.preset}: packed, computed / real tokens <= 1.01", packed["computed_per_real"] <= 1.01,
                            f"{packed['computed_per_real']:.3f}"))
            if ratio("card"):
                out.append((f"{s.preset}: ours >= 5x faster than the card", ratio("card") >= 5,
                            f"card / ours = {ratio('card'):.2f}"))
            if "TRL" in rows:
                trl = rows["TRL"]
                out.append((f"{s.preset}: ours faster than TRL's path", trl["error"] is not None or trl["vs_ours"] > 1,
                            "TRL out of memory" if trl["error"] else f"TRL / ours = {trl['vs_ours']:.2f}"))
            if ours["padded"] is not None:
                out.append((f"{s.preset}: padding <= 10% of computed tokens", ours["padded"] <= 0.10,
                            f"{ours['padded']:.1%}"))
            out.append((f"{s.preset}: wrapper overhead <= 10%", ours["overhead"] <= 0.10, f"{ours['overhead']:.1%}"))
        elif s.preset == "pairrm" and ratio("llm-blender"):
            out.append((f"pairrm ({s.workload}): >= 1.5x faster than llm-blender", ratio("llm-blender") >= 1.5,
                        f"llm-blender / ours = {ratio('llm-blender'):.2f}"))
        elif s.preset == "rlhflow-pair-pm-llama3-8b" and ratio("card"):
            out.append((f"pair-PM ({s.workload}): >= 1.5x faster than the card's loop", ratio("card") >= 1.5,
                        f"card / ours = {ratio('card'):.2f}"))
        diffs = [r["max_diff"] for r in rows.values() if r["max_diff"] is not None]
        if diffs:
            out.append((f"{s.title}: every method's results within 1e-4 of {reference(s).name}'s",
                        max(diffs) <= 1e-4, f"max {max(diffs):.1e}"))
    return out


def machine() -> dict[str, Any]:
    """The CPU, core count and library versions the run used."""
    import transformers

    model_name = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model_name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    return dict(cpu=model_name, cores=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, trl=trl_version, load_before=os.getloadavg()[0])


@dataclass
class Report:
    """Everything one run measured."""

    scale: str
    seed: int
    threads: int
    machine: dict[str, Any]
    seconds: float
    sections: list[Section]
    notes: list[str]

    def markdown(self) -> str:
        m = self.machine
        lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {self.threads} torch threads; Python {m['python']}, "
                 f"torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}. Scale {self.scale}, seed "
                 f"{self.seed}; whole run {self.seconds:.0f} s; load average (1 min) {m['load_before']:.2f} before, "
                 f"{m['load_after']:.2f} after (above 0 means other work shared the cores).", "",
                 *(f"- {n}" for n in self.notes), "",
                 markdown(self.sections), "### Targets", ""]
        for target, met, measured in targets(self.sections):
            lines.append(f"- {'met' if met else 'MISSED'}: {target} ({measured})")
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, Any]:
        return dict(scale=self.scale, seed=self.seed, threads=self.threads, machine=self.machine,
                    seconds=self.seconds, notes=self.notes,
                    sections=[dict(title=s.title, preset=s.preset, workload=s.workload, real_tokens=s.real_tokens,
                                   inputs=s.inputs, rows=section_rows(s), notes=section_notes(s),
                                   stats={m.name: m.stats for m in s.measurements})
                              for s in self.sections],
                    targets=[dict(target=t, met=ok, measured=v) for t, ok, v in targets(self.sections)])



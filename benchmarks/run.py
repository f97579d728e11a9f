"""Running the whole benchmark: build the workload and models, run every method, report (``python -m benchmarks``)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from . import __doc__ as DOC
from .measure import Probe, Runner, warmup_for
from .methods import (backbone_of, family_methods, family_samples, messages, pair_pm_methods, pairrm_methods,
                      scalar_methods)
from .plain import PlainJob, run_plain
from .report import Report, Section, machine
from .workload import (FAMILIES, FULL, LLAMA3_8B, NEW_FAMILIES, SCALAR_PRESETS, SMOKE, Conversation, Group, Scale,
                       Writer, build_model, comparisons, corpus_words, lm_head_share, make_workload, short_groups)

def _scalar_sections(scale: Scale, runner: Runner, root: str, seed: int, presets: Sequence[str],
                     conversations: Sequence[Conversation], words: Sequence[str]) -> list[Section]:
    sections = []
    for k, preset in enumerate(presets):
        runner.log(f"{preset}: building")
        directory = os.path.join(root, preset)
        rm = build_model(preset, scale.sizes[preset], directory, seed)
        writer = Writer(rm.tokenizer, words)
        methods = scalar_methods(rm, writer, conversations)
        real = sum(len(ids) for ids in rm.tokenize([rm.format(*messages(writer, c)) for c in conversations]))
        probe = Probe(rm.backbone, [rm.head])
        section = Section(preset, preset, "mixed", real, len(conversations),
                          runner.run(rm, methods, probe, warmup_for(rm.backbone)))
        # as a user's process runs: ours and the floor, and on the first preset ours at each budget of the sweep
        jobs = [PlainJob(scale, seed, preset, directory, name, None, runner.threads) for name in ("ours", "floor")
                if k < scale.plain_presets]
        if k == 0:
            jobs += [PlainJob(scale, seed, preset, directory, "ours", budget, runner.threads)
                     for budget in scale.budgets]
        for job in jobs:
            runner.log(f"  {job.method}{f' at {job.budget}' if job.budget else ''}, plain process ...")
            section.measurements.append(run_plain(job, runner.timeout))
            runner.log(f"    {section.measurements[-1].seconds:.2f} s")
        sections.append(section)
    return sections


def _family_sections(scale: Scale, runner: Runner, root: str, seed: int, presets: Sequence[str],
                     conversations: Sequence[Conversation], words: Sequence[str]) -> list[Section]:
    """The families added after the seeds, each against its card (:func:`~benchmarks.methods.family_methods`)."""
    sections = []
    for preset in presets:
        runner.log(f"{preset}: building")
        directory = os.path.join(root, preset)
        rm: Any = build_model(preset, scale.sizes[preset], directory, seed)
        count = scale.process_conversations if rm.kind == "process" else scale.family_conversations
        samples = family_samples(rm, Writer(rm.tokenizer, words), conversations[:count])
        methods = family_methods(rm, directory, samples)
        real = sum(len(ids) for ids in rm.tokenize([rm.format(p, c) for p, c in samples]))
        probe = Probe(backbone_of(rm))
        what = "solutions" if rm.kind == "process" else "mixed"
        sections.append(Section(preset, preset, what, real, len(samples),
                                runner.run(rm, methods, probe, warmup_for(backbone_of(rm)))))
    return sections


def _pairwise_sections(scale: Scale, runner: Runner, root: str, seed: int, family: str, groups: Sequence[Group],
                       words: Sequence[str], workload_filter: Sequence[str] = ()) -> list[Section]:
    preset = "rlhflow-pair-pm-llama3-8b" if family == "pair-pm" else "pairrm"
    runner.log(f"{preset}: building")
    rm: Any = build_model(preset, scale.sizes[preset], os.path.join(root, preset), seed)
    default = rm.packing
    writer = Writer(rm.tokenizer, words)
    counts = scale.pair_pm_groups if family == "pair-pm" else scale.pairrm_groups
    # (label, comparison mode, groups, title detail)
    workloads = [("baseline", "baseline", groups[:counts[0]], ""),
                 ("round-robin", "round-robin", groups[:counts[1]], "")]
    if family == "pair-pm":
        workloads.insert(1, ("baseline, short contexts", "baseline", short_groups(scale, seed),
                             f" (contexts ~{scale.short_context} tokens, responses ~{scale.short_response})"))
    sections = []
    for label, mode, chosen, shape in workloads:
        if workload_filter and label not in workload_filter:
            continue
        items = comparisons(writer, chosen, mode)
        if family == "pair-pm":
            methods = pair_pm_methods(rm, items, default=default, ours_only=mode == "round-robin", full=not shape)
            real = sum(len(rm.tokenizer.encode(t, add_special_tokens=False)) for p, x, y in items
                       for t in rm.format(p, x, y))
            probe, warmup = Probe(rm.backbone, [rm.model.get_output_embeddings()]), warmup_for(rm.backbone)
        else:
            methods = pairrm_methods(rm, items)
            real = sum(len(r) for p, x, y in items for r in rm.encode(p, x, y))
            probe, warmup = Probe(rm.model), warmup_for(rm.model.pretrained_model)
        title = f"{preset}, {len(chosen)} group(s) of {scale.group_size}{shape}, " + (
            "each completion against one baseline" if mode == "baseline" else "round robin")
        runner.log(title)
        sections.append(Section(title, preset, label, real, 2 * len(items), runner.run(rm, methods, probe, warmup)))
    return sections


def run(scale: Scale, *, scale_name: str = "custom", seed: int = 0, families: Sequence[str] = FAMILIES,
        presets: Sequence[str] = SCALAR_PRESETS, isolate: bool = True, threads: Optional[int] = None,
        memory_cap_gb: float = 12.0, timeout: float = 900.0, log: Callable[[str], None] = lambda s: None,
        workloads: Sequence[str] = (), methods: Sequence[str] = ()) -> Report:
    """Build the workload and models, run every method, return the :class:`Report`.

    ``isolate``: each method in a forked child with a warm, caching heap (``scale.warm_heap_gb``) and at most
    ``memory_cap_gb`` of memory (see :func:`run_isolated`); only from a process that has not run multi-threaded
    torch work. ``threads``: torch threads for the methods (default: the CPU count). ``workloads``, ``methods``:
    only the pairwise workloads (labels such as ``"baseline, short contexts"``) and methods so named (default: all)."""
    start, host = time.perf_counter(), machine()
    threads = threads or os.cpu_count() or 1
    if isolate:
        torch.set_num_threads(1)  # the parent only builds; children get `threads`
    else:
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # a tokenizer thread pool would not survive a fork
    runner = Runner(isolate, threads, memory_cap_gb, scale.warm_heap_gb, timeout, log, tuple(methods))
    conversations, groups = make_workload(scale, seed)
    words = corpus_words()
    sections: list[Section] = []
    with tempfile.TemporaryDirectory(prefix="rlhf-rewards-bench-") as root:
        if "scalar" in families:
            if any(p in presets for p in ("ray2333-mistral-7b", "sequence-classifier")):
                importlib.import_module("trl.data_utils")  # seconds to import: once here, not in every child
            sections += _scalar_sections(scale, runner, root, seed, presets, conversations, words)
        for family in ("pair-pm", "pairrm"):
            if family in families:
                sections += _pairwise_sections(scale, runner, root, seed, family, groups, words, workloads)
        chosen = [p for family, ps in NEW_FAMILIES.items() if family in families for p in ps]
        if chosen:
            sections += _family_sections(scale, runner, root, seed, chosen, conversations, words)
    notes = [f"{name}: hidden {size.hidden}, {size.layers} layers, {size.heads} heads ({size.kv_heads} key/value), "
             f"MLP {size.intermediate}, vocabulary {size.vocab}" for name, size in scale.sizes.items()
             if name in {s.preset for s in sections}]
    if "pair-pm" in families:
        pm = scale.sizes["rlhflow-pair-pm-llama3-8b"]
        notes.append(f"pair-PM: the LM head is {lm_head_share(pm):.1%} of the model's FLOPs per token "
                     f"(Llama-3-8B: {lm_head_share(LLAMA3_8B):.1%})")
    host["load_after"] = os.getloadavg()[0]
    return Report(scale_name, seed, threads, host, time.perf_counter() - start, sections, notes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m benchmarks``: run the benchmark, print the markdown report, optionally write it and a JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=DOC.split("\n\n")[0].replace("``", ""))
    parser.add_argument("--smoke", action="store_true", help="tiny models and inputs: seconds, for tests")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {FAMILIES}")
    parser.add_argument("--presets", default=",".join(SCALAR_PRESETS), help="scalar presets to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    parser.add_argument("--memory-cap-gb", type=float, default=12.0,
                        help="per-method memory cap; a method above it is reported as out of memory")
    parser.add_argument("--no-isolate", action="store_true",
                        help="run methods one after another in this process (no fork; allocator state and "
                             "model settings carry over between methods)")
    parser.add_argument("--workloads", default="", help="only these pairwise workloads (labels: "
                        "baseline | baseline, short contexts | round-robin; separate several with ';')")
    parser.add_argument("--methods", default="", help="only these methods, ';'-separated (e.g. 'card;ours')")
    parser.add_argument("--markdown", help="also write the report to this file")
    parser.add_argument("--json", help="write the numbers as JSON to this file")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    families, presets = [f for f in args.families.split(",") if f], [p for p in args.presets.split(",") if p]
    unknown = sorted(set(families) - set(FAMILIES)) + sorted(set(presets) - set(SCALAR_PRESETS))
    if unknown:
        parser.error(f"unknown families or presets: {', '.join(unknown)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    report = run(SMOKE if args.smoke else FULL, scale_name="smoke" if args.smoke else "full", seed=args.seed,
                 families=families, presets=presets,
                 isolate=not args.no_isolate, threads=args.threads, memory_cap_gb=args.memory_cap_gb,
                 log=lambda s: print(s, file=sys.stderr, flush=True),
                 workloads=[w for w in args.workloads.split(";") if w], methods=[m for m in args.methods.split(";") if m])
    text = report.markdown()
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.as_json(), f, indent=2)
    return 0


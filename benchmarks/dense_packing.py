"""Dense packed rows: today's packed plan (rows grouped under the 10% padding cap of padded batches) against the
current one (packed rows grouped under ``PACKED_MAX_PADDING``), on GRPO-sized batches of the benchmark's mixed
lengths, in one run (``python -m benchmarks.dense_packing [--smoke] [--markdown FILE]``).

Per batch size (64, 128, 256, 512 samples):

* ``computed/real`` of both plans at budgets of 4096 (the CPU default), 16384 and 65536 tokens (the CUDA range),
  from planning alone: ``rows x widest row`` per batch over the samples' tokens, as ``rm.stats`` counts them;
* wall time of scoring the batch packed (``packing=True``, sdpa) on the benchmark's random Ray2333 model, both plans
  alternating ``repeats`` times in this one process (each first every other time), best time each, and its ratio
  (new / today: below 1 is faster), with the forward passes each plan ran;
* the planning time of the current plan.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch

from rlhf_rewards import batching, load_reward_model

from .workload import FULL, SMOKE, Scale, Writer, build_model, corpus_words, make_workload

SIZES = (64, 128, 256, 512)
BUDGETS = (4096, 16384, 65536)
TIMED_BUDGET = 16384
PRESET = "ray2333-mistral-7b"
TEMPLATE_TOKENS = 8
"""Tokens a chat template adds per message in :func:`mixed_lengths` (Mistral's ``[INST]``/``[/INST]``, Llama-3's
headers: 4-8)."""


def mixed_lengths(n: int, seed: int) -> list[int]:
    """Token lengths of ``n`` of the benchmark's seeded conversations (system, turns and response, and
    :data:`TEMPLATE_TOKENS` per message): planning without a tokenizer."""
    conversations, _ = make_workload(replace(FULL, conversations=n), seed)
    return [sum(t.tokens + TEMPLATE_TOKENS for t in (*([c.system] if c.system else []), *c.turns, c.response))
            for c in conversations]


def computed_over_real(lengths: Sequence[int], plan: Sequence[Sequence[Sequence[int]]]) -> float:
    """``sum over batches of rows x widest row`` over the real tokens: what ``rm.stats`` counts for ``plan``."""
    computed = sum(len(batch) * max(sum(lengths[i] for i in row) for row in batch) for batch in plan)
    return computed / sum(lengths)


@contextmanager
def todays_plan() -> Iterator[None]:
    """Packed rows grouped as before dense packing: under the padded batches' cap."""
    kept = batching.PACKED_MAX_PADDING
    batching.PACKED_MAX_PADDING = batching.MAX_PADDING
    try:
        yield
    finally:
        batching.PACKED_MAX_PADDING = kept


def planning_rows(sizes: Sequence[int], seed: int) -> list[str]:
    rows = []
    for n in sizes:
        lengths = mixed_lengths(n, seed)
        cells = []
        for budget in BUDGETS:
            with todays_plan():
                before = computed_over_real(lengths, batching.plan_packed(lengths, budget))
            start = time.perf_counter()
            plan = batching.plan_packed(lengths, budget)
            ms = 1000 * (time.perf_counter() - start)
            cells.append(f"{before:.4f} -> {computed_over_real(lengths, plan):.4f} ({ms:.1f} ms)")
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return rows


def timing_rows(scale: Scale, sizes: Sequence[int], seed: int, repeats: int) -> list[str]:
    words = corpus_words()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        build_model(PRESET, scale.sizes[PRESET], root, seed)  # saved in the preset's layout, loaded again to pack
        rm = load_reward_model(root, preset=PRESET, device="cpu", dtype=torch.float32, packing=True,
                               max_batch_tokens=TIMED_BUDGET)
        writer = Writer(rm.tokenizer, words)
        for n in sizes:
            conversations, _ = make_workload(replace(scale, conversations=n), seed)
            prompts = [writer.prompt(c) for c in conversations]
            completions = [writer.text(c.response) for c in conversations]
            best = {"today": float("inf"), "new": float("inf")}
            counts: dict[str, tuple[int, int, int]] = {}
            scores: dict[str, list[float]] = {}
            for k in range(repeats):
                for name in ("today", "new") if k % 2 == 0 else ("new", "today"):  # neither always runs warmer
                    rm.stats.reset()
                    start = time.perf_counter()
                    if name == "today":
                        with todays_plan():
                            scores[name] = rm.score(prompts, completions)
                    else:
                        scores[name] = rm.score(prompts, completions)
                    best[name] = min(best[name], time.perf_counter() - start)
                    counts[name] = (rm.stats.computed_tokens, rm.stats.real_tokens, rm.stats.batches)
            diff = max(abs(a - b) for a, b in zip(scores["today"], scores["new"]))
            ratios = {k: c / r for k, (c, r, _) in counts.items()}
            rows.append(f"| {n} | {counts['new'][1]} | {ratios['today']:.4f} ({counts['today'][2]}) | "
                        f"{ratios['new']:.4f} ({counts['new'][2]}) | {best['today']:.2f} | {best['new']:.2f} | "
                        f"{best['new'] / best['today']:.3f} | {diff:.1e} |")
            print(f"  {n} samples done", file=sys.stderr)
    return rows


def report(smoke: bool, seed: int, repeats: int) -> str:
    sizes = SIZES[:1] if smoke else SIZES
    lines = ["## Dense packed rows", "", "Planning alone, computed / real tokens, today -> now (planning time now), "
             "the benchmark's mixed lengths:", "",
             "| samples | " + " | ".join(f"budget {b}" for b in BUDGETS) + " |",
             "|---" * (len(BUDGETS) + 1) + "|", *planning_rows(sizes, seed), "",
             f"Scoring packed (sdpa, CPU, {PRESET}'s benchmark model, budget {TIMED_BUDGET}), best of {repeats}; "
             "computed / real (forward passes); time in seconds; max |score difference| between the plans:", "",
             "| samples | real tokens | today | now | today s | now s | now / today | max diff |",
             "|---|---|---|---|---|---|---|---|",
             *timing_rows(SMOKE if smoke else FULL, [8] if smoke else sizes, seed, repeats)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dense_packing", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one small batch on the tiny model (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", help="also write the report to this file")
    args = parser.parse_args(argv)
    text = report(args.smoke, args.seed, args.repeats)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

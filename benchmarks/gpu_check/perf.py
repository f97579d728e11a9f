"""The measurements, as ratios taken in one run: ours against the card, TRL's path and the padding-free floor on a
GRPO-shaped workload and the benchmark's; the default token budget against two others; peak memory; batching across
requests in the server; int8 and nf4 quantization against bfloat16."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Sequence
from typing import Any, Optional

import torch

from ..measure import Probe, warmup_for
from ..methods import scalar_methods
from ..workload import Conversation, Scale, Writer, corpus_words, make_workload
from .checks import Model, ours


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device, base: int) -> Optional[float]:
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20 if device.type == "cuda" else None


def time_method(rm: Any, method: Any) -> dict[str, Any]:
    """One method's wall seconds, computed / real token positions (by the probe), forward passes and, on CUDA, peak
    memory beyond what was allocated before (``torch.cuda.max_memory_allocated``)."""
    if method.prepare is not None:
        method.prepare()
    warmup_for(rm.backbone)()
    device = rm.device
    _sync(device)
    base = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    counter = method.probe or Probe(rm.backbone, [rm.head])
    probe = Probe(counter.backbone, counter.heads)
    with probe:
        start = time.perf_counter()
        method.run()
        _sync(device)
        seconds = time.perf_counter() - start
    return dict(method=method.name, seconds=seconds, computed=probe.counts.computed, real=probe.counts.real,
                calls=probe.counts.calls, peak_mb=_peak_mb(device, base))


def grpo_workload(scale: Scale, seed: int, prompts: int = 16, completions: int = 8) -> list[Conversation]:
    """GRPO's shape: ``prompts`` prompts of the benchmark's workload, ``completions`` responses to each."""
    conversations, _ = make_workload(scale, seed)
    responses = [c.response for c in conversations]
    return [Conversation(c.system, c.turns, responses[(p * completions + k) % len(responses)])
            for p in range(prompts) for c in [conversations[p % len(conversations)]] for k in range(completions)]


def throughput(model: Model, device: torch.device, scale: Scale, seed: int, grpo: tuple[int, int] = (16, 8)
               ) -> dict[str, Any]:
    """On ``model`` (a scalar preset with a card procedure) in the device's default dtype: every method of the
    benchmark (:func:`~benchmarks.methods.scalar_methods`) on the GRPO-shaped workload (``grpo``: prompts x
    completions) and on the benchmark's, each
    with its time as a ratio to ours; ours at the device's default token budget, half and twice it."""
    rm = model.load(device)
    writer = Writer(rm.tokenizer, corpus_words())
    workloads = {f"GRPO {grpo[0]} prompts x {grpo[1]} completions": grpo_workload(scale, seed, *grpo),
                 f"benchmark workload ({scale.conversations} conversations)": make_workload(scale, seed)[0]}
    out: dict[str, Any] = {"preset": model.preset, "dtype": str(rm.backbone.dtype).removeprefix("torch."),
                           "default_max_batch_tokens": rm.max_batch_tokens, "workloads": {}}
    default = rm.max_batch_tokens
    for title, conversations in workloads.items():
        rows = [time_method(rm, m) for m in scalar_methods(rm, writer, conversations)]
        mine = next(r for r in rows if r["method"] == "ours")
        for r in rows:
            r["vs_ours"] = r["seconds"] / mine["seconds"]
        out["workloads"][title] = rows
    conversations = workloads[f"benchmark workload ({scale.conversations} conversations)"]
    budgets = []
    for budget in (default // 2, default, default * 2):
        rm.max_batch_tokens = budget
        ours_method = next(m for m in scalar_methods(rm, writer, conversations) if m.name == "ours")
        rm.max_batch_tokens = budget  # the method's own setting puts back the packing choice only
        row = time_method(rm, ours_method)
        row.update(budget=budget, default=budget == default)
        budgets.append(row)
    for row in budgets:
        row["vs_default"] = row["seconds"] / next(b for b in budgets if b["default"])["seconds"]
    out["budgets"] = budgets
    return out


SERVER_WAITS = (5.0, 0.0)
"""``--max-wait-ms`` of the two servers compared: batching across requests, and one forward per request."""


def start_servers(model: Model, device: torch.device, stack: contextlib.ExitStack) -> dict[float, Any]:
    """``rlhf-rewards serve`` on ``model`` per :data:`SERVER_WAITS`, started now and stopped when ``stack`` closes:
    they load while the caller checks other models (on otherwise idle cores), and take no compute once idle, so
    they wait for :func:`serving` without disturbing what runs meanwhile."""
    from .. import serving as bench

    return {wait: stack.push(bench.Server(model.directory, model.preset, str(device), wait, None))
            for wait in SERVER_WAITS}


def serving(servers: dict[float, Any], requests: int, senders: int = 64) -> dict[str, Any]:
    """``senders`` concurrent one-sample clients against the :func:`start_servers` ones, with batching across
    requests (``--max-wait-ms 5``) and without (``0``: one forward per request), one server after the other, by
    :mod:`benchmarks.serving`."""
    from .. import serving as bench

    queries = [bench.chatml_query(q, a) for q, a in bench.workload(requests, 0)]
    on, off = [bench.measure_server(servers[wait].ready(), queries, senders, wait) for wait in SERVER_WAITS]
    return dict(senders=senders, requests=requests, batching=on, no_batching=off,
                speedup=on["requests_per_s"] / off["requests_per_s"])


def quantization(model: Model, device: torch.device) -> dict[str, Any]:
    """int8 and nf4 (bitsandbytes) scores against bfloat16 on the same samples: the largest difference and the
    scores' own spread, for scale."""
    if device.type != "cuda":
        return {"skipped": f"bitsandbytes quantization needs CUDA, not {device.type}"}
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes not installed"}
    reference = ours(model.load(device, torch.bfloat16), model.samples)
    out: dict[str, Any] = {"bf16_spread": max(reference) - min(reference)}
    for name, setting in (("int8", "8bit"), ("nf4", "4bit")):
        rm = model.load(device, torch.bfloat16, quantization=setting)
        got = ours(rm, model.samples)
        out[name] = {"max_diff_from_bf16": max(abs(a - b) for a, b in zip(got, reference)),
                     "peak_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20}
    return out


def ratio_line(rows: Sequence[dict[str, Any]]) -> str:
    """``card 3.1x, TRL 2.0x, floor 0.9x`` (each method's time over ours)."""
    return ", ".join(f"{r['method']} {r['vs_ours']:.2f}x" for r in rows if r["method"] != "ours")

"""The whole check and its command line: build every preset's random model, run the checks and measurements, write
``gpu_check.json`` and ``gpu_check.md``, exit 1 iff an exactness check failed."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from ..workload import FULL, SMOKE, ModelSize
from . import FP32_TOL, ULPS
from .checks import LEAK_PRESET, PACKING_PRESETS, Check, attention_implementations, build, every_preset, exactness, \
    packing, row_mate_leak, written_models
from .perf import quantization, ratio_line, serving, start_servers, throughput

TIMED = "ray2333-mistral-7b"
"""The model throughput, serving and quantization run on (a scalar preset with a card procedure)."""
PARTS = ("exactness", "packing", "throughput", "serving", "quantization")
SIZES = {
    # Llama-3-8B's shape scaled to a quarter of its width and depth: ~100-250M weights a model (mostly the real
    # vocabularies' embeddings and heads), large enough that kernels, not Python, set the times on an H100
    "full": ModelSize(1024, 8, 16, 4, 3584),
    "smoke": ModelSize(16, 1, 2, 1, 32),
}
SAMPLES = {"full": 16, "smoke": 3}
REQUESTS = {"full": 640, "smoke": 64}
GRPO = {"full": (16, 8), "smoke": (4, 2)}  # prompts x completions


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def machine(device: torch.device) -> dict[str, Any]:
    """The device, its driver, and the library versions the run used."""
    import transformers

    out = dict(device=str(device), python=platform.python_version(), torch=torch.__version__,
               transformers=transformers.__version__, cuda=torch.version.cuda or "none",
               flash_attn=_version("flash_attn"), bitsandbytes=_version("bitsandbytes"))
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip().split("\n")[0]
        except (OSError, subprocess.TimeoutExpired):
            out["driver"] = "unknown (nvidia-smi not found)"
    else:
        out["gpu"], out["driver"] = "none (CPU run)", "none"
        out["cpu"], out["cores"] = platform.processor() or "unknown", os.cpu_count()
    return out


def run(out_dir: str, device: torch.device, scale: str, presets: Sequence[str], skip: Sequence[str] = (),
        seed: int = 0, inject: Callable[[list[float]], list[float]] = list,
        log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Everything, as the JSON report's dict (also written to ``out_dir``)."""
    start = time.perf_counter()
    bench_scale = FULL if scale == "full" else SMOKE
    result: dict[str, Any] = dict(machine=machine(device), scale=scale, seed=seed, checks=[], skipped=[],
                                  tolerances=dict(float32=FP32_TOL, bfloat16=f"{ULPS} x 2^-8 x max(1, |results|)"),
                                  model_size=vars(SIZES[scale]))
    checks: list[Check] = []
    servers: dict[float, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rlhf-rewards-gpu-check-") as root, contextlib.ExitStack() as stack:
        models = {}
        order = sorted(presets, key=lambda p: p != TIMED)  # the timed one first: its servers start early
        for preset, directory in written_models(order, SIZES[scale], root, seed, stack):
            log(f"{preset}: loading")
            models[preset], float32 = build(preset, directory, bench_scale, SAMPLES[scale], seed, device)
            if preset == TIMED and "serving" not in skip:
                servers = start_servers(models[preset], device, stack)
            if "exactness" not in skip:
                log(f"{preset}: exactness")
                checks += exactness(models[preset], float32, inject)
            del float32
        implementations, skipped = attention_implementations(device)
        if "packing" not in skip:
            result["skipped"] += skipped
            for preset in [p for p in PACKING_PRESETS if p in models]:
                log(f"{preset}: packing")
                checks += packing(models[preset], device, implementations)
            if LEAK_PRESET in models:
                checks += row_mate_leak(models[LEAK_PRESET], device, implementations)
        timed = models.get(TIMED)
        for part, job in (("throughput", lambda: throughput(timed, device, bench_scale, seed, GRPO[scale])),
                          ("serving", lambda: serving(servers, REQUESTS[scale])),
                          ("quantization", lambda: quantization(timed, device))):
            if part in skip:
                result["skipped"].append(f"{part}: skipped: --skip")
            elif timed is None:
                result["skipped"].append(f"{part}: skipped: runs on {TIMED}, not among --presets")
            else:
                log(part)
                result[part] = job()
                if "skipped" in result[part]:
                    result["skipped"].append(f"{part}: skipped: {result[part]['skipped']}")
    result["checks"] = [c.as_dict() for c in checks]
    result["skipped"] += [f"{c.check} {c.preset} ({c.setting}): skipped: {c.skipped}" for c in checks if c.skipped]
    result["failed"] = [f"{c.check} {c.preset} ({c.setting})" for c in checks if not c.passed]
    result["seconds"] = time.perf_counter() - start
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write(markdown(result))
    return result


def _fmt(x: Optional[float], spec: str = ".1e") -> str:
    return "-" if x is None else format(x, spec)


def markdown(result: dict[str, Any]) -> str:
    """The report: the machine first, the verdict, then every check and measurement."""
    m = result["machine"]
    lines = [f"GPU: {m['gpu']}; driver {m['driver']}; CUDA {m['cuda']}; torch {m['torch']}; transformers "
             f"{m['transformers']}; flash-attn {m['flash_attn']}; bitsandbytes {m['bitsandbytes']}; Python "
             f"{m['python']}; device {m['device']}.",
             f"Scale {result['scale']} (models: {result['model_size']}), seed {result['seed']}, "
             f"{result['seconds']:.0f} s.", "",
             f"**{'FAILED: ' + '; '.join(result['failed']) if result['failed'] else 'Every exactness check passed'}"
             f"** ({len(result['checks'])} checks, {len(result['skipped'])} skipped).", "",
             "## Exactness", "",
             f"Tolerances: float32 {FP32_TOL}; bfloat16 {result['tolerances']['bfloat16']} (see docs/benchmarks.md).",
             "", "| check | preset | setting | compared | max abs diff | tolerance | passed | detail |",
             "|---|---|---|---:|---:|---:|---|---|"]
    for c in result["checks"]:
        lines.append(f"| {c['check']} | {c['preset']} | {c['setting']} | {c['compared']} | {_fmt(c['max_diff'])} "
                     f"| {_fmt(c['tolerance'])} | {'yes' if c['passed'] else 'NO'}"
                     f"{' (skipped)' if c['skipped'] else ''} | {c['skipped'] or c['detail']} |")
    if "throughput" in result:
        t = result["throughput"]
        lines += ["", f"## Throughput ({t['preset']}, {t['dtype']})", ""]
        for title, rows in t["workloads"].items():
            lines += [f"### {title}", "", f"Time over ours: {ratio_line(rows)}.", "",
                      "| method | seconds | x ours | computed / real tokens | calls | peak MB |",
                      "|---|---:|---:|---:|---:|---:|"]
            for r in rows:
                real = max(1, next(x for x in rows if x["method"] == "floor")["computed"])
                lines.append(f"| {r['method']} | {r['seconds']:.3f} | {r['vs_ours']:.2f} | {r['computed'] / real:.3f} "
                             f"| {r['calls']} | {_fmt(r['peak_mb'], '.0f')} |")
            lines.append("")
        lines += [f"Token budget (default {t['default_max_batch_tokens']}):", "",
                  "| max_batch_tokens | seconds | x default | peak MB |", "|---:|---:|---:|---:|"]
        lines += [f"| {b['budget']}{' (default)' if b['default'] else ''} | {b['seconds']:.3f} | {b['vs_default']:.2f} "
                  f"| {_fmt(b['peak_mb'], '.0f')} |" for b in t["budgets"]]
    if "serving" in result:
        s = result["serving"]
        lines += ["", f"## Serving ({s['senders']} concurrent one-sample clients, {s['requests']} requests)", "",
                  f"Batching across requests: **{s['speedup']:.2f}x** the throughput of one forward per request "
                  f"(target >= 2x: {'met' if s['speedup'] >= 2 else 'missed'}).", "",
                  "| server | requests/s | p50 ms | p99 ms | forward batches / request |", "|---|---:|---:|---:|---:|"]
        for name, row in (("batching (5 ms)", s["batching"]), ("one forward per request", s["no_batching"])):
            lines.append(f"| {name} | {row['requests_per_s']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                         f"{row['forward_batches'] / row['requests']:.2f} |")
    if "quantization" in result and "skipped" not in result["quantization"]:
        q = result["quantization"]
        lines += ["", "## Quantization (against bfloat16)", "", f"bfloat16 scores spread over {q['bf16_spread']:.3f}.",
                  ""] + [f"- {name}: max abs diff {q[name]['max_diff_from_bf16']:.3e}, peak {q[name]['peak_mb']:.0f} MB"
                         for name in ("int8", "nf4")]
    lines += ["", "## Skipped (not failures)", ""] + [f"- {s}" for s in result["skipped"] or ["nothing"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None, inject: Callable[[list[float]], list[float]] = list) -> int:
    """``python -m benchmarks.gpu_check``: 0 when every exactness check passed, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", choices=("full", "smoke"), default="full")
    parser.add_argument("--presets", default="", help="comma-separated presets (default: every preset)")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {', '.join(PARTS)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p] or every_preset()
    skip = [s for s in args.skip.split(",") if s]
    unknown = sorted(set(presets) - set(every_preset())) + sorted(set(skip) - set(PARTS))
    if unknown:
        parser.error(f"unknown presets or parts: {', '.join(unknown)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    result = run(args.out, torch.device(args.device), args.scale, presets, skip, args.seed, inject,
                 log=lambda s: print(f"[{time.perf_counter() - start:5.0f} s] {s}", file=sys.stderr, flush=True))
    print(markdown(result))
    return 1 if result["failed"] else 0

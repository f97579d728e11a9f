"""Ray Serve replicas vs the plain server, on one machine, in one run (docs/ray.md has the last run's numbers).

    python -m benchmarks.ray_serve            # about 4-6 minutes on 2 CPU cores
    python -m benchmarks.ray_serve --smoke    # a tiny model and stream: about 2 minutes (mostly Ray start-up)

The same stream of requests (``--senders`` concurrent OpenRLHF-style clients, each sending ``--requests`` requests
of ``--samples`` samples to ``/v1/rewards``) goes to, in turn:

1. the plain server (``rlhf-rewards serve``, uvicorn, torch on all cores), without Ray running;
2. Ray Serve with 1 replica reserving all the cores, through Ray Serve's HTTP proxy;
3. Ray Serve with 2 replicas sharing the same cores (one each), through the proxy;
4. the same 2 replicas through the deployment handle (what ``RayRewardFunction`` does: no HTTP).

The model is random, at Starling-RM-34B's architecture (Llama backbone + value head, Yi's 64k vocabulary) and a
size chosen so the forward passes, not the HTTP plumbing, take most of the time. Everything binds 127.0.0.1.
Reported: samples per second, request latency p50/p99, and the ratios 2 vs 1 replica and proxy vs plain server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable, Optional, Sequence

import httpx

PRESET = "starling-rm-34b"


@dataclass
class Result:
    name: str
    samples_per_s: float
    p50_ms: float
    p99_ms: float
    seconds: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_stream(senders: int, requests: int, samples: int, words: int, seed: int) -> list[list[dict[str, Any]]]:
    """Per sender, its request bodies: user prompts and responses of about ``words`` words in all."""
    from rlhf_rewards.testing.tokenizers import CORPUS

    vocab = re.findall(r"\S+", CORPUS)
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(max(1, n)))

    def body() -> dict[str, Any]:
        lengths = [int(rng.lognormvariate(0, 0.5) * words) for _ in range(samples)]
        return {"prompts": [[{"role": "user", "content": text(n // 3)}] for n in lengths],
                "completions": [text(n - n // 3) for n in lengths]}

    return [[body() for _ in range(requests)] for _ in range(senders)]


async def drive(stream: list[list[dict[str, Any]]], send: Callable[[dict[str, Any]], Awaitable[list]]
                ) -> tuple[float, list[float]]:
    """Run every sender concurrently; return the wall time and each request's latency."""
    latencies: list[float] = []

    async def sender(bodies: list[dict[str, Any]]) -> None:
        for body in bodies:
            start = time.perf_counter()
            rewards = await send(body)
            latencies.append(time.perf_counter() - start)
            if len(rewards) != len(body["completions"]) or any(r is None for r in rewards):
                raise RuntimeError(f"incomplete answer: {rewards}")

    start = time.perf_counter()
    await asyncio.gather(*(sender(bodies) for bodies in stream))
    return time.perf_counter() - start, latencies


def summarize(name: str, seconds: float, latencies: Sequence[float], samples: int) -> Result:
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return Result(name, samples / seconds, pct(0.5), pct(0.99), seconds)


def over_http(url: str, stream, warmup) -> tuple[float, list[float]]:
    async def run():
        limits = httpx.Limits(max_connections=len(stream) + 4)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            async def send(body):
                response = await client.post(url + "/v1/rewards", json=body)
                response.raise_for_status()
                return response.json()["rewards"]

            await drive(warmup, send)
            return await drive(stream, send)

    return asyncio.run(run())


def over_handle(handle, stream, warmup) -> tuple[float, list[float]]:
    async def send(body):
        return (await handle.rewards.remote(body))["rewards"]

    async def run():
        await drive(warmup, send)
        return await drive(stream, send)

    return asyncio.run(run())


def plain_server(model_dir: str, stream, warmup, max_wait_ms: float) -> tuple[float, list[float]]:
    port = free_port()
    cmd = [sys.executable, "-m", "rlhf_rewards", "serve", model_dir, "--preset", PRESET, "--device", "cpu",
           "--port", str(port), "--log-level", "warning", "--max-wait-ms", str(max_wait_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the plain server did not start")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        return over_http(url, stream, warmup)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.report import machine
    from benchmarks.workload import ModelSize, build_model
    from rlhf_rewards.serving import ray as ray_serving

    info = machine()
    root = tempfile.mkdtemp(prefix="rsb", dir="/tmp")
    model_dir = os.path.join(root, "model")
    size = ModelSize(args.hidden, args.layers, 4, 1, args.hidden * 23 // 8, 64000)
    build_model(PRESET, size, model_dir, args.seed)
    stream = make_stream(args.senders, args.requests, args.samples, args.words, args.seed)
    warmup = make_stream(args.senders, 2, args.samples, args.words, args.seed + 1)
    n = args.senders * args.requests * args.samples
    results = []

    def progress(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    progress("plain server")
    results.append(summarize("plain server (uvicorn)", *plain_server(model_dir, stream, warmup, args.max_wait_ms), n))
    cores = os.cpu_count() or 2
    progress("starting Ray")
    ray_serving.start_local_ray(num_cpus=cores, temp_dir=os.path.join(root, "ray"), log_to_driver=False)
    try:
        engine = {"max_wait_ms": args.max_wait_ms}
        load = {"preset": PRESET, "device": "cpu"}
        for replicas in (1, 2):
            progress(f"Ray Serve, {replicas} replica(s)")
            deployed = ray_serving.deploy(model_dir, replicas=replicas, num_cpus_per_replica=cores / replicas,
                                          num_gpus_per_replica=0, load_kwargs=load, engine_kwargs=engine,
                                          port=free_port(), name=f"bench{replicas}")
            results.append(summarize(f"Ray Serve, {replicas} replica(s), HTTP proxy",
                                     *over_http(deployed.url, stream, warmup), n))
            if replicas == 2:
                results.append(summarize("Ray Serve, 2 replicas, deployment handle",
                                         *over_handle(deployed.handle, stream, warmup), n))
            deployed.delete()
    finally:
        ray_serving.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    info["load_after"] = os.getloadavg()[0]
    by_name = {r.name: r for r in results}
    one = by_name["Ray Serve, 1 replica(s), HTTP proxy"]
    two = by_name["Ray Serve, 2 replica(s), HTTP proxy"]
    plain = by_name["plain server (uvicorn)"]
    ratios = {"2 vs 1 replica (throughput)": two.samples_per_s / one.samples_per_s,
              "Ray Serve 1 replica vs plain server (throughput)": one.samples_per_s / plain.samples_per_s,
              "proxy latency added at p50 (ms)": one.p50_ms - plain.p50_ms}
    return {"machine": info, "model": asdict(size), "stream": {"senders": args.senders, "requests": args.requests,
            "samples_per_request": args.samples, "words": args.words, "max_wait_ms": args.max_wait_ms},
            "results": [asdict(r) for r in results], "ratios": ratios}


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["stream"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, load average {m['load_before']:.1f} before, "
             f"{m['load_after']:.1f} after; torch {m['torch']}.",
             f"Stream: {s['senders']} concurrent senders x {s['requests']} requests x {s['samples_per_request']} "
             f"samples (~{s['words']} words each) to /v1/rewards; --max-wait-ms {s['max_wait_ms']}.", "",
             "| server | samples/s | p50 ms | p99 ms |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['samples_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |"
              for r in report["results"]]
    lines.append("")
    lines += [f"- {name}: {value:.2f}" for name, value in report["ratios"].items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and stream")
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16, help="requests per sender")
    parser.add_argument("--samples", type=int, default=1, help="samples per request (OpenRLHF sends 1)")
    parser.add_argument("--words", type=int, default=150, help="median words per sample")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.senders, args.requests, args.words, args.hidden, args.layers = 4, 4, 20, 32, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = run(args)
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

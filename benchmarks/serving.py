"""Serving benchmark: ``python benchmarks/serving.py [--model DIR --preset P] [--markdown FILE] [--json FILE]``.

Measured in one run, against ``rlhf-rewards serve`` subprocesses on 127.0.0.1:

1. Cross-request batching: ``--senders`` concurrent OpenRLHF-style senders (one query per ``/get_reward`` request,
   the policy's ChatML text with its special tokens) against the server with batching (``--max-wait-ms``,
   default 5) and against the same server with it off (``--max-wait-ms 0``: one request per forward).
   Target: at least 2x the throughput. p50/p99 request latency and forward batches per request are reported.
2. HTTP overhead: a batch of ``--batch`` samples (default 64) scored by ``RemoteRewardFunction`` through the
   server vs by ``RewardFunction`` in this process, same model, same inputs, alternated ``--repeats`` times.
   Target: at most 15% overhead (median over median).

Without ``--model`` the model is the tiny random checkpoint of ``--preset`` (so the forward pass is cheap and the
HTTP overhead is as large a share as it will ever be). Everything runs offline on the CPU unless ``--device`` says
otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

WORDS = ("the reward model reads every token of the answer and the question before it returns one number "
         "for the policy gradient step so long answers cost more than short ones").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def workload(n: int, seed: int, answer_words: tuple[int, int] = (20, 200)) -> list[tuple[str, str]]:
    """``n`` (question, answer) pairs, answers of ``answer_words`` words (a range)."""
    rng = random.Random(seed)
    return [(sentence(rng, 5, 30) + "?", sentence(rng, *answer_words)) for _ in range(n)]


def chatml_query(question: str, answer: str) -> str:
    """What OpenRLHF sends for a Qwen-style policy: prompt + response decoded with special tokens."""
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n{answer}<|im_end|><|endoftext|>")


class Server:
    def __init__(self, model: str, preset: str, device: str, max_wait_ms: float, threads: int | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "rlhf_rewards", "serve", model, "--preset", preset, "--device", device,
               "--port", str(self.port), "--max-wait-ms", str(max_wait_ms), "--log-level", "warning"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    def __enter__(self) -> "Server":
        return self.ready()

    def ready(self) -> "Server":
        """Wait (bounded) until the server answers ``/health``; it started loading when constructed."""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def batches(self) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return float(re.search(r"^rlhf_rewards_batches_total (\S+)$", text, re.M).group(1))


async def senders(url: str, queries: list[str], count: int) -> tuple[float, list[float]]:
    """``count`` concurrent senders share ``queries``, one per request; returns (seconds, latencies)."""
    latencies: list[float] = []
    queue = list(reversed(queries))

    async def sender(client: httpx.AsyncClient) -> None:
        while queue:
            query = queue.pop()
            start = time.perf_counter()
            r = await client.post(url + "/get_reward", json={"query": [query], "prompts": [""], "labels": [""]})
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=count)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(sender(client) for _ in range(count)))
        return time.perf_counter() - start, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def measure_senders(args, model: str, queries: list[str], max_wait_ms: float) -> dict:
    with Server(model, args.preset, args.device, max_wait_ms, args.threads) as server:
        return measure_server(server, queries, args.senders, max_wait_ms)


def measure_server(server: Server, queries: list[str], count: int, max_wait_ms: float) -> dict:
    """``count`` concurrent senders against the ready ``server`` (started with ``max_wait_ms``): a warm-up of
    ``2 x count`` queries, then ``queries`` timed."""
    asyncio.run(senders(server.url, queries[: count * 2], count))  # warm-up
    before = server.batches()
    seconds, latencies = asyncio.run(senders(server.url, queries, count))
    batches = server.batches() - before
    return {"max_wait_ms": max_wait_ms, "requests": len(queries), "seconds": seconds,
            "requests_per_s": len(queries) / seconds, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * percentile(latencies, 0.99), "forward_batches": batches}


def measure_overhead(args, model: str, pairs: list[tuple[str, str]]) -> dict:
    import torch

    from rlhf_rewards import RemoteRewardFunction, RewardFunction, load_reward_model

    if args.threads:
        torch.set_num_threads(args.threads)  # as the server process

    rm = load_reward_model(model, preset=args.preset, device=args.device)
    prompts = [[{"role": "user", "content": q}] for q, _ in pairs]
    completions = [a for _, a in pairs]
    local = RewardFunction(rm)
    with Server(model, args.preset, args.device, args.max_wait_ms, args.threads) as server:
        remote = RemoteRewardFunction(server.url)
        # same rewards both ways, or the timing comparison means nothing
        gap = max(abs(a - b) for a, b in zip(remote(prompts, completions), local(prompts, completions)))
        if gap > 1e-4:
            raise RuntimeError(f"HTTP and in-process rewards differ by {gap}")
        inproc, http = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            local(prompts, completions)
            inproc.append(time.perf_counter() - start)
            start = time.perf_counter()
            remote(prompts, completions)
            http.append(time.perf_counter() - start)
    return {"batch": len(pairs), "repeats": args.repeats, "in_process_ms": 1000 * statistics.median(inproc),
            "http_ms": 1000 * statistics.median(http),
            "overhead": statistics.median(http) / statistics.median(inproc) - 1}


def report(result: dict) -> str:
    on, off = result["batching"], result["no_batching"]
    over = result["overhead"]
    speedup = on["requests_per_s"] / off["requests_per_s"]
    lines = [
        f"Serving benchmark: {result['model']} ({result['preset']}, {result['device']}, "
        f"{result['threads'] or 'default'} torch threads), answers of {result['answer_words']} words, "
        f"load average {result['load_before']} -> {result['load_after']}",
        "",
        f"{result['senders']} concurrent OpenRLHF-style senders, one query per `/get_reward` request:",
        "",
        "| server | requests/s | p50 ms | p99 ms | forward batches / request |",
        "|---|---|---|---|---|",
    ]
    for name, row in (("batching (`--max-wait-ms " + f"{on['max_wait_ms']:g}`)", on),
                      ("one request per forward (`--max-wait-ms 0`)", off)):
        lines.append(f"| {name} | {row['requests_per_s']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                     f"{row['forward_batches'] / row['requests']:.2f} |")
    lines += [
        "",
        f"Throughput with batching: **{speedup:.2f}x** (target >= 2x: {'met' if speedup >= 2 else 'missed'}).",
        "",
        f"HTTP (`RemoteRewardFunction`) vs in-process (`RewardFunction`), batch of {over['batch']}, median of "
        f"{over['repeats']}: {over['http_ms']:.1f} ms vs {over['in_process_ms']:.1f} ms, overhead "
        f"**{100 * over['overhead']:.1f}%** (target <= 15%: {'met' if over['overhead'] <= 0.15 else 'missed'}).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="reward model directory (default: the preset's tiny random checkpoint)")
    parser.add_argument("--preset", default="starling-rm-34b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--requests", type=int, default=320, help="requests sent by the senders in all")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--answer-words", default="20,200",
                        help="LOW,HIGH: words per answer (default 20,200: RLHF-like; 2,12: short answers)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads in the server and in-process (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", help="also write the report here")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = args.model
    if model is None:
        from rlhf_rewards.testing import make_tiny_checkpoint

        model = make_tiny_checkpoint(args.preset, os.path.join(tempfile.mkdtemp(), args.preset), seed=args.seed)
    words = tuple(int(x) for x in args.answer_words.split(","))
    queries = [chatml_query(q, a) for q, a in workload(args.requests, args.seed, words)]
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print("senders, batching on ...", file=sys.stderr)
    on = measure_senders(args, model, queries, args.max_wait_ms)
    print(f"senders, batching off ... (on: {on})", file=sys.stderr)
    off = measure_senders(args, model, queries, 0)
    print(f"HTTP vs in-process ... (off: {off})", file=sys.stderr)
    over = measure_overhead(args, model, workload(args.batch, args.seed + 1, words))
    result = {"model": args.model or "tiny random checkpoint", "preset": args.preset, "device": args.device,
              "answer_words": args.answer_words, "threads": args.threads,
              "senders": args.senders, "batching": on, "no_batching": off, "overhead": over,
              "load_before": load_before, "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    text = report(result)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measuring a scalar method as a user's process runs it: a fresh Python process with glibc's default allocator
(nothing kept for reuse, nothing faulted in beforehand), the model loaded from its saved directory with
``load_reward_model``. The forked, tuned children of :mod:`benchmarks.measure` show the model's work alone; this
shows what a training job that calls ``rm.score`` pays, allocator included.

``python -m benchmarks.plain JOB OUT`` runs one pickled :class:`PlainJob` and pickles its
:class:`~benchmarks.measure.Measurement` to ``OUT``; :func:`run_plain` does both ends."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

from .measure import Measurement
from .workload import Scale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class PlainJob:
    """One scalar method (``method``, a name from :func:`~benchmarks.methods.scalar_methods`) on the workload of
    ``scale`` and ``seed``, with the model saved in ``directory``; ``budget``: a ``max_batch_tokens`` to set first
    (``None``: the default)."""

    scale: Scale
    seed: int
    preset: str
    directory: str
    method: str
    budget: Optional[int]
    threads: int


def run_plain(job: PlainJob, timeout: float) -> Measurement:
    """Run ``job`` in a fresh interpreter; its measurement is named ``"<method>, plain process"`` (with the budget
    if one was set)."""
    name = job.method + (f", max_batch_tokens={job.budget}" if job.budget else "") + ", plain process"
    with tempfile.TemporaryDirectory(prefix="rlhf-rewards-plain-") as tmp:
        job_file, out_file = os.path.join(tmp, "job.pkl"), os.path.join(tmp, "out.pkl")
        with open(job_file, "wb") as f:
            pickle.dump(job, f)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
        try:
            done = subprocess.run([sys.executable, "-m", "benchmarks.plain", job_file, out_file], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Measurement(name, error=f"timed out after {timeout:.0f} s")
        if done.returncode != 0 or not os.path.exists(out_file):
            raise RuntimeError(f"{name}: the process failed ({done.returncode}): {done.stderr[-2000:]}")
        with open(out_file, "rb") as f:
            result: Measurement = pickle.load(f)
    result.name = name
    return result


def _child(job: PlainJob) -> Measurement:
    import torch

    from rlhf_rewards import load_reward_model

    from .measure import Method, Probe, measure, warmup_for
    from .methods import scalar_methods
    from .workload import Writer, corpus_words, make_workload

    torch.set_num_threads(job.threads)
    rm = load_reward_model(job.directory, preset=job.preset, device="cpu", dtype=torch.float32)
    conversations, _ = make_workload(job.scale, job.seed)
    method = next(m for m in scalar_methods(rm, Writer(rm.tokenizer, corpus_words()), conversations)
                  if m.name == job.method)
    if job.budget:
        prepare = method.prepare

        def with_budget() -> None:
            if prepare is not None:
                prepare()
            rm.max_batch_tokens = job.budget

        method = Method(method.name, method.run, method.card_exact, with_budget)
    return measure(method, rm, Probe(rm.backbone, [rm.head]), warmup_for(rm.backbone))


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        plain_job = pickle.load(f)
    measurement = _child(plain_job)
    with open(sys.argv[2], "wb") as f:
        pickle.dump(measurement, f)

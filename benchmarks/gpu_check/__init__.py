"""One command that proves or disproves on an accelerator what the package claims for it:
``python -m benchmarks.gpu_check --out DIR [--device cuda|cpu] [--scale full|smoke]`` from a source checkout with
torch installed (it installs and downloads nothing: every model is a random one of its preset's real architecture,
built on the spot). Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md``; exits 1 iff an exactness check failed.

What it checks (:mod:`.checks`): every preset against its card's procedure on the device in float32 and bfloat16,
batch invariance in bfloat16, packed against padded rows under each attention implementation, and a row-mate leak
test. What it measures (:mod:`.perf`): throughput ratios of ours, the card, TRL's path and the padding-free floor on a
GRPO-shaped workload and the benchmark's, the default token budget against two others, peak memory, batching across
requests in the server, and int8 / nf4 quantization. Tolerances: :data:`FP32_TOL` and :func:`bf16_tolerance`.
"""

from __future__ import annotations

import torch

from rlhf_rewards.packing_check import FLOAT32_TOLERANCE as FP32_TOL, ULPS, dtype_tolerance

__all__ = ["FP32_TOL", "ULPS", "bf16_tolerance"]


def bf16_tolerance(reference: list[float]) -> float:
    """The bfloat16 tolerance for results like ``reference``: the package's :func:`dtype_tolerance` (:data:`ULPS`
    units of bfloat16's rounding, 2^-8: ours and the card round at every layer in a different order) at the results'
    scale, the largest magnitude among them but at least 1 (a reward near 0 carries the absolute error of the hidden
    states, of unit scale after the final norm; probabilities are at most 1). 8 x 2^-8 = 0.031 at scale 1."""
    return dtype_tolerance(torch.bfloat16) * max([1.0, *(abs(x) for x in reference)])

"""The load-time packing check: before a model scores packed, the same few synthetic samples are scored packed and
padded through its per-sample protocol, and it packs only if the two agree within its dtype's tolerance.

Packed rows depend on what the padded path never needs: position ids restarting inside a row, a block mask or the
variable-length kernels' reading of those position ids. A kernel or transformers version that gets one of them wrong
gives every sample a wrong reward without any error; the padded path (one sample per row, plain causal attention) is
the reference, and it is the card's procedure batched.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Union

import torch

from .backends.base import RewardModel
from .conversation import Message
from .errors import SampleError

logger = logging.getLogger(__name__)

FLOAT32_TOLERANCE = 1e-4
"""float32's tolerance: the packed-against-padded and card-parity bound the test suite holds every preset to. In
float32 the order of accumulation over a layer's thousands of products (another kernel, another row width), not
the rounding of one value (2^-24), sets the difference: 1e-5 to 1e-7 on the tiny checkpoints."""

ULPS = 8
"""Half-precision tolerance in units of the dtype's precision at the score's scale: both paths round every layer's
activations to the dtype, in other orders, and the read-out rounds once more; a few ulps each way, and no more,
unless the two paths compute different things (a row-mate seen, a position wrong: differences of the score's own
size)."""


def dtype_tolerance(dtype: torch.dtype) -> float:
    """The largest difference between two ways of computing the same rewards in ``dtype``, relative to
    ``max(1, |reward|)``: :data:`ULPS` times the dtype's unit roundoff (half its machine epsilon: one rounding of x is
    off by up to that times |x|), at least :data:`FLOAT32_TOLERANCE`: bfloat16 (8 significant bits) 8 x 2^-8 = 0.031,
    float16 (11 bits) 8 x 2^-11 = 0.0039, float32 1e-4. The packing check holds packed against padded scores to it,
    and ``benchmarks.gpu_check`` ours against the card's on the device."""
    return max(FLOAT32_TOLERANCE, ULPS * torch.finfo(dtype).eps / 2)


class PackingMismatchError(ValueError):
    """``packing=True`` was asked for, and packed and padded scores of the synthetic samples disagree (``check``)."""

    def __init__(self, message: str, check: "PackingCheck"):
        super().__init__(message)
        self.check = check


_USER = ("Hi!", "What is the capital of France?",
         "Explain in a few sentences why the sky looks blue during the day and red at sunset.",
         "My bike's chain keeps slipping when I pedal hard uphill. It is two years old and I ride it every day "
         "to work. What could be wrong, and can I fix it myself with basic tools?")
_STEPS = (("Hello.",),
          ("The capital of France is Paris.", "So the answer is Paris."),
          ("Sunlight holds every colour.", "Air molecules scatter short (blue) wavelengths far more than long ones, "
           "so blue light reaches us from all over the sky.", "At sunset the light crosses much more air, the blue "
           "is scattered away, and the reds and oranges are left."),
          ("A slipping chain is usually a worn chain, worn cogs or a badly adjusted derailleur.",
           "Measure the chain's stretch with a ruler: twelve links should span twelve inches.",
           "If it is stretched, replace it; a new chain on worn cogs slips too, so check them as well.",
           "Otherwise turn the barrel adjuster a quarter turn at a time until the chain sits on the cog."))
_PLAN = ((0, 0), (1, 1), (2, 2), (3, 3), (1, 0), (3, 2))
"""(prompt, completion) of each synthetic sample: short and long ones, so rows hold several samples."""


def synthetic_samples() -> tuple[list[list[Message]], list[list[str]]]:
    """The check's prompts (one user turn; the last one after an earlier exchange) and completions as step lists,
    of different lengths."""
    prompts: list[list[Message]] = [[{"role": "user", "content": _USER[p]}] for p, _ in _PLAN]
    prompts[-1] = [{"role": "user", "content": _USER[1]}, {"role": "assistant", "content": " ".join(_STEPS[1])},
                   {"role": "user", "content": _USER[3]}]
    return prompts, [list(_STEPS[c]) for _, c in _PLAN]


Output = Union[float, list[float], SampleError, None]


def _outputs(model: RewardModel) -> list[Output]:
    prompts, steps = synthetic_samples()
    if model.kind == "process":
        return list(model.run_steps(model.prepare(prompts, steps)))  # type: ignore[attr-defined]
    texts = [" ".join(s) for s in steps]
    # a pairwise model compares each completion with the next one
    others = texts[1:] + texts[:1] if model.kind == "pairwise" else None
    return list(model.run(model.prepare(prompts, texts, others)))


@dataclass(frozen=True)
class PackingCheck:
    """What the packing check found.

    Attributes:
        samples: synthetic samples scored each way.
        compared: numbers compared (a process model gives one per step).
        difference: the largest ``|packed - padded| / max(1, |padded|)`` over them (``inf`` when one way scored a
            sample the other could not).
        tolerance: the largest accepted (:func:`packing_tolerance` of ``dtype``).
        dtype: the dtype the model computes in.
        seconds: wall time of both passes.
    """

    samples: int
    compared: int
    difference: float
    tolerance: float
    dtype: torch.dtype
    seconds: float

    @property
    def passed(self) -> bool:
        return self.compared > 0 and self.difference <= self.tolerance

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"packed and padded scores of {self.samples} synthetic samples differ by up to {self.difference:.1e} "
                f"(relative to max(1, |score|); the {dtype} tolerance is {self.tolerance:.1e})")


def _difference(packed: Output, padded: Output) -> tuple[int, float]:
    """``(numbers compared, largest scaled difference)`` of one sample's two outputs."""
    if isinstance(packed, SampleError) or isinstance(padded, SampleError) or packed is None or padded is None:
        both_failed = not isinstance(packed, (float, list)) and not isinstance(padded, (float, list))
        return (0, 0.0) if both_failed else (1, math.inf)
    a = packed if isinstance(packed, list) else [packed]
    b = padded if isinstance(padded, list) else [padded]
    if len(a) != len(b):
        return 1, math.inf
    worst = max((abs(x - y) / max(1.0, abs(y)) for x, y in zip(a, b)), default=0.0)
    return len(a), worst if math.isfinite(worst) else math.inf


def check_packing(model: RewardModel, dtype: torch.dtype) -> PackingCheck:
    """Score :func:`synthetic_samples` with ``model`` packed and padded (copies of it: its ``stats`` stay as they
    are) and compare. ``model`` must pack."""
    start = time.perf_counter()
    packed = _outputs(model.with_packing(True))
    padded = _outputs(model.with_packing(False))
    compared, worst = 0, 0.0
    for a, b in zip(packed, padded):
        n, diff = _difference(a, b)
        compared, worst = compared + n, max(worst, diff)
    return PackingCheck(len(packed), compared, worst, dtype_tolerance(dtype), dtype, time.perf_counter() - start)


def verify_packing(model: RewardModel, requested: Union[bool, str], dtype: torch.dtype) -> None:
    """Run :func:`check_packing` on a model that packs. Agreement: ``model.packing_reason`` says so. Disagreement:
    ``packing=True`` raises :class:`PackingMismatchError` (a ``ValueError``); ``"auto"`` makes the model pad,
    ``packing_reason`` saying why, with a warning. A model that pads is left alone (no cost)."""
    if not model.packing:
        return
    check = check_packing(model, dtype)
    if check.passed:
        model.packing_reason += f"; checked: {check.describe()}"
        return
    found = check.describe() if check.compared else "no synthetic sample could be scored both ways"
    where = f"{model.preset.name} with attention implementation {getattr(model, 'attn_implementation', None)!r}"
    if requested is True:
        raise PackingMismatchError(
            f"packing=True failed its check: {found}, so {where} gives other rewards packed than padded; load it "
            "with packing=False (or 'auto', which then pads), or another attention implementation", check)
    model.packing = False
    model.packing_reason = f"auto: padded, because {found}"
    logger.warning("%s: packing turned off: %s; packed rows would give other rewards than padded batches with this "
                   "attention implementation (%r), so it pads (rm.packing_reason)", model.preset.name, found,
                   getattr(model, "attn_implementation", None))

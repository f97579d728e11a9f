"""Numbers between preferences and rewards: the logistic function, its inverse and the transforms that turn a
preference ``P(a better than b)`` into a reward. Imports nothing from the package.

Ties: a preference of exactly 0.5 maps to the transform's midpoint (0 for ``"logodds"`` and ``"centered"``, 0.5
for ``"probability"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

Transform = Literal["probability", "centered", "logodds"]
TRANSFORMS: tuple[str, ...] = ("probability", "centered", "logodds")

LOGODDS_BOUND = 10.0
"""``"logodds"`` rewards are clipped to ``[-LOGODDS_BOUND, LOGODDS_BOUND]`` (P within about 4.5e-5 of 0 or 1), so a
saturated preference cannot dominate a batch of advantages."""

SATURATED_LOGIT = 53 * math.log(2.0)
"""The largest log-odds a float64 probability below 1 carries (``1 - P >= 2**-53``): what :func:`logit` gives
for a saturated probability, so rankings never average infinities."""


def sigmoid(x: float) -> float:
    """``1 / (1 + exp(-x))`` without overflow for any finite ``x``."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def logit(p: float) -> float:
    """``log(p / (1 - p))``; a saturated ``p`` (0 or 1 in float64) gives :data:`SATURATED_LOGIT` with its sign."""
    if p <= 0.0:
        return -SATURATED_LOGIT
    if p >= 1.0:
        return SATURATED_LOGIT
    return math.log(p) - math.log1p(-p)


def check_transform(transform: str) -> None:
    """Raise ``ValueError`` unless ``transform`` is one of :data:`TRANSFORMS`."""
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; expected 'probability', 'centered' or 'logodds'")


def apply_transform(probabilities: Sequence[float], transform: Transform = "logodds", *,
                    bound: float = LOGODDS_BOUND) -> list[float]:
    """Turn preferences ``P`` into rewards.

    ``"probability"``: ``P`` in [0, 1]; ``"centered"``: ``2P - 1`` in [-1, 1]; ``"logodds"`` (default):
    ``log(P / (1 - P))`` clipped to ``[-bound, bound]``, the Bradley-Terry reward difference implied by ``P``.
    """
    check_transform(transform)
    if transform == "probability":
        return [float(p) for p in probabilities]
    if transform == "centered":
        return [2.0 * p - 1.0 for p in probabilities]
    return [max(-bound, min(bound, logit(p))) for p in probabilities]

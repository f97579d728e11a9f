"""ProcessBench scoring (Zheng et al. 2024, "ProcessBench: Identifying Process Errors in Mathematical Reasoning";
QwenLM/ProcessBench ``code/``), for process reward models.

A row holds a math problem, its solution split into ``steps`` and ``label``: the index (from 0) of the earliest
wrong step, or -1 when every step is right. A process reward model gives every step a reward in [0, 1]; the
predicted label is the first step whose reward is **not above** the threshold, or -1 when every step's reward is
above it. A reward exactly at the threshold counts as wrong: the paper calls a step correct when its score is above
the threshold, and the reference script's argmax over the two labels picks "wrong" on a tie. A row is a match when
the predicted label equals its label (an erroneous row flagged at another step is a miss).

Per subset: the accuracy on the erroneous rows (label >= 0), the accuracy on the correct rows (label -1), and their
harmonic mean, the F1 the paper ranks models by. ProcessBench's overall number is the unweighted mean of the four
subsets' F1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional

SUBSETS: tuple[str, ...] = ("gsm8k", "math", "olympiadbench", "omnimath")
"""ProcessBench's four subsets (its dataset's split names), in the paper's order."""

DEFAULT_THRESHOLD = 0.5
"""The step reward at or below which a step is predicted wrong, unless told otherwise."""


def first_error_step(step_rewards: Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> int:
    """The predicted label: the index of the first step whose reward is at or below ``threshold``, or -1 when every
    reward is above it."""
    return next((i for i, r in enumerate(step_rewards) if not r > threshold), -1)


def subset_of_id(row_id: Any) -> Optional[str]:
    """The subset a ProcessBench id names (``"gsm8k-0"`` -> ``"gsm8k"``; the dataset's ids are ``SUBSET-N``), or
    ``None`` for an id of another form."""
    match = re.fullmatch(r"([a-z0-9]+)-\d+", row_id) if isinstance(row_id, str) else None
    return match.group(1) if match and match.group(1) in SUBSETS else None


def harmonic_mean(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``2ab / (a + b)``: 0 when both are 0 (the mean's limit there; the reference script divides 0 by 0), ``None``
    when either is ``None``."""
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


class SubsetScore(NamedTuple):
    """One subset's numbers over its scored rows; accuracies are fractions in [0, 1], ``None`` without rows."""

    erroneous: int
    """Scored rows with an erroneous step (label >= 0)."""
    erroneous_matched: int
    """Of those, rows whose first wrong step was predicted exactly."""
    correct: int
    """Scored rows whose steps are all right (label -1)."""
    correct_matched: int
    """Of those, rows predicted -1 (no step at or below the threshold)."""

    @property
    def error_accuracy(self) -> Optional[float]:
        return self.erroneous_matched / self.erroneous if self.erroneous else None

    @property
    def correct_accuracy(self) -> Optional[float]:
        return self.correct_matched / self.correct if self.correct else None

    @property
    def f1(self) -> Optional[float]:
        """The harmonic mean of the two accuracies (``None`` unless the subset has rows of both kinds)."""
        return harmonic_mean(self.error_accuracy, self.correct_accuracy)


def subset_score(labels: Sequence[int], predictions: Sequence[int]) -> SubsetScore:
    """A subset's :class:`SubsetScore` from its rows' labels and predicted labels, in the same order."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    erroneous = [lab == pred for lab, pred in zip(labels, predictions) if lab != -1]
    correct = [pred == -1 for lab, pred in zip(labels, predictions) if lab == -1]
    return SubsetScore(len(erroneous), sum(erroneous), len(correct), sum(correct))


def average_f1(f1s: Mapping[str, Optional[float]]) -> Optional[float]:
    """ProcessBench's overall score: the unweighted mean of the four :data:`SUBSETS`' F1, or ``None`` unless all four
    are present and defined."""
    values = [f1s.get(name) for name in SUBSETS]
    return None if any(v is None for v in values) else math.fsum(values) / len(values)

"""Per-sample errors beyond bad input (see :class:`~rlhf_rewards.conversation.SampleError`): a sample too long for
any truncation its card allows, a model output that is not a finite number; and raising the first of a call's
per-sample errors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, TypeVar, Union

from ..conversation import SampleError

T = TypeVar("T")


class TooLongError(SampleError):
    """A sample that cannot fit ``max_length`` by any truncation its model card allows (e.g. two pair-PM responses
    that alone exceed it); the message gives the token counts."""

    def __init__(self, index: int, message: str, about: str = "pair"):
        super().__init__(index, message, about)


class NonFiniteRewardError(SampleError):
    """The model returned NaN or an infinite value for a sample (or a comparison): no reward can be made of it, so
    the sample has none, never a clipped or 0.5 stand-in. Counted in ``stats.nonfinite``; usually a broken
    checkpoint or a float16 overflow (try ``dtype="bfloat16"`` or ``"float32"``)."""

    def __init__(self, index: int, message: str, about: str = "completion"):
        super().__init__(index, message, about)


def nonfinite(value: float) -> Optional[str]:
    """``"NaN"``, ``"inf"`` or ``"-inf"`` for a value that is not a finite number, ``None`` for one that is."""
    if math.isfinite(value):
        return None
    return "NaN" if value != value else ("inf" if value > 0 else "-inf")


def raise_first(results: Sequence[Union[T, SampleError]]) -> list[T]:
    """``results`` unchanged when none is a :class:`SampleError`; else raise the first, saying how many more
    there are."""
    errors = [r for r in results if isinstance(r, SampleError)]
    if errors:
        more = f" (and {len(errors) - 1} more samples that cannot be scored)" if len(errors) > 1 else ""
        raise type(errors[0])(errors[0].index, f"{errors[0]}{more}", errors[0].about)
    return list(results)

"""Per-sample errors: why one sample has no reward. The bottom floor of the package: imports nothing from it.

The per-sample entry points (``score_samples``, ``compare_samples``, reward functions, the server) put a
:class:`SampleError` in a sample's place instead of raising, so one bad sample never costs the others their
rewards; :func:`raise_first` turns such a list back into an exception for the calls that raise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, TypeVar, Union

T = TypeVar("T")


class SampleError(ValueError):
    """Why one sample (one completion, or one comparison) could not be scored.

    ``str(error)`` names the input and index, e.g. ``"prompts[3]: ..."``. ``index`` is the sample's position in
    the call; ``about`` what the error concerns: ``"prompt"``, ``"completion"`` or ``"pair"`` (two completions
    together, e.g. too long for the model).
    """

    def __init__(self, index: int, message: str, about: str = "prompt"):
        super().__init__(message)
        self.index = index
        self.about = about

    def at(self, index: int, where: str) -> SampleError:
        """The same error for sample ``index``, its message prefixed with the location ``where``."""
        return type(self)(index, f"{where}: {self}", self.about)


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

"""argparse value types that check a number's range, so a wrong value is a usage error (exit code 2) naming the
option, before anything loads."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Callable, Union


def bounded(kind: type, low: float, high: float = math.inf, *, above: bool = False
            ) -> Callable[[str], Union[int, float]]:
    """A ``type=`` for a finite ``kind`` (``int`` or ``float``) from ``low`` (excluded with ``above``) to ``high``;
    ``nan`` and ``inf`` are refused."""
    what = "an integer" if kind is int else "a number"
    rule = f"{what} {'>' if above else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")

    def parse(text: str) -> Union[int, float]:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (above and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}")
        return value

    return parse


def json_object(text: str) -> dict[str, Any]:
    """A ``type=`` for a JSON object given on the command line."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object ({{...}}), got {text!r}")
    return value

"""How a remote reward-function call is cut into requests: the smallest sets of samples the server must see
together (units: whole groups, both candidates of an online-DPO pair), what each unit costs the server's queue
(its items), and requests of whole units that fit what each server accepts (:class:`ServerLimits`).

No HTTP here: :mod:`rlhf_rewards.serving.client` sends what this module cuts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from ..groups import group_bounds, halves


@dataclass(frozen=True)
class ServerLimits:
    """What one server accepts in a request, as its ``GET /v1/models`` says (``None``: not said, no limit known).

    Attributes:
        kind: the served model's kind, ``"scalar"`` or ``"pairwise"``: what the server's queue counts depends on it.
        max_request_items: the most items one request may put in the server's queue. An item is one model input
            for a scalar model (a completion, a baseline) and one comparison (both orders) for a pairwise model.
        max_request_bytes: the largest request body the server reads (``--max-request-mb``).
    """

    kind: Optional[str] = None
    max_request_items: Optional[int] = None
    max_request_bytes: Optional[int] = None

    @classmethod
    def parse(cls, answer: Any) -> ServerLimits:
        """The limits in a ``/v1/models`` answer; fields a server does not send (older versions) are ``None``."""
        try:
            entry = answer["data"][0]
        except (KeyError, IndexError, TypeError):
            return cls()
        if not isinstance(entry, dict):
            return cls()
        limits = entry.get("limits") if isinstance(entry.get("limits"), dict) else {}
        kind = entry.get("kind") if entry.get("kind") in ("scalar", "pairwise") else None
        return cls(kind, _positive(limits.get("max_request_items")), _positive(limits.get("max_request_bytes")))

    @staticmethod
    def tightest(all_limits: Iterable[ServerLimits]) -> ServerLimits:
        """Limits every one of these servers accepts (a request may fail over to any of them)."""
        all_limits = list(all_limits)
        kinds = {lim.kind for lim in all_limits if lim.kind is not None}
        items = [lim.max_request_items for lim in all_limits if lim.max_request_items is not None]
        size = [lim.max_request_bytes for lim in all_limits if lim.max_request_bytes is not None]
        # servers of different kinds would score one batch on two scales; counting as pairwise is the larger count
        kind = kinds.pop() if len(kinds) == 1 else ("pairwise" if kinds else None)
        return ServerLimits(kind, min(items) if items else None, min(size) if size else None)


def _positive(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@dataclass(frozen=True)
class Layout:
    """A call's reward-function options that decide which samples go together and what they cost (``normalize=
    "group"`` needs each whole group in one request, as ``pairing="group"`` does)."""

    pairing: Optional[str]
    group_size: Optional[int]
    group_mode: str
    baselines: bool
    normalize: Optional[str] = None

    @property
    def grouped(self) -> bool:
        return self.pairing == "group" or self.normalize == "group"

    def units(self, prompts: Sequence[Any]) -> tuple[list[list[int]], bool]:
        """The smallest sets of samples that must be scored together, in order, and whether the batch has the
        layout its pairing needs (when not, it is one unit, sent whole: the server says what is wrong, as
        :class:`~rlhf_rewards.RewardFunction` does in-process)."""
        try:
            if self.pairing == "halves":
                half = halves(prompts)
                return [[i, i + half] for i in range(half)], True
            if self.grouped:
                return [list(range(start, end)) for start, end in group_bounds(prompts, self.group_size)], True
        except ValueError:
            return [list(range(len(prompts)))], False
        return [[i] for i in range(len(prompts))], True

    def items(self, unit: Sequence[int], kind: Optional[str]) -> int:
        """What ``unit`` adds to a server's queue at most (the server scores each distinct text or pair once, so it
        may count fewer). ``kind`` ``None`` (not known) counts as pairwise, the larger count for groups."""
        size = len(unit)
        if kind == "scalar":
            return 2 * size if self.baselines else size
        if self.pairing == "group":
            return size * (size - 1) // 2 if self.group_mode == "round-robin" else size - 1
        if self.pairing == "halves":
            return size // 2
        return size

    def describe(self, unit: Sequence[int], kind: Optional[str]) -> str:
        """What ``unit`` is and what it costs the server, for the reason logged when no server takes it."""
        items = self.items(unit, kind)
        noun = "model input" if kind == "scalar" else "comparison"
        cost = f"{items} {noun}{'s' if items != 1 else ''} in one request"
        if self.pairing == "group" and len(unit) > 1:
            return f"its group of {len(unit)} completions ({self.group_mode}: {cost})"
        if self.grouped and len(unit) > 1:
            return f"its group of {len(unit)} completions, normalised together ({cost})"
        if self.pairing == "halves" and len(unit) == 2:
            return f"its online-DPO pair ({cost})"
        if len(unit) == 1:
            return f"this sample ({cost})"
        return f"these {len(unit)} samples ({cost})"


class Shard:
    """Whole units sent together to one server, and what came back or why nothing did."""

    def __init__(self, units: list[list[int]], halves: bool):
        self.units = units
        self.halves = halves
        self.rewards: Optional[list[Optional[float]]] = None
        self.errors: list[Optional[str]] = []
        self.stats: dict[str, float] = {}
        self.failure: Optional[str] = None
        self.url: Optional[str] = None
        self.attempts = 0
        self.last_url: Optional[str] = None

    @property
    def indices(self) -> list[int]:
        """The samples in request order; online-DPO pairs keep its layout: first candidates, then second ones."""
        if self.halves:
            return [u[0] for u in self.units] + [u[1] for u in self.units]
        return [i for u in self.units for i in u]

    def items(self, layout: Layout, kind: Optional[str]) -> int:
        return sum(layout.items(u, kind) for u in self.units)


def pack(units: list[list[int]], layout: Layout, halves: bool, *, shards: int, max_samples: Optional[int],
         limits: ServerLimits) -> tuple[list[Shard], list[tuple[list[int], str]]]:
    """Units into about ``shards`` requests of similar size (at most ``max_samples`` samples and the server's
    ``max_request_items`` each), in order. Returns the requests and the units no request can carry, each with the
    reason."""
    total = sum(len(u) for u in units)
    size = math.ceil(total / max(1, min(shards, len(units)))) if units else 0
    if max_samples:
        size = min(size, max_samples)
    return _fill(units, layout, halves, size, limits)


def split(shard: Shard, layout: Layout, limits: ServerLimits, why: str
          ) -> tuple[list[Shard], list[tuple[list[int], str]]]:
    """``shard``, refused as too large (``why``), in smaller requests: each under ``limits.max_request_items`` when
    the shard is over it, else its units in two halves (the server refused it for a reason the client cannot
    measure). A single unit cannot be split: it comes back as refused, with the reason."""
    max_items = limits.max_request_items
    if max_items is not None and shard.items(layout, limits.kind) > max_items:
        return _fill(shard.units, layout, shard.halves, None, limits)
    if len(shard.units) == 1:
        return [], [(shard.units[0], f"{layout.describe(shard.units[0], limits.kind)}: {why}")]
    middle = len(shard.units) // 2
    return [Shard(shard.units[:middle], shard.halves), Shard(shard.units[middle:], shard.halves)], []


def _fill(units: list[list[int]], layout: Layout, halves: bool, size: Optional[int], limits: ServerLimits
          ) -> tuple[list[Shard], list[tuple[list[int], str]]]:
    max_items = limits.max_request_items
    shards: list[list[list[int]]] = [[]]
    refused: list[tuple[list[int], str]] = []
    samples = items = 0
    for unit in units:
        cost = layout.items(unit, limits.kind)
        if max_items is not None and cost > max_items:
            refused.append((unit, f"{layout.describe(unit, limits.kind)} is more than the {max_items} the server "
                                  "takes in one request (its max_request_items)"))
            continue
        if shards[-1] and ((size and samples + len(unit) > size) or (max_items is not None
                                                                    and items + cost > max_items)):
            shards.append([])
            samples = items = 0
        shards[-1].append(unit)
        samples += len(unit)
        items += cost
    return [Shard(s, halves) for s in shards if s], refused

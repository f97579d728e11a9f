"""How trainers lay out completions in a batch, in one place for every caller (reward functions, the pairwise
helpers, the remote clients' sharding): GRPO/RLOO groups of consecutive completions of one prompt, and online DPO's
halves (candidate ``i`` of the first half and candidate ``i`` of the second half answer the same prompt). Imports
nothing from the package, so the HTTP client can use it without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional


def check_group_size(group_size: object, name: str = "group_size") -> int:
    """``group_size`` if it is a whole number of completions per prompt, at least 2; else ``ValueError`` naming
    ``name``. A group of one has nothing to be compared with: every reward would be the tie value."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"{name} must be a whole number of completions per prompt (the trainer's "
                         f"num_generations), got {group_size!r} ({type(group_size).__name__})")
    if group_size < 2:
        raise ValueError(f"{name} must be at least 2, got {group_size}: a group of one has nothing to be compared "
                         "with, so every reward would be the tie value")
    return group_size


def group_bounds(prompts: Sequence[Any], group_size: Optional[int]) -> list[tuple[int, int]]:
    """``(start, end)`` of each group: ``group_size`` consecutive samples answering one prompt, or without
    ``group_size`` each run of equal consecutive prompts.

    ``prompts`` are compared with ``==`` (pass parsed messages to compare conversations rather than their
    spelling). Raises ``ValueError`` when the samples do not split into groups of ``group_size`` or a group's
    prompts differ."""
    n = len(prompts)
    if group_size is None:
        bounds, start = [], 0
        for i in range(1, n + 1):
            if i == n or prompts[i] != prompts[start]:
                bounds.append((start, i))
                start = i
        return bounds
    check_group_size(group_size)
    if n % group_size:
        raise ValueError(f"{n} completions do not split into groups of group_size={group_size}")
    for start in range(0, n, group_size):
        for i in range(start + 1, start + group_size):
            if prompts[i] != prompts[start]:
                raise ValueError(
                    f"prompts[{i}] differs from prompts[{start}], the first of its group of {group_size}: a group's "
                    "completions must answer the same prompt, and groups must be whole in every call (with several "
                    "processes, make each process's batch a multiple of num_generations)")
    return [(s, s + group_size) for s in range(0, n, group_size)]


def halves(prompts: Sequence[Any]) -> int:
    """The half size of an online-DPO batch (first candidates, then second candidates of the same prompts); raises
    ``ValueError`` for an odd batch or a pair whose prompts differ."""
    n = len(prompts)
    if n % 2:
        raise ValueError(f"pairing='halves' needs an even number of completions (first candidates, then second "
                         f"candidates of the same prompts), got {n}")
    half = n // 2
    for i in range(half):
        if prompts[i] != prompts[i + half]:
            raise ValueError(f"pairing='halves': prompts[{i}] and prompts[{i + half}] differ; online DPO passes "
                             "the same prompts twice (first candidates, then second candidates)")
    return half

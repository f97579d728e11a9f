"""What the TRL adapters share: policy prompts and completions turned into the reward model's inputs, and one lock
per loaded reward model."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional

from ..backends.base import RewardModel
from ..conversation import Message, check_same_length

_MODEL_LOCKS: weakref.WeakKeyDictionary[RewardModel, threading.Lock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: RewardModel) -> threading.Lock:
    """One lock per loaded reward model. Trainers that score from threads (AsyncGRPOTrainer scores each group in
    ``asyncio.to_thread``) then take turns on the model, which runs one batch at a time anyway, and each call's
    share of ``model.stats`` is its own."""
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(model, threading.Lock())


class Sample(NamedTuple):
    """One completion ready for the reward model."""

    messages: list[Message]
    completion: str
    baseline: Optional[str]


def set_options(target: Any, *, baseline_column: Optional[str], pairing: Optional[str], group_size: Optional[int],
                group_mode: str, transform: str, parse_templates: bool) -> None:
    """Check the reward-function options every reward function takes (in-process, remote, Ray) and set them as
    ``target``'s attributes of the same names. Options that do not go together fail at construction rather than
    mid-training."""
    from ..pairwise import apply_transform, check_group_size

    if pairing not in (None, "group", "halves"):
        raise ValueError(f"pairing must be None, 'group' or 'halves', got {pairing!r}")
    if pairing is not None and baseline_column is not None:
        raise ValueError("give either pairing or baseline_column, not both")
    if group_size is not None:
        check_group_size(group_size)
        if pairing != "group":
            raise ValueError(f"group_size={group_size} needs pairing='group'")
    if group_mode not in ("round-robin", "anchor"):
        raise ValueError(f"unknown group_mode {group_mode!r}; expected 'round-robin' or 'anchor'")
    apply_transform([0.5], transform)  # rejects an unknown transform
    target.baseline_column = baseline_column
    target.pairing = pairing
    target.group_size = group_size
    target.group_mode = group_mode
    target.transform = transform
    target.parse_templates = parse_templates


def call_baselines(prompts: Sequence[Any], completions: Sequence[Any], baseline_column: Optional[str],
                   columns: Mapping[str, Any]) -> Optional[Sequence[Any]]:
    """Check one reward-function call's lengths and return its baseline column (``None`` without one)."""
    check_same_length(prompts=prompts, completions=completions)
    if baseline_column is None:
        return None
    if baseline_column not in columns:
        raise ValueError(f"baseline_column {baseline_column!r} is not among the dataset columns passed by the "
                         f"trainer: {sorted(k for k in columns if not callable(columns[k]))}")
    baselines = columns[baseline_column]
    check_same_length(prompts=prompts, **{baseline_column: baselines})
    return baselines

"""What the TRL adapters share: policy prompts and completions turned into the reward model's inputs, and one lock
per loaded reward model."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional

from ..backends.base import RewardModel
from ..chat_parsing import parse_chat, strip_completion
from ..conversation import Message, normalize_completion, normalize_prompt

_MODEL_LOCKS: weakref.WeakKeyDictionary[RewardModel, threading.Lock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: RewardModel) -> threading.Lock:
    """One lock per loaded reward model. Trainers that score from threads (AsyncGRPOTrainer scores each group in
    ``asyncio.to_thread``) then take turns on the model, which runs one batch at a time anyway, and each call's
    share of ``model.stats`` is its own."""
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(model, threading.Lock())


def to_messages(prompt: Any, where: str) -> tuple[list[Message], str]:
    """A policy prompt as messages, plus the chat format it was written in (``"plain"`` for untemplated text or
    message lists). Text rendered with a policy chat template is parsed back into its turns; a prompt that does not
    end with a user turn (e.g. a prefilled assistant turn) is an error."""
    if isinstance(prompt, str):
        messages, fmt = parse_chat(prompt, where=where)
        return normalize_prompt(messages, where), fmt
    return normalize_prompt(prompt, where), "plain"


def to_completion(completion: Any, fmt: str, where: str) -> str:
    """A policy completion as text; for a templated prompt, the end-of-turn marker the policy may have left at the
    end is removed (TRL decodes with special tokens skipped, but not every pipeline does)."""
    text = normalize_completion(completion, where)
    return strip_completion(text, fmt) if fmt != "plain" else text


class Sample(NamedTuple):
    """One completion ready for the reward model."""

    messages: list[Message]
    completion: str
    baseline: Optional[str]


def check_options(pairing: Optional[str], baseline_column: Optional[str], group_size: Optional[int],
                  group_mode: str, transform: str) -> None:
    """Reject reward-function options that do not go together, at construction rather than mid-training."""
    from ..pairwise import apply_transform

    if pairing not in (None, "group", "halves"):
        raise ValueError(f"pairing must be None, 'group' or 'halves', got {pairing!r}")
    if pairing is not None and baseline_column is not None:
        raise ValueError("give either pairing or baseline_column, not both")
    if group_size is not None and (pairing != "group" or group_size < 1):
        raise ValueError(f"group_size={group_size} needs pairing='group' and a positive size")
    if group_mode not in ("round-robin", "anchor"):
        raise ValueError(f"unknown group_mode {group_mode!r}; expected 'round-robin' or 'anchor'")
    apply_transform([0.5], transform)  # rejects an unknown transform


def call_baselines(prompts: Sequence[Any], completions: Sequence[Any], baseline_column: Optional[str],
                   columns: Mapping[str, Any]) -> Optional[Sequence[Any]]:
    """Check one reward-function call's lengths and return its baseline column (``None`` without one)."""
    if len(prompts) != len(completions):
        raise ValueError(f"length mismatch: len(prompts)={len(prompts)}, len(completions)={len(completions)}")
    if baseline_column is None:
        return None
    if baseline_column not in columns:
        raise ValueError(f"baseline_column {baseline_column!r} is not among the dataset columns passed by the "
                         f"trainer: {sorted(k for k in columns if not callable(columns[k]))}")
    return columns[baseline_column]

"""What the TRL adapters share: policy prompts and completions turned into the reward model's inputs, and one lock
per loaded reward model."""

from __future__ import annotations

import threading
import weakref
from typing import NamedTuple, Optional

from ..backends.base import RewardModel
from ..conversation import Message

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

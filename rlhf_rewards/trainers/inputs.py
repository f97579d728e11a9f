"""What the TRL adapters share: policy prompts and completions turned into the reward model's inputs, and one lock
per loaded reward model."""

from __future__ import annotations

import threading
import weakref
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

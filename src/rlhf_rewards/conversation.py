"""Validation and normalisation of what callers pass in: prompts and completions.

Every entry point validates each prompt with :func:`normalize_prompt` and each completion with
:func:`normalize_completion` (through :mod:`rlhf_rewards.chat_parsing`, which parses templated text first), so bad
input fails in one place, with one style of message that names the argument and the index.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Optional, Union

Message = dict[str, str]
"""One chat message: ``{"role": "system" | "user" | "assistant", "content": str}``."""

PromptInput = Union[str, Sequence[Mapping[str, str]]]
"""A prompt: a plain string (one user turn) or a list of messages (system/user/assistant, multi-turn)."""

CompletionInput = Union[str, Sequence[Mapping[str, str]], Sequence[str]]
"""A completion: a string, or TRL's conversational form ``[{"role": "assistant", "content": ...}]``; for a process
reward model also an explicit list of step strings (see :func:`normalize_steps`)."""

ROLES = ("system", "user", "assistant")


class Sample(NamedTuple):
    """One sample validated and ready for a reward model (what :meth:`RewardModel.prepare
    <rlhf_rewards.backends.base.RewardModel.prepare>` returns): the prompt's messages, the completion's text, and
    the text it is compared with (a scalar model's baseline, a pairwise model's other completion) or ``None``. A
    process reward model's sample holds the completion's steps, a tuple of strings, as ``completion``."""

    messages: list[Message]
    completion: Union[str, tuple[str, ...]]
    other: Optional[str] = None


def _not_bytes(value: object, where: str, what: str) -> None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{where}: expected {what}, got {type(value).__name__} (decode it first, e.g. "
                         "value.decode('utf-8'))")


def _check_text(text: str, where: str) -> str:
    """``text`` itself when it is valid Unicode. A lone surrogate (``"\\ud800"``: a bad decode, a JSON escape, a
    string cut inside a pair) cannot be encoded as UTF-8, so no tokenizer takes it; it fails its own sample here
    instead of the whole batch inside the tokenizer."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"{where}: a lone surrogate {text[err.start]!r} at character {err.start} is not valid "
                             "Unicode text (no tokenizer takes it); fix the text's source or decode it with "
                             "errors='replace'") from None
    return text


def _check_message(msg: object, where: str) -> Message:
    if not isinstance(msg, Mapping):
        raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {type(msg).__name__}")
    if "role" not in msg or "content" not in msg:
        raise ValueError(f"{where}: a message needs both 'role' and 'content' keys, got keys {sorted(msg)}")
    role, content = msg["role"], msg["content"]
    if role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if content is None:
        raise ValueError(f"{where}: content is None")
    if not isinstance(content, str):
        _not_bytes(content, f"{where}['content']", "a string")
        raise ValueError(f"{where}: content must be a string, got {type(content).__name__}")
    return {"role": role, "content": _check_text(content, f"{where}['content']")}


def normalize_prompt(prompt: object, where: str) -> list[Message]:
    """Return the prompt as a list of messages ending with a user turn.

    ``where`` names the argument and index for error messages, e.g. ``"prompts[3]"``.
    """
    if prompt is None:
        raise ValueError(f"{where}: prompt is None")
    _not_bytes(prompt, where, "a string or a list of messages")
    if isinstance(prompt, str):
        return [{"role": "user", "content": _check_text(prompt, where)}]
    if isinstance(prompt, Mapping) or not isinstance(prompt, Sequence):
        raise ValueError(f"{where}: expected a string or a list of messages, got {type(prompt).__name__}")
    if len(prompt) == 0:
        raise ValueError(f"{where}: empty message list")
    messages = [_check_message(m, f"{where}[{j}]") for j, m in enumerate(prompt)]
    if messages[-1]["role"] != "user":
        raise ValueError(
            f"{where}: the last message of a prompt must be a user turn (the completion answers it), "
            f"got {messages[-1]['role']!r}"
        )
    if all(m["role"] == "system" for m in messages):
        raise ValueError(f"{where}: a prompt needs at least one user message")
    return messages


def normalize_completion(completion: object, where: str) -> str:
    """Return the completion's text. A conversational completion must be exactly one assistant message."""
    if completion is None:
        raise ValueError(f"{where}: completion is None")
    _not_bytes(completion, where, "a string or [{'role': 'assistant', 'content': ...}]")
    if isinstance(completion, str):
        return _check_text(completion, where)
    if isinstance(completion, Mapping) or not isinstance(completion, Sequence):
        raise ValueError(f"{where}: expected a string or [{{'role': 'assistant', 'content': ...}}], "
                         f"got {type(completion).__name__}")
    if len(completion) != 1:
        raise ValueError(f"{where}: a conversational completion must hold exactly one assistant message, "
                         f"got {len(completion)} messages")
    msg = _check_message(completion[0], f"{where}[0]")
    if msg["role"] != "assistant":
        raise ValueError(f"{where}[0]: a completion's role must be 'assistant', got {msg['role']!r}")
    return msg["content"]


def is_step_list(completion: object) -> bool:
    """Whether ``completion`` is an explicit list of steps (a list or tuple of strings, or an empty one) rather than
    a completion's text or TRL's conversational form."""
    return (isinstance(completion, (list, tuple)) and
            all(isinstance(step, str) for step in completion))


def normalize_steps(steps: Sequence[str], where: str) -> tuple[str, ...]:
    """An explicit list of step strings (process reward models only) as a tuple, each step checked as text; an empty
    list has no step to score and is refused. Empty strings are steps (the model cards score them)."""
    if len(steps) == 0:
        raise ValueError(f"{where}: no steps (an empty list); a process reward model scores at least one step")
    return tuple(_check_text(step, f"{where}[{j}]") for j, step in enumerate(steps))


def check_same_length(**named: Sequence) -> int:
    """Raise unless every named sequence is a list/tuple of the same length; return that length."""
    lengths = {}
    for name, seq in named.items():
        if seq is None:
            raise ValueError(f"{name} is None")
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise ValueError(f"{name} must be a list, got {type(seq).__name__}")
        lengths[name] = len(seq)
    if len(set(lengths.values())) > 1:
        raise ValueError("length mismatch: " + ", ".join(f"len({k})={v}" for k, v in lengths.items()))
    return next(iter(lengths.values()), 0)


"""The work one request may ask for, checked once its body is parsed and before anything is rendered: how many
samples, and how many characters in one sample (which bounds the tokens made before truncation: a tokenizer makes
at most one token per UTF-8 byte, at most four per character).

Both read a body's per-sample fields (:meth:`~rlhf_rewards.serving.endpoints.fields.RequestBody.columns`): by name,
one list entry per sample."""

from __future__ import annotations

from typing import Any

from .middleware import HTTPError

Columns = dict[str, list[Any]]


def samples(fields: Columns) -> int:
    """How many samples a request with these per-sample fields holds."""
    return max((len(column) for column in fields.values()), default=0)


def characters(value: Any) -> int:
    """Characters of every string in ``value`` (JSON data: strings, lists, objects' keys and values)."""
    total, stack = 0, [value]
    while stack:  # iterative: a deeply nested body must not exhaust the stack
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return total


def check(fields: Columns, *, max_request_items: int, max_sample_chars: int) -> None:
    """Raise the 413 :class:`~rlhf_rewards.serving.middleware.HTTPError` of a request (its per-sample ``fields``)
    with more samples than ``max_request_items`` or a sample (all its fields at one index) of more than
    ``max_sample_chars`` characters."""
    n = samples(fields)
    if n > max_request_items:
        raise HTTPError(413, f"this request holds {n} samples; the server takes at most {max_request_items} per "
                             "request (max_request_items): send fewer samples per request",
                        limit="max_request_items", max=max_request_items, count=n)
    for i in range(n):
        chars = sum(characters(column[i]) for column in fields.values() if i < len(column))
        if chars > max_sample_chars:
            where = ", ".join(f"{name}[{i}]" for name, column in fields.items() if i < len(column))
            raise HTTPError(413, f"sample {i} ({where}) holds {chars} characters; the server takes at most "
                                 f"{max_sample_chars} per sample (max_sample_chars; --max-sample-chars)",
                            limit="max_sample_chars", max=max_sample_chars, count=chars, index=i)

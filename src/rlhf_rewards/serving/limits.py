"""The work one request may ask for, checked once its body is parsed and before anything is rendered: how many
samples, and how many characters in one sample (which bounds the tokens made before truncation: a tokenizer makes
at most one token per UTF-8 byte, at most four per character)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .middleware import HTTPError
from .schemas import ClassifyRequest


def columns(body: BaseModel) -> dict[str, list[Any]]:
    """The request's per-sample fields by name (``prompts``, ``completions``, ``query``, ``input``, ...), each a
    list with one entry per sample."""
    if isinstance(body, ClassifyRequest):
        refs = body.references()
        return {"input": body.inputs(), **({"labels": refs} if refs is not None else {})}
    return {name: value for name in type(body).model_fields if isinstance(value := getattr(body, name), list)}


def samples(body: BaseModel) -> int:
    """How many samples the request holds."""
    return _count(columns(body))


def _count(fields: dict[str, list[Any]]) -> int:
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


def check(body: BaseModel, *, max_request_items: int, max_sample_chars: int) -> None:
    """Raise the 413 :class:`~rlhf_rewards.serving.middleware.HTTPError` of a request with more samples than
    ``max_request_items`` or a sample (all its fields at one index) of more than ``max_sample_chars`` characters."""
    fields = columns(body)
    n = _count(fields)
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

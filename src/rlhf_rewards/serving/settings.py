"""What the app (and :func:`~rlhf_rewards.serving.serve`'s uvicorn) enforces in front of the engine: the API key,
the limits of one request, and the timeouts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ServerSettings:
    """What the app (and :func:`~rlhf_rewards.serving.serve`'s uvicorn) enforces in front of the engine. Every
    value is checked when the settings are made (``ValueError`` naming it).

    Attributes:
        api_key: when set, every path but ``/health`` needs ``Authorization: Bearer <api_key>`` (else 401; the
            scheme is case-insensitive).
        max_request_mb: bodies larger than this many MiB get 413 before they are read into memory or parsed. It
            also bounds a request's characters (each takes at least one byte of JSON).
        max_sample_chars: characters one sample may hold, all its fields at one index together (prompt, messages,
            completion, baseline; query, prompt, label; input, label); beyond it the request gets 413. It bounds
            the tokens made before truncation, and the memory one sample's tokenization takes.
        body_timeout_s: seconds the whole body may take to arrive after the request's headers; slower uploads get
            408 and their connection is closed.
        header_timeout_s: seconds a connection may stay open without completing a request's headers (a new
            connection, or one after its last answer); it is then closed. Applied by :func:`serve` (uvicorn);
            under Ray Serve its proxy has its own.
        shutdown_timeout_s: after SIGTERM, seconds requests in flight may take to finish; the rest are cancelled
            and the server exits. Applied by :func:`serve`.
        retry_after_s: the ``Retry-After`` sent with 503 (queue full, model not loaded yet).
    """

    api_key: Optional[str] = None
    max_request_mb: float = 32.0
    max_sample_chars: int = 1_000_000
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    shutdown_timeout_s: float = 30.0
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string (or None for no key)")
        for name in ("max_request_mb", "body_timeout_s", "header_timeout_s", "shutdown_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_mb={self.max_request_mb!r} allows no byte at all")
        for name, low in (("max_sample_chars", 1), ("retry_after_s", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

    @property
    def max_request_bytes(self) -> int:
        """``max_request_mb`` in bytes."""
        return int(self.max_request_mb * 1024 * 1024)

"""Length-aware batching: sort by length, pack under a token budget, pad each batch only to its longest sample,
split and retry a batch that runs out of accelerator memory, and give results back in the caller's order."""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch

from .stats import RewardStats

T = TypeVar("T")

DEFAULT_MAX_BATCH_TOKENS = 16384


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int | None = None) -> list[list[int]]:
    """Group sample indices into batches, longest first, so that ``batch size x longest length`` stays within
    ``max_batch_tokens`` (a sample longer than the budget runs alone). Longest first makes an out-of-memory show
    on the first batch rather than after minutes of work."""
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # sorted descending: the batch's first sample fixes its padded length
        width = lengths[current[0]] if current else lengths[i]
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or (len(current) + 1) * width > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest; return ``(input_ids, attention_mask)`` on ``device``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_batched(items: Sequence[T], lengths: Sequence[int], forward: Callable[[list[T]], list],
                *, max_batch_tokens: int, stats: RewardStats, max_batch_size: int | None = None) -> list:
    """Run ``forward`` over ``items`` in length-sorted, token-budgeted batches and return its per-item outputs in
    the order of ``items``.

    ``forward`` takes a list of items and returns one output per item. A batch that raises an out-of-memory error is
    split in half and retried (down to single items), each split counted in ``stats.oom_splits``; results are the
    same because every sample's output is independent of its batch-mates.
    """
    results: list = [None] * len(items)

    def run(idx: list[int]) -> None:
        try:
            outs = forward([items[i] for i in idx])
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err) or len(idx) == 1:
                raise
            stats.oom_splits += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(idx) // 2
            run(idx[:half])
            run(idx[half:])
            return
        stats.batches += 1
        stats.real_tokens += sum(lengths[i] for i in idx)
        stats.computed_tokens += len(idx) * max(lengths[i] for i in idx)
        for i, out in zip(idx, outs):
            results[i] = out

    for batch in plan_batches(lengths, max_batch_tokens, max_batch_size):
        run(batch)
    return results

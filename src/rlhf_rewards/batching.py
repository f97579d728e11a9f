"""Length-aware batching, one mechanism for every backend: sort by length, group under a token budget and a padding
cap (padded batches) or pack several samples into each row (padding-free batches), split and retry a batch that runs
out of accelerator memory, and give results back in the caller's order."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, TypeVar

import torch

from .stats import RewardStats

T = TypeVar("T")

DEFAULT_MAX_BATCH_TOKENS = 16384
"""The token budget of one forward pass on an accelerator whose free memory cannot be read."""

ACCELERATOR_BYTES_PER_TOKEN = 1 << 20
"""Free accelerator memory set aside per budgeted token: a token's activations in a 7-8B model's widest layer (MLP
intermediate 14336, bf16) with the attention workspace and the allocator's slack come to well under this."""

CPU_MAX_BATCH_TOKENS = 4096
"""The CPU's default budget: the fastest one in a plain process (glibc's allocator, no tuning) in the benchmark
(docs/benchmarks.md); larger batches there lose more to allocating and touching fresh memory than they gain."""

MAX_PADDING = 0.1
"""A padded batch closes before padding passes this share of its computed tokens. Length sorting alone leaves long
tails of padding where lengths are spread; the cap halved the padding (9.1% -> 4.7%) and ran ~10% faster."""

PACKED_MAX_PADDING = 0.01
"""The padding cap of a batch of packed rows. Nearly every packed row is full, so what a batch wastes is the few
part-filled rows that join it, padded to the widest: under :data:`MAX_PADDING` they cost 1.5-6.5% more computed
tokens than real ones on 64-512 mixed samples with budgets of 16-64k tokens; under this cap they run with rows of
their own fill, at most 0.9% (benchmarks/dense_packing.py), for a few more forward passes of similar rows."""


def default_max_batch_tokens(device: torch.device) -> int:
    """The default token budget of one forward pass: :data:`CPU_MAX_BATCH_TOKENS` on the CPU; on CUDA, half the
    device's free memory (read once, after the weights are on it) over :data:`ACCELERATOR_BYTES_PER_TOKEN`,
    between 4096 and 65536 tokens; :data:`DEFAULT_MAX_BATCH_TOKENS` elsewhere."""
    if device.type == "cpu":
        return CPU_MAX_BATCH_TOKENS
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return max(4096, min(65536, free // 2 // ACCELERATOR_BYTES_PER_TOKEN // 1024 * 1024))
    return DEFAULT_MAX_BATCH_TOKENS


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_size: Optional[int] = None, *,
                 max_padding: Optional[float] = MAX_PADDING, cached: Optional[Sequence[int]] = None
                 ) -> list[list[int]]:
    """Group sample indices into batches, longest first.

    A batch is padded to its first (longest) sample; it stays within ``max_batch_tokens`` counting
    ``batch size x (longest length + longest cached prefix)`` (a sample longer than the budget runs alone), and its
    padding within ``max_padding`` of its computed tokens (``None``: no cap). ``cached``: per sample, tokens it
    reads from a KV cache rather than computes (the pair-PM's shared prefixes): they cost memory and attention, so
    the budget counts them, but they are not padding. Longest first makes an out-of-memory show on the first batch
    rather than after minutes of work."""
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    past = cached if cached is not None else [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], -past[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    real = longest_past = 0
    for i in order:
        if current:
            n, width = len(current) + 1, lengths[current[0]]
            full = max_batch_size is not None and n > max_batch_size
            over = n * (width + max(longest_past, past[i])) > max_batch_tokens
            padded = max_padding is not None and n * width - (real + lengths[i]) > max_padding * n * width
            if full or over or padded:
                batches.append(current)
                current, real, longest_past = [], 0, 0
        current.append(i)
        real += lengths[i]
        longest_past = max(longest_past, past[i])
    if current:
        batches.append(current)
    return batches


def plan_packed(lengths: Sequence[int], max_batch_tokens: int, cached: Optional[Sequence[int]] = None
                ) -> list[list[list[int]]]:
    """Batches of rows of sample indices for padding-free scoring: samples packed first-fit, longest first, into rows
    as wide as the longest sample (or the budget, if smaller), then rows grouped as :func:`plan_batches` groups
    samples (under ``max_batch_tokens`` counting ``rows x widest row``), with the tight
    :data:`PACKED_MAX_PADDING` cap. First-fit leaves only the last rows short, and those run with each other, so
    nearly every computed token is real (rows wider than the longest sample, or best-fit, gained nothing over this
    on the benchmark's workload, and wider rows cost attention under a block mask).
    ``cached``: per sample, tokens it continues from a KV cache; a row holds its samples' caches too, so they count
    in its width."""
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    if not lengths:
        return []
    size = [n + c for n, c in zip(lengths, cached)] if cached is not None else list(lengths)
    width = min(max(size), max_batch_tokens)
    rows: list[list[int]] = []
    fills: list[int] = []
    for i in sorted(range(len(size)), key=lambda i: (-size[i], i)):
        slot = next((r for r, fill in enumerate(fills) if fill + size[i] <= width), None)
        if slot is None:
            rows.append([])
            fills.append(0)
            slot = len(rows) - 1
        rows[slot].append(i)
        fills[slot] += size[i]
    # rows of similar fill together: a short last row goes with its like, not padded to a full row's width
    batches = plan_batches(fills, max_batch_tokens, max_padding=PACKED_MAX_PADDING)
    return [[rows[r] for r in batch] for batch in batches]


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


def run_batched(items: Sequence[T], lengths: Sequence[int], forward: Callable[[list], list], *,
                max_batch_tokens: int, stats: RewardStats, max_batch_size: Optional[int] = None,
                packed: bool = False, cached: Optional[Sequence[int]] = None) -> list:
    """Run ``forward`` over ``items`` in token-budgeted batches and return its per-item outputs in the order of
    ``items``.

    Padded (``packed=False``, batches from :func:`plan_batches`): ``forward`` takes a list of items and returns one
    output per item. Packed (batches from :func:`plan_packed`): ``forward`` takes a list of rows, each a list of
    items, and returns one output per item in row order. ``lengths`` are the tokens each item computes; ``stats``
    counts them as real and ``rows x longest row`` as computed. A batch that raises an out-of-memory error is split in
    half (by rows, then a lone row by its samples) and retried, each split counted in ``stats.oom_splits``; results
    are the same because every sample's output is independent of its batch-mates.
    """
    results: list = [None] * len(items)

    def run(rows: list[list[int]]) -> None:
        try:
            if packed:
                outs = forward([[items[i] for i in row] for row in rows])
            else:
                outs = forward([items[row[0]] for row in rows])
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err) or (len(rows) == 1 and len(rows[0]) == 1):
                raise
            stats.oom_splits += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(rows) == 1:
                rows = [[i] for i in rows[0]]
            half = len(rows) // 2
            run(rows[:half])
            run(rows[half:])
            return
        fills = [sum(lengths[i] for i in row) for row in rows]
        stats.batches += 1
        stats.real_tokens += sum(fills)
        stats.computed_tokens += len(rows) * max(fills)
        for i, out in zip((i for row in rows for i in row), outs):
            results[i] = out

    if packed:
        plan = plan_packed(lengths, max_batch_tokens, cached)
    else:
        plan = [[[i] for i in batch] for batch in plan_batches(lengths, max_batch_tokens, max_batch_size,
                                                               cached=cached)]
    for batch in plan:
        run(batch)
    return results


def packed_inputs(rows: Sequence[Sequence[Sequence[int]]], pad_id: int, device: torch.device | str, *,
                  positions: Optional[Sequence[Sequence[Sequence[int]]]] = None,
                  hidden_keys: Optional[Sequence[Sequence[int]]] = None,
                  cached: Optional[Sequence[Sequence[int]]] = None, sliding_window: Optional[int] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Tensors for one padding-free forward: ``(input_ids, position_ids, mask, starts)``.

    ``rows[r]`` lists the token ids of the samples packed into row ``r``. ``cached[r][s]``: how many tokens sample
    ``s`` of row ``r`` continues from a KV cache (default none); the caller lays those caches out, row by row, in
    sample order ahead of the row's new tokens (the first ``past width`` key columns, the rest padding).
    ``positions`` gives the new tokens' position ids (default: ``cached, cached + 1, ...`` for each sample).

    ``mask`` is boolean, ``(rows, 1, width, past width + width)``: a token attends to its own sample's cached tokens
    and its own new tokens up to itself, except the ones named in ``hidden_keys[r][s]`` (an offset within sample
    ``s``'s new tokens, or -1 for none), which nobody attends to, and none more than ``sliding_window`` tokens back.
    The short tail of a row attends only within the tail (never read). ``starts[k] = (row, offset)`` of the
    ``k``-th sample's new tokens in row order."""
    width = max(sum(map(len, row)) for row in rows)
    past = cached if cached is not None else [[0] * len(row) for row in rows]
    past_width = max(sum(p) for p in past)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    # per token: its sample (-1 a row's tail, -2 a past column no sample fills) and its order within the sample
    # (cached tokens -1: before every new one); a query sees a key of its own sample no later than itself
    q_seg = torch.full((len(rows), width), -1, dtype=torch.long)
    k_seg = torch.full((len(rows), past_width + width), -2, dtype=torch.long)
    order = torch.arange(width).repeat(len(rows), 1)
    k_order = torch.cat([torch.full((len(rows), past_width), -1, dtype=torch.long), order.clone()], dim=1)
    key_ok = torch.ones((len(rows), past_width + width), dtype=torch.bool)
    starts: list[tuple[int, int]] = []
    for r, row in enumerate(rows):
        at = cache_at = 0
        for s, seq in enumerate(row):
            n, p = len(seq), past[r][s]
            ids[r, at:at + n] = torch.tensor(seq, dtype=torch.long)
            pos[r, at:at + n] = torch.tensor(positions[r][s]) if positions is not None else torch.arange(p, p + n)
            q_seg[r, at:at + n] = s
            order[r, at:at + n] = torch.arange(n)
            k_seg[r, cache_at:cache_at + p] = s
            k_seg[r, past_width + at:past_width + at + n] = s
            k_order[r, past_width + at:past_width + at + n] = torch.arange(n)
            if hidden_keys is not None and hidden_keys[r][s] >= 0:
                key_ok[r, past_width + at + hidden_keys[r][s]] = False
            starts.append((r, at))
            at += n
            cache_at += p
        k_seg[r, past_width + at:] = -1
    visible = k_order[:, None, :] <= order[:, :, None]
    if sliding_window is not None:
        visible &= order[:, :, None] - k_order[:, None, :] < sliding_window
    mask = (q_seg[:, :, None] == k_seg[:, None, :]) & visible & key_ok[:, None, :]
    return ids.to(device), pos.to(device), mask[:, None].to(device), starts


def is_varlen(implementation: Optional[str]) -> bool:
    """Whether an attention implementation runs packed rows through variable-length kernels (flash-attention), which
    take the samples' bounds from ``position_ids`` restarting at 0 and no mask."""
    return "flash" in (implementation or "")


def packed_mask(mask: torch.Tensor, implementation: Optional[str], dtype: torch.dtype) -> torch.Tensor:
    """:func:`packed_inputs`' boolean mask in the form the attention implementation reads: boolean for sdpa, additive
    (0 or the dtype's minimum) for eager, which adds the mask to its scores."""
    if implementation == "sdpa":
        return mask
    if implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    raise ValueError(f"packed scoring has no mask for attention implementation {implementation!r}")


def choose_packing(requested: "bool | str", implementation: Optional[str],
                   blocker: Optional[str] = None) -> tuple[bool, str]:
    """``(pack, reason)`` for ``packing="auto" | True | False``. ``blocker`` names why this model cannot pack with
    this implementation (``None``: it can); asking for ``True`` then raises."""
    if requested not in ("auto", True, False):
        raise ValueError(f"packing must be 'auto', True or False, got {requested!r}")
    varlen = is_varlen(implementation)
    if blocker is None and not varlen and implementation not in ("sdpa", "eager"):
        blocker = f"attention implementation {implementation!r} takes neither packed position ids nor a block mask"
    if requested is False:
        return False, "packing=False"
    if blocker is not None:
        if requested is True:
            raise ValueError(f"packing=True is not possible: {blocker}")
        return False, f"auto: {blocker}"
    if requested is True:
        how = "variable-length kernels" if varlen else "a block mask"
        return True, f"packing=True ({implementation}: {how})"
    if varlen:
        return True, f"auto: {implementation} runs packed rows in variable-length kernels (no padding, no mask)"
    # a dense block mask turns off the fused causal kernel: every row pays its full width squared in attention,
    # which cost more than the padding it saves (CPU, sdpa: packed 1.45-2.85x the time of padded in the benchmark)
    return False, (f"auto: {implementation} with a block mask computes each packed row's full attention, slower "
                   "than padded batches on the causal kernel (pack with attn_implementation='flash_attention_2')")

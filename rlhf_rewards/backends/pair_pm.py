"""Pairwise preference models that are causal LMs answering "A" or "B" (RLHFlow's pair-preference model).

The card runs the full LM once per order and reads two logits of the last position. Here both orders of every
comparison go through one length-sorted batched pass, the backbone's last hidden state is read at each sequence's
last position only, and only the two LM-head rows of "A" and "B" are multiplied: the same two logits, without the
vocabulary-sized output over every position.

Prefix reuse: the sequences of one call share long token prefixes (every comparison of a prompt starts with the
template and the context; in a group compared against one baseline, the order (baseline, completion) also shares the
baseline). The sequences are arranged in a prefix tree over their full tokenizations, so every split falls on a
token boundary of each sequence's own tokenization (pieces are never tokenized separately: BPE merges across a
boundary would change the ids). Each shared stretch runs once, batch size 1, extending its parent's KV cache; the
sequences' remaining tokens then run batched on top of that cache. Causal attention makes this exact: a token's
hidden state depends only on the tokens before it, and those are the same ids at the same positions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Optional, Union

import torch
from torch import nn
from transformers import DynamicCache

from ..batching import pad_right, run_batched
from ..conversation import CompletionInput, Message, PromptInput, SampleError
from ..rendering import render_rlhflow_context, render_rlhflow_pair
from .base import PairwiseRewardModel, TooLongError

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer, the keys and values of one row, ``(1, kv_heads, tokens, head_dim)`` each."""

PREFIX_MIN_SAVED_TOKENS = 64
"""A shared stretch gets its own forward pass only if that saves at least this many token computations
(``(sharers - 1) * stretch length``): below that, the extra pass and its cache cost more than they save."""

MAX_PADDING = 0.1
"""Sequences that run together are padded to the longest of them; a run of similar lengths closes before its padding
passes this share of its computed tokens. Few sequences share one prefix (a GRPO group's eight), too few for length
sorting alone to even out their batches. A CPU pays for every padded token whatever the batch size; on a GPU the
extra, smaller batches are the price (large batches gain little once the GPU is busy)."""


def similar_lengths(lengths: Sequence[int], max_padding: float) -> list[list[int]]:
    """Indices grouped, longest first, into runs of similar length: padding every member of a run to its first
    (longest) keeps the run's padding within ``max_padding`` of its computed tokens."""
    runs: list[list[int]] = []
    total = 0
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if runs:
            n, width = len(runs[-1]) + 1, lengths[runs[-1][0]]
            if n * width - (total + lengths[i]) <= max_padding * n * width:
                runs[-1].append(i)
                total += lengths[i]
                continue
        runs.append([i])
        total = lengths[i]
    return runs


@dataclass
class _PrefixNode:
    """A stretch of tokens, positions ``[start, end)``, identical in every sequence below this node (which also share
    everything before ``start``). ``size``: how many sequences pass through it; ``member``: one of them (the
    stretch's ids are read from it); ``children``: nodes continuing it; ``leaves``: sequences (indices) whose tokens
    from ``end`` on run directly on top of this node's cache."""

    start: int
    end: int
    size: int
    member: int
    children: list["_PrefixNode"] = field(default_factory=list)
    leaves: list[int] = field(default_factory=list)


def _shared_length(sequences: Sequence[list[int]], group: list[int], start: int) -> int:
    """End of the token prefix all of ``group`` share from ``start`` on, short of each one's last token (a sequence
    must keep at least one token of its own to read its last hidden state from)."""
    limit = min(len(sequences[i]) for i in group) - 1
    if limit <= start:
        return start
    # commonprefix only walks the lexicographic min and max of the group (found by list comparisons, in C)
    return start + len(os.path.commonprefix([sequences[i][start:limit] for i in group]))


def build_prefix_tree(sequences: Sequence[list[int]], min_saved: int = PREFIX_MIN_SAVED_TOKENS) -> _PrefixNode:
    """The prefix tree of distinct, non-empty token sequences: a root with an empty stretch, nodes for stretches
    shared by several sequences that save at least ``min_saved`` token computations, every sequence a leaf of the
    deepest node it passes through. Built on the token ids themselves, so each split is a token boundary of every
    sequence."""
    root = _PrefixNode(0, 0, len(sequences), 0)
    created: list[tuple[_PrefixNode, _PrefixNode]] = []  # (node, parent) in creation order: parents first
    stack = [(root, list(range(len(sequences))))]
    while stack:  # iterative: the depth of sharing is not bounded by anything Python's recursion limit knows of
        node, members = stack.pop()
        groups: dict[int, list[int]] = {}
        for i in members:
            groups.setdefault(sequences[i][node.end], []).append(i)
        for group in groups.values():
            end = _shared_length(sequences, group, node.end) if len(group) > 1 else node.end
            if end == node.end:
                node.leaves += group
                continue
            child = _PrefixNode(node.end, end, len(group), group[0])
            node.children.append(child)
            created.append((child, node))
            stack.append((child, group))
    # children before parents: a stretch not worth its own pass is folded into the stretches below it
    for node, parent in reversed(created):
        if (node.size - 1) * (node.end - node.start) >= min_saved:
            continue
        parent.children.remove(node)
        for child in node.children:
            child.start = node.start
        parent.children += node.children
        parent.leaves += node.leaves
    return root


class PairPMRewardModel(PairwiseRewardModel):
    """RLHFlow's preference model, read as its model card does: ``P(A better) = softmax(logit_A, logit_B)[A]`` at
    the last position (with ``temperature``), averaged over the orders (A, B) and (B, A) as the card does; exactly
    0.5 is a tie.

    Attributes:
        prefix_reuse: run token prefixes shared by several sequences of a call once, through the KV cache (see the
            module docstring); ``False`` runs every sequence whole (the same numbers, to float rounding). Off for
            sliding-window models.
        max_batch_size: at most this many sequences per forward pass (``None``: only ``max_batch_tokens`` limits).
    """

    def __init__(self, *, model: nn.Module, temperature: float = 1.0, prefix_reuse: bool = True, **kwargs):
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.model = model
        # a sliding-window cache keeps only the window's last tokens, not the whole shared prefix
        self.prefix_reuse = prefix_reuse and getattr(model.config.get_text_config(), "sliding_window", None) is None
        self.max_batch_size: Optional[int] = None
        self.backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.temperature = temperature
        self.token_ids = []
        for letter in ("A", "B"):
            ids = self.tokenizer.encode(letter, add_special_tokens=False)
            if len(ids) != 1:  # the card asserts this too
                raise ValueError(f"the tokenizer encodes {letter!r} as {ids}, not one token")
            self.token_ids.append(ids[0])
        head = model.get_output_embeddings()
        # the two rows of the LM head the card reads; Llama's head has no bias
        self.ab_weight = head.weight[self.token_ids].detach()
        self.ab_bias = head.bias[self.token_ids].detach() if getattr(head, "bias", None) is not None else None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _context(self, messages: list[Message]) -> str:
        try:
            return render_rlhflow_context(messages, self.tokenizer)
        except ValueError as err:
            raise ValueError(f"{self.preset.name} cannot render this conversation: {err}") from None

    def format(self, prompt: PromptInput, completion_a: CompletionInput, completion_b: CompletionInput
               ) -> list[str]:
        messages, a, b = self._one(prompt, completion_a, completion_b)
        context = self._context(messages)
        return [render_rlhflow_pair(context, a, b, self.tokenizer), render_rlhflow_pair(context, b, a, self.tokenizer)]

    def encode(self, prompt: PromptInput, completion_a: CompletionInput, completion_b: CompletionInput
               ) -> list[list[int]]:
        """The token ids of orders (A, B) and (B, A), the context shortened as scoring shortens it."""
        messages, a, b = self._one(prompt, completion_a, completion_b)
        context = self._context(messages)
        return [self._encode(context, a, b), self._encode(context, b, a)]

    def _truncation_rule(self) -> str:
        return "the context cut from its start; the responses are never cut"

    def _encode(self, context: str, first: str, second: str) -> list[int]:
        """Token ids of one order, the context shortened from its start if the whole exceeds ``max_length``
        (the responses and the question's final turn are what the comparison is about).

        The responses themselves are never cut: a comparison of truncated responses would judge texts the policy
        did not write, and cutting one response more than the other would bias it. Two responses that do not fit
        beside the template even with the whole context gone raise :class:`TooLongError` with the token counts.
        """
        text = render_rlhflow_pair(context, first, second, self.tokenizer)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        context_ids = self.tokenizer.encode(context, add_special_tokens=False)
        excess = len(ids) - self.max_length
        while True:
            if excess >= len(context_ids):
                bare = len(self.tokenizer.encode(render_rlhflow_pair("", first, second, self.tokenizer),
                                                 add_special_tokens=False))
                count = [len(self.tokenizer.encode(r, add_special_tokens=False)) for r in (first, second)]
                raise TooLongError(0, f"the two responses take {count[0]} + {count[1]} tokens, {bare} with the "
                                      f"pair template and no context at all, more than max_length="
                                      f"{self.max_length}; {self.preset.name} compares whole responses only")
            cut = self.tokenizer.decode(context_ids[excess:])
            ids = self.tokenizer.encode(render_rlhflow_pair(cut, first, second, self.tokenizer),
                                        add_special_tokens=False)
            if len(ids) <= self.max_length:
                break
            excess += len(ids) - self.max_length
        self.stats.truncated += 1
        self.stats.truncated_tokens += excess
        return ids

    def _cache(self, past: Optional[KVCache], rows: int) -> DynamicCache:
        """A fresh cache holding ``past`` repeated for ``rows`` rows. The forward pass appends to its cache, so
        every use gets its own; ``past`` itself is never modified."""
        if past is None:
            return DynamicCache(config=self.model.config)
        return DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in past],
                            config=self.model.config)

    @torch.inference_mode()
    def _logits_ab(self, batch: list[list[int]], past: Optional[KVCache] = None, start: int = 0
                   ) -> list[tuple[float, float]]:
        """``(logit_A, logit_B)`` at the last token of each sequence of ``batch``; with ``past``, the KV cache of
        their shared first ``start`` tokens, only the tokens from ``start`` on run."""
        suffixes = [ids[start:] for ids in batch]
        input_ids, mask = pad_right(suffixes, self.pad_id, self.device)
        cache = None
        if past is not None:
            cache = self._cache(past, len(batch))
            mask = torch.cat([mask.new_ones(len(batch), start), mask], dim=1)
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask, past_key_values=cache,
                               use_cache=cache is not None).last_hidden_state
        last = torch.tensor([len(ids) - 1 for ids in suffixes], device=self.device)
        h = hidden[torch.arange(len(batch), device=self.device), last]
        logits = h @ self.ab_weight.to(h.dtype).T
        if self.ab_bias is not None:
            logits = logits + self.ab_bias.to(h.dtype)
        return [tuple(row) for row in logits.float().cpu().tolist()]

    @torch.inference_mode()
    def _extend(self, past: Optional[KVCache], tokens: list[int]) -> KVCache:
        """The KV cache of ``past`` followed by ``tokens`` (one row)."""
        input_ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        out = self.backbone(input_ids=input_ids, past_key_values=self._cache(past, 1), use_cache=True)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def _batched(self, sequences: list[list[int]], past: Optional[KVCache] = None, start: int = 0
                 ) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = [(0.0, 0.0)] * len(sequences)
        for chunk in similar_lengths([len(s) - start for s in sequences], MAX_PADDING):
            # lengths include the shared prefix: a row's cost (its keys, its cache copy) grows with it, so the token
            # budget, and with it peak memory, counts it
            rows = [sequences[i] for i in chunk]
            results = run_batched(rows, [len(s) for s in rows], partial(self._logits_ab, past=past, start=start),
                                  max_batch_tokens=self.max_batch_tokens, stats=self.stats,
                                  max_batch_size=self.max_batch_size)
            for i, r in zip(chunk, results):
                out[i] = r
        # only the tokens from `start` on were computed; run_batched counted whole rows
        self.stats.computed_tokens -= start * len(sequences)
        return out

    def _logits_shared(self, sequences: list[list[int]]) -> list[tuple[float, float]]:
        """:meth:`logits_ab` with prefix reuse: each distinct sequence once, shared stretches once (depth first, so
        only the caches of one path of the tree are held at a time)."""
        distinct = list(dict.fromkeys(map(tuple, sequences)))
        index = {seq: k for k, seq in enumerate(distinct)}
        unique = [list(seq) for seq in distinct]
        results: list[tuple[float, float]] = [(0.0, 0.0)] * len(unique)
        stack: list[tuple[_PrefixNode, Optional[KVCache]]] = [(build_prefix_tree(unique), None)]
        while stack:
            node, past = stack.pop()
            if node.end > node.start:
                past = self._extend(past, unique[node.member][node.start:node.end])
                self.stats.batches += 1
                self.stats.computed_tokens += node.end - node.start
            if node.leaves:
                for i, r in zip(node.leaves, self._batched([unique[i] for i in node.leaves], past, node.end)):
                    results[i] = r
            stack += [(child, past) for child in node.children]
        # a repeated sequence was computed once; each occurrence counts as a real input
        self.stats.real_tokens += sum(map(len, sequences)) - sum(map(len, unique))
        return [results[index[tuple(s)]] for s in sequences]

    def logits_ab(self, sequences: Sequence[list[int]]) -> list[tuple[float, float]]:
        """``(logit_A, logit_B)`` at the last position of each token sequence, batched by length (sharing token
        prefixes through the KV cache when ``prefix_reuse`` is on)."""
        sequences = [list(s) for s in sequences]
        out = self._logits_shared(sequences) if self.prefix_reuse else self._batched(sequences)
        self.stats.samples += len(sequences)
        return out

    def _slot_probs(self, logit_a: float, logit_b: float) -> tuple[float, float]:
        """The card's softmax over the two logits at ``temperature``: the probabilities that the response in slot
        A, and in slot B, is better (identical logits in both orders give exactly 0.5)."""
        za, zb = logit_a / self.temperature, logit_b / self.temperature
        shift = max(za, zb)  # keeps exp finite at low temperatures; cancels in the ratio
        ea, eb = math.exp(za - shift), math.exp(zb - shift)
        z = ea + eb
        return ea / z, eb / z

    def _compare_both_orders(self, items: list[tuple[list[Message], str, str]]
                             ) -> list[Union[tuple[float, float, float], SampleError]]:
        contexts: dict[tuple, Union[str, SampleError]] = {}  # a group's comparisons share one context
        sequences: list[list[int]] = []
        results: list[Union[tuple[float, float, float], SampleError, None]] = []
        for k, (messages, a, b) in enumerate(items):
            key = tuple((m["role"], m["content"]) for m in messages)
            if key not in contexts:
                try:
                    contexts[key] = self._context(messages)
                except ValueError as err:
                    contexts[key] = SampleError(k, str(err))
            context = contexts[key]
            if isinstance(context, SampleError):
                results.append(SampleError(k, str(context)))
                continue
            try:
                pair = [self._encode(context, a, b), self._encode(context, b, a)]
            except TooLongError as err:
                results.append(TooLongError(k, str(err)))
                continue
            sequences += pair
            results.append(None)
        logits = iter(self.logits_ab(sequences)) if sequences else iter(())
        for k, r in enumerate(results):
            if r is None:
                p_ab = self._slot_probs(*next(logits))[0]
                p_ba = self._slot_probs(*next(logits))[1]  # order (b, a): a sits in slot B
                results[k] = (p_ab, p_ba, (p_ab + p_ba) / 2)
        return results


def load_pair_pm(name_or_path: str, *, preset, tokenizer, device, dtype, max_length, max_batch_tokens,
                 quantization, adapter, temperature: float = 1.0) -> PairPMRewardModel:
    """Loading as RLHFlow's model card does: ``AutoModelForCausalLM`` (bf16 on GPU), the repository's own tokenizer."""
    from transformers import AutoModelForCausalLM

    from .weights import apply_adapter, from_pretrained_checked
    from ..tokenization import load_tokenizer

    tokenizer = load_tokenizer(preset, name_or_path, tokenizer)
    model = from_pretrained_checked(AutoModelForCausalLM, name_or_path, dtype=dtype, device=device,
                                    quantization=quantization, skip_modules=("lm_head",))
    model = apply_adapter(model, adapter, quantized=quantization is not None)
    limit = max_length or preset.max_length or getattr(model.config, "max_position_embeddings", None)
    return PairPMRewardModel(model=model, temperature=temperature, preset=preset, tokenizer=tokenizer,
                             device=device, max_length=limit, max_batch_tokens=max_batch_tokens)

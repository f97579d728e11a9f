"""Pairwise preference models that are causal LMs answering "A" or "B" (RLHFlow's pair-preference model).

The card runs the full LM once per order and reads two logits of the last position. Here both orders of every
comparison go through one length-sorted batched pass, the backbone's last hidden state is read at each sequence's
last position only, and only the two LM-head rows of "A" and "B" are multiplied: the same two logits, without the
vocabulary-sized output over every position.

Prefix reuse: the sequences of one call share long token prefixes (every comparison of a prompt starts with the
template and the context; in a group compared against one baseline, the order (baseline, completion) also shares the
baseline). The sequences are arranged in a prefix tree over their full tokenizations, so every split falls on a
token boundary of each sequence's own tokenization (pieces are never tokenized separately: BPE merges across a
boundary would change the ids). Each shared stretch runs once, extending its parent's KV cache; the sequences'
remaining tokens run on top of the cache of the deepest stretch they share. Causal attention makes this exact: a
token's hidden state depends only on the tokens before it, and those are the same ids at the same positions.

Batching: the tree is walked level by level, so the stretches of one level run together across all the prompts of a
call (a batch of GRPO groups shares one pass per level, not one per group), and the sequences' own tokens run
together under the same token budget, each row on its own cached prefix: rows of different prefixes are stacked into
one cache (padded columns masked; position ids continue each row's own prefix). With ``packing``, several sequences
share a row, each seeing only its own prefix and itself through a block mask.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn
from transformers import DynamicCache

from ..batching import choose_packing, is_varlen, packed_inputs, packed_mask, run_batched
from ..conversation import CompletionInput, Message, PromptInput
from ..errors import NonFiniteRewardError, SampleError, TooLongError, nonfinite
from ..rendering import render_rlhflow_context, render_rlhflow_pair
from .pairwise_base import PairwiseRewardModel

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer, the keys and values of one sequence, ``(1, kv_heads, tokens, head_dim)`` each."""


@dataclass
class _Job:
    """Tokens to run on top of a cached past: a sequence's own remaining tokens (``sequence`` its index) or a shared
    stretch whose cache the stretches and sequences below it continue (``keep_cache``)."""

    tokens: list[int]
    past: Optional[KVCache]
    past_length: int
    keep_cache: bool
    sequence: int

PREFIX_MIN_SAVED_TOKENS = 64
"""A shared stretch gets its own forward pass only if that saves at least this many token computations
(``(sharers - 1) * stretch length``): below that, the extra pass and its cache cost more than they save."""

PREFIX_CACHE_BUDGETS = 4
"""Shared stretches of one call run level by level, many at once; the caches of one level are held until their
continuations have run. Each round of stretches is cut to produce at most this many token budgets' worth of cache, so a
call's memory stays bounded whatever its size."""


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


def _cache_tokens(node: _PrefixNode) -> int:
    """Cached tokens the stretches below ``node`` produce (each holds its whole sequence so far)."""
    return sum(child.end for child in node.children)


class PairPMRewardModel(PairwiseRewardModel):
    """RLHFlow's preference model, read as its model card does: ``P(A better) = softmax(logit_A, logit_B)[A]`` at
    the last position (with ``temperature``), averaged over the orders (A, B) and (B, A) as the card does; exactly
    0.5 is a tie.

    Attributes:
        prefix_reuse: run token prefixes shared by several sequences of a call once, through the KV cache (see the
            module docstring); ``False`` runs every sequence whole (the same numbers, to float rounding). Off for
            sliding-window models.
        max_batch_size: at most this many sequences per padded forward pass (``None``: only ``max_batch_tokens``
            limits).
        packing: whether each sequence's own remaining tokens run packed into rows (several per row, each on its
            own cached prefix, under a block mask) rather than padded; ``packing_reason`` says why.
    """

    def __init__(self, *, model: nn.Module, temperature: float = 1.0, prefix_reuse: bool = True,
                 packing: "bool | str" = "auto", **kwargs):
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
        self.sliding_window = getattr(model.config.get_text_config(), "sliding_window", None)
        self.attn_implementation = getattr(self.backbone.config, "_attn_implementation", None)
        # transformers 5.24 renamed the forward's and the output's `past_key_values` to `cache` (the old name warns)
        self._cache_name = "cache" if "cache" in inspect.signature(self.backbone.forward).parameters \
            else "past_key_values"
        blocker = None
        if is_varlen(self.attn_implementation):
            blocker = "each sequence continues its own cached prefix, which variable-length kernels do not take"
        self.packing, self.packing_reason = choose_packing(packing, self.attn_implementation, blocker)

    def _context(self, messages: list[Message]) -> str:
        try:
            return render_rlhflow_context(messages, self.tokenizer)
        except ValueError as err:
            raise ValueError(f"{self.preset.name} cannot render this conversation: {err}") from None

    def _render_pair(self, messages: list[Message], a: str, b: str) -> list[str]:
        context = self._context(messages)
        return [self.shown(render_rlhflow_pair(context, a, b, self.tokenizer)),
                self.shown(render_rlhflow_pair(context, b, a, self.tokenizer))]

    def encode(self, prompt: PromptInput, completion_a: CompletionInput, completion_b: CompletionInput
               ) -> list[list[int]]:
        """The token ids of orders (A, B) and (B, A), the context shortened as scoring shortens it."""
        with self.session("encode"):
            messages, a, b = self._one(prompt, completion_a, completion_b, count=True)
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
        ids = self._ids(render_rlhflow_pair(context, first, second, self.tokenizer))
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        context_ids = self._ids(context)
        excess = len(ids) - self.max_length
        while True:
            if excess >= len(context_ids):
                bare = len(self._ids(render_rlhflow_pair("", first, second, self.tokenizer)))
                count = [len(self._ids(r)) for r in (first, second)]
                raise TooLongError(0, f"the two responses take {count[0]} + {count[1]} tokens, {bare} with the "
                                      f"pair template and no context at all, more than max_length="
                                      f"{self.max_length}; {self.preset.name} compares whole responses only")
            cut = self.tokenizer.decode(context_ids[excess:])
            if self.control_text == "text":
                # control text the context held was read as text; spelled out again by decoding, it must stay text
                cut = self._control.escape(cut)[0]
            ids = self._ids(render_rlhflow_pair(cut, first, second, self.tokenizer))
            if len(ids) <= self.max_length:
                break
            excess += len(ids) - self.max_length
        self.stats.truncated += 1
        self.stats.truncated_tokens += excess
        return ids

    def _ids(self, text: str) -> list[int]:
        """Untruncated ids of a rendered text as the card encodes it (``add_special_tokens=False``), control text
        from messages read as text (see ``control_text``)."""
        return self._token_ids([text], add_special_tokens=False)[0]

    @torch.inference_mode()
    def _run(self, rows: list[list[_Job]]) -> list[tuple[tuple[float, float], Optional[KVCache]]]:
        """One forward over ``rows`` of jobs (one job a row when padded, several when packed): for each job in row
        order, ``(logit_A, logit_B)`` at its last token and, if it asked for one, the KV cache of its whole
        sequence so far (its past and its new tokens)."""
        packed = any(len(row) > 1 for row in rows)
        tokens = [[job.tokens for job in row] for row in rows]
        past = [[job.past_length for job in row] for row in rows]
        input_ids, position_ids, mask, starts = packed_inputs(tokens, self.pad_id, self.device, cached=past,
                                                              sliding_window=self.sliding_window)
        width = max(map(sum, past))
        cache = self._stack([[job.past for job in row] for row in rows], width)
        if packed:
            attention = packed_mask(mask, self.attn_implementation, self.backbone.dtype)
        else:  # one job a row: a 2D mask (cached columns then new tokens) keeps the attention's fast paths
            attention = mask[:, 0].any(dim=1).long()  # the columns some query of the row sees
        want = any(job.keep_cache for row in rows for job in row)
        if cache is None and want:
            cache = DynamicCache(config=self.model.config)
        out = self.backbone(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                            use_cache=want, **{self._cache_name: cache})
        jobs = [job for row in rows for job in row]
        r = torch.tensor([row for row, _ in starts], device=self.device)
        c = torch.tensor([at + len(job.tokens) - 1 for (_, at), job in zip(starts, jobs)], device=self.device)
        h = out.last_hidden_state[r, c]
        logits = h @ self.ab_weight.to(h.dtype).T
        if self.ab_bias is not None:
            logits = logits + self.ab_bias.to(h.dtype)
        results = []
        for k, (pair, job, (row, at)) in enumerate(zip(logits.float().cpu().tolist(), jobs, starts)):
            kept = None
            if job.keep_cache:  # copies, so the batch's cache is freed with the batch
                kept = [(torch.cat([layer.keys[row:row + 1, :, :job.past_length],
                                    layer.keys[row:row + 1, :, width + at:width + at + len(job.tokens)]], dim=2),
                         torch.cat([layer.values[row:row + 1, :, :job.past_length],
                                    layer.values[row:row + 1, :, width + at:width + at + len(job.tokens)]], dim=2))
                        for layer in getattr(out, self._cache_name).layers]
            results.append((tuple(pair), kept))
        return results

    def _stack(self, pasts: list[list[Optional[KVCache]]], width: int) -> Optional[DynamicCache]:
        """A cache holding, in each row, its jobs' pasts one after another (zeros after them up to ``width``, masked);
        ``None`` when no job has a past. Every forward gets its own cache (the forward appends to it)."""
        if width == 0:
            return None
        first = next(p for row in pasts for p in row if p is not None)
        cache = DynamicCache(config=self.model.config)
        for layer, (k0, v0) in enumerate(first):
            keys = k0.new_zeros((len(pasts), k0.shape[1], width, k0.shape[3]))
            values = v0.new_zeros((len(pasts), v0.shape[1], width, v0.shape[3]))
            for r, row in enumerate(pasts):
                at = 0
                for p in row:
                    if p is not None:
                        n = p[layer][0].shape[2]
                        keys[r, :, at:at + n] = p[layer][0][0]
                        values[r, :, at:at + n] = p[layer][1][0]
                        at += n
            cache.update(keys, values, layer)
        return cache

    def _run_jobs(self, jobs: list[_Job], packed: bool) -> list[tuple[tuple[float, float], Optional[KVCache]]]:
        """:meth:`_run` over ``jobs`` in token-budgeted batches (each job's cached past counted in the budget)."""
        lengths = [len(job.tokens) for job in jobs]
        forward = self._run if packed else (lambda batch: self._run([[job] for job in batch]))
        return run_batched(jobs, lengths, forward, max_batch_tokens=self.max_batch_tokens, stats=self.stats,
                           max_batch_size=self.max_batch_size, packed=packed,
                           cached=[job.past_length for job in jobs])

    def logits_ab(self, sequences: Sequence[list[int]]) -> list[tuple[float, float]]:
        """``(logit_A, logit_B)`` at the last position of each token sequence.

        Each distinct sequence runs once. With ``prefix_reuse``, the shared stretches of the prefix tree run level
        by level, the stretches of one level (across all prompts of the call) batched together on top of their
        parents' caches, and every sequence's own remaining tokens run batched (packed when ``packing``) on top of
        the cache of the deepest stretch it shares."""
        sequences = [list(s) for s in sequences]
        distinct = list(dict.fromkeys(map(tuple, sequences)))
        unique = [list(seq) for seq in distinct]
        real_before = self.stats.real_tokens
        results: list[tuple[float, float]] = [(0.0, 0.0)] * len(unique)
        if self.prefix_reuse:
            root = build_prefix_tree(unique)
        else:
            root = _PrefixNode(0, 0, len(unique), 0, leaves=list(range(len(unique))))
        cap = PREFIX_CACHE_BUDGETS * self.max_batch_tokens
        pending: list[list[tuple[_PrefixNode, Optional[KVCache]]]] = [[(root, None)]]
        while pending:  # depth first over rounds, so only a bounded number of caches is held at once
            level = pending.pop()
            rounds, produced = [], 0
            while level and (not rounds or produced + _cache_tokens(level[0][0]) <= cap):
                node, past = level.pop(0)
                rounds.append((node, past))
                produced += _cache_tokens(node)
            if level:
                pending.append(level)
            leaves = [_Job(unique[i][node.end:], past, node.end, False, i) for node, past in rounds
                      for i in node.leaves]
            for job, (pair, _) in zip(leaves, self._run_jobs(leaves, self.packing)):
                results[job.sequence] = pair
            stretches = [(child, _Job(unique[child.member][child.start:child.end], past, node.end, True, -1))
                         for node, past in rounds for child in node.children]
            if stretches:
                done = self._run_jobs([job for _, job in stretches], False)
                pending.append([(child, cache) for (child, _), (_, cache) in zip(stretches, done)])
        # every occurrence of every sequence counts as read; shared and repeated tokens were computed once
        self.stats.real_tokens = real_before + sum(map(len, sequences))
        self.stats.samples += len(sequences)
        index = {seq: k for k, seq in enumerate(distinct)}
        return [results[index[tuple(s)]] for s in sequences]

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
                ab, ba = next(logits), next(logits)
                # a -inf logit still gives a finite softmax (0, or 0.5 when both orders agree): refuse it, as NaN
                bad = next((nonfinite(x) for x in ab + ba if nonfinite(x)), None)
                if bad is not None:
                    results[k] = NonFiniteRewardError(k, f"{self.preset.name} returned a {bad} logit for this "
                                                         f"comparison ('A', 'B' logits: {ab} in order (a, b), {ba} "
                                                         "in order (b, a))", "pair")
                    continue
                p_ab = self._slot_probs(*ab)[0]
                p_ba = self._slot_probs(*ba)[1]  # order (b, a): a sits in slot B
                results[k] = (p_ab, p_ba, (p_ab + p_ba) / 2)
        return results


def load_pair_pm(name_or_path: str, *, preset, tokenizer, device, dtype, max_length, max_batch_tokens,
                 quantization, adapter, temperature: float = 1.0, packing="auto", attn_implementation=None
                 ) -> PairPMRewardModel:
    """Loading as RLHFlow's model card does: ``AutoModelForCausalLM`` (bf16 on GPU), the repository's own tokenizer."""
    from transformers import AutoModelForCausalLM

    from .weights import apply_adapter, from_pretrained_checked
    from ..tokenization import load_tokenizer

    tokenizer = load_tokenizer(preset, name_or_path, tokenizer)
    model = from_pretrained_checked(AutoModelForCausalLM, name_or_path, dtype=dtype, device=device,
                                    quantization=quantization, skip_modules=("lm_head",),
                                    attn_implementation=attn_implementation)
    model = apply_adapter(model, adapter, quantized=quantization is not None)
    limit = max_length or preset.max_length or getattr(model.config, "max_position_embeddings", None)
    return PairPMRewardModel(model=model, temperature=temperature, preset=preset, tokenizer=tokenizer,
                             device=device, max_length=limit, max_batch_tokens=max_batch_tokens, packing=packing)

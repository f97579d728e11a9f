"""Pairwise preference models that are causal LMs answering "A" or "B" (RLHFlow's pair-preference model, card 003).

The card runs the full LM once per order and reads two logits of the last position. Here both orders of every
comparison go through one length-sorted batched pass, the backbone's last hidden state is read at each sequence's
last position only, and only the two LM-head rows of "A" and "B" are multiplied: the same two logits, without the
vocabulary-sized output over every position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from ..batching import pad_right, run_batched
from ..conversation import CompletionInput, Message, PromptInput, normalize_completion, normalize_prompt
from ..rendering import render_rlhflow_context, render_rlhflow_pair
from .base import PairwiseRewardModel


class PairPMRewardModel(PairwiseRewardModel):
    """Card 003's preference model: ``P(A better) = softmax(logit_A, logit_B)[A]`` at the last position (with
    ``temperature``), averaged over the orders (A, B) and (B, A) as the card does; exactly 0.5 is a tie."""

    def __init__(self, *, model: nn.Module, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.model = model
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

    def _context(self, messages: list[Message], where: str) -> str:
        try:
            return render_rlhflow_context(messages, self.tokenizer)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    def format(self, prompt: PromptInput, completion_a: CompletionInput, completion_b: CompletionInput
               ) -> list[str]:
        context = self._context(normalize_prompt(prompt, "prompt"), "prompt")
        a = normalize_completion(completion_a, "completion_a")
        b = normalize_completion(completion_b, "completion_b")
        return [render_rlhflow_pair(context, a, b, self.tokenizer), render_rlhflow_pair(context, b, a, self.tokenizer)]

    def _encode(self, context: str, first: str, second: str) -> list[int]:
        """Token ids of one order, the context shortened from its start if the whole exceeds ``max_length``
        (the responses and the question's final turn are what the comparison is about)."""
        text = render_rlhflow_pair(context, first, second, self.tokenizer)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        context_ids = self.tokenizer.encode(context, add_special_tokens=False)
        excess = len(ids) - self.max_length
        while True:
            if excess >= len(context_ids):
                raise ValueError(f"the two responses alone take more than max_length={self.max_length} tokens")
            cut = self.tokenizer.decode(context_ids[excess:])
            ids = self.tokenizer.encode(render_rlhflow_pair(cut, first, second, self.tokenizer),
                                        add_special_tokens=False)
            if len(ids) <= self.max_length:
                break
            excess += len(ids) - self.max_length
        self.stats.truncated += 1
        self.stats.truncated_tokens += excess
        return ids

    @torch.inference_mode()
    def _logits_ab(self, batch: list[list[int]]) -> list[tuple[float, float]]:
        input_ids, mask = pad_right(batch, self.pad_id, self.device)
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        last = torch.tensor([len(ids) - 1 for ids in batch], device=self.device)
        h = hidden[torch.arange(len(batch), device=self.device), last]
        logits = h @ self.ab_weight.to(h.dtype).T
        if self.ab_bias is not None:
            logits = logits + self.ab_bias.to(h.dtype)
        return [tuple(row) for row in logits.float().cpu().tolist()]

    def logits_ab(self, sequences: Sequence[list[int]]) -> list[tuple[float, float]]:
        """``(logit_A, logit_B)`` at the last position of each token sequence, batched by length."""
        out = run_batched(list(sequences), [len(s) for s in sequences], self._logits_ab,
                          max_batch_tokens=self.max_batch_tokens, stats=self.stats)
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
                             ) -> list[tuple[float, float, float]]:
        contexts: dict[int, str] = {}
        sequences = []
        for i, (messages, a, b) in enumerate(items):
            context = contexts.setdefault(id(messages), self._context(messages, f"prompts[{i}]"))
            sequences += [self._encode(context, a, b), self._encode(context, b, a)]
        logits = self.logits_ab(sequences)
        results = []
        for i in range(len(items)):
            p_ab = self._slot_probs(*logits[2 * i])[0]
            p_ba = self._slot_probs(*logits[2 * i + 1])[1]  # order (b, a): a sits in slot B
            results.append((p_ab, p_ba, (p_ab + p_ba) / 2))
        return results


def load_pair_pm(name_or_path: str, *, preset, tokenizer, device, dtype, max_length, max_batch_tokens,
                 quantization, adapter, temperature: float = 1.0) -> PairPMRewardModel:
    """Card 003's loading: ``AutoModelForCausalLM`` (bf16 on GPU), the repository's own tokenizer."""
    from transformers import AutoModelForCausalLM

    from ..loading import apply_adapter, from_pretrained_checked
    from ..tokenization import load_tokenizer

    tokenizer = load_tokenizer(preset, name_or_path, tokenizer)
    model = from_pretrained_checked(AutoModelForCausalLM, name_or_path, dtype=dtype, device=device,
                                    quantization=quantization, skip_modules=("lm_head",))
    model = apply_adapter(model, adapter, quantized=quantization is not None)
    limit = max_length or preset.max_length or getattr(model.config, "max_position_embeddings", None)
    return PairPMRewardModel(model=model, temperature=temperature, preset=preset, tokenizer=tokenizer,
                             device=device, max_length=limit, max_batch_tokens=max_batch_tokens)

"""Process reward models that are causal LMs judging each step with a "good" or a "bad" token (RLHFlow's PRMs,
Math-Shepherd): a step's reward is ``softmax(logit(good), logit(bad))[good]`` at a position the family's card reads.

The cards run the whole LM and slice two columns out of the vocabulary-sized logits at every position. Here the
backbone's last hidden state is read at the read positions only and multiplied by the two LM-head rows: the same two
logits. One forward per sample gives all its steps' rewards (right-padded, or packed under a block mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..batching import choose_packing, is_varlen, packed_inputs, packed_mask, pad_right
from .process_base import MarkedInput, ProcessRewardModel, StepRewards, per_sample, picked


class LabelTokenProcessRewardModel(ProcessRewardModel):
    """A causal-LM PRM read at its label tokens (see :class:`ProcessRewardModel` for the API). A family sets the
    preset's ``extra["good_token"]`` and ``extra["bad_token"]`` and implements ``_render_steps`` and
    :meth:`_read_positions`.

    Attributes:
        label_ids: the card's candidate tokens ``(id of good, id of bad)``; a step's reward is the softmax
            probability of the first.
        packing: whether samples are packed into rows under a block mask (``packing=True``) rather than
            right-padded; ``packing_reason`` says why.
    """

    def __init__(self, *, model: nn.Module, packing: "bool | str" = "auto", **kwargs: Any):
        super().__init__(**kwargs)
        self.model = model
        self.backbone = model.get_decoder()
        self.label_ids = tuple(self._one_id(self.preset.extra[name]) for name in ("good_token", "bad_token"))
        head = model.get_output_embeddings()
        # the two rows of the LM head the cards read (Llama's and Mistral's heads have no bias)
        self.label_weight = head.weight[list(self.label_ids)].detach()
        self.label_bias = head.bias[list(self.label_ids)].detach() if getattr(head, "bias", None) is not None \
            else None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # a sliding-window model (Mistral-7B v0.1: 4096) keeps its window in packed rows too
        self.sliding_window = getattr(self.backbone.config, "sliding_window", None)
        self.attn_implementation = getattr(self.backbone.config, "_attn_implementation", None)
        self.packing, self.packing_reason = choose_packing(packing, self.attn_implementation)

    def _one_id(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{self.preset.name}: the tokenizer encodes {text!r} as {ids}, not one token")
        return ids[0]

    def _read_positions(self, ids: list[int]) -> list[int]:
        """Where in a tokenized input each step's reward is read, in step order."""
        raise NotImplementedError

    def _forward_steps(self, texts: Sequence[str]) -> list[StepRewards]:
        return self._rewards_at(texts, self._read_positions, self._forward_packed if self.packing else self._forward,
                                packed=self.packing)

    @torch.inference_mode()
    def _forward(self, batch: list[MarkedInput]) -> list[list[float]]:
        input_ids, _ = pad_right([ids for ids, _ in batch], self.pad_id, self.device)
        # right padding under causal attention: no real token attends to a pad
        hidden = self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state
        return self._read(hidden, [(r, at) for r, (_, at) in enumerate(batch)])

    @torch.inference_mode()
    def _forward_packed(self, rows: list[list[MarkedInput]]) -> list[list[float]]:
        """Step rewards of packed rows, in row order: each sample at position ids 0, 1, ..., attending only within
        itself."""
        if is_varlen(self.attn_implementation):
            rows = [[item for row in rows for item in row]]  # variable-length kernels take one row
        input_ids, position_ids, mask, starts = packed_inputs([[ids for ids, _ in row] for row in rows], self.pad_id,
                                                              self.device, sliding_window=self.sliding_window)
        attention = None if is_varlen(self.attn_implementation) else \
            packed_mask(mask, self.attn_implementation, self.backbone.dtype)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        items = [item for row in rows for item in row]
        return self._read(hidden, [(row, [at + p for p in item[1]]) for (row, at), item in zip(starts, items)])

    def _read(self, hidden: torch.Tensor, places: list[tuple[int, list[int]]]) -> list[list[float]]:
        """Per item, ``P(good)`` at its read positions ``places[k] = (row, columns)`` of ``hidden``."""
        at = picked(hidden, places)
        if at is None:
            return [[] for _ in places]
        logits = at @ self.label_weight.to(at.device, at.dtype).T
        if self.label_bias is not None:
            logits = logits + self.label_bias.to(at.device, at.dtype)
        return per_sample(torch.softmax(logits.float(), dim=-1)[:, 0].cpu().tolist(), places)


def load_label_token_prm(cls: type[LabelTokenProcessRewardModel], name_or_path: str, *, preset, tokenizer, device,
                         dtype, max_length, max_batch_tokens, quantization, adapter, packing="auto"
                         ) -> LabelTokenProcessRewardModel:
    """Load ``cls`` as the cards load their model: ``AutoModelForCausalLM`` (a missing weight is an error; the LM head
    kept out of quantization), the repository's own tokenizer (checked against the preset's golden ids, and against
    sentencepiece where the preset says so), an optional PEFT adapter."""
    from transformers import AutoModelForCausalLM

    from .weights import apply_adapter, from_pretrained_checked
    from ..tokenization import load_tokenizer

    tokenizer = load_tokenizer(preset, name_or_path, tokenizer)
    model = from_pretrained_checked(AutoModelForCausalLM, name_or_path, dtype=dtype, device=device,
                                    quantization=quantization, skip_modules=("lm_head",))
    model = apply_adapter(model, adapter, quantized=quantization is not None)
    limit = max_length or preset.max_length or getattr(model.config, "max_position_embeddings", None)
    return cls(model=model, packing=packing, preset=preset, tokenizer=tokenizer, device=device, max_length=limit,
               max_batch_tokens=max_batch_tokens)

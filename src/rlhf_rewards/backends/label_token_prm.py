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

from .backbone_prm import BackboneProcessRewardModel
from .process_base import StepRewards


class LabelTokenProcessRewardModel(BackboneProcessRewardModel):
    """A causal-LM PRM read at its label tokens (the API: :class:`~rlhf_rewards.backends.process_base.
    ProcessRewardModel`). A family sets the preset's ``extra["good_token"]`` and ``extra["bad_token"]`` and
    implements ``_render_steps`` and :meth:`_read_positions`.

    Attributes:
        label_ids: the card's candidate tokens ``(id of good, id of bad)``; a step's reward is the softmax
            probability of the first.
    """

    def __init__(self, *, model: nn.Module, **kwargs: Any):
        super().__init__(model=model, backbone=model.get_decoder(), **kwargs)
        self.label_ids = tuple(self._one_id(self.preset.extra[name]) for name in ("good_token", "bad_token"))
        head = model.get_output_embeddings()
        # the two rows of the LM head the cards read (Llama's and Mistral's heads have no bias)
        self.label_weight = head.weight[list(self.label_ids)].detach()
        self.label_bias = head.bias[list(self.label_ids)].detach() if getattr(head, "bias", None) is not None \
            else None

    def _one_id(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{self.preset.name}: the tokenizer encodes {text!r} as {ids}, not one token")
        return ids[0]

    def _read_positions(self, ids: list[int]) -> list[int]:
        """Where in a tokenized input each step's reward is read, in step order."""
        raise NotImplementedError

    def _forward_steps(self, texts: Sequence[str]) -> list[StepRewards]:
        return self._rewards_read_at(texts, self._read_positions)

    def _read_at(self, hidden: torch.Tensor) -> list[float]:
        logits = hidden @ self.label_weight.to(hidden.device, hidden.dtype).T
        if self.label_bias is not None:
            logits = logits + self.label_bias.to(hidden.device, hidden.dtype)
        return torch.softmax(logits.float(), dim=-1)[:, 0].cpu().tolist()


def load_label_token_prm(cls: type[LabelTokenProcessRewardModel], name_or_path: str, *, preset, tokenizer, device,
                         dtype, max_length, max_batch_tokens, quantization, adapter, packing="auto",
                         attn_implementation=None) -> LabelTokenProcessRewardModel:
    """Load ``cls`` as the cards load their model: ``AutoModelForCausalLM`` (a missing weight is an error; the LM head
    kept out of quantization), the repository's own tokenizer (checked against the preset's golden ids, and against
    sentencepiece where the preset says so), an optional PEFT adapter."""
    from transformers import AutoModelForCausalLM

    from .weights import apply_adapter, from_pretrained_checked
    from ..tokenization import load_tokenizer

    tokenizer = load_tokenizer(preset, name_or_path, tokenizer)
    model = from_pretrained_checked(AutoModelForCausalLM, name_or_path, dtype=dtype, device=device,
                                    quantization=quantization, skip_modules=("lm_head",),
                                    attn_implementation=attn_implementation)
    model = apply_adapter(model, adapter, quantized=quantization is not None)
    limit = max_length or preset.max_length or getattr(model.config, "max_position_embeddings", None)
    return cls(model=model, packing=packing, preset=preset, tokenizer=tokenizer, device=device, max_length=limit,
               max_batch_tokens=max_batch_tokens)

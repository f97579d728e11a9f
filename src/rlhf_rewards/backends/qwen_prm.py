"""Qwen2.5-Math-PRM (Qwen/Qwen2.5-Math-PRM-7B and -72B), natively: a Qwen2 backbone and a two-label head, the
probability of label 1 read at every ``<extra_0>`` that ends a step.

Module names and config keys are those of the hub repository's remote code (``Qwen2ForProcessRewardModel``), so its
files load as they are, without ``trust_remote_code``. See docs/presets/qwen2.5-math-prm.md for the card's procedure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2Model, Qwen2PreTrainedModel

from ..conversation import Message
from ..rendering import template_kwargs
from .backbone_prm import BackboneProcessRewardModel
from .process_base import StepRewards


class Qwen2ProcessRewardNetwork(Qwen2PreTrainedModel):
    """The network of the hub's ``Qwen2ForProcessRewardModel``: ``model`` (Qwen2Model) and ``score`` =
    ``Sequential(Linear(H, H), ReLU, Linear(H, 2))`` (weights ``score.0.*`` and ``score.2.*``)."""

    config_class = Qwen2Config
    base_model_prefix = "model"

    def __init__(self, config: Qwen2Config):
        super().__init__(config)
        self.model = Qwen2Model(config)
        hidden = config.hidden_size
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        self.post_init()


class QwenProcessRewardModel(BackboneProcessRewardModel):
    """Qwen2.5-Math-PRM as a process reward model (see :class:`ProcessRewardModel` for the API).

    Attributes:
        step_tag: the marker after every step (``<extra_0>``), one token of id ``step_tag_id``.
        system_prompt: the card's system prompt, used when a prompt has no system message of its own.
    """

    def __init__(self, *, model: Qwen2ProcessRewardNetwork, **kwargs: Any):
        super().__init__(model=model, backbone=model.model, **kwargs)
        self.step_tag: str = self.preset.extra["step_tag"]
        self.system_prompt: str = self.preset.extra["system_prompt"]
        # the card's tokenizer.encode("<extra_0>")[0]; load_tokenizer checked it is one token
        self.step_tag_id: int = self.tokenizer.convert_tokens_to_ids(self.step_tag)

    def _render_steps(self, messages: list[Message], steps: list[str]) -> str:
        system = [] if messages[0]["role"] == "system" else [{"role": "system", "content": self.system_prompt}]
        answer = {"role": "assistant", "content": self.step_tag.join(steps) + self.step_tag}
        return self.tokenizer.apply_chat_template(system + messages + [answer], tokenize=False,
                                                  add_generation_prompt=False, **template_kwargs(self.tokenizer))

    def _forward_steps(self, texts: Sequence[str]) -> list[StepRewards]:
        return self._rewards_read_at(texts, lambda ids: [j for j, t in enumerate(ids) if t == self.step_tag_id])

    def _read_at(self, hidden: torch.Tensor) -> list[float]:
        head = self.model.score
        return torch.softmax(head(hidden.to(head[0].weight.dtype)).float(), dim=-1)[:, 1].cpu().tolist()


def load_qwen2_prm(name_or_path: str, *, preset, tokenizer, device, dtype, max_length, max_batch_tokens,
                   quantization, adapter, packing="auto", attn_implementation=None) -> QwenProcessRewardModel:
    """The ``"qwen2-prm"`` backend's loader: the repository's tokenizer (checked against the preset's golden ids),
    its config and weights in :class:`Qwen2ProcessRewardNetwork` (a missing weight is an error), an optional PEFT
    adapter. Batches are right-padded, or packed (``packing``) as the scalar models' are."""
    from .weights import apply_adapter, from_pretrained_checked
    from ..tokenization import load_tokenizer

    tokenizer = load_tokenizer(preset, name_or_path, tokenizer)
    model = from_pretrained_checked(Qwen2ProcessRewardNetwork, name_or_path, dtype=dtype, device=device,
                                    quantization=quantization, skip_modules=("score",),
                                    attn_implementation=attn_implementation)
    model = apply_adapter(model, adapter, quantized=quantization is not None)
    limit = max_length or preset.max_length or getattr(model.config, "max_position_embeddings", None)
    return QwenProcessRewardModel(model=model, preset=preset, tokenizer=tokenizer, device=device, max_length=limit,
                                  max_batch_tokens=max_batch_tokens, packing=packing)

"""INF-ORM-Llama3.1-70B's architecture, run without ``trust_remote_code``: a Llama backbone (attribute ``model``) and
a score head ``Linear(hidden, hidden) -> ReLU -> Linear(hidden, 1)`` (attribute ``score``), the parameter names of
the published checkpoint (``config.json`` architecture ``INFORMForSequenceClassification``). Scoring is the scalar
backend's: the backbone once per batch, the head only at the position the card reads (docs/presets/
inf-orm-llama3.1-70b.md)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel

from .scalar import ScalarRewardModel, _max_length


class INFORMRewardModel(LlamaPreTrainedModel):
    """Llama backbone + INF-ORM's two-layer score head; ``from_pretrained`` loads INF-ORM's files as they are
    (``model.*``, ``score.0.*``, ``score.2.*``)."""

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.score = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.ReLU(),
                                   nn.Linear(config.hidden_size, 1))
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The head's value at every position, shape ``(batch, length)``; the card reads one of them."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.score(hidden).squeeze(-1)


def load_inform(name_or_path: str, *, preset, tokenizer, device, dtype, max_length, max_batch_tokens, quantization,
                adapter, packing="auto", device_map=None, attn_implementation=None) -> ScalarRewardModel:
    """INF-ORM from its repository's files (``device_map``: a :class:`~rlhf_rewards.backends.placement.Split`)."""
    from ..tokenization import load_tokenizer
    from .weights import apply_adapter, from_pretrained_checked

    tokenizer = load_tokenizer(preset, name_or_path, tokenizer)
    model = from_pretrained_checked(INFORMRewardModel, name_or_path, dtype=dtype, device=device,
                                    quantization=quantization, skip_modules=("score",), split=device_map,
                                    attn_implementation=attn_implementation)
    model = apply_adapter(model, adapter, quantized=quantization is not None)
    return ScalarRewardModel(model=model, backbone=model.model, head=model.score,
                             config_pad_id=model.config.pad_token_id, preset=preset, tokenizer=tokenizer,
                             device=device, max_length=_max_length(max_length, preset.max_length, model.config),
                             max_batch_tokens=max_batch_tokens, packing=packing)

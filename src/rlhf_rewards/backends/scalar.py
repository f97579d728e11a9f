"""Scalar reward models: a transformer backbone and a linear head read at one position per sample.

Covers transformers' decoder ``*ForSequenceClassification`` models (backbone + ``score``) and the Starling value-head
models (``transformer`` + ``v_head``). The backbone runs once per batch and the head only at the positions the card
reads, so no per-position head output is computed for nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from ..batching import choose_packing, is_varlen, packed_inputs, packed_mask, pad_right, run_batched
from .scalar_base import ScalarModelBase

_Item = tuple[list[int], int, Optional[int]]
"""A tokenized sample: ``(ids, index, position_id)`` as :meth:`ScalarRewardModel._read_position` gives them."""


class ScalarRewardModel(ScalarModelBase):
    """A scalar reward model (``kind == "scalar"``); build it with :func:`rlhf_rewards.load_reward_model`.

    ``score`` returns the card's reward for each completion: the head's output at the position the preset's
    ``reward_position`` rule names, as a Python float.

    Attributes:
        packing: whether samples are packed into rows without padding (each with its own position ids and a
            block-diagonal mask, or flash-attention's variable-length kernels) rather than padded to a batch's longest.
        packing_reason: why ``packing`` is what it is (also in the repr).
    """

    def __init__(self, *, backbone: nn.Module, head: nn.Module, model: nn.Module, config_pad_id: Optional[int],
                 packing: "bool | str" = "auto", **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.backbone = backbone
        self.head = head
        self.config_pad_id = config_pad_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        card_pad = self.preset.card_pad_id
        if card_pad == "first-id-of-pad-token":
            # the card computes tokenizer(tokenizer.pad_token)["input_ids"][0]: BOS when the tokenizer adds one
            card_pad = self.tokenizer(self.tokenizer.pad_token)["input_ids"][0]
        self.card_pad_id = card_pad
        self.attn_implementation = getattr(getattr(backbone, "config", None), "_attn_implementation", None)
        self.packing, self.packing_reason = choose_packing(packing, self.attn_implementation,
                                                           self._packing_blocker())

    def _packing_blocker(self) -> Optional[str]:
        if self.preset.reward_position == "before-first-pad-id" and is_varlen(self.attn_implementation):
            # the card reads a pad position that attends to the real tokens but not to itself
            return "the card's appended pad must be hidden as a key, which variable-length kernels cannot express"
        return None

    def _read_position(self, ids: list[int]) -> tuple[int, Optional[int]]:
        """``(index, position_id)``: where the reward is read in the unpadded ``ids``. ``index == len(ids)`` means
        one pad token appended at position id ``position_id`` (the card reads a pad position of its padded input)."""
        rule = self.preset.reward_position
        if rule == "last":
            return len(ids) - 1, None
        if rule == "last-non-pad":
            # transformers' pooling: the rightmost token whose id is not the config's pad id
            if self.config_pad_id is not None:
                for j in range(len(ids) - 1, -1, -1):
                    if ids[j] != self.config_pad_id:
                        return j, None
            return len(ids) - 1, None
        if rule == "before-first-config-pad":
            # INF-ORM's pooling on its unpadded input: argmax(ids == pad) - 1, modulo the length
            first = next((j for j, t in enumerate(ids) if t == self.config_pad_id), 0)
            return (first - 1) % len(ids), None
        if rule == "before-first-pad-id":
            first = next((j for j, t in enumerate(ids) if t == self.card_pad_id), len(ids))
            if first > 0:
                return first - 1, None
            # the card's index -1 on an input padded to max_length: the last padded position
            if len(ids) == self.max_length:
                return len(ids) - 1, None
            return len(ids), self.max_length - 1
        raise ValueError(f"unknown reward_position {rule!r}")

    @torch.inference_mode()
    def _forward(self, batch: list[_Item]) -> list[float]:
        seqs = [ids + [self.pad_id] if pos_id is not None else ids for ids, _, pos_id in batch]
        input_ids, mask = pad_right(seqs, self.pad_id, self.device)
        position_ids = None
        if any(pos_id is not None for _, _, pos_id in batch):
            position_ids = torch.arange(input_ids.shape[1], device=self.device).repeat(len(batch), 1)
            for row, (ids, _, pos_id) in enumerate(batch):
                if pos_id is not None:
                    position_ids[row, len(ids)] = pos_id
                    mask[row, len(ids)] = 0  # the card's pad is masked as a key, yet its own output is read
        # right padding under causal attention: no real token attends to a pad, so the mask is only needed for
        # the card's appended pad (which must not attend to itself); without one the causal fast path runs
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask if position_ids is not None else None,
                               position_ids=position_ids, use_cache=False).last_hidden_state
        return self._read(hidden, list(range(len(batch))), [index for _, index, _ in batch], batch)

    @torch.inference_mode()
    def _forward_packed(self, rows: list[list[_Item]]) -> list[float]:
        """Rewards of packed rows, in row order: each sample at position ids 0, 1, ... (the card's appended pad at its
        own position id, hidden as a key), attending only within itself."""
        if is_varlen(self.attn_implementation):
            rows = [[item for row in rows for item in row]]  # variable-length kernels take one row
        seqs = [[ids + [self.pad_id] if pos_id is not None else ids for ids, _, pos_id in row] for row in rows]
        positions = [[list(range(len(ids))) + ([pos_id] if pos_id is not None else []) for ids, _, pos_id in row]
                     for row in rows]
        hidden_keys = [[len(ids) if pos_id is not None else -1 for ids, _, pos_id in row] for row in rows]
        config = self.backbone.config
        window = getattr(config, "sliding_window", None)
        input_ids, position_ids, mask, starts = packed_inputs(seqs, self.pad_id, self.device, positions=positions,
                                                              hidden_keys=hidden_keys, sliding_window=window)
        attention = None
        if not is_varlen(self.attn_implementation):
            attention = packed_mask(mask, self.attn_implementation, self.backbone.dtype)
            if window is not None and "full_attention" in (getattr(config, "layer_types", None) or ()):
                # sliding and full layers alternate (Gemma-2): one mask would window the full layers too
                full = packed_inputs(seqs, self.pad_id, self.device, positions=positions, hidden_keys=hidden_keys)[2]
                attention = {"full_attention": packed_mask(full, self.attn_implementation, self.backbone.dtype),
                             "sliding_attention": attention}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        items = [item for row in rows for item in row]
        return self._read(hidden, [r for r, _ in starts], [at + index for (_, at), (_, index, _) in zip(starts, items)],
                          items)

    def _read(self, hidden: torch.Tensor, rows: list[int], cols: list[int], items: list[_Item]) -> list[float]:
        """The head's output at ``hidden[rows[k], cols[k]]`` (the read position of ``items[k]``) for each ``k``, as
        floats."""
        picked = hidden[torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)]
        rewards = self.head(picked.to(self._head_dtype())).float().reshape(len(rows), -1)[:, 0]
        return rewards.cpu().tolist()

    def _head_dtype(self) -> torch.dtype:
        # a head of several layers (INF-ORM's) takes its first layer's dtype
        return next((p.dtype for p in self.head.parameters() if p.is_floating_point()), torch.float32)

    def _forward_texts(self, texts: Sequence[str]) -> list[float]:
        """Rewards of already-rendered texts, in input order (each text tokenized as the card does)."""
        items = []
        for ids in self.tokenize(texts):
            index, pos_id = self._read_position(ids)
            items.append((ids, index, pos_id))
        lengths = [len(ids) + (pos_id is not None) for ids, _, pos_id in items]
        forward = self._forward_packed if self.packing else self._forward
        rewards = run_batched(items, lengths, forward, max_batch_tokens=self.max_batch_tokens, stats=self.stats,
                              packed=self.packing)
        self.stats.samples += len(items)
        return rewards


class FullModelRewardModel(ScalarRewardModel):
    """Fallback for sequence-classification models without a separable decoder backbone and ``score`` head
    (e.g. encoders with a pooler): the whole model runs and its own pooling picks the position."""

    def _packing_blocker(self) -> Optional[str]:
        return "the model's own pooling reads one position per row"

    @torch.inference_mode()
    def _forward(self, batch: list[_Item]) -> list[float]:
        input_ids, mask = pad_right([ids for ids, _, _ in batch], self.pad_id, self.device)
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        return logits.float().reshape(len(batch), -1)[:, 0].cpu().tolist()


def _max_length(requested: Optional[int], preset_limit: Optional[int], config) -> Optional[int]:
    return requested or preset_limit or getattr(config, "max_position_embeddings", None)


def load_sequence_classifier(name_or_path: str, *, preset, tokenizer, device, dtype, max_length, max_batch_tokens,
                             quantization, adapter, packing="auto", device_map=None, attn_implementation=None
                             ) -> ScalarRewardModel:
    """A transformers ``AutoModelForSequenceClassification`` reward model with one label (loaded as Ray2333's model card does)."""
    from transformers import AutoModelForSequenceClassification

    from .weights import apply_adapter, from_pretrained_checked
    from ..tokenization import load_tokenizer

    tokenizer = load_tokenizer(preset, name_or_path, tokenizer)
    model = from_pretrained_checked(AutoModelForSequenceClassification, name_or_path, dtype=dtype, device=device,
                                    quantization=quantization, skip_modules=("score", "classifier"),
                                    split=device_map, attn_implementation=attn_implementation, num_labels=1)
    model = apply_adapter(model, adapter, quantized=quantization is not None)
    backbone = getattr(model, model.base_model_prefix, None)
    head = getattr(model, "score", None)
    # decoder classifiers (Llama, Mistral, Qwen, Gemma...) are backbone + `score`; anything else runs whole
    cls = ScalarRewardModel if isinstance(head, nn.Linear) and backbone is not None else FullModelRewardModel
    return cls(model=model, backbone=backbone, head=head, config_pad_id=model.config.pad_token_id, preset=preset,
               tokenizer=tokenizer, device=device, max_length=_max_length(max_length, preset.max_length, model.config),
               max_batch_tokens=max_batch_tokens, packing=packing)


def load_value_head(name_or_path: str, *, preset, tokenizer, device, dtype, max_length, max_batch_tokens,
                    quantization, adapter, packing="auto", device_map=None, attn_implementation=None
                    ) -> ScalarRewardModel:
    """A Starling value-head model: ``from_pretrained`` files (Starling-RM-34B), or a plain state dict over a
    Llama config (Starling-RM-7B-alpha, whose config comes from its base model when its repository has none)."""
    from transformers import AutoConfig

    from .weights import apply_adapter, from_pretrained_checked, quantization_config
    from ..tokenization import load_tokenizer
    from .value_head import ValueHeadRewardModel, find_state_dict_file, load_value_head_state_dict

    tokenizer = load_tokenizer(preset, name_or_path, tokenizer)
    state_file = find_state_dict_file(name_or_path)
    if state_file is None:
        model = from_pretrained_checked(ValueHeadRewardModel, name_or_path, dtype=dtype, device=device,
                                        quantization=quantization, skip_modules=("v_head",), split=device_map,
                                        attn_implementation=attn_implementation)
    else:
        if device_map is not None:
            raise ValueError(f"{name_or_path}: device_map needs safetensors/from_pretrained weights; this "
                             "checkpoint is a plain state dict (convert it with save_pretrained first)")
        if quantization_config(quantization, dtype, ()) is not None:
            raise ValueError(f"{name_or_path}: quantization needs safetensors/from_pretrained weights; this "
                             "checkpoint is a plain state dict (convert it with save_pretrained first)")
        config_source = name_or_path if os.path.isfile(os.path.join(name_or_path, "config.json")) \
            else (tokenizer.name_or_path or preset.tokenizer_source)
        config = AutoConfig.from_pretrained(config_source)
        if attn_implementation is not None:
            # the model's constructor checks it against the class, as from_pretrained does
            config._attn_implementation = attn_implementation
        model = ValueHeadRewardModel(config)
        load_value_head_state_dict(model, state_file)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model = apply_adapter(model, adapter, quantized=quantization is not None)
    return ScalarRewardModel(model=model, backbone=model.transformer, head=model.v_head, config_pad_id=None,
                             preset=preset, tokenizer=tokenizer, device=device,
                             max_length=_max_length(max_length, preset.max_length, model.config),
                             max_batch_tokens=max_batch_tokens, packing=packing)

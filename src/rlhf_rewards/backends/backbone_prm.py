"""Process reward models whose step rewards are read from a transformer backbone's last hidden state at given
positions (Qwen2.5-Math-PRM's score head at each ``<extra_0>``; the label-token PRMs' two LM-head rows): one forward
per sample gives every step's reward, in right-padded batches or packed rows under a block mask (the model's sliding
window kept), exactly as the scalar models batch. A family reads the picked hidden states with :meth:`_read_at`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import nn

from ..batching import choose_packing, is_varlen, packed_inputs, packed_mask, pad_right
from .process_base import MarkedInput, ProcessRewardModel, StepRewards, per_sample, picked


class BackboneProcessRewardModel(ProcessRewardModel):
    """A PRM run as ``backbone`` (a transformers decoder) plus a read-out at its step positions.

    Attributes:
        packing: whether samples are packed into rows under a block mask rather than right-padded;
            ``packing_reason`` says why (``"auto"`` packs only with variable-length attention kernels).
    """

    def __init__(self, *, model: nn.Module, backbone: nn.Module, packing: "bool | str" = "auto", **kwargs: Any):
        super().__init__(**kwargs)
        self.model = model
        self.backbone = backbone
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # a sliding-window model (Mistral-7B v0.1: 4096) keeps its window in packed rows too
        self.sliding_window = getattr(backbone.config, "sliding_window", None)
        self.attn_implementation = getattr(backbone.config, "_attn_implementation", None)
        self.packing, self.packing_reason = choose_packing(packing, self.attn_implementation)

    def _read_at(self, hidden: torch.Tensor) -> list[float]:
        """The step rewards of picked hidden states ``(n, hidden)``, in order."""
        raise NotImplementedError

    def _rewards_read_at(self, texts: Sequence[str], positions: Callable[[list[int]], list[int]]
                         ) -> list[StepRewards]:
        """:meth:`_forward_steps` for a family that reads each text's rewards at ``positions(ids)``."""
        return self._rewards_at(texts, positions, self._forward_packed if self.packing else self._forward,
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
        """Per item, its rewards at ``places[k] = (row, columns)`` of ``hidden``."""
        at = picked(hidden, places)
        if at is None:
            return [[] for _ in places]
        return per_sample(self._read_at(at), places)

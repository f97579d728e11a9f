"""RLHFlow's Llama-3.1-8B PRMs: causal LMs that answer each step of a solution, posed as a user turn, with an
assistant turn "+" or "-". A step's reward is ``softmax(logit("+"), logit("-"))[0]`` at the position that predicts the
assistant's answer (see docs/presets/rlhflow-prm.md for the card's procedure).

The card runs one growing conversation per step and reads position -3 of each. Every such conversation is, token for
token, a prefix of the whole one (each turn ends at the special token ``<|eot_id|>``, so no merge crosses a turn), and
causal attention makes a position's hidden state depend on the tokens before it only: one forward over the whole
conversation gives every step's reward, read two tokens before the ``<|eot_id|>`` that closes each assistant turn.
Only the LM-head rows of "+" and "-" are multiplied, at those positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from ..batching import choose_packing, is_varlen, packed_inputs, packed_mask, pad_right, run_batched
from ..conversation import Message
from ..errors import TooLongError
from ..rendering import template_kwargs
from .process_base import ProcessRewardModel, StepRewards

_Item = tuple[list[int], list[int]]
"""A tokenized input: ``(ids, read positions in step order)``."""


class StepLabelProcessRewardModel(ProcessRewardModel):
    """RLHFlow's PRM as a process reward model (see :class:`ProcessRewardModel` for the API).

    Attributes:
        label_ids: the card's candidate tokens ``(id of "+", id of "-")``; a step's reward is the softmax
            probability of the first.
        packing: whether conversations are packed into rows under a block mask (``packing=True``) rather than
            right-padded; ``packing_reason`` says why.
    """

    def __init__(self, *, model: nn.Module, packing: "bool | str" = "auto", **kwargs: Any):
        super().__init__(**kwargs)
        self.model = model
        self.backbone = model.get_decoder()
        self.label_ids = tuple(self._one_id(self.preset.extra[name]) for name in ("good_token", "bad_token"))
        head = model.get_output_embeddings()
        # the two rows of the LM head the card reads (Llama's head has no bias)
        self.label_weight = head.weight[list(self.label_ids)].detach()
        self.label_bias = head.bias[list(self.label_ids)].detach() if getattr(head, "bias", None) is not None \
            else None
        convert = self.tokenizer.convert_tokens_to_ids
        self._assistant_header = [convert("<|start_header_id|>"), self._one_id("assistant"),
                                  convert("<|end_header_id|>")]
        self._end_of_turn = convert("<|eot_id|>")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._end_of_turn
        self.attn_implementation = getattr(self.backbone.config, "_attn_implementation", None)
        self.packing, self.packing_reason = choose_packing(packing, self.attn_implementation)

    def _one_id(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{self.preset.name}: the tokenizer encodes {text!r} as {ids}, not one token")
        return ids[0]

    def _render_steps(self, messages: list[Message], steps: list[str]) -> str:
        *head, question = messages
        roles = [m["role"] for m in messages]
        if question["role"] != "user" or len(head) > 1 or (head and head[0]["role"] != "system"):
            raise ValueError(f"its steps answer one question: the prompt must be one user message, optionally after "
                             f"one system message; got the roles {roles} (earlier assistant turns would sit where "
                             "the model reads its '+'/'-' labels)")
        turns: list[Message] = list(head)
        for k, step in enumerate(steps):
            text = step.strip()  # the card strips every step, then prefixes the first with the question
            turns.append({"role": "user", "content": f"{question['content']} {text}" if k == 0 else text})
            turns.append({"role": "assistant", "content": self.preset.extra["good_token"]})
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=False,
                                                  **template_kwargs(self.tokenizer))

    def _read_positions(self, ids: list[int]) -> list[int]:
        """Per assistant turn, two tokens before the ``<|eot_id|>`` closing it: the card's ``-3`` of the conversation
        ending with that turn (the ``\\n\\n`` that predicts its "+")."""
        header, out, j = self._assistant_header, [], 0
        while j <= len(ids) - len(header):
            if ids[j:j + len(header)] != header:
                j += 1
                continue
            end = next((e for e in range(j + len(header), len(ids)) if ids[e] == self._end_of_turn), None)
            if end is None:
                break
            out.append(end - 2)
            j = end + 1
        return out

    def _forward_steps(self, texts: Sequence[str]) -> list[StepRewards]:
        results: list[Any] = [None] * len(texts)
        batch: list[_Item] = []
        places = []
        for k, ids in enumerate(self._token_ids(texts, self.preset.add_special_tokens)):
            if self.max_length is not None and len(ids) > self.max_length:
                # cutting would drop steps: the rewards would no longer be the steps'
                results[k] = TooLongError(k, f"{len(ids)} tokens, more than max_length={self.max_length}; a process "
                                             "reward model's input is never cut (its steps would lose their "
                                             "markers)", "completion")
                continue
            batch.append((ids, self._read_positions(ids)))
            places.append(k)
        if batch:
            forward = self._forward_packed if self.packing else self._forward
            outs = run_batched(batch, [len(ids) for ids, _ in batch], forward, stats=self.stats,
                               max_batch_tokens=self.max_batch_tokens, packed=self.packing)
            for k, out in zip(places, outs):
                results[k] = out
        self.stats.samples += len(texts)
        return results

    @torch.inference_mode()
    def _forward(self, batch: list[_Item]) -> list[list[float]]:
        input_ids, _ = pad_right([ids for ids, _ in batch], self.pad_id, self.device)
        # right padding under causal attention: no real token attends to a pad
        hidden = self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state
        return self._read(hidden, [(r, at) for r, (_, at) in enumerate(batch)], batch)

    @torch.inference_mode()
    def _forward_packed(self, rows: list[list[_Item]]) -> list[list[float]]:
        """Step rewards of packed rows, in row order: each conversation at position ids 0, 1, ..., attending only
        within itself."""
        if is_varlen(self.attn_implementation):
            rows = [[item for row in rows for item in row]]  # variable-length kernels take one row
        input_ids, position_ids, mask, starts = packed_inputs([[ids for ids, _ in row] for row in rows], self.pad_id,
                                                              self.device)
        attention = None if is_varlen(self.attn_implementation) else \
            packed_mask(mask, self.attn_implementation, self.backbone.dtype)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        items = [item for row in rows for item in row]
        return self._read(hidden, [(row, [at + p for p in item[1]]) for (row, at), item in zip(starts, items)],
                          items)

    def _read(self, hidden: torch.Tensor, places: list[tuple[int, list[int]]], items: list[_Item]
              ) -> list[list[float]]:
        """Per item, ``P("+")`` at its read positions ``places[k] = (row, columns)`` of ``hidden``."""
        rows = [r for r, cols in places for _ in cols]
        cols = [c for _, cols in places for c in cols]
        if not cols:
            return [[] for _ in items]
        picked = hidden[torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)]
        logits = picked @ self.label_weight.to(picked.dtype).T
        if self.label_bias is not None:
            logits = logits + self.label_bias.to(picked.dtype)
        probs = torch.softmax(logits.float(), dim=-1)[:, 0].cpu().tolist()
        out, start = [], 0
        for _, cols in places:
            out.append(probs[start:start + len(cols)])
            start += len(cols)
        return out


def load_step_label_prm(name_or_path: str, *, preset, tokenizer, device, dtype, max_length, max_batch_tokens,
                        quantization, adapter, packing="auto") -> StepLabelProcessRewardModel:
    """The ``"llama-step-label-prm"`` backend's loader, as the card loads: ``AutoModelForCausalLM`` (bf16 on GPU),
    the repository's own tokenizer (checked against the preset's golden ids), an optional PEFT adapter."""
    from transformers import AutoModelForCausalLM

    from .weights import apply_adapter, from_pretrained_checked
    from ..tokenization import load_tokenizer

    tokenizer = load_tokenizer(preset, name_or_path, tokenizer)
    model = from_pretrained_checked(AutoModelForCausalLM, name_or_path, dtype=dtype, device=device,
                                    quantization=quantization, skip_modules=("lm_head",))
    model = apply_adapter(model, adapter, quantized=quantization is not None)
    limit: Optional[int] = max_length or preset.max_length or getattr(model.config, "max_position_embeddings", None)
    return StepLabelProcessRewardModel(model=model, packing=packing, preset=preset, tokenizer=tokenizer,
                                       device=device, max_length=limit, max_batch_tokens=max_batch_tokens)

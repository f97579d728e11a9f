"""Math-Shepherd's process reward model (peiyi9979/math-shepherd-mistral-7b-prm): a Mistral causal LM that, at the
tag ``ки`` ending every step, gives the probability of "+" against "-".

The card runs the whole LM and takes ``logits[:, :, [id("+"), id("-")]].softmax(-1)[:, :, 0]`` at the tag
positions. Here the backbone's last hidden state is read at the tag positions only and multiplied by the two LM-head
rows of "+" and "-": the same two logits, without the vocabulary-sized output at every position.
See docs/presets/math-shepherd.md for the card's procedure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..conversation import Message, is_step_list
from .process_base import MarkedInput, ProcessRewardModel, StepRewards, hidden_at_markers, per_sample


class MathShepherdRewardModel(ProcessRewardModel):
    """Math-Shepherd as a process reward model (see :class:`ProcessRewardModel` for the API).

    Attributes:
        step_tag: the tag written after every step (``"ки"``, plain vocabulary text), read as token
            ``step_tag_id`` (the piece ``"▁ки"``, 12902 in Mistral's vocabulary).
        candidate_ids: the ids of the card's good and bad tokens (``"+"``, ``"-"``: 648, 387); a step's reward is
            the softmax probability of the first against the second at the step's tag.
    """

    def __init__(self, *, model: nn.Module, **kwargs: Any):
        super().__init__(**kwargs)
        self.model = model
        extra = self.preset.extra
        self.step_tag: str = extra["step_tag"]
        # the card's tokenizer.encode("ки")[-1] and tokenizer.encode("+ -")[1:] (its [0] is the BOS)
        self.step_tag_id: int = self._one_token(self.step_tag)
        self.candidate_ids: tuple[int, int] = (self._one_token(extra["good_token"]),
                                               self._one_token(extra["bad_token"]))
        together = self.tokenizer.encode(f"{extra['good_token']} {extra['bad_token']}", add_special_tokens=False)
        if tuple(together) != self.candidate_ids:
            raise ValueError(f"the tokenizer encodes {extra['good_token']} {extra['bad_token']!r} as {together}, "
                             f"not the good and bad tokens {list(self.candidate_ids)} the card reads")
        self.backbone = model.get_decoder()
        head = model.get_output_embeddings()
        # the two rows of the LM head the card reads; Mistral's head has no bias
        self.head_rows = head.weight[list(self.candidate_ids)].detach()
        self.head_bias = head.bias[list(self.candidate_ids)].detach() if getattr(head, "bias", None) is not None \
            else None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _one_token(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer encodes {text!r} as {ids}, not one token as {self.preset.name}'s card "
                             "reads it")
        return ids[0]

    def _tag_refusal(self, text: str, where: str) -> None:
        """Raise ``ValueError`` when ``text`` holds the step tag: the model would read one more step there and every
        later reward would belong to another step (a policy could forge step boundaries). Refused on the characters
        whatever the tokenization around them (see docs/presets/math-shepherd.md)."""
        if self.step_tag in text:
            raise ValueError(f"{where} contains {self.step_tag!r}, {self.preset.name}'s step tag (plain text to its "
                             "tokenizer, so it would mark a step of its own there and shift the rewards of the "
                             f"steps after it); remove or replace {self.step_tag!r} to score this sample")

    def _steps(self, completion: object, fmt: str, where: str) -> tuple[str, ...]:
        steps = super()._steps(completion, fmt, where)
        listed = is_step_list(completion)
        for j, step in enumerate(steps):
            self._tag_refusal(step, f"{where}[{j}]" if listed else
                              f"{where} (its step {j + 1}, split at {self.step_separator!r})")
        return steps

    def _render_steps(self, messages: list[Message], steps: list[str]) -> str:
        if len(messages) != 1 or messages[0]["role"] != "user":
            roles = ", ".join(m["role"] for m in messages)
            raise ValueError(f"it reads one question (a single user turn), and this prompt holds {len(messages)} "
                             f"messages ({roles}); pass the question alone")
        question = messages[0]["content"]
        self._tag_refusal(question, "the question")
        # samples built by callers other than prepare (e.g. Bradley-Terry comparisons) reach here unchecked
        for j, step in enumerate(steps):
            self._tag_refusal(step, f"step {j + 1}")
        return f"{question} " + "\n".join(f"{step} {self.step_tag}" for step in steps)

    def _forward_steps(self, texts: Sequence[str]) -> list[StepRewards]:
        return self._rewards_at_markers(texts, self.step_tag_id, self._forward)

    @torch.inference_mode()
    def _forward(self, batch: list[MarkedInput]) -> list[list[float]]:
        picked = hidden_at_markers(self.backbone, batch, self.pad_id, self.device)
        if picked is None:
            return [[] for _ in batch]
        weight = self.head_rows.to(picked.device)
        logits = picked.to(weight.dtype) @ weight.T
        if self.head_bias is not None:
            logits = logits + self.head_bias.to(logits.device)
        return per_sample(torch.softmax(logits.float(), dim=-1)[:, 0].cpu().tolist(), batch)


def load_math_shepherd(name_or_path: str, *, preset, tokenizer, device, dtype, max_length, max_batch_tokens,
                       quantization, adapter, packing="auto") -> MathShepherdRewardModel:
    """The ``"math-shepherd"`` backend's loader: the repository's tokenizer (checked against the preset's golden ids
    and sentencepiece, rebuilt from ``tokenizer.model`` if transformers loads it differently), its weights in
    ``AutoModelForCausalLM`` (a missing weight is an error; the LM head kept out of quantization), an optional PEFT
    adapter. Batches are right-padded: ``packing=True`` is refused."""
    from transformers import AutoModelForCausalLM

    from .weights import apply_adapter, from_pretrained_checked
    from ..tokenization import load_tokenizer

    if packing is True:
        raise ValueError("packing=True is not possible: the math-shepherd backend reads step positions from padded "
                         "batches")
    tokenizer = load_tokenizer(preset, name_or_path, tokenizer)
    model = from_pretrained_checked(AutoModelForCausalLM, name_or_path, dtype=dtype, device=device,
                                    quantization=quantization, skip_modules=("lm_head",))
    model = apply_adapter(model, adapter, quantized=quantization is not None)
    limit = max_length or preset.max_length or getattr(model.config, "max_position_embeddings", None)
    return MathShepherdRewardModel(model=model, preset=preset, tokenizer=tokenizer, device=device, max_length=limit,
                                   max_batch_tokens=max_batch_tokens)

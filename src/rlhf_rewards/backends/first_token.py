"""Reward models whose card reads the score ``generate`` gives one token id at the first generated position
(NVIDIA's Nemotron reward models: ``generate(max_new_tokens=1, return_dict_in_generate=True, output_scores=True)``,
reward ``scores[0][0][0]``), computed from one forward pass instead of ``generate``.

``scores`` are the logits after ``generate``'s logits processors, which the repository's ``generation_config.json``
switches on (:class:`FirstTokenScoring` reproduces the ones that can touch the token; see
docs/presets/nemotron-reward.md). The backbone runs once per batch and only each sample's last position is read;
when every active processor is elementwise only the token's own row of the output head is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .scalar import ScalarRewardModel, _Item, _max_length

# transformers' global defaults, which generate() gives every field the model's generation config leaves unset
_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0,
             "repetition_penalty": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "num_beams": 1}

# Settings that make generate() process the first step in ways not reproduced here, with the value that means "off".
_REFUSED = {"num_beams": 1, "guidance_scale": 1.0, "sequence_bias": None, "no_repeat_ngram_size": 0,
            "bad_words_ids": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
            "remove_invalid_values": False, "exponential_decay_length_penalty": None, "suppress_tokens": None,
            "begin_suppress_tokens": None, "watermarking_config": None, "penalty_alpha": None,
            "prompt_lookup_num_tokens": None}


def _off(value: Any, off: Any) -> bool:
    return value is None or value == off or (off is None and value in (0, False, [], {}))


@dataclass(frozen=True)
class FirstTokenScoring:
    """What ``generate(..., max_new_tokens=1, output_scores=True)`` does to the score of ``token_id`` at the first
    generated position, read from a model's generation config (its unset fields take transformers' defaults).

    Attributes:
        token_id: the id whose processed score is the reward (0 for the Nemotron cards).
        repetition_penalty: divides a positive score (multiplies a negative one) of an id present in the input.
        sampling: ``do_sample``: only then do the warpers below run.
        temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff, top_h: the warpers, in
            ``generate``'s order (temperature first).
        renormalize: a final log-softmax (``renormalize_logits``).
    """

    token_id: int
    repetition_penalty: float = 1.0
    sampling: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: Optional[float] = None
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    top_h: Optional[float] = None
    renormalize: bool = False

    @classmethod
    def from_generation_config(cls, config: Any, token_id: int, where: str) -> "FirstTokenScoring":
        """Read ``config`` (a transformers ``GenerationConfig``); raise ``ValueError`` naming the first setting whose
        effect on ``generate``'s scores is not reproduced (``where`` names the checkpoint)."""
        def get(name: str) -> Any:
            value = getattr(config, name, None)
            return _DEFAULTS.get(name) if value is None else value

        for name, off in _REFUSED.items():
            if not _off(getattr(config, name, None), off):
                raise ValueError(f"{where}: its generation config sets {name}={getattr(config, name)!r}; the card's "
                                 "generate() would process the reward's score in a way this package does not "
                                 "reproduce (remove the setting from generation_config.json to score without it)")
        eos = getattr(config, "eos_token_id", None)
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        for name in ("min_length", "min_new_tokens"):
            if token_id in eos and (getattr(config, name, None) or 0) > 0:
                raise ValueError(f"{where}: {name} is set and token id {token_id} is an end-of-sequence id; the card's "
                                 "generate() would set its score to -inf before that length")
        sampling = bool(get("do_sample"))
        if sampling and not float(get("temperature")) > 0:
            raise ValueError(f"{where}: its generation config samples with temperature={get('temperature')!r}; "
                             "generate() refuses that (a temperature must be positive)")
        return cls(token_id=token_id, repetition_penalty=float(get("repetition_penalty")), sampling=sampling,
                   temperature=float(get("temperature")), top_k=int(get("top_k") or 0), top_p=float(get("top_p")),
                   min_p=getattr(config, "min_p", None), typical_p=float(get("typical_p")),
                   epsilon_cutoff=float(get("epsilon_cutoff")), eta_cutoff=float(get("eta_cutoff")),
                   top_h=getattr(config, "top_h", None), renormalize=bool(getattr(config, "renormalize_logits", False)))

    @property
    def cutting(self) -> bool:
        """Whether a processor needs the whole vocabulary row (it cuts or normalises by the other tokens' scores)."""
        warps = self.sampling and (self.top_k != 0 or self.top_p < 1.0 or self.min_p is not None
                                   or self.typical_p < 1.0 or 0.0 < self.epsilon_cutoff < 1.0
                                   or 0.0 < self.eta_cutoff < 1.0 or self.top_h is not None)
        return warps or self.renormalize

    def describe(self) -> str:
        """The processors that run, in order (for ``rm.generation_settings``)."""
        steps = [f"repetition_penalty={self.repetition_penalty}"] if self.repetition_penalty != 1.0 else []
        if self.sampling:
            steps += [f"{name}={value}" for name, value, on in (
                ("temperature", self.temperature, self.temperature != 1.0),
                ("top_h", self.top_h, self.top_h is not None),
                ("top_k", self.top_k, self.top_k != 0), ("top_p", self.top_p, self.top_p < 1.0),
                ("min_p", self.min_p, self.min_p is not None), ("typical_p", self.typical_p, self.typical_p < 1.0),
                ("epsilon_cutoff", self.epsilon_cutoff, 0.0 < self.epsilon_cutoff < 1.0),
                ("eta_cutoff", self.eta_cutoff, 0.0 < self.eta_cutoff < 1.0)) if on]
        if self.renormalize:
            steps.append("renormalize_logits")
        return ", ".join(steps) or "none (scores are the raw logits)"

    def on_value(self, score: torch.Tensor, in_input: torch.Tensor) -> torch.Tensor:
        """The processed score from the raw float32 scores of ``token_id`` (shape ``(n,)``) when no processor needs
        the whole row: the repetition penalty where the token occurs in the sample's input, then the temperature."""
        if self.repetition_penalty != 1.0:
            penalised = torch.where(score < 0, score * self.repetition_penalty, score / self.repetition_penalty)
            score = torch.where(in_input, penalised, score)
        if self.sampling and self.temperature != 1.0:
            score = score / self.temperature
        return score

    def processors(self, device: torch.device):
        """transformers' own processors, built and ordered as ``generate`` builds them, for the whole-row case."""
        from transformers import (EpsilonLogitsWarper, EtaLogitsWarper, LogitNormalization, LogitsProcessorList,
                                  MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                  TopHLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper)

        steps = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            steps.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.sampling:
            if self.temperature != 1.0:
                steps.append(TemperatureLogitsWarper(self.temperature))
            if self.top_h is not None:
                steps.append(TopHLogitsWarper(top_h=self.top_h))
            if self.top_k != 0:
                steps.append(TopKLogitsWarper(top_k=self.top_k, min_tokens_to_keep=1))
            if self.top_p < 1.0:
                steps.append(TopPLogitsWarper(top_p=self.top_p, min_tokens_to_keep=1))
            if self.min_p is not None:
                steps.append(MinPLogitsWarper(min_p=self.min_p, min_tokens_to_keep=1))
            if self.typical_p < 1.0:
                steps.append(TypicalLogitsWarper(mass=self.typical_p, min_tokens_to_keep=1))
            if 0.0 < self.epsilon_cutoff < 1.0:
                steps.append(EpsilonLogitsWarper(epsilon=self.epsilon_cutoff, min_tokens_to_keep=1))
            if 0.0 < self.eta_cutoff < 1.0:
                steps.append(EtaLogitsWarper(epsilon=self.eta_cutoff, min_tokens_to_keep=1, device=device))
        if self.renormalize:
            steps.append(LogitNormalization())
        return steps


class FirstTokenRewardModel(ScalarRewardModel):
    """A causal LM whose reward is ``generate``'s processed first-step score of one token id (``kind == "scalar"``).

    Attributes:
        scoring: the :class:`FirstTokenScoring` read from the checkpoint's generation config.
        generation_settings: the processors that run on the score, in order, as text.
    """

    def __init__(self, *, scoring: FirstTokenScoring, **kwargs):
        super().__init__(**kwargs)
        self.scoring = scoring
        self.generation_settings = scoring.describe()

    def _read(self, hidden: torch.Tensor, rows: list[int], cols: list[int], items: list[_Item]) -> list[float]:
        at = hidden.device
        picked = hidden[torch.tensor(rows, device=at), torch.tensor(cols, device=at)]
        token = self.scoring.token_id
        weight = self.head.weight
        if self.scoring.cutting or weight.device.type == "meta":
            # the whole last-position row: a processor reads the other tokens' scores (or the head is offloaded,
            # and only a call through it loads its weights)
            rows_out = self.head(picked).float()
            out = []
            steps = self.scoring.processors(rows_out.device)
            for k, (ids, _, _) in enumerate(items):
                # one sample at a time, its own unpadded ids, as the card's generate() sees it
                input_ids = torch.tensor([ids], device=rows_out.device)
                out.append(steps(input_ids, rows_out[k:k + 1])[0, token] if steps else rows_out[k, token])
            scores = torch.stack(out) if out else rows_out[:, token]
        else:
            bias = self.head.bias[token:token + 1] if self.head.bias is not None else None
            raw = nn.functional.linear(picked.to(weight.device, weight.dtype), weight[token:token + 1], bias)
            in_input = torch.tensor([token in ids for ids, _, _ in items], device=raw.device)
            scores = self.scoring.on_value(raw.float()[:, 0], in_input)
        return scores.cpu().tolist()


def load_first_token_model(name_or_path: str, *, preset, tokenizer, device, dtype, max_length, max_batch_tokens,
                           quantization, adapter, packing="auto", device_map=None, attn_implementation=None
                           ) -> FirstTokenRewardModel:
    """A causal LM scored as its card's ``generate(max_new_tokens=1, output_scores=True)`` reads ``scores[0][0][
    token_id]`` (``preset.extra["token_id"]``, default 0), its generation config as loaded with the model."""
    from transformers import AutoModelForCausalLM

    from ..tokenization import load_tokenizer
    from .weights import apply_adapter, from_pretrained_checked

    tokenizer = load_tokenizer(preset, name_or_path, tokenizer)
    model = from_pretrained_checked(AutoModelForCausalLM, name_or_path, dtype=dtype, device=device,
                                    quantization=quantization, skip_modules=("lm_head",), split=device_map,
                                    attn_implementation=attn_implementation)
    model = apply_adapter(model, adapter, quantized=quantization is not None)
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(f"{name_or_path}: preset {preset.name!r} reads a plain linear output head; this model's "
                         f"({type(model).__name__}) transforms its logits further")
    token_id = preset.extra.get("token_id", 0)
    scoring = FirstTokenScoring.from_generation_config(model.generation_config, token_id, name_or_path)
    return FirstTokenRewardModel(scoring=scoring, model=model, backbone=model.get_decoder(), head=head,
                                 config_pad_id=None, preset=preset, tokenizer=tokenizer, device=device,
                                 max_length=_max_length(max_length, preset.max_length, model.config),
                                 max_batch_tokens=max_batch_tokens, packing=packing)

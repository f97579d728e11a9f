"""ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1), natively: a Llama backbone, objective rewards read at the end of the
input, a gating network read at the end of the prompt, combined into the card's preference score.

The module names and config keys are those of the hub repository's remote code (``LlamaForRewardModelWithGating``),
so its files load as they are, without ``trust_remote_code``. See docs/presets/armorm-llama3-8b.md for the card's
procedure step by step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers import initialization as init

from ..batching import pad_right, run_batched
from ..conversation import CompletionInput, PromptInput
from ..errors import NonFiniteRewardError, SampleError, nonfinite, raise_first
from .base import _located
from .scalar_base import ScalarModelBase

# The remote code's defaults for config keys a checkpoint may leave out.
DEFAULT_NUM_OBJECTIVES = 19
DEFAULT_GATING_TEMPERATURE = 10.0
DEFAULT_GATING_HIDDEN_DIM = 1024
DEFAULT_GATING_N_HIDDEN = 3


class ArmoRMGating(nn.Module):
    """The gate: ``n_hidden`` x (Linear + ReLU) of width ``hidden_dim``, a last Linear to one logit per objective,
    ``softmax(logits / temperature)`` times the learned scalar ``logit_scale`` (parameter names as the checkpoint's
    ``gating.layers.{k}`` and ``gating.logit_scale``)."""

    def __init__(self, in_features: int, objectives: int, *, temperature: float, hidden_dim: int, n_hidden: int):
        super().__init__()
        self.temperature = temperature
        self.logit_scale = nn.Parameter(torch.ones(1))
        widths = [in_features] + [hidden_dim] * n_hidden
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(widths, widths[1:])] +
                                    [nn.Linear(widths[-1], objectives)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per row of ``x`` (batch, hidden) the objectives' weights (batch, objectives); each row sums to
        ``logit_scale``."""
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        weights = torch.softmax(self.layers[-1](x) / self.temperature, dim=1)
        return weights * self.logit_scale[0]


class ArmoRMModel(LlamaPreTrainedModel):
    """The network of the hub's ``LlamaForRewardModelWithGating``: ``model`` (LlamaModel), ``regression_layer``
    (Linear(hidden, objectives), no bias), ``reward_transform_matrix`` (objectives x objectives, from the checkpoint)
    and ``gating`` (:class:`ArmoRMGating`), configured by the config keys ``num_objectives``, ``gating_temperature``,
    ``gating_hidden_dim`` and ``gating_n_hidden`` (the remote code's defaults when absent)."""

    config_class = LlamaConfig
    base_model_prefix = "model"

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        settings = config.to_dict()
        self.num_objectives = int(settings.get("num_objectives", DEFAULT_NUM_OBJECTIVES))
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, self.num_objectives, bias=False)
        self.reward_transform_matrix = nn.Parameter(torch.eye(self.num_objectives), requires_grad=False)
        self.gating = ArmoRMGating(
            config.hidden_size, self.num_objectives,
            temperature=float(settings.get("gating_temperature", DEFAULT_GATING_TEMPERATURE)),
            hidden_dim=int(settings.get("gating_hidden_dim", DEFAULT_GATING_HIDDEN_DIM)),
            n_hidden=int(settings.get("gating_n_hidden", DEFAULT_GATING_N_HIDDEN)))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # the remote code's starting values, for a fresh model; transformers' init functions leave values loaded
        # from a checkpoint alone
        if module is self:
            init.eye_(self.reward_transform_matrix)
        elif isinstance(module, ArmoRMGating):
            init.ones_(module.logit_scale)

    def heads(self, hidden: torch.Tensor, reward_at: torch.Tensor, gate_at: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(score, rewards)`` of each row of ``hidden`` (batch, length, hidden): the objective rewards at column
        ``reward_at[row]``, the gate at column ``gate_at[row]``, ``score = sum(gate * (rewards @ transform))``."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        rewards = self.regression_layer(hidden[rows, reward_at])
        gate = self.gating(hidden[rows, gate_at])
        score = torch.sum(gate * (rewards @ self.reward_transform_matrix), dim=1)
        return score, rewards


class ArmoRMOutput(NamedTuple):
    """What ArmoRM gives for one input: the card's ``score`` and its objective ``rewards`` (card order)."""

    score: float
    rewards: tuple[float, ...]


_Item = tuple[list[int], int, int]
"""A tokenized input: ``(ids, reward position, gate position)``."""


def check_objective_weights(weights: Mapping[str, float], names: Sequence[str], model: str) -> tuple[float, ...]:
    """``weights`` (objective name -> weight) as one weight per objective of ``names`` (0 for those not named).
    Raises ``ValueError`` for anything but a non-empty mapping of known names to finite numbers, not all zero."""
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"objectives must be a non-empty mapping of objective name to weight, got {weights!r}; "
                         f"{model}'s objectives: {', '.join(names)}")
    unknown = [k for k in weights if k not in names]
    if unknown:
        raise ValueError(f"unknown objective {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1
                         else "") + f"; {model}'s objectives: {', '.join(names)}")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"objectives[{name!r}] must be a finite number, got {w!r}")
    if not any(weights.values()):
        raise ValueError("objectives: every weight is 0, which would give every sample the reward 0")
    return tuple(float(weights.get(name, 0.0)) for name in names)


class ArmoRMRewardModel(ScalarModelBase):
    """ArmoRM as a scalar reward model: ``score`` is the card's gated preference score.

    Attributes:
        objective_names: the objectives' names in the card's order.
        objective_weights: ``None`` (the reward is the card's ``score``), or one weight per objective (the reward is
            the weighted sum of the objective rewards): set by :meth:`with_objectives`.
        gating_pattern: the token ids whose last occurrence starts the gate's input (the card's
            ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n``).
    """

    objective_weights: Optional[tuple[float, ...]] = None

    def __init__(self, *, model: ArmoRMModel, objective_names: Sequence[str], config_pad_id: Optional[int],
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.model = model
        self.attn_implementation = getattr(model.config, "_attn_implementation", None)
        self.objective_names = tuple(objective_names)
        self.config_pad_id = config_pad_id
        self.gating_pattern: tuple[int, ...] = tuple(self.preset.extra["gating_pattern"])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def __repr__(self) -> str:
        chosen = "" if self.objective_weights is None else ", objectives=" + repr(
            {n: w for n, w in zip(self.objective_names, self.objective_weights) if w})
        return super().__repr__()[:-1] + chosen + ")"

    # -- objectives -------------------------------------------------------------------------------------------------
    def with_objectives(self, weights: Mapping[str, float]) -> ArmoRMRewardModel:
        """A copy of the model whose reward is ``sum(weights[name] * objective reward)`` over the named objectives
        (see :attr:`objective_names`) instead of the gated score; with baselines, the difference of the two sums.
        It shares the weights, tokenizer, lock and ``stats`` with this model. Raises ``ValueError`` for an unknown
        name (listing the known ones), a weight that is not a finite number, or weights that are all 0."""
        chosen = check_objective_weights(weights, self.objective_names, self.preset.name)
        view = copy.copy(self)
        view.lock, view.stats = self.lock, self.stats  # one model: calls through either take turns and count once
        view.objective_weights = chosen
        return view

    def score_objectives(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput]
                         ) -> list[list[float]]:
        """Per completion its objective rewards (the card's ``rewards``), one float per name of
        :attr:`objective_names`, in that order. Raises ``ValueError`` naming the first sample that cannot be scored
        (see :meth:`score_objectives_samples`)."""
        return raise_first(self.score_objectives_samples(prompts, completions))

    def score_objectives_samples(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput]
                                 ) -> list[Union[list[float], SampleError]]:
        """:meth:`score_objectives` with each sample's error in its place instead of raising (bad input, a
        conversation without the assistant header the gate reads, a NaN or infinite objective)."""
        with self.session("score_objectives"):
            prepared = self.prepare(prompts, completions)
            errors, texts = self._render_samples(prepared)
            done = list(texts)
            outputs = self.forward([texts[i][0] for i in done]) if done else []
            results: list[Union[list[float], SampleError, None]] = list(errors)
            for i, out in zip(done, outputs):
                if isinstance(out, SampleError):
                    results[i] = SampleError(i, str(out), out.about)
                    continue
                bad = next((nonfinite(r) for r in out.rewards if nonfinite(r)), None)
                self.stats.nonfinite += bad is not None
                results[i] = (NonFiniteRewardError(i, f"{self.preset.name} returned {bad} for an objective")
                              if bad else list(out.rewards))
            return _located(prepared, results, lambda i, r: f"{r.about}s[{i}]")

    def _reward_of(self, output: Union[ArmoRMOutput, SampleError]) -> Union[float, SampleError]:
        if isinstance(output, SampleError) or self.objective_weights is None:
            return output if isinstance(output, SampleError) else output.score
        return math.fsum(w * r for w, r in zip(self.objective_weights, output.rewards) if w)

    # -- positions and the forward pass ------------------------------------------------------------------------------
    def reward_position(self, ids: Sequence[int]) -> int:
        """Where the card reads the objective rewards: one before the first ``config.pad_token_id`` in ``ids``,
        modulo the length (the last token when there is none), as the remote code's ``argmax - 1``."""
        first = ids.index(self.config_pad_id) if self.config_pad_id in ids else 0
        return (first - 1) % len(ids)

    def gate_position(self, ids: Sequence[int]) -> Optional[int]:
        """Where the card reads the gate: the start of the last occurrence of :attr:`gating_pattern` in ``ids``;
        ``None`` when it does not occur."""
        pattern, n = list(self.gating_pattern), len(self.gating_pattern)
        return next((j for j in range(len(ids) - n, -1, -1) if ids[j:j + n] == pattern), None)

    def _missing_pattern(self, index: int) -> SampleError:
        text = self.tokenizer.decode(list(self.gating_pattern))
        return SampleError(index, f"the model input holds no {text!r} (token ids "
                                  f"{', '.join(map(str, self.gating_pattern))}), where {self.preset.name}'s gate reads "
                                  "the prompt: the chat template must close the turn before the response with "
                                  "Llama-3's assistant header (or truncation to max_length cut it)")

    def _forward_items(self, items: list[Any]) -> list[Union[ArmoRMOutput, SampleError]]:
        """Per rendered text its :class:`ArmoRMOutput`, or the :class:`SampleError` of an input without the gate's
        pattern (index: the text's place in ``items``)."""
        results: list[Union[ArmoRMOutput, SampleError, None]] = [None] * len(items)
        batch: list[_Item] = []
        places = []
        for k, ids in enumerate(self.tokenize(items)):
            gate = self.gate_position(ids)
            if gate is None:
                results[k] = self._missing_pattern(k)
                continue
            batch.append((ids, self.reward_position(ids), gate))
            places.append(k)
        if batch:
            outs = run_batched(batch, [len(ids) for ids, _, _ in batch], self._forward, stats=self.stats,
                               max_batch_tokens=self.max_batch_tokens)
            for k, out in zip(places, outs):
                results[k] = out
        self.stats.samples += len(items)
        return results  # type: ignore[return-value]

    def _forward_texts(self, texts: Sequence[str]) -> list[float]:
        return raise_first([self._reward_of(out) for out in self._forward_items(list(texts))])

    @torch.inference_mode()
    def _forward(self, batch: list[_Item]) -> list[ArmoRMOutput]:
        input_ids, _ = pad_right([ids for ids, _, _ in batch], self.pad_id, self.device)
        # right padding under causal attention: no real token attends to a pad, so no mask is needed and each row's
        # hidden states are those of its sample alone
        hidden = self.model.model(input_ids=input_ids, use_cache=False).last_hidden_state
        at = [torch.tensor(col, device=hidden.device) for col in zip(*[(r, g) for _, r, g in batch])]
        score, rewards = self.model.heads(hidden, at[0], at[1])
        return [ArmoRMOutput(s, tuple(r)) for s, r in zip(score.float().cpu().tolist(),
                                                         rewards.float().cpu().tolist())]


def load_armorm(name_or_path: str, *, preset, tokenizer, device, dtype, max_length, max_batch_tokens, quantization,
                adapter, packing="auto", attn_implementation=None) -> ArmoRMRewardModel:
    """The ``"armorm"`` backend's loader: the repository's Llama-3 tokenizer (checked against the preset's golden
    ids), its config and weights in :class:`ArmoRMModel` (a missing weight is an error), an optional PEFT adapter.
    ArmoRM reads two positions per sample from right-padded batches: ``packing=True`` is refused."""
    from .weights import apply_adapter, from_pretrained_checked
    from ..tokenization import load_tokenizer

    if packing is True:
        raise ValueError("packing=True is not possible: the armorm backend reads two positions per sample from "
                         "padded batches")
    tokenizer = load_tokenizer(preset, name_or_path, tokenizer)
    model = from_pretrained_checked(ArmoRMModel, name_or_path, dtype=dtype, device=device, quantization=quantization,
                                    skip_modules=("regression_layer", "gating"),
                                    attn_implementation=attn_implementation)
    model = apply_adapter(model, adapter, quantized=quantization is not None)
    names = tuple(preset.extra["objective_names"])
    if model.num_objectives != len(names):
        raise ValueError(f"{name_or_path}: config.json has num_objectives={model.num_objectives}; preset "
                         f"{preset.name!r} names {len(names)} objectives")
    limit = max_length or preset.max_length or getattr(model.config, "max_position_embeddings", None)
    return ArmoRMRewardModel(model=model, objective_names=names, config_pad_id=model.config.pad_token_id,
                             preset=preset, tokenizer=tokenizer, device=device, max_length=limit,
                             max_batch_tokens=max_batch_tokens)

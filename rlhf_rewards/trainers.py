"""Adapters to TRL's trainers: :class:`RewardFunction` for ``reward_funcs`` (GRPO, RLOO, online DPO and the other
callable-taking trainers) and :class:`PPORewardAdapter` for the legacy PPO ``reward_model`` contract.

The reward model never moves: it stays on the device it was loaded on, apart from the policy. Policy outputs
arrive as text or messages, are parsed back into messages when they carry the policy's chat template, and are
re-rendered in the reward model's own format.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import nn

from .backends.base import RewardModel
from .chat_parsing import parse_chat, strip_completion
from .conversation import normalize_completion, normalize_prompt
from .pairwise import GroupMode, Transform, apply_transform, group_rewards

logger = logging.getLogger(__name__)

Pairing = Literal["group", "halves"]


def to_messages(prompt: Any, where: str) -> tuple[list[dict[str, str]], str]:
    """A policy prompt as messages, plus the chat format it was written in (``"plain"`` for untemplated text or
    message lists). Text rendered with a policy chat template is parsed back into its turns; an assistant turn
    left complete at the end of a templated prompt is an error (the completion should answer a user turn)."""
    if isinstance(prompt, str):
        messages, fmt = parse_chat(prompt, where=where)
        return normalize_prompt(messages, where), fmt
    return normalize_prompt(prompt, where), "plain"


def to_completion(completion: Any, fmt: str, where: str) -> str:
    """A policy completion as text; for a templated prompt, the end-of-turn marker the policy may have left at the
    end is removed (TRL usually decodes with special tokens skipped, but not every pipeline does)."""
    text = normalize_completion(completion, where)
    return strip_completion(text, fmt) if fmt != "plain" else text


class RewardFunction:
    """A TRL reward function backed by a reward model from :func:`rlhf_rewards.load_reward_model`.

    Pass it in ``reward_funcs`` of ``GRPOTrainer``, ``RLOOTrainer``, ``OnlineDPOTrainer`` and the other trainers
    that take callables. Each call returns one float per completion (or ``None`` for a sample that could not be
    scored; the reason is logged and the trainer skips it).

    Args:
        model: a loaded reward model (scalar or pairwise).
        baseline_column: a dataset column holding a reference completion per prompt. Scalar models then return
            ``r(completion) - r(reference)``; pairwise models ``transform(P(completion better than reference))``.
        pairing: for pairwise models without a baseline column: ``"group"`` compares the consecutive completions
            of one prompt (GRPO/RLOO groups); ``"halves"`` compares the first half of the batch with the second
            half, as ``OnlineDPOTrainer`` lays out its two candidates per prompt.
        group_size: completions per prompt for ``pairing="group"``; default: runs of identical prompts.
        group_mode: ``"round-robin"`` (each against all others in its group) or ``"anchor"`` (each against the
            group's first completion, linear cost).
        transform: how preferences become rewards: ``"logodds"`` (default), ``"centered"`` or ``"probability"``.
        name: the function's ``__name__`` (TRL's logging key); default ``"reward_<preset>"``.
        parse_templates: parse prompts that are text rendered with a policy chat template back into messages
            (default ``True``); when off, a text prompt is one user turn as is.
    """

    def __init__(self, model: RewardModel, *, baseline_column: Optional[str] = None,
                 pairing: Optional[Pairing] = None, group_size: Optional[int] = None,
                 group_mode: GroupMode = "round-robin", transform: Transform = "logodds",
                 name: Optional[str] = None, parse_templates: bool = True):
        if pairing not in (None, "group", "halves"):
            raise ValueError(f"pairing must be None, 'group' or 'halves', got {pairing!r}")
        if pairing is not None and baseline_column is not None:
            raise ValueError("give either pairing or baseline_column, not both")
        if model.kind == "pairwise" and pairing is None and baseline_column is None:
            raise ValueError(
                f"{model.preset.name} is a pairwise model: it needs something to compare each completion with. "
                "Pass baseline_column='<dataset column with a reference completion>', pairing='group' "
                "(GRPO/RLOO groups) or pairing='halves' (online DPO)")
        apply_transform([0.5], transform)  # rejects an unknown transform now rather than mid-training
        self.model = model
        self.baseline_column = baseline_column
        self.pairing = pairing
        self.group_size = group_size
        self.group_mode = group_mode
        self.transform = transform
        self.parse_templates = parse_templates
        self.__name__ = name or "reward_" + model.preset.name.replace("-", "_")

    def __repr__(self) -> str:
        return f"RewardFunction({self.__name__}, model={self.model!r}, pairing={self.pairing!r})"

    # -- inputs ---------------------------------------------------------------------------------------------------
    def _prepare(self, prompts: Sequence[Any], completions: Sequence[Any], baselines: Optional[Sequence[Any]]
                 ) -> tuple[list[Optional[tuple]], list[Optional[str]]]:
        """Per sample ``(messages, completion, baseline)`` or ``None`` with the reason it cannot be scored."""
        items: list[Optional[tuple]] = []
        reasons: list[Optional[str]] = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            try:
                if self.parse_templates:
                    messages, fmt = to_messages(prompt, f"prompts[{i}]")
                else:
                    messages, fmt = normalize_prompt(prompt, f"prompts[{i}]"), "plain"
                text = to_completion(completion, fmt, f"completions[{i}]")
                base = None
                if baselines is not None:
                    base = to_completion(baselines[i], fmt, f"{self.baseline_column}[{i}]")
                items.append((messages, text, base))
                reasons.append(None)
            except ValueError as err:
                items.append(None)
                reasons.append(str(err))
        return items, reasons

    # -- the call -------------------------------------------------------------------------------------------------
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                 **kwargs: Any) -> list[Optional[float]]:
        """Rewards for TRL: one float (or ``None``) per completion, in order."""
        if len(prompts) != len(completions):
            raise ValueError(f"length mismatch: len(prompts)={len(prompts)}, len(completions)={len(completions)}")
        baselines = None
        if self.baseline_column is not None:
            if self.baseline_column not in kwargs:
                raise ValueError(f"baseline_column {self.baseline_column!r} is not among the dataset columns "
                                 f"passed by the trainer: {sorted(k for k in kwargs if not callable(kwargs[k]))}")
            baselines = kwargs[self.baseline_column]
        before = self.model.stats.as_dict()
        start = time.perf_counter()
        items, reasons = self._prepare(prompts, completions, baselines)
        if self.pairing is None:
            rewards = self._score_each(items)
        elif self.pairing == "halves":
            rewards = self._score_halves(items, reasons)
        else:
            rewards = self._score_groups(items, reasons)
        for i, reason in enumerate(reasons):
            if reason is not None:
                rewards[i] = None
                logger.warning("%s: sample %d not scored: %s", self.__name__, i, reason)
        self._log(kwargs.get("log_metric"), before, time.perf_counter() - start, reasons)
        return rewards

    def _score_each(self, items: list[Optional[tuple]]) -> list[Optional[float]]:
        ok = [i for i, it in enumerate(items) if it is not None]
        rewards: list[Optional[float]] = [None] * len(items)
        if not ok:
            return rewards
        prompts = [items[i][0] for i in ok]
        completions = [items[i][1] for i in ok]
        if self.baseline_column is None:
            values = self.model.score(prompts, completions)
        elif self.model.kind == "pairwise":
            values = self.model.score(prompts, completions, baselines=[items[i][2] for i in ok],
                                      transform=self.transform)
        else:
            values = self.model.score(prompts, completions, baselines=[items[i][2] for i in ok])
        for i, v in zip(ok, values):
            rewards[i] = v
        return rewards

    def _score_halves(self, items: list[Optional[tuple]], reasons: list[Optional[str]]) -> list[Optional[float]]:
        n = len(items)
        if n % 2:
            raise ValueError(f"pairing='halves' needs an even number of completions (first candidates, then second "
                             f"candidates of the same prompts), got {n}")
        half = n // 2
        rewards: list[Optional[float]] = [None] * n
        ok = []
        for i in range(half):
            first, second = items[i], items[i + half]
            if first is None or second is None:
                reasons[i] = reasons[i] or f"its pair (sample {i + half}) could not be scored"
                reasons[i + half] = reasons[i + half] or f"its pair (sample {i}) could not be scored"
            elif first[0] != second[0]:
                raise ValueError(f"pairing='halves': prompts[{i}] and prompts[{i + half}] differ; online DPO "
                                 "passes the same prompts twice (first candidates, then second candidates)")
            else:
                ok.append(i)
        if self.model.kind == "pairwise":
            probs = self.model.compare([items[i][0] for i in ok], [items[i][1] for i in ok],
                                       [items[i + half][1] for i in ok])
            forward = apply_transform(probs, self.transform)
            backward = apply_transform([1.0 - p for p in probs], self.transform)
            for i, f, b in zip(ok, forward, backward):
                rewards[i], rewards[i + half] = f, b
        else:
            values = self.model.score([items[i][0] for i in ok] * 2,
                                      [items[i][1] for i in ok] + [items[i + half][1] for i in ok])
            for k, i in enumerate(ok):
                rewards[i], rewards[i + half] = values[k], values[k + len(ok)]
        return rewards

    def _score_groups(self, items: list[Optional[tuple]], reasons: list[Optional[str]]) -> list[Optional[float]]:
        groups = self._group_bounds(items)
        rewards: list[Optional[float]] = [None] * len(items)
        for start, end in groups:
            members = [i for i in range(start, end) if items[i] is not None]
            if len(members) < end - start:
                for i in members:
                    reasons[i] = "another completion of its group could not be scored"
                continue
            values = group_rewards(self.model, [items[i][0] for i in members], [items[i][1] for i in members],
                                   len(members), mode=self.group_mode, transform=self.transform)
            for i, v in zip(members, values):
                rewards[i] = v
        return rewards

    def _group_bounds(self, items: list[Optional[tuple]]) -> list[tuple[int, int]]:
        n = len(items)
        if self.group_size is not None:
            if n % self.group_size:
                raise ValueError(f"{n} completions do not split into groups of group_size={self.group_size}")
            return [(s, s + self.group_size) for s in range(0, n, self.group_size)]
        bounds, start = [], 0
        for i in range(1, n + 1):
            if i == n or items[i] is None or items[start] is None or items[i][0] != items[start][0]:
                bounds.append((start, i))
                start = i
        return bounds

    def _log(self, log_metric: Optional[Callable[[str, float], None]], before: dict, seconds: float,
             reasons: list[Optional[str]]) -> None:
        if log_metric is None:
            return
        after = self.model.stats.as_dict()
        delta = {k: after[k] - before[k] for k in after}
        prefix = self.__name__
        log_metric(f"{prefix}/seconds", seconds)
        log_metric(f"{prefix}/unscored", float(sum(r is not None for r in reasons)))
        if delta["samples"]:
            log_metric(f"{prefix}/truncation_rate", delta["truncated"] / delta["samples"])
        if delta["computed_tokens"]:
            log_metric(f"{prefix}/padding_share", 1 - delta["real_tokens"] / delta["computed_tokens"])
        if delta["comparisons"]:
            log_metric(f"{prefix}/order_disagreement", delta["order_disagreements"] / delta["comparisons"])


class _RewardBackbone(nn.Module):
    """What ``get_reward`` calls as ``getattr(model, model.base_model_prefix)``: takes the policy's tokens and
    returns, as ``last_hidden_state``, the reward of each row broadcast to every position (shape ``(B, L, 1)``)."""

    def __init__(self, adapter: "PPORewardAdapter"):
        super().__init__()
        self._adapter = [adapter]  # a list keeps the parent out of this module's children (no cycle)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any):
        from transformers.modeling_outputs import BaseModelOutput

        rewards = self._adapter[0].rewards_for_tokens(input_ids, attention_mask)
        hidden = rewards.to(input_ids.device)[:, None, None].expand(-1, input_ids.shape[1], 1)
        return BaseModelOutput(last_hidden_state=hidden)


class PPORewardAdapter(nn.Module):
    """A ``reward_model`` for PPO-style trainers that score through ``get_reward(model, query_responses,
    pad_token_id, context_length)`` (TRL's legacy PPOTrainer, ``trl.experimental.utils.get_reward``), for a reward
    model whose tokenizer differs from the policy's.

    ``get_reward`` runs ``model.<base_model_prefix>`` on the policy's token ids and reads ``model.score`` at the
    last response token. This adapter decodes each row's real tokens with the policy tokenizer, splits prompt and
    response (from the policy's chat template; for untemplated text set :attr:`context_length`), re-renders them
    for the reward model, and returns that reward at every position, so the position ``get_reward`` reads holds it.

    Args:
        model: a scalar reward model from :func:`rlhf_rewards.load_reward_model` (stays on its own device).
        policy_tokenizer: the tokenizer the policy's token ids come from.
        context_length: for policies whose queries are plain text (no chat template): the number of query
            positions (left-padded) at the start of each row; set it before each call when it changes.
    """

    base_model_prefix = "reward_backbone"

    def __init__(self, model: RewardModel, policy_tokenizer: Any, *, context_length: Optional[int] = None):
        super().__init__()
        if model.kind != "scalar":
            raise ValueError("PPORewardAdapter needs a scalar reward model; wrap a pairwise one with a baseline in "
                             "RewardFunction instead")
        self.reward_model = model
        self.policy_tokenizer = policy_tokenizer
        self.context_length = context_length
        self.reward_backbone = _RewardBackbone(self)
        self.score = nn.Identity()
        self.config = getattr(getattr(model, "model", None), "config", None)

    def split(self, row_ids: torch.Tensor, row_mask: torch.Tensor) -> tuple[Union[str, list], str]:
        """The prompt (messages or text) and response text of one row of policy tokens."""
        tok = self.policy_tokenizer
        if self.context_length is not None:
            query = row_ids[: self.context_length][row_mask[: self.context_length].bool()].tolist()
            response = row_ids[self.context_length:][row_mask[self.context_length:].bool()].tolist()
            prompt_text = tok.decode(query, skip_special_tokens=False)
            messages, fmt = parse_chat(prompt_text)
            response_text = tok.decode(response, skip_special_tokens=True)
            return messages, strip_completion(response_text, fmt)
        text = tok.decode(row_ids[row_mask.bool()].tolist(), skip_special_tokens=False)
        messages, fmt = parse_chat(text)
        if fmt == "plain":
            raise ValueError("cannot tell prompt from response in untemplated text: set adapter.context_length")
        if messages[-1]["role"] != "assistant":
            return messages, ""  # the policy's response is empty: the text ends with the generation prompt
        return messages[:-1], strip_completion(messages[-1]["content"], fmt)

    @torch.inference_mode()
    def rewards_for_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The reward of each row of policy tokens, as a float32 tensor on the CPU."""
        prompts, responses = [], []
        for row in range(input_ids.shape[0]):
            prompt, response = self.split(input_ids[row].cpu(), attention_mask[row].cpu())
            prompts.append(prompt)
            responses.append(response)
        return torch.tensor(self.reward_model.score(prompts, responses), dtype=torch.float32)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The reward of each row (for direct use outside ``get_reward``)."""
        return self.rewards_for_tokens(input_ids, attention_mask)

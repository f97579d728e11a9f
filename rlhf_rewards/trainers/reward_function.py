""":class:`RewardFunction`: a reward model as a TRL ``reward_funcs`` callable (GRPO, RLOO, online DPO and the other
callable-taking trainers).

The reward model never moves: it stays on the device it was loaded on, apart from the policy. Policy outputs
arrive as text or messages, are parsed back into messages when they carry the policy's chat template, and are
re-rendered in the reward model's own format.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Callable, Literal, Optional

from ..backends.base import RewardModel
from ..conversation import Message, normalize_prompt
from ..pairwise import GroupMode, Transform, apply_transform, group_rewards
from .inputs import Sample, call_baselines, check_options, model_lock, to_completion, to_messages

logger = logging.getLogger(__name__)

Pairing = Literal["group", "halves"]


class RewardFunction:
    """A TRL reward function backed by a reward model from :func:`rlhf_rewards.load_reward_model`.

    Pass it in ``reward_funcs`` of ``GRPOTrainer``, ``RLOOTrainer``, ``OnlineDPOTrainer`` and the other trainers
    that take callables. Each call returns one float per completion, or ``None`` for a sample that could not be
    scored (a prompt that does not parse or does not fit the reward model's format); the reason is logged as a
    warning and the trainer skips that reward.

    What the floats are: for a scalar model, its score on its own logit scale (minus the score of the
    ``baseline_column`` completion when one is given). For a pairwise model, ``transform(P)`` of preferences ``P``
    (default ``"logodds"``: ``log(P / (1 - P))``, 0 for a tie): against the baseline completion, averaged over the
    other completions of the group, or against the other candidate of the online-DPO pair (see ``pairing``).

    Args:
        model: a loaded reward model (scalar or pairwise). It stays where it was loaded; the trainer never sees it.
        baseline_column: a dataset column holding a reference completion per prompt (text, or TRL's
            ``[{"role": "assistant", ...}]``). Scalar models then return ``r(completion) - r(reference)``; pairwise
            models ``transform(P(completion better than reference))``.
        pairing: without a baseline column: ``"group"`` compares the completions of one prompt with each other
            (GRPO/RLOO groups, consecutive in the batch); ``"halves"`` compares completion ``i`` of the first half of
            the batch with completion ``i`` of the second half, as ``OnlineDPOTrainer`` lays out its two candidates
            per prompt. A scalar model compared this way gives Bradley-Terry preferences ``sigmoid(r_a - r_b)``
            within groups, and its plain scores for halves. Pairwise models need ``pairing`` or ``baseline_column``.
        group_size: completions per prompt for ``pairing="group"`` (pass the trainer's ``num_generations``); default:
            each run of identical consecutive prompts is a group.
        group_mode: ``"round-robin"`` (each against all others in its group, ``G(G-1)/2`` comparisons) or
            ``"anchor"`` (each against the group's first completion, ``G-1`` comparisons).
        transform: how preferences become rewards: ``"logodds"`` (default), ``"centered"`` (``2P - 1``) or
            ``"probability"`` (``P``).
        name: the function's ``__name__``, TRL's logging key; default ``"reward_<preset>"``.
        parse_templates: parse text prompts rendered with a policy chat template back into messages (default
            ``True``); when off, a text prompt is one user turn as it is.
    """

    def __init__(self, model: RewardModel, *, baseline_column: Optional[str] = None,
                 pairing: Optional[Pairing] = None, group_size: Optional[int] = None,
                 group_mode: GroupMode = "round-robin", transform: Transform = "logodds",
                 name: Optional[str] = None, parse_templates: bool = True):
        check_options(pairing, baseline_column, group_size, group_mode, transform)
        if model.kind == "pairwise" and pairing is None and baseline_column is None:
            raise ValueError(
                f"{model.preset.name} is a pairwise model: it needs something to compare each completion with. "
                "Pass baseline_column='<dataset column with a reference completion>', pairing='group' "
                "(GRPO/RLOO groups) or pairing='halves' (online DPO)")
        self.model = model
        self.baseline_column = baseline_column
        self.pairing = pairing
        self.group_size = group_size
        self.group_mode = group_mode
        self.transform = transform
        self.parse_templates = parse_templates
        self.__name__ = name or "reward_" + model.preset.name.replace("-", "_")
        self._source: Optional[tuple[str, dict[str, Any]]] = None

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, load_kwargs: Optional[dict[str, Any]] = None,
                        **kwargs: Any) -> RewardFunction:
        """Load the reward model with ``load_reward_model(name_or_path, **load_kwargs)`` and wrap it.

        The function then pickles as that recipe, not as the weights: a process that unpickles it (AsyncGRPOTrainer's
        spawned rollout worker) loads the model itself. ``kwargs`` are the constructor's.
        """
        from ..loading import load_reward_model

        load_kwargs = dict(load_kwargs or {})
        function = cls(load_reward_model(name_or_path, **load_kwargs), **kwargs)
        function._source = (name_or_path, load_kwargs)
        return function

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._source is not None:
            del state["model"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "model" not in state:
            from ..loading import load_reward_model

            name_or_path, load_kwargs = state["_source"]
            self.model = load_reward_model(name_or_path, **load_kwargs)

    def __repr__(self) -> str:
        how = f"pairing={self.pairing!r}" if self.baseline_column is None else f"baseline={self.baseline_column!r}"
        return f"RewardFunction({self.__name__}, model={self.model!r}, {how})"

    # -- inputs ---------------------------------------------------------------------------------------------------
    def _prepare(self, prompts: Sequence[Any], completions: Sequence[Any], baselines: Optional[Sequence[Any]]
                 ) -> tuple[list[Optional[Sample]], list[Optional[str]]]:
        """Per sample a :class:`Sample`, or ``None`` and the reason it cannot be scored."""
        samples: list[Optional[Sample]] = []
        reasons: list[Optional[str]] = []
        render_errors: dict[tuple, Optional[str]] = {}
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
            except ValueError as err:
                samples.append(None)
                reasons.append(str(err))
                continue
            # A conversation the model's format cannot hold (e.g. a system turn after a user turn) would make the
            # whole batch's scoring call raise; rendering each distinct prompt once first finds it per sample.
            key = tuple((m["role"], m["content"]) for m in messages)
            if key not in render_errors:
                render_errors[key] = self._render_error(messages)
            if render_errors[key] is not None:
                samples.append(None)
                reasons.append(f"prompts[{i}]: {render_errors[key]}")
                continue
            samples.append(Sample(messages, text, base))
            reasons.append(None)
        return samples, reasons

    def _render_error(self, messages: list[Message]) -> Optional[str]:
        """Why the reward model cannot render ``messages``, or ``None`` when it can."""
        try:
            if self.model.kind == "scalar":
                self.model.format(messages, "")
            else:
                self.model.format(messages, "", "")
        except ValueError as err:
            return f"{self.model.preset.name} cannot render this conversation: {err}"
        return None

    # -- the call -------------------------------------------------------------------------------------------------
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                 **kwargs: Any) -> list[Optional[float]]:
        """Rewards for TRL: one float (or ``None``) per completion, in order. ``kwargs`` are the dataset columns
        and the trainer's extras; ``log_metric``, when given, receives this call's metrics."""
        baselines = call_baselines(prompts, completions, self.baseline_column, kwargs)
        start = time.perf_counter()
        samples, reasons = self._prepare(prompts, completions, baselines)
        with model_lock(self.model):
            before = self.model.stats.as_dict()
            if self.pairing is None:
                rewards = self._score_each(samples)
            elif self.pairing == "halves":
                rewards = self._score_halves(prompts, samples, reasons)
            else:
                rewards = self._score_groups(prompts, samples)
            after = self.model.stats.as_dict()
        unscored = [(i, reason) for i, reason in enumerate(reasons) if reason is not None]
        for i, _ in unscored:
            rewards[i] = None
        if unscored:
            logger.warning("%s: %d of %d samples not scored:\n%s", self.__name__, len(unscored), len(rewards),
                           "\n".join(f"  sample {i}: {reason}" for i, reason in unscored))
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            delta = {k: after[k] - before[k] for k in after}
            self._log(log_metric, delta, time.perf_counter() - start, len(unscored) / max(len(rewards), 1))
        return rewards

    def _score_each(self, samples: list[Optional[Sample]]) -> list[Optional[float]]:
        """Each completion on its own: its score, or its comparison with its baseline."""
        ok = [i for i, s in enumerate(samples) if s is not None]
        rewards: list[Optional[float]] = [None] * len(samples)
        if not ok:
            return rewards
        prompts = [samples[i].messages for i in ok]
        completions = [samples[i].completion for i in ok]
        if self.baseline_column is None:
            values = self.model.score(prompts, completions)
        else:
            baselines = [samples[i].baseline for i in ok]
            extra = {"transform": self.transform} if self.model.kind == "pairwise" else {}
            values = self.model.score(prompts, completions, baselines=baselines, **extra)
        for i, v in zip(ok, values):
            rewards[i] = v
        return rewards

    def _score_halves(self, prompts: Sequence[Any], samples: list[Optional[Sample]],
                      reasons: list[Optional[str]]) -> list[Optional[float]]:
        """Online DPO's layout: sample ``i`` and sample ``i + n/2`` are two candidates for the same prompt."""
        n = len(samples)
        if n % 2:
            raise ValueError(f"pairing='halves' needs an even number of completions (first candidates, then second "
                             f"candidates of the same prompts), got {n}")
        half = n // 2
        for i in range(half):
            if prompts[i] != prompts[i + half]:
                raise ValueError(f"pairing='halves': prompts[{i}] and prompts[{i + half}] differ; online DPO passes "
                                 "the same prompts twice (first candidates, then second candidates)")
        rewards: list[Optional[float]] = [None] * n
        ok = []
        for i in range(half):
            if samples[i] is None or samples[i + half] is None:
                # a pair with one unscorable candidate has no preference for the other either
                reasons[i] = reasons[i] or f"its pair (sample {i + half}) could not be scored"
                reasons[i + half] = reasons[i + half] or f"its pair (sample {i}) could not be scored"
            else:
                ok.append(i)
        if not ok:
            return rewards
        messages = [samples[i].messages for i in ok]
        firsts = [samples[i].completion for i in ok]
        seconds = [samples[i + half].completion for i in ok]
        if self.model.kind == "pairwise":
            probs = self.model.compare(messages, firsts, seconds)
            values = apply_transform(probs, self.transform) + apply_transform([1.0 - p for p in probs],
                                                                               self.transform)
        else:
            values = self.model.score(messages * 2, firsts + seconds)
        for k, i in enumerate(ok):
            rewards[i], rewards[i + half] = values[k], values[k + len(ok)]
        return rewards

    def _score_groups(self, prompts: Sequence[Any], samples: list[Optional[Sample]]) -> list[Optional[float]]:
        """GRPO/RLOO's layout: the scorable completions of each group are compared with each other. Groups of
        equal size go through one batched :func:`~rlhf_rewards.pairwise.group_rewards` call."""
        by_size: dict[int, list[list[int]]] = {}
        for start, end in self._group_bounds(prompts):
            members = [i for i in range(start, end) if samples[i] is not None]
            if members:
                by_size.setdefault(len(members), []).append(members)
        rewards: list[Optional[float]] = [None] * len(samples)
        for size, groups in by_size.items():
            flat = [i for members in groups for i in members]
            values = group_rewards(self.model, [samples[i].messages for i in flat],
                                   [samples[i].completion for i in flat], size, mode=self.group_mode,
                                   transform=self.transform)
            for i, v in zip(flat, values):
                rewards[i] = v
        return rewards

    def _group_bounds(self, prompts: Sequence[Any]) -> list[tuple[int, int]]:
        """``(start, end)`` of each group: ``group_size`` consecutive samples answering one prompt, or each run of
        identical consecutive prompts."""
        n = len(prompts)
        if self.group_size is None:
            bounds, start = [], 0
            for i in range(1, n + 1):
                if i == n or prompts[i] != prompts[start]:
                    bounds.append((start, i))
                    start = i
            return bounds
        if n % self.group_size:
            raise ValueError(f"{n} completions do not split into groups of group_size={self.group_size}")
        for start in range(0, n, self.group_size):
            for i in range(start + 1, start + self.group_size):
                if prompts[i] != prompts[start]:
                    raise ValueError(
                        f"prompts[{i}] differs from prompts[{start}], the first of its group of {self.group_size}. "
                        "Groups must be whole in every call: with several processes, make each process's batch a "
                        "multiple of num_generations")
        return [(s, s + self.group_size) for s in range(0, n, self.group_size)]

    def _log(self, log_metric: Callable[[str, float], None], delta: dict[str, float], seconds: float,
             unscored_rate: float) -> None:
        log_call_metrics(log_metric, self.__name__, delta, seconds, unscored_rate)


def log_call_metrics(log_metric: Callable[[str, float], None], prefix: str, delta: dict[str, float],
                     seconds: float, unscored_rate: float) -> None:
    """Report one reward-function call's metrics under ``<prefix>/``: wall time, share of samples left unscored,
    and, from the model's counters for the call (``delta``, as :class:`~rlhf_rewards.stats.RewardStats` names
    them), the share of model inputs truncated, of computed tokens that were padding, and of pairwise comparisons
    whose two orders disagreed."""
    log_metric(f"{prefix}/seconds", seconds)
    log_metric(f"{prefix}/unscored_rate", unscored_rate)
    if delta.get("samples"):
        log_metric(f"{prefix}/truncation_rate", delta["truncated"] / delta["samples"])
    if delta.get("computed_tokens"):
        log_metric(f"{prefix}/padding_share", 1 - delta["real_tokens"] / delta["computed_tokens"])
    if delta.get("comparisons"):
        log_metric(f"{prefix}/order_disagreement_rate", delta["order_disagreements"] / delta["comparisons"])

""":class:`RewardFunction`: a reward model as a TRL ``reward_funcs`` callable (GRPO, RLOO, online DPO and the other
callable-taking trainers).

The reward model never moves: it stays on the device it was loaded on, apart from the policy. Policy outputs
arrive as text or messages, are parsed back into messages when they carry the policy's chat template, and are
re-rendered in the reward model's own format.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Literal, Optional, Union

import torch

from ..backends.base import RewardModel
from ..backends.weights import device_problem
from ..conversation import Sample
from ..errors import SampleError
from ..groups import group_bounds, halves
from ..normalization import Calibration, NormalizeMode, make_normalizer
from ..pairwise import GroupMode, rewards_within_groups
from ..reward_options import aggregate_steps, call_baselines, log_call_metrics, set_options
from ..transforms import Transform, apply_transform

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
        objectives: for a multi-objective model (``model.objective_names`` non-empty, e.g. ArmoRM), objective name
            -> weight: the reward is the weighted sum of those objectives' rewards instead of the model's own
            reward (see ``model.with_objectives``). Unknown names, weights that are not finite numbers, and models
            without objectives fail here, at construction.
        aggregate: for a process reward model (``model.kind == "process"``): how a completion's step rewards become
            its reward, ``"min"``, ``"last"``, ``"mean"`` or ``"product"`` (default: the model's ``aggregate``). Each
            call logs ``<name>/mean_step_reward`` and ``<name>/steps_per_completion`` through ``log_metric``, and
            keeps the step rewards (per sample a list, ``None`` when unscored) as ``last_step_rewards``.
        on_step_rewards: for a process reward model: called after each call with that call's step rewards (as
            ``last_step_rewards``), e.g. to log or shape per-step rewards yourself.
        normalize: ``None`` (default): the rewards above, raw. ``"stats"``: ``(r - mean) / std`` with the mean and
            sample standard deviation of ``calibration``, else of the checkpoint config's OpenRLHF ``mean``/``std``;
            refused (here, naming where it looked) without either, for statistics of another model, preset or
            reward (``objectives``, ``aggregate``, ``transform``, baseline), and with ``pairing="group"``.
            ``"group"``: within each group (``group_size`` consecutive completions, else each run of equal
            consecutive prompts), ``(r - group mean) / (group sample std + 1e-4)`` as TRL's GDPO
            (``normalize_then_sum``) does; a group with fewer than two rewards, or all equal, gives 0.0. ``None``
            rewards stay ``None`` and are left out of a group's statistics. See docs/normalization.md.
        calibration: for ``normalize="stats"``: a file written by ``rlhf-rewards calibrate`` (its path or parsed
            JSON, or a :class:`~rlhf_rewards.normalization.RewardScale`); it takes precedence over the checkpoint
            config's ``mean``/``std``.
    """

    def __init__(self, model: RewardModel, *, baseline_column: Optional[str] = None,
                 pairing: Optional[Pairing] = None, group_size: Optional[int] = None,
                 group_mode: GroupMode = "round-robin", transform: Transform = "logodds",
                 name: Optional[str] = None, parse_templates: bool = True,
                 objectives: Optional[Mapping[str, float]] = None, aggregate: Optional[str] = None,
                 on_step_rewards: Optional[Callable[[list[Optional[list[float]]]], None]] = None,
                 normalize: Optional[NormalizeMode] = None, calibration: Optional[Calibration] = None):
        set_options(self, baseline_column=baseline_column, pairing=pairing, group_size=group_size,
                    group_mode=group_mode, transform=transform, parse_templates=parse_templates, normalize=normalize)
        if objectives is not None:
            model = model.with_objectives(objectives)  # checked before anything else is kept
        self.objectives = None if objectives is None else dict(objectives)
        if model.kind == "process":
            if pairing is not None or baseline_column is not None:
                raise ValueError(f"{model.preset.name} is a process reward model: it scores each completion's steps "
                                 "on their own; pairing and baseline_column do not apply")
            if aggregate is not None:
                model = model.with_aggregate(aggregate)  # type: ignore[attr-defined]
        elif aggregate is not None or on_step_rewards is not None:
            raise ValueError(f"aggregate and on_step_rewards need a process reward model; {model.preset.name} is "
                             f"a {model.kind} model")
        self.aggregate = aggregate
        self.on_step_rewards = on_step_rewards
        self.last_step_rewards: Optional[list[Optional[list[float]]]] = None
        self._steps_of_call: list[Optional[list[float]]] = []
        if model.kind == "pairwise" and pairing is None and baseline_column is None:
            raise ValueError(
                f"{model.preset.name} is a pairwise model: it needs something to compare each completion with. "
                "Pass baseline_column='<dataset column with a reference completion>', pairing='group' "
                "(GRPO/RLOO groups) or pairing='halves' (online DPO)")
        self.model = model
        self.__name__ = name or "reward_" + model.preset.name.replace("-", "_")
        self._source: Optional[tuple[str, dict[str, Any]]] = None
        self.normalizer = make_normalizer(normalize, model, calibration=calibration,
                                          baseline=baseline_column is not None, transform=transform,
                                          objectives=self.objectives, pairing=pairing, group_size=group_size)
        logger.info("%s: normalize=%s", self.__name__, self.normalizer)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, load_kwargs: Optional[dict[str, Any]] = None,
                        **kwargs: Any) -> RewardFunction:
        """Load the reward model with ``load_reward_model(name_or_path, **load_kwargs)`` and wrap it.

        The function then pickles as that recipe, not as the weights: a process that unpickles it (AsyncGRPOTrainer's
        spawned rollout worker, a Ray task) loads the model itself at its first call, on the device it ran on here,
        and raises ``RuntimeError`` when that device does not exist there. ``kwargs`` are the constructor's.
        """
        from ..loading import load_reward_model

        load_kwargs = dict(load_kwargs or {})
        function = cls(load_reward_model(name_or_path, **load_kwargs), **kwargs)
        function._source = (name_or_path, load_kwargs)
        return function

    @property
    def model(self) -> RewardModel:
        """The reward model. In a process that unpickled this function, it is loaded (or its pickled weights read)
        at the first call, once the devices it ran on are known to exist there."""
        model = self.__dict__.get("_model")
        return model if model is not None else self._restore()

    @model.setter
    def model(self, model: RewardModel) -> None:
        self._model = model

    # -- pickling: AsyncGRPOTrainer's spawned rollout worker, Ray tasks -------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_restoring", None)  # a lock does not pickle; the copy gets its own
        model = state.pop("_model", None)
        if model is None:
            return state  # unpickled here and never called: passed on as it came
        state["_devices"] = model.devices
        if self._source is None:
            # the weights travel as bytes the receiving process reads only once it knows their devices exist there:
            # read directly, CUDA tensors fail deep inside torch.load where no CUDA device is visible
            state["_weights"] = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Nothing loads here. AsyncGRPOTrainer's rollout worker unpickles its reward functions before it hides the
        # GPUs (CUDA_VISIBLE_DEVICES=""): a device check now would pass, and a model loaded now would sit on the
        # trainer's GPU from a process meant to hold none. The first call checks and loads (:meth:`_restore`).
        self.__dict__.update(state)
        self._restoring = threading.Lock()

    def _restore(self) -> RewardModel:
        """The model of an unpickled function, made at its first use on the device it ran on where it was pickled;
        ``RuntimeError`` when that device cannot be used here (never a silent fallback to the CPU)."""
        with self._restoring:
            if self.__dict__.get("_model") is None:
                for device in self._devices:
                    problem = device_problem(torch.device(device))
                    if problem is not None:
                        raise RuntimeError(self._unavailable(device, problem))
                if "_weights" in self.__dict__:
                    self._model = pickle.loads(self.__dict__.pop("_weights"))
                else:
                    from ..loading import load_reward_model

                    name_or_path, load_kwargs = self._source
                    if "device_map" not in load_kwargs:
                        # where it ran, not where a default or a local-rank template resolves in this process
                        load_kwargs = {**load_kwargs, "device": self._devices[0]}
                    model = load_reward_model(name_or_path, **load_kwargs)
                    if self.objectives is not None:
                        model = model.with_objectives(self.objectives)
                    if self.aggregate is not None:
                        model = model.with_aggregate(self.aggregate)  # type: ignore[attr-defined]
                    self._model = model
        return self._model

    def _unavailable(self, device: str, problem: str) -> str:
        """Why an unpickled function cannot score here, and what to use instead."""
        model = self._source[0] if self._source is not None else "MODEL"
        return (f"{self.__name__}: its reward model ran on {', '.join(self._devices)} in the process that pickled this "
                f"RewardFunction, and this process cannot use {device}: {problem}. TRL's AsyncGRPOTrainer calls "
                "reward functions in a spawned rollout process with CUDA_VISIBLE_DEVICES=\"\", where a GPU reward "
                "model cannot run; it is not loaded on the CPU instead (slow, or out of memory, for a large model). "
                f"Serve it and score over HTTP: `rlhf-rewards serve {model} --device {device}`, then "
                "reward_funcs=[RemoteRewardFunction(\"http://HOST:8000\")] (or AsyncRemoteRewardFunction); or deploy "
                "it with Ray Serve (rlhf_rewards.serving.ray.deploy) and pass RayRewardFunction(handle). To run it on "
                "the CPU there on purpose: RewardFunction.from_pretrained(path, load_kwargs={\"device\": \"cpu\"})")

    def __repr__(self) -> str:
        how = f"pairing={self.pairing!r}" if self.baseline_column is None else f"baseline={self.baseline_column!r}"
        model = self.__dict__.get("_model") or "loaded at the first call"  # repr never loads it
        return f"RewardFunction({self.__name__}, model={model!r}, {how}, normalize={self.normalizer})"

    # -- the call -------------------------------------------------------------------------------------------------
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                 **kwargs: Any) -> list[Optional[float]]:
        """Rewards for TRL: one float (or ``None``) per completion, in order. ``kwargs`` are the dataset columns
        and the trainer's extras; ``log_metric``, when given, receives this call's metrics."""
        return self.rewards_with_reasons(prompts, completions, **kwargs)[0]

    def rewards_with_reasons(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
                             ) -> tuple[list[Optional[float]], list[Optional[str]]]:
        """What a call returns, plus per sample the reason its reward is ``None`` (``None`` where it has one): the
        server sends these reasons back to its clients."""
        baselines = call_baselines(prompts, completions, self.baseline_column, kwargs)
        groups = self.normalizer.layout(prompts)  # a batch that is not whole groups fails before any scoring
        start = time.perf_counter()
        model = self.model
        with model.lock:
            before = model.stats.as_dict()
            with model.session(self.__name__):
                samples = model.prepare(prompts, completions, baselines, parse_templates=self.parse_templates,
                                        names=("completions", self.baseline_column or "baselines"))
                reasons = [str(s) if isinstance(s, SampleError) else None for s in samples]
                if self.pairing is None:
                    rewards = self._score_each(samples, reasons)
                elif self.pairing == "halves":
                    rewards = self._score_halves(prompts, samples, reasons)
                else:
                    rewards = self._score_groups(prompts, samples, reasons)
                steps_of_call = self._steps_of_call  # this call's, before another thread's call replaces it
            after = model.stats.as_dict()
        unscored = [(i, reason) for i, reason in enumerate(reasons) if reason is not None]
        for i, _ in unscored:
            rewards[i] = None
        rewards = self.normalizer.apply(rewards, groups)
        if unscored:
            # every reward lost would train on nothing: that is an error, not a warning
            level = logging.ERROR if len(unscored) == len(rewards) else logging.WARNING
            logger.log(level, "%s: %d of %d samples not scored:\n%s", self.__name__, len(unscored), len(rewards),
                       "\n".join(f"  sample {i}: {reason}" for i, reason in unscored))
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            delta = {k: after[k] - before[k] for k in after}
            self._log(log_metric, delta, time.perf_counter() - start, len(unscored) / max(len(rewards), 1))
        if model.kind == "process":
            steps = self.last_step_rewards = [s if r is not None else None
                                              for s, r in zip(steps_of_call, rewards)]
            self._log_steps(log_metric, steps)
        return rewards, reasons

    @staticmethod
    def _scored(values: Sequence[Any], indices: Sequence[int], rewards: list[Optional[float]],
                reasons: list[Optional[str]]) -> None:
        """Put each value (a reward, or the :class:`SampleError` why there is none) at its sample's place."""
        for i, v in zip(indices, values):
            if isinstance(v, SampleError):
                reasons[i] = reasons[i] or f"{'prompts' if v.about == 'prompt' else 'completions'}[{i}]: {v}"
            else:
                rewards[i] = v

    def _score_each(self, samples: list[Union[Sample, SampleError]], reasons: list[Optional[str]]
                    ) -> list[Optional[float]]:
        """Each completion on its own: its score, or its comparison with its baseline."""
        ok = [i for i, s in enumerate(samples) if isinstance(s, Sample)]
        rewards: list[Optional[float]] = [None] * len(samples)
        self._steps_of_call = [None] * len(samples)
        if not ok:
            return rewards
        if self.model.kind == "process":
            steps = self.model.run_steps([samples[i] for i in ok])  # type: ignore[attr-defined]
            for i, s in zip(ok, steps):
                self._steps_of_call[i] = s if isinstance(s, list) else None
            how = self.model.aggregate  # type: ignore[attr-defined]
            values = [aggregate_steps(s, how) if isinstance(s, list) else s for s in steps]
        elif self.model.kind == "scalar":
            values = self.model.run([samples[i] for i in ok])
        else:
            probs = self.model.run([samples[i] for i in ok])
            good = [p for p in probs if not isinstance(p, SampleError)]
            transformed = iter(apply_transform(good, self.transform))
            values = [p if isinstance(p, SampleError) else next(transformed) for p in probs]
        self._scored(values, ok, rewards, reasons)
        return rewards

    def _score_halves(self, prompts: Sequence[Any], samples: list[Union[Sample, SampleError]],
                      reasons: list[Optional[str]]) -> list[Optional[float]]:
        """Online DPO's layout: sample ``i`` and sample ``i + n/2`` are two candidates for the same prompt."""
        n = len(samples)
        half = halves(prompts)
        rewards: list[Optional[float]] = [None] * n
        ok = [i for i in range(half) if isinstance(samples[i], Sample) and isinstance(samples[i + half], Sample)]
        if ok:
            firsts = [(samples[i].messages, samples[i].completion) for i in ok]
            seconds = [(samples[i + half].messages, samples[i + half].completion) for i in ok]
            if self.model.kind == "pairwise":
                probs = self.model.run([Sample(m, a, b) for (m, a), (_, b) in zip(firsts, seconds)])
                good = [p for p in probs if not isinstance(p, SampleError)]
                forward = iter(apply_transform(good, self.transform))
                backward = iter(apply_transform([1.0 - p for p in good], self.transform))
                values = [p if isinstance(p, SampleError) else next(forward) for p in probs]
                values += [p if isinstance(p, SampleError) else next(backward) for p in probs]
            else:
                values = self.model.run([Sample(m, c) for m, c in firsts + seconds])
            self._scored(values, ok + [i + half for i in ok], rewards, reasons)
        for i in range(half):
            # a pair with one unscorable candidate has no preference for the other either
            if rewards[i] is None or rewards[i + half] is None:
                rewards[i] = rewards[i + half] = None
                reasons[i] = reasons[i] or f"its pair (sample {i + half}) could not be scored"
                reasons[i + half] = reasons[i + half] or f"its pair (sample {i}) could not be scored"
        return rewards

    def _score_groups(self, prompts: Sequence[Any], samples: list[Union[Sample, SampleError]],
                      reasons: list[Optional[str]]) -> list[Optional[float]]:
        """GRPO/RLOO's layout: the scorable completions of each group are compared with each other, all groups in
        one batched call. A comparison that cannot be made is left out (see
        :func:`~rlhf_rewards.pairwise.rewards_within_groups`)."""
        groups = []
        for start, end in group_bounds(prompts, self.group_size):
            members = [i for i in range(start, end) if isinstance(samples[i], Sample)]
            if members:
                groups.append(members)
        rewards: list[Optional[float]] = [None] * len(samples)
        if groups:
            values = rewards_within_groups(self.model, [samples[g[0]].messages for g in groups],
                                           [[samples[i].completion for i in g] for g in groups],
                                           mode=self.group_mode, transform=self.transform)
            self._scored(values, [i for g in groups for i in g], rewards, reasons)
        return rewards

    def _log_steps(self, log_metric: Optional[Callable[[str, float], None]],
                   steps: list[Optional[list[float]]]) -> None:
        """A process model's call: its mean step reward and steps per completion (over scored samples) to
        ``log_metric``, and the step rewards to ``on_step_rewards``."""
        scored = [s for s in steps if s is not None]
        if log_metric is not None and scored:
            flat = [r for s in scored for r in s]
            log_metric(f"{self.__name__}/mean_step_reward", sum(flat) / len(flat))
            log_metric(f"{self.__name__}/steps_per_completion", len(flat) / len(scored))
        if self.on_step_rewards is not None:
            self.on_step_rewards(steps)

    def _log(self, log_metric: Callable[[str, float], None], delta: dict[str, float], seconds: float,
             unscored_rate: float) -> None:
        log_call_metrics(log_metric, self.__name__, delta, seconds, unscored_rate)

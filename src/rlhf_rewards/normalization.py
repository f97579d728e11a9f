"""Reward normalisation, one implementation for every path that returns rewards (the in-process
:class:`~rlhf_rewards.RewardFunction`, the server's ``/v1/score`` and ``/v1/rewards``, and through the server the
remote and Ray clients), and the reward statistics ``rlhf-rewards calibrate`` writes.

Two modes (``normalize=``; ``None`` keeps the raw reward):

- ``"stats"``: ``(r - mean) / std`` with a fixed reward distribution's mean and standard deviation: from a
  calibration file (:func:`read_calibration`), else from the checkpoint's ``config.json`` ``mean``/``std`` as
  OpenRLHF's reward-model trainer stores them. A calibration file wins when both exist: it was measured on the
  user's own data and records which reward it describes. No epsilon: a ``std`` that is not positive is refused.
- ``"group"``: within each GRPO group (``group_size`` consecutive completions, or each run of equal consecutive
  prompts), ``(r - group mean) / (group std + GROUP_EPS)``, as TRL's ``multi_objective_aggregation=
  "normalize_then_sum"`` (GDPO) normalises each reward function before summing. ``None`` rewards are left out of
  the group's mean and std and stay ``None``; a group with fewer than two rewards, or whose rewards are all equal,
  gives ``0.0`` to each (nothing to tell apart: what TRL's NaN-skipping sum makes of such a group).

Every standard deviation here is the *sample* one (``n - 1`` in the denominator), as ``torch.std`` and TRL's
``nanstd`` compute it and as OpenRLHF stores it. Imports nothing but :mod:`rlhf_rewards.groups`: no torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from .groups import group_bounds

NormalizeMode = Literal["stats", "group"]
NORMALIZE_MODES: tuple[str, ...] = ("stats", "group")

GROUP_EPS = 1e-4
"""Added to a group's standard deviation before dividing, as TRL's GRPO adds it (``std + 1e-4``)."""

QUANTILES: tuple[int, ...] = (1, 5, 25, 50, 75, 95, 99)
"""The percentiles a calibration reports (linear interpolation between order statistics, numpy's default)."""

STD_KIND = "sample (n - 1)"
"""Which standard deviation calibration files and every normalisation use, as the files state it."""

CALIBRATION_FORMAT = "rlhf-rewards calibration 1"
"""The ``format`` field of a calibration file (:func:`read_calibration` refuses other files)."""


def check_normalize(value: object, pairing: Optional[str] = None, kind: Optional[str] = None
                    ) -> Optional[NormalizeMode]:
    """``value`` if it is ``None``, ``"stats"`` or ``"group"`` and goes with ``pairing`` for a model of ``kind``
    (``None``: not known yet, as in a remote client; what depends on it is checked later), else ``ValueError``.
    ``"stats"`` does not describe rewards that compare completions of one batch (``pairing="group"``, a pairwise
    model's ``"halves"``: no calibration measures them); ``"group"`` needs groups, which ``"halves"`` has not."""
    if value is not None and value not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be None, 'stats' or 'group', got {value!r}")
    if value == "stats" and (pairing == "group" or (pairing == "halves" and kind not in (None, "scalar"))):
        raise ValueError(f"normalize='stats' does not go with pairing={pairing!r}: those rewards compare the "
                         "completions of one batch with each other, which no calibration measures; use "
                         "normalize='group', or a baseline_column")
    if value == "group" and pairing == "halves":
        raise ValueError("normalize='group' does not go with pairing='halves': online DPO's batch holds pairs, "
                         "not groups")
    return value  # type: ignore[return-value]


def reward_shape(kind: str, *, baseline: bool, transform: Optional[str] = None, aggregate: Optional[str] = None,
                 objectives: Optional[Mapping[str, float]] = None) -> dict[str, Any]:
    """Which reward a distribution describes, as calibration files record it and as a reward function's statistics
    must match: the model kind, whether it is measured against a baseline (scalar: ``r(c) - r(baseline)``;
    pairwise: always), the pairwise ``transform``, the process ``aggregate``, and a multi-objective model's
    ``objectives`` weights (``None``: the model's own reward). Options that do not change the number are ``None``."""
    return {"kind": kind, "baseline": kind == "pairwise" or (kind == "scalar" and baseline),
            "transform": transform if kind == "pairwise" else None,
            "aggregate": aggregate if kind == "process" else None,
            "objectives": None if not objectives else {k: float(v) for k, v in objectives.items()}}


# -- statistics -----------------------------------------------------------------------------------------------------
def mean(values: Sequence[float]) -> float:
    """The arithmetic mean (exactly rounded sum)."""
    return math.fsum(values) / len(values)


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (``n - 1``), by two passes; ``ValueError`` below two values."""
    if len(values) < 2:
        raise ValueError(f"a sample standard deviation needs at least two values, got {len(values)}")
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ascending ``ordered``, interpolated linearly between order statistics
    at position ``(n - 1) * q / 100`` (numpy's default, Hyndman and Fan's type 7)."""
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """What a calibration reports of scored rewards: ``n``, ``mean``, ``std`` (sample; ``None`` below two values),
    ``min``, ``max`` and ``quantiles`` (``{"1": ..., "50": ..., "99": ...}``, see :data:`QUANTILES`); every number
    ``None`` without values."""
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None,
                "quantiles": {str(q): None for q in QUANTILES}}
    ordered = sorted(values)
    return {"n": len(values), "mean": mean(values), "std": sample_std(values) if len(values) > 1 else None,
            "min": ordered[0], "max": ordered[-1],
            "quantiles": {str(q): percentile(ordered, q) for q in QUANTILES}}


# -- where "stats" come from ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RewardScale:
    """The mean and standard deviation ``normalize="stats"`` divides by, and where they come from.

    Attributes:
        mean: the reward distribution's mean.
        std: its sample standard deviation (positive).
        source: where it was read, e.g. ``"stats.json (rlhf-rewards calibrate)"`` or ``"config.json mean/std of
            /models/rm (OpenRLHF)"``.
        model: the model it was measured on (its local directory or hub id), ``None`` when not recorded.
        preset: that model's preset, ``None`` when not recorded.
        reward: which reward it describes (:func:`reward_shape`).
    """

    mean: float
    std: float
    source: str
    model: Optional[str]
    preset: Optional[str]
    reward: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        """What the server states in ``/v1/models`` and a reward function logs: the numbers and their origin."""
        return {"mean": self.mean, "std": self.std, "std_kind": STD_KIND, "source": self.source,
                "model": self.model, "preset": self.preset, "reward": self.reward}


Calibration = Union[str, "os.PathLike[str]", Mapping[str, Any], RewardScale]
"""What a ``calibration=`` argument takes: a calibration file's path, its parsed JSON, or a :class:`RewardScale`."""


def _finite(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
    return float(value)


def _positive_std(value: Any, where: str) -> float:
    std = _finite(value, "std", where)
    if std <= 0:
        raise ValueError(f"{where}: std is {std!r}; (r - mean) / std needs a positive standard deviation (rewards "
                         "that never vary cannot be normalised)")
    return std


def scale_from_record(record: Mapping[str, Any], where: str) -> RewardScale:
    """The :class:`RewardScale` of a calibration file's parsed JSON (``where`` names it in errors)."""
    if not isinstance(record, Mapping) or record.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"{where}: not a calibration file written by `rlhf-rewards calibrate` (its 'format' "
                         f"should be {CALIBRATION_FORMAT!r})")
    model, reward = record.get("model"), record.get("reward")
    if not isinstance(model, Mapping) or not isinstance(reward, Mapping):
        raise ValueError(f"{where}: has no 'model' or 'reward' record; write it again with `rlhf-rewards calibrate`")
    if record.get("std") is None:
        raise ValueError(f"{where}: has no std (fewer than two rows were scored); calibrate on more data")
    return RewardScale(_finite(record.get("mean"), "mean", where), _positive_std(record["std"], where),
                       f"{where} (rlhf-rewards calibrate)", model.get("name_or_path"), model.get("preset"),
                       dict(reward))


def read_calibration(calibration: Calibration) -> RewardScale:
    """A ``calibration=`` argument as a :class:`RewardScale`: a file is read and checked (``ValueError`` naming it
    for a file that is missing, not JSON, not a calibration, or whose std is not positive)."""
    if isinstance(calibration, RewardScale):
        return calibration
    if isinstance(calibration, Mapping):
        return scale_from_record(calibration, "calibration")
    path = os.fspath(calibration)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except OSError as err:
        raise ValueError(f"calibration file {path}: cannot read ({err.strerror or err})") from None
    except ValueError as err:
        raise ValueError(f"calibration file {path}: not valid JSON ({err})") from None
    return scale_from_record(record, path)


def checkpoint_scale(model: Any) -> Optional[RewardScale]:
    """The OpenRLHF ``mean``/``std`` in the config of a loaded reward model's checkpoint (its transformers model's
    ``config``), which describe the model's raw scalar score; ``None`` when the config has no ``mean``. A ``mean``
    without a usable ``std`` is an error, as a file's would be."""
    config = getattr(getattr(model, "model", None), "config", None)
    if config is None or getattr(config, "mean", None) is None:
        return None
    name, preset = model.name_or_path, model.preset.name
    where = f"config.json of {name or preset}"
    return RewardScale(_finite(config.mean, "mean", where), _positive_std(getattr(config, "std", None), where),
                       f"{where} (OpenRLHF mean/std)", name, preset, reward_shape("scalar", baseline=False))


def check_same_model(scale: RewardScale, model: Optional[str], preset: str) -> None:
    """``ValueError`` naming both when ``scale`` was measured on another preset or model than ``model``
    (``preset``); a side that does not record its model is compared by preset only."""
    if scale.preset is not None and scale.preset != preset:
        raise ValueError(f"{scale.source} describes preset {scale.preset!r} ({scale.model}), but the loaded model "
                         f"is preset {preset!r} ({model}): calibrate this model")
    if scale.model is not None and model is not None and scale.model != model:
        raise ValueError(f"{scale.source} describes model {scale.model}, but the loaded model is {model}: "
                         "calibrate this model (a hub id and a local copy of it count as different models)")


def _shape_text(shape: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in shape.items() if v is not None and v is not False) or "raw"


def resolve_scale(calibration: Optional[Calibration], *, config_scale: Optional[RewardScale], model: Optional[str],
                  preset: str, reward: Mapping[str, Any]) -> RewardScale:
    """The statistics ``normalize="stats"`` uses for ``reward`` (:func:`reward_shape`) of the model ``model``
    (``preset``): the calibration when given (it takes precedence over the checkpoint config's), else the
    checkpoint config's. ``ValueError`` when there are none (naming where it looked), when they were measured on
    another model or preset (naming both), or on another reward (naming both)."""
    scale = read_calibration(calibration) if calibration is not None else config_scale
    if scale is None:
        raise ValueError(f"normalize='stats' found no reward statistics for {model or preset}: no calibration was "
                         "given (run `rlhf-rewards calibrate` and pass its output as calibration=, or to `serve "
                         "--calibration`), and the checkpoint's config.json has no OpenRLHF mean/std")
    check_same_model(scale, model, preset)
    if dict(scale.reward) != dict(reward):
        raise ValueError(f"{scale.source} describes the reward ({_shape_text(scale.reward)}), but this function's "
                         f"reward is ({_shape_text(reward)}): calibrate with the same options (see docs/"
                         "normalization.md)")
    return scale


# -- the arithmetic -------------------------------------------------------------------------------------------------
def normalize_by_scale(values: Sequence[Optional[float]], scale: RewardScale) -> list[Optional[float]]:
    """``(r - mean) / std`` of each reward; ``None`` stays ``None``."""
    return [None if r is None else (r - scale.mean) / scale.std for r in values]


def normalize_in_groups(values: Sequence[Optional[float]], bounds: Sequence[tuple[int, int]]
                        ) -> list[Optional[float]]:
    """Each reward as ``(r - group mean) / (group sample std + GROUP_EPS)`` over its group's rewards that are not
    ``None`` (``bounds``: each group's ``(start, end)``); ``0.0`` in a group with fewer than two rewards or all of
    them equal; ``None`` stays ``None``."""
    out: list[Optional[float]] = list(values)
    for start, end in bounds:
        members = [i for i in range(start, end) if values[i] is not None]
        scored = [values[i] for i in members]
        if len(scored) < 2 or all(r == scored[0] for r in scored):
            for i in members:
                out[i] = 0.0
            continue
        m, s = mean(scored), sample_std(scored)  # type: ignore[arg-type]
        for i in members:
            out[i] = (values[i] - m) / (s + GROUP_EPS)  # type: ignore[operator]
    return out


@dataclass(frozen=True)
class Normalizer:
    """One reward function's normalisation, checked when it is built.

    Attributes:
        mode: ``None`` (raw rewards), ``"stats"`` or ``"group"``.
        scale: the statistics of ``"stats"``.
        group_size: for ``"group"``: completions per prompt (``None``: runs of equal consecutive prompts).
    """

    mode: Optional[NormalizeMode] = None
    scale: Optional[RewardScale] = None
    group_size: Optional[int] = None
    note: str = ""

    def layout(self, prompts: Sequence[Any]) -> Optional[list[tuple[int, int]]]:
        """The groups of a call (``"group"`` mode; else ``None``), found before anything is scored: ``ValueError``
        when the prompts do not split into groups of ``group_size``."""
        return group_bounds(prompts, self.group_size) if self.mode == "group" else None

    def apply(self, values: Sequence[Optional[float]], groups: Optional[Sequence[tuple[int, int]]]
              ) -> list[Optional[float]]:
        """The call's rewards normalised (``groups``: what :meth:`layout` gave for the call's prompts)."""
        if self.mode == "stats":
            return normalize_by_scale(values, self.scale)  # type: ignore[arg-type]
        if self.mode == "group":
            return normalize_in_groups(values, groups)  # type: ignore[arg-type]
        return list(values)

    def __str__(self) -> str:
        if self.mode == "stats":
            s = self.scale
            return f"stats: (r - {s.mean:.6g}) / {s.std:.6g} from {s.source}{self.note}"  # type: ignore[union-attr]
        if self.mode == "group":
            size = "runs of equal prompts" if self.group_size is None else f"group_size={self.group_size}"
            return f"group: (r - group mean) / (group sample std + {GROUP_EPS:g}) within each group ({size})"
        return "none (raw rewards)"


def make_normalizer(normalize: object, model: Any, *, calibration: Optional[Calibration] = None,
                    baseline: bool = False, transform: Optional[str] = None,
                    objectives: Optional[Mapping[str, float]] = None, pairing: Optional[str] = None,
                    group_size: Optional[int] = None) -> Normalizer:
    """Check ``normalize=`` against a reward function's other options and find its statistics: what every path
    (in-process, ``/v1/score``, ``/v1/rewards``) builds before it scores. ``model`` is the loaded reward model as it
    scores (its ``kind``, ``preset``, ``name_or_path``, a process model's ``aggregate``, its checkpoint config); the
    checkpoint config is read only for ``"stats"``. ``ValueError`` for a combination that cannot give the
    documented numbers."""
    mode = check_normalize(normalize, pairing, model.kind)
    if calibration is not None and mode != "stats":
        raise ValueError(f"a calibration is only read by normalize='stats' (normalize={mode!r})")
    if mode == "stats":
        config_scale = checkpoint_scale(model)
        reward = reward_shape(model.kind, baseline=baseline, transform=transform,
                              aggregate=getattr(model, "aggregate", None), objectives=objectives)
        scale = resolve_scale(calibration, config_scale=config_scale, model=model.name_or_path,
                              preset=model.preset.name, reward=reward)
        note = "" if calibration is None or config_scale is None else \
            " (it takes precedence over the checkpoint config's OpenRLHF mean/std)"
        return Normalizer("stats", scale, note=note)
    if mode == "group":
        return Normalizer("group", group_size=group_size)
    return Normalizer()

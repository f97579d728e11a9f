"""What every reward function shares, in-process (:class:`~rlhf_rewards.RewardFunction`), remote and on Ray: its
options, the baseline column of a call, and the metrics it logs. Imports neither torch nor the backends, so the
HTTP and Ray clients stay light."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Literal, Optional

from .conversation import check_same_length
from .groups import check_group_size
from .normalization import check_normalize
from .transforms import check_transform

Aggregate = Literal["min", "last", "mean", "product"]
AGGREGATES: tuple[str, ...] = ("min", "last", "mean", "product")
"""How a process reward model's step rewards become one reward per completion (see
:attr:`rlhf_rewards.backends.process_base.ProcessRewardModel.aggregate`)."""

DEFAULT_AGGREGATE: Aggregate = "min"
"""A process reward model's aggregate unless told otherwise."""


def check_aggregate(value: object) -> Aggregate:
    """``value`` if it names an aggregate, else ``ValueError`` listing them."""
    if value not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(repr(a) for a in AGGREGATES)}, got {value!r}")
    return value  # type: ignore[return-value]


def aggregate_steps(rewards: Sequence[float], how: Aggregate) -> float:
    """One completion's reward from its step rewards: their minimum, the last one, their mean or their product."""
    if how == "min":
        return min(rewards)
    if how == "last":
        return rewards[-1]
    if how == "mean":
        return math.fsum(rewards) / len(rewards)
    return math.prod(rewards)


def set_options(target: Any, *, baseline_column: Optional[str], pairing: Optional[str], group_size: Optional[int],
                group_mode: str, transform: str, parse_templates: bool, normalize: Optional[str] = None) -> None:
    """Check the reward-function options every reward function takes (in-process, remote, Ray) and set them as
    ``target``'s attributes of the same names. Options that do not go together fail at construction rather than
    mid-training."""
    if pairing not in (None, "group", "halves"):
        raise ValueError(f"pairing must be None, 'group' or 'halves', got {pairing!r}")
    if pairing is not None and baseline_column is not None:
        raise ValueError("give either pairing or baseline_column, not both")
    check_normalize(normalize, pairing)
    if group_size is not None:
        check_group_size(group_size)
        if pairing != "group" and normalize != "group":
            raise ValueError(f"group_size={group_size} needs pairing='group' or normalize='group'")
    if group_mode not in ("round-robin", "anchor"):
        raise ValueError(f"unknown group_mode {group_mode!r}; expected 'round-robin' or 'anchor'")
    check_transform(transform)
    target.baseline_column = baseline_column
    target.pairing = pairing
    target.group_size = group_size
    target.group_mode = group_mode
    target.transform = transform
    target.parse_templates = parse_templates
    target.normalize = normalize


def call_baselines(prompts: Sequence[Any], completions: Sequence[Any], baseline_column: Optional[str],
                   columns: Mapping[str, Any]) -> Optional[Sequence[Any]]:
    """Check one reward-function call's lengths and return its baseline column (``None`` without one)."""
    check_same_length(prompts=prompts, completions=completions)
    if baseline_column is None:
        return None
    if baseline_column not in columns:
        raise ValueError(f"baseline_column {baseline_column!r} is not among the dataset columns passed by the "
                         f"trainer: {sorted(k for k in columns if not callable(columns[k]))}")
    baselines = columns[baseline_column]
    check_same_length(prompts=prompts, **{baseline_column: baselines})
    return baselines


def log_call_metrics(log_metric: Callable[[str, float], None], prefix: str, delta: dict[str, float],
                     seconds: float, unscored_rate: float) -> None:
    """Report one reward-function call's metrics under ``<prefix>/``: wall time, share of samples left unscored,
    and, from the model's counters for the call (``delta``, as :class:`~rlhf_rewards.stats.RewardStats` names
    them), the share of model inputs truncated, of computed tokens that were padding, of pairwise comparisons
    whose two orders disagreed, and the control-token strings found inside messages (``control_text``)."""
    log_metric(f"{prefix}/seconds", seconds)
    log_metric(f"{prefix}/unscored_rate", unscored_rate)
    if delta.get("samples"):
        log_metric(f"{prefix}/truncation_rate", delta["truncated"] / delta["samples"])
    if delta.get("computed_tokens"):
        log_metric(f"{prefix}/padding_share", 1 - delta["real_tokens"] / delta["computed_tokens"])
    if delta.get("comparisons"):
        log_metric(f"{prefix}/order_disagreement_rate", delta["order_disagreements"] / delta["comparisons"])
    if "control_text" in delta:  # a policy learning to write control tokens shows here first
        log_metric(f"{prefix}/control_text", delta["control_text"])

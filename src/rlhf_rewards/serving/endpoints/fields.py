"""What request models share: the base that lists a body's per-sample fields (what the limits count), strict
bodies, equal lengths, and the field types of prompts, completions and transforms.

Message lists are checked here only for being lists of objects; roles, content and turn order are checked by
:mod:`rlhf_rewards.conversation`, with the same messages in-process scoring gives.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr

Messages = list[dict[StrictStr, Any]]
Text = Union[StrictStr, Messages]
TransformName = Literal["logodds", "centered", "probability"]
Completion = Union[StrictStr, list[StrictStr], Messages]
"""A completion: text, TRL's ``[{"role": "assistant", ...}]``, or (process reward models) a list of step strings."""
AggregateName = Optional[Literal["min", "last", "mean", "product"]]
"""How a process reward model's step rewards become one reward per completion (``None``: the model's own)."""
NormalizeName = Optional[Literal["stats", "group"]]
"""Reward normalisation (``None``: raw rewards; see :mod:`rlhf_rewards.normalization`)."""
Objectives = Optional[dict[StrictStr, Union[StrictInt, StrictFloat]]]
"""Objective name -> weight: the reward is the weighted sum of a multi-objective model's objectives (names and
weights are checked by the model: a 422 naming the known objectives)."""


class RequestBody(BaseModel):
    """A request body whose list fields hold one entry per sample."""

    def columns(self) -> dict[str, list[Any]]:
        """The per-sample fields by name (``prompts``, ``completions``, ``query``, ``input``, ...), each a list with
        one entry per sample: what :mod:`rlhf_rewards.serving.limits` counts."""
        return {name: value for name in type(self).model_fields if isinstance(value := getattr(self, name), list)}


class StrictBody(RequestBody):
    """A body of our own ``/v1/*`` contracts: an unknown field is a 422, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


def same_length(body: BaseModel, first: str, *others: str) -> None:
    """Raise ``ValueError`` (a 422) when a given field among ``others`` is not as long as ``first``."""
    n = len(getattr(body, first))
    for name in others:
        value = getattr(body, name)
        if value is not None and len(value) != n:
            raise ValueError(f"length mismatch: len({first})={n}, len({name})={len(value)}")

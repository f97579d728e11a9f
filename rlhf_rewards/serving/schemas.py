"""Request bodies of every endpoint (pydantic), so a wrong shape or type is a 422 naming the field and index.

Message lists are checked here only for being lists of objects; roles, content and turn order are checked by
:mod:`rlhf_rewards.conversation`, with the same messages in-process scoring gives.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

Messages = list[dict[StrictStr, Any]]
Text = Union[StrictStr, Messages]
TransformName = Literal["logodds", "centered", "probability"]
Objectives = Optional[dict[StrictStr, Union[StrictInt, StrictFloat]]]
"""Objective name -> weight: the reward is the weighted sum of a multi-objective model's objectives (names and
weights are checked by the model, a 422 naming the known objectives)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _same_length(body: BaseModel, first: str, *others: str) -> None:
    n = len(getattr(body, first))
    for name in others:
        value = getattr(body, name)
        if value is not None and len(value) != n:
            raise ValueError(f"length mismatch: len({first})={n}, len({name})={len(value)}")


class ScoreRequest(_Strict):
    """``POST /v1/score``: ``rm.score(prompts, completions, baselines=...)``."""

    prompts: list[Text]
    completions: list[Text]
    baselines: Optional[list[Text]] = None
    transform: TransformName = "logodds"
    objectives: Objectives = None

    @model_validator(mode="after")
    def _lengths(self) -> ScoreRequest:
        _same_length(self, "prompts", "completions", "baselines")
        return self


class CompareRequest(_Strict):
    """``POST /v1/compare``: ``P(completions_a[i] better than completions_b[i])``."""

    prompts: list[Text]
    completions_a: list[Text]
    completions_b: list[Text]

    @model_validator(mode="after")
    def _lengths(self) -> CompareRequest:
        _same_length(self, "prompts", "completions_a", "completions_b")
        return self


class RewardsRequest(_Strict):
    """``POST /v1/rewards``: a :class:`~rlhf_rewards.RewardFunction` call (its options, one batch).

    Each sample's values may be any JSON: as in-process, a sample that is not a prompt and completion (``null``, a
    number, an object) is one ``null`` reward with its reason in ``errors``, and the others are scored. Only the
    request's shape (lists of equal length, the options) is a 422."""

    prompts: list[Any]
    completions: list[Any]
    baselines: Optional[list[Any]] = None
    pairing: Optional[Literal["group", "halves"]] = None
    group_size: Optional[StrictInt] = Field(default=None, ge=1)
    group_mode: Literal["round-robin", "anchor"] = "round-robin"
    transform: TransformName = "logodds"
    parse_templates: StrictBool = True
    objectives: Objectives = None

    @model_validator(mode="after")
    def _lengths(self) -> RewardsRequest:
        _same_length(self, "prompts", "completions", "baselines")
        return self


class GetRewardRequest(BaseModel):
    """OpenRLHF's ``POST /get_reward``: ``query[i]`` is the policy's prompt+response decoded with special tokens;
    ``labels[i]``, when a string, is the reference a pairwise model compares against. ``prompts`` (the prompt as
    the policy saw it) locates the response in an untemplated query. Other fields are ignored, as OpenRLHF's own
    server ignores them."""

    model_config = ConfigDict(extra="ignore")

    query: list[StrictStr]
    prompts: Optional[list[Any]] = None
    labels: Optional[list[Any]] = None

    @model_validator(mode="after")
    def _lengths(self) -> GetRewardRequest:
        _same_length(self, "query", "prompts", "labels")
        return self


class ClassifyRequest(BaseModel):
    """vLLM's ``POST /classify`` as verl's reward loop sends it: ``input`` rendered with a chat template, the last
    turn the response. ``activation`` / ``use_activation`` (vLLM's two spellings, default on) apply the sigmoid of
    a one-label classifier to the reward. ``labels`` (not part of vLLM's contract) gives a pairwise model its
    reference response(s). Other vLLM fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[StrictStr] = None
    input: Union[StrictStr, list[StrictStr]]
    activation: Optional[StrictBool] = None
    use_activation: Optional[StrictBool] = None
    labels: Optional[Union[StrictStr, list[Any]]] = None

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def references(self) -> Optional[list[Any]]:
        if self.labels is None or not isinstance(self.labels, str):
            return self.labels
        return [self.labels]

    @model_validator(mode="after")
    def _lengths(self) -> ClassifyRequest:
        refs = self.references()
        if refs is not None and len(refs) != len(self.inputs()):
            raise ValueError(f"length mismatch: {len(self.inputs())} inputs, {len(refs)} labels")
        return self

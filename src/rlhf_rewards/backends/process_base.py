"""Process reward models: a reward in [0, 1] for every step of a completion, and one reward per completion made of
them by an aggregate (``"min"`` by default).

A PRM family implements two methods and inherits everything else (input checks, step splitting, control text,
per-sample errors, aggregation, the per-sample protocol):

- ``_render_steps(messages, steps) -> str``: the model's input text for a prompt's messages and a completion's
  steps (both already guarded for control text), the family's step markers inserted as its card inserts them;
- ``_forward_steps(texts) -> list[list[float] | SampleError]``: per rendered text, its step rewards in step order
  (one per marker), or the error why it has none (e.g. too long). The base checks that there is one reward per step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch

from ..batching import run_batched
from ..conversation import CompletionInput, Message, PromptInput, Sample, check_same_length, is_step_list, \
    normalize_steps
from ..errors import NonFiniteRewardError, SampleError, TooLongError, nonfinite, raise_first
from ..policy_text import completion_text
from ..reward_options import DEFAULT_AGGREGATE, Aggregate, aggregate_steps, check_aggregate
from .base import RewardModel, _decoded, _located

StepRewards = Union[list[float], SampleError]
"""One sample's step rewards (each in [0, 1], in step order), or why it has none."""

MarkedInput = tuple[list[int], list[int]]
"""A tokenized input: ``(ids, positions where its step rewards are read, in step order)``."""


def picked(hidden: torch.Tensor, places: Sequence[tuple[int, Sequence[int]]]) -> Optional[torch.Tensor]:
    """``hidden``'s vectors at ``places[k] = (row, columns)``, one per column, item by item in order; ``None`` when
    there are none."""
    rows = [r for r, cols in places for _ in cols]
    cols = [c for _, at in places for c in at]
    if not cols:
        return None
    return hidden[torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)]


def per_sample(values: Sequence[float], places: Sequence[tuple[Any, Sequence[int]]]) -> list[list[float]]:
    """``values`` (one per read position, ordered as :func:`picked` orders them) cut into each item's list."""
    out, start = [], 0
    for _, at in places:
        out.append(list(values[start:start + len(at)]))
        start += len(at)
    return out


class ProcessRewardModel(RewardModel):
    """A process reward model (``kind == "process"``); build it with :func:`rlhf_rewards.load_reward_model`.

    A completion is a string, split into steps at ``step_separator`` (Python's ``str.split``: empty steps stay, as
    the cards split), or an explicit list of step strings (one sample's ``[step, step, ...]``), used as it is.

    Attributes:
        step_separator: where a completion string is split into steps (load option; default: the preset's, the
            card's recommendation).
        aggregate: how :meth:`score`, :meth:`run` and reward functions make one reward of a completion's step
            rewards: ``"min"`` (default: a solution is as sound as its weakest step, and one wrong step makes it
            wrong however good the others; the mean lets many easy steps hide a bad one), ``"last"`` (the final
            step's reward, given in view of every earlier step), ``"mean"`` or ``"product"``.
    """

    kind = "process"

    def __init__(self, *, step_separator: Optional[str] = None, aggregate: Aggregate = DEFAULT_AGGREGATE,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.step_separator = step_separator if step_separator is not None else self.preset.extra["step_separator"]
        self.aggregate = aggregate

    @property
    def aggregate(self) -> Aggregate:
        return self._aggregate

    @aggregate.setter
    def aggregate(self, how: Aggregate) -> None:
        self._aggregate = check_aggregate(how)

    @property
    def step_separator(self) -> str:
        return self._step_separator

    @step_separator.setter
    def step_separator(self, separator: str) -> None:
        if not isinstance(separator, str) or not separator:
            raise ValueError(f"step_separator must be a non-empty string, got {separator!r}")
        self._step_separator = separator

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", aggregate={self.aggregate!r}, step_separator={self.step_separator!r})"

    def with_aggregate(self, how: Aggregate) -> ProcessRewardModel:
        """A copy of the model whose completion reward is the ``how`` aggregate of its step rewards; it shares the
        weights, tokenizer, lock and ``stats`` with this model. Raises ``ValueError`` for an unknown aggregate."""
        view = copy.copy(self)
        view.lock, view.stats = self.lock, self.stats  # one model: calls through either take turns and count once
        view.aggregate = how
        return view

    # -- the family's part ----------------------------------------------------------------------------------------
    def _render_steps(self, messages: list[Message], steps: list[str]) -> str:
        """The model's input text for ``messages`` and ``steps``, step markers inserted (``ValueError`` if the
        conversation does not fit the model's format)."""
        raise NotImplementedError

    def _forward_steps(self, texts: Sequence[str]) -> list[StepRewards]:
        """Per rendered text its step rewards in order (one per step marker), or its error."""
        raise NotImplementedError

    def _rewards_at(self, texts: Sequence[str], positions: Callable[[list[int]], list[int]],
                    forward: Callable[[list], list[list[float]]], *, packed: bool = False) -> list[StepRewards]:
        """Per rendered text, tokenized as the preset says (control text guarded), the rewards ``forward`` gives at
        its read ``positions(ids)``, run in token-budgeted batches of :data:`MarkedInput` (``packed``: rows of
        them); a text longer than ``max_length`` is refused, never cut."""
        results: list[Any] = [None] * len(texts)
        batch: list[MarkedInput] = []
        places = []
        for k, ids in enumerate(self._token_ids(texts, self.preset.add_special_tokens)):
            if self.max_length is not None and len(ids) > self.max_length:
                # cutting would drop step markers: the rewards would no longer be the steps'
                results[k] = TooLongError(k, f"{len(ids)} tokens, more than max_length={self.max_length}; a process "
                                             "reward model's input is never cut (its steps would lose their "
                                             "markers)", "completion")
                continue
            batch.append((ids, positions(ids)))
            places.append(k)
        if batch:
            outs = run_batched(batch, [len(ids) for ids, _ in batch], forward, stats=self.stats,
                               max_batch_tokens=self.max_batch_tokens, packed=packed)
            for k, out in zip(places, outs):
                results[k] = out
        self.stats.samples += len(texts)
        return results

    # -- the per-sample protocol ----------------------------------------------------------------------------------
    def _steps(self, completion: object, fmt: str, where: str) -> tuple[str, ...]:
        if is_step_list(completion):
            return normalize_steps(completion, where)  # type: ignore[arg-type]
        return tuple(completion_text(completion, fmt, where).split(self.step_separator))

    def prepare(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput],
                others: Optional[Sequence[CompletionInput]] = None, *,
                names: tuple[str, str] = ("completions", "baselines"),
                parse_templates: Optional[bool] = None) -> list[Union[Sample, SampleError]]:
        """Per sample a :class:`~rlhf_rewards.conversation.Sample` whose ``completion`` is the tuple of its steps,
        or the :class:`SampleError` naming ``prompts[i]`` or ``{names[0]}[i]`` (``{names[0]}[i][j]`` for a bad
        step). A process model scores each completion on its own: ``others`` raises ``ValueError``."""
        if others is not None:
            raise ValueError(f"{self.preset.name} is a process reward model: it scores each completion's steps on "
                             f"their own, without {names[1]}")
        n = check_same_length(prompts=prompts, **{names[0]: completions})
        parse = self.parse_templates if parse_templates is None else parse_templates
        out: list[Union[Sample, SampleError]] = []
        for i in range(n):
            try:
                messages, fmt = self._prompt(prompts[i], f"prompts[{i}]", parse)
                out.append(Sample(messages, self._steps(completions[i], fmt, f"{names[0]}[{i}]")))
            except ValueError as err:
                out.append(SampleError(i, str(err)))
        return out

    def forward_chars(self, items: Sequence[Any]) -> list[int]:
        return [len(text) for text in items]

    def _forward_items(self, items: list[Any]) -> list[Any]:
        return self._forward_steps(items)

    def run_steps(self, samples: Sequence[Union[Sample, SampleError, None]]) -> list[Union[list[float], SampleError,
                                                                                          None]]:
        """Per prepared sample its step rewards (each in [0, 1], one per step, in order), the
        :class:`SampleError` why it has none, or ``None`` for anything but a :class:`Sample`. Call it inside
        :meth:`session`."""
        results: list[Union[list[float], SampleError, None]] = [None] * len(samples)
        texts: dict[int, str] = {}
        for i, sample in enumerate(samples):
            if not isinstance(sample, Sample):
                continue
            messages, steps = self._guard(sample.messages, self._sample_steps(sample))
            try:
                texts[i] = self._render_steps(messages, steps)  # type: ignore[arg-type]
            except ValueError as err:
                results[i] = SampleError(i, f"{self.preset.name} cannot render this conversation: {err}")
        done = list(texts)
        outputs = self.forward([texts[i] for i in done]) if done else []
        for i, out in zip(done, outputs):
            results[i] = self._checked(i, out, len(self._sample_steps(samples[i])))  # type: ignore[arg-type]
        return results

    def _sample_steps(self, sample: Sample) -> list[str]:
        """A sample's steps: :meth:`prepare` gives them as a tuple; text from callers that build samples of any
        model (Bradley-Terry comparisons in :mod:`rlhf_rewards.pairwise`) is split as :meth:`prepare` splits it."""
        if isinstance(sample.completion, str):
            return sample.completion.split(self.step_separator)
        return list(sample.completion)

    def _checked(self, i: int, out: StepRewards, steps: int) -> StepRewards:
        if isinstance(out, SampleError):
            return type(out)(i, str(out), out.about)
        if len(out) != steps:
            # a step marker inside a step's own text (control_text="tokens"), or one cut away: the rewards would
            # belong to other steps than the caller's
            return SampleError(i, f"the model input holds {len(out)} step markers for {steps} steps (a step's own "
                                  "text spells the step marker and control_text='tokens' made it one); no reward "
                                  "is given rather than rewards of the wrong steps", "completion")
        bad = next((nonfinite(r) for r in out if nonfinite(r)), None)
        if bad is not None:
            self.stats.nonfinite += 1
            return NonFiniteRewardError(i, f"{self.preset.name} returned {bad} for a step")
        return list(out)

    def run(self, samples: Sequence[Union[Sample, SampleError, None]]) -> list[Union[float, SampleError, None]]:
        """Per prepared sample the :attr:`aggregate` of its step rewards (see :meth:`run_steps`)."""
        return [aggregate_steps(r, self.aggregate) if isinstance(r, list) else r for r in self.run_steps(samples)]

    # -- public scoring ---------------------------------------------------------------------------------------------
    def score_steps_samples(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput]
                            ) -> list[StepRewards]:
        """Per sample its list of step rewards (each in [0, 1]: the model's probability that the step is correct),
        or the :class:`SampleError` saying why it has none, located (``prompts[i]``, ``completions[i]``). Only
        arguments wrong as a whole raise."""
        with self.session("score_steps"):
            prepared = self.prepare(prompts, completions)
            return _located(prepared, self.run_steps(prepared), lambda i, r: f"{r.about}s[{i}]")

    def score_steps(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput]
                    ) -> list[list[float]]:
        """Per sample its step rewards (see :meth:`score_steps_samples`); raises the first sample's error."""
        return raise_first(self.score_steps_samples(prompts, completions))

    def score_samples(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput], *,
                      baselines: Optional[Sequence[CompletionInput]] = None, aggregate: Optional[Aggregate] = None
                      ) -> list[Union[float, SampleError]]:
        """Per sample one reward in [0, 1], the ``aggregate`` (default: the model's :attr:`aggregate`) of its step
        rewards, or its :class:`SampleError`."""
        how = self.aggregate if aggregate is None else check_aggregate(aggregate)
        if baselines is not None:
            raise ValueError(f"{self.preset.name} is a process reward model: it takes no baselines")
        return [aggregate_steps(r, how) if isinstance(r, list) else r
                for r in self.score_steps_samples(prompts, completions)]

    def score(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput], *,
              baselines: Optional[Sequence[CompletionInput]] = None, aggregate: Optional[Aggregate] = None
              ) -> list[float]:
        """One reward per completion in [0, 1]: the ``aggregate`` of its step rewards (see :attr:`aggregate`);
        raises ``ValueError`` naming the first sample that cannot be scored."""
        return raise_first(self.score_samples(prompts, completions, baselines=baselines, aggregate=aggregate))

    def format(self, prompt: PromptInput, completion: CompletionInput, *, tokens: bool = False) -> str:
        """The text the model reads for one prompt and completion (its steps marked); ``tokens=True``: its token
        ids decoded with every special token shown (for debugging)."""
        (sample,) = self.prepare([prompt], [completion])
        if isinstance(sample, SampleError):
            raise sample
        messages, steps = self._guard(sample.messages, list(sample.completion), count=False)
        text = self._render_steps(messages, steps)  # type: ignore[arg-type]
        if tokens:
            return _decoded(self.tokenizer, self._token_ids([text], self.preset.add_special_tokens)[0])
        return self.shown(text)

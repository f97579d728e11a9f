"""Pairwise reward models: the probability that one completion is better than another, both orders combined."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional, Union

from ..conversation import CompletionInput, Message, PromptInput, Sample
from ..errors import NonFiniteRewardError, SampleError, nonfinite, raise_first
from ..policy_text import completion_text
from ..transforms import apply_transform, check_transform
from .base import RewardModel, _decoded, _located

logger = logging.getLogger(__name__)


class PairwiseRewardModel(RewardModel):
    """A model that compares two completions of the same prompt. Subclasses implement
    :meth:`_compare_both_orders`; everything built on preferences (baselines, groups, ranking) lives in
    :mod:`rlhf_rewards.pairwise`."""

    kind = "pairwise"

    def format(self, prompt: PromptInput, completion_a: CompletionInput, completion_b: CompletionInput, *,
               tokens: bool = False) -> list[str]:
        """The texts the model reads to compare ``completion_a`` with ``completion_b``, one per order (A first),
        for debugging: as the card renders them before tokenization, or with ``tokens=True`` the token ids the
        model runs (:meth:`encode`, truncated as in scoring) decoded with every special token shown."""
        if tokens:
            return [_decoded(self.tokenizer, ids) for ids in self.encode(prompt, completion_a, completion_b)]
        return self._render_pair(*self._one(prompt, completion_a, completion_b, count=False))

    def _render_pair(self, messages: list[Message], a: str, b: str) -> list[str]:
        """:meth:`format`'s texts for validated inputs (control text escaped: show it with :meth:`shown`)."""
        raise NotImplementedError

    def encode(self, prompt: PromptInput, completion_a: CompletionInput, completion_b: CompletionInput
               ) -> list[list[int]]:
        """The token ids the model runs to compare ``completion_a`` with ``completion_b``, one row per order (A
        first), truncated as in scoring, with every special token (decode them to see what the model reads)."""
        raise NotImplementedError

    def _one(self, prompt: PromptInput, completion_a: CompletionInput, completion_b: CompletionInput, *,
             count: bool) -> tuple[list[Message], str, str]:
        """One comparison's inputs as :meth:`format` takes them, validated (templated prompts parsed), control text
        escaped (counted when ``count``)."""
        messages, fmt = self._prompt(prompt, "prompt")
        messages, (a, b) = self._guard(messages, [completion_text(completion_a, fmt, "completion_a"),
                                                  completion_text(completion_b, fmt, "completion_b")], count=count)
        return messages, a, b

    def _compare_both_orders(self, items: list[tuple[list[Message], str, str]]
                             ) -> list[Union[tuple[float, float, float], SampleError]]:
        """For each ``(messages, a, b)``: ``(p_ab, p_ba, p)``, each a probability that ``a`` is better: from the
        order (a, b), from the swapped order (b, a), and the model's combination of the two; or a
        :class:`SampleError` (its ``index`` the item's position) when that comparison cannot be made. Messages
        name no location: the caller adds it."""
        raise NotImplementedError

    def _forward_items(self, items: list[Any]) -> list[Any]:
        return self._compare_both_orders(items)

    def forward_chars(self, items: Sequence[Any]) -> list[int]:
        # both orders read the conversation and both responses
        return [2 * (sum(len(m["content"]) for m in messages) + len(a) + len(b)) for messages, a, b in items]

    def compare(self, prompts: Sequence[PromptInput], completions_a: Sequence[CompletionInput],
                completions_b: Sequence[CompletionInput]) -> list[float]:
        """``P(completions_a[i] is better than completions_b[i])`` for ``prompts[i]``, in [0, 1], both orders
        combined to cancel position bias. 0.5 exactly is a tie. Order disagreements and ties go to ``stats``.
        Raises ``ValueError`` naming the first comparison that cannot be made (see :meth:`compare_samples`)."""
        return raise_first(self.compare_samples(prompts, completions_a, completions_b))

    def compare_samples(self, prompts: Sequence[PromptInput], completions_a: Sequence[CompletionInput],
                        completions_b: Sequence[CompletionInput], *,
                        names: tuple[str, str] = ("completions_a", "completions_b")
                        ) -> list[Union[float, SampleError]]:
        """:meth:`compare` that never fails the call for one comparison: each place holds ``P`` or the
        :class:`~rlhf_rewards.conversation.SampleError` saying why there is none (bad input, a conversation the
        format cannot hold, two responses too long for ``max_length``, a NaN or infinite model output:
        :class:`~rlhf_rewards.errors.NonFiniteRewardError`). ``names`` are the two completion arguments' names in
        error messages."""
        with self.session("compare"):
            prepared = self.prepare(prompts, completions_a, completions_b, names=names)
            return _located(prepared, self.run(prepared),
                            lambda i, r: f"{names[0]}[{i}] and {names[1]}[{i}]" if r.about == "pair"
                            else f"prompts[{i}]")

    def run(self, samples: Sequence[Union[Sample, SampleError, None]]) -> list[Union[float, SampleError, None]]:
        items = [s if isinstance(s, Sample) else None for s in samples]
        results: list[Union[float, SampleError, None]] = [None] * len(items)
        guarded: list[Optional[tuple[list[Message], str, str]]] = []
        for item in items:
            if item is None:
                guarded.append(None)
                continue
            messages, (a, b) = self._guard(item[0], item[1:])
            guarded.append((messages, a, b))
        items = guarded
        # identical strings are a tie by definition; GRPO groups often hold duplicates
        todo = [k for k, item in enumerate(items) if item is not None and item[1] != item[2]]
        triples: dict[int, tuple[float, float, float]] = {k: (0.5, 0.5, 0.5) for k, item in enumerate(items)
                                                          if item is not None and item[1] == item[2]}
        if todo:
            for k, r in zip(todo, self.forward([items[k] for k in todo])):
                if isinstance(r, SampleError):
                    results[k] = type(r)(k, str(r), r.about)
                    self.stats.nonfinite += isinstance(r, NonFiniteRewardError)
                elif any(nonfinite(p) for p in r):
                    what = next(nonfinite(p) for p in r if nonfinite(p))
                    results[k] = NonFiniteRewardError(
                        k, f"{self.preset.name} returned {what} as a probability for this comparison", "pair")
                    self.stats.nonfinite += 1
                else:
                    triples[k] = r
        self.stats.comparisons += len(triples)
        self.stats.order_disagreements += sum((p1 > 0.5) != (p2 > 0.5) for p1, p2, _ in triples.values())
        self.stats.ties += sum(p == 0.5 for _, _, p in triples.values())
        for k, (_, _, p) in triples.items():
            results[k] = p
        return results

    def score(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput], *,
              baselines: Optional[Sequence[CompletionInput]] = None, transform: str = "logodds") -> list[float]:
        """Scalar reward of each completion against its baseline: ``transform(P(completion better than
        baseline))``; see :mod:`rlhf_rewards.pairwise` for the transforms. ``baselines`` is required."""
        return raise_first(self.score_samples(prompts, completions, baselines=baselines, transform=transform))

    def score_samples(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput], *,
                      baselines: Optional[Sequence[CompletionInput]] = None, transform: str = "logodds"
                      ) -> list[Union[float, SampleError]]:
        """:meth:`score` with per-sample errors in place of rewards (see :meth:`compare_samples`)."""
        if baselines is None:
            raise ValueError("a pairwise model scores a completion against a baseline: pass baselines=[...] "
                             "(one reference completion per prompt), or use rlhf_rewards.pairwise.group_rewards")
        check_transform(transform)
        results = self.compare_samples(prompts, completions, baselines, names=("completions", "baselines"))
        probs = [r for r in results if not isinstance(r, SampleError)]
        values = iter(apply_transform(probs, transform))
        return [r if isinstance(r, SampleError) else next(values) for r in results]

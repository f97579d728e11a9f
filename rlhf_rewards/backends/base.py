"""What every reward model shares: rendering, tokenization with counted truncation, batching, device, stats.

Subclasses supply the forward pass. :class:`ScalarRewardModel`-style backends implement ``_score_texts``;
:class:`PairwiseRewardModel` backends implement ``_compare_both_orders``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Literal, Optional

import torch

from ..batching import default_max_batch_tokens
from ..conversation import (CompletionInput, Message, PromptInput, check_same_length, normalize_completion,
                            normalize_pairs, normalize_prompt)
from ..presets import Preset
from ..rendering import get_renderer
from ..stats import RewardStats


def _special_affixes(tokenizer, add_special_tokens: bool) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after the text when ``add_special_tokens`` is on,
    so truncation can keep them where transformers' own truncation keeps them."""
    if not add_special_tokens:
        return 0, 0
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return start, len(full) - start - len(bare)
    return 0, 0


class RewardModel:
    """Base class of loaded reward models (see :func:`rlhf_rewards.load_reward_model`).

    Attributes:
        kind: ``"scalar"`` or ``"pairwise"``.
        preset: the :class:`~rlhf_rewards.presets.Preset` describing the model.
        tokenizer: the reward model's own tokenizer (never the policy's).
        device: where the model's weights live; inputs are moved there and rewards come back as Python floats.
        max_length: the per-input token limit; longer inputs are truncated on ``preset.truncation_side`` and counted.
        max_batch_tokens: the token budget of one forward pass (batch size x padded length, or rows x row width when
            packed); the default depends on the device (see :func:`rlhf_rewards.batching.default_max_batch_tokens`).
        packing: whether samples are packed into rows without padding; ``packing_reason`` says why (both in the repr).
        stats: a :class:`~rlhf_rewards.stats.RewardStats` of what was computed, truncated and split.
    """

    kind: ClassVar[Literal["scalar", "pairwise"]]
    packing: bool = False
    packing_reason: str = "this backend pads its batches"

    def __init__(self, *, preset: Preset, tokenizer: Any, device: torch.device, max_length: Optional[int],
                 max_batch_tokens: Optional[int]):
        self.preset = preset
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_length = max_length
        self.max_batch_tokens = max_batch_tokens or default_max_batch_tokens(self.device)
        self.stats = RewardStats()
        self._prefix, self._suffix = _special_affixes(tokenizer, preset.add_special_tokens)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(preset={self.preset.name!r}, device={str(self.device)!r}, "
                f"max_batch_tokens={self.max_batch_tokens}, packing={self.packing!r} ({self.packing_reason}))")

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of ``texts`` as the card tokenizes them, truncated to ``max_length`` (counted in ``stats``)."""
        if not texts:
            return []
        encoded = self.tokenizer(list(texts), add_special_tokens=self.preset.add_special_tokens)["input_ids"]
        return [self.truncate(ids) for ids in encoded]

    def truncate(self, ids: list[int]) -> list[int]:
        """Cut ``ids`` to ``max_length`` on the preset's side, keeping the tokenizer's own special tokens (BOS/EOS)
        in place as transformers' truncation does; count the cut in ``stats``."""
        if self.max_length is None or len(ids) <= self.max_length:
            return list(ids)
        body_end = len(ids) - self._suffix
        keep = self.max_length - self._prefix - self._suffix
        if keep <= 0:
            raise ValueError(f"max_length={self.max_length} leaves no room beside the tokenizer's special tokens")
        body = ids[self._prefix:body_end]
        body = body[-keep:] if self.preset.truncation_side == "left" else body[:keep]
        self.stats.truncated += 1
        self.stats.truncated_tokens += len(ids) - self.max_length
        return ids[: self._prefix] + body + ids[body_end:]

    @contextmanager
    def _timed(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats.seconds += time.perf_counter() - start

    def score(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput], *,
              baselines: Optional[Sequence[CompletionInput]] = None) -> list[float]:
        raise NotImplementedError


class ScalarModelBase(RewardModel):
    """A model giving one reward per (prompt, completion). Subclasses implement :meth:`score_texts`."""

    kind = "scalar"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._render = get_renderer(self.preset.text_format)

    def _render_at(self, messages: list[Message], completion: str, where: str) -> str:
        try:
            return self._render(messages, completion, self.tokenizer)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    def format(self, prompt: PromptInput, completion: CompletionInput) -> str:
        """The exact text the model reads for one prompt and completion, before tokenization (for debugging)."""
        return self._render_at(normalize_prompt(prompt, "prompt"), normalize_completion(completion, "completion"),
                               "prompt")


    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """Rewards of already-rendered texts (as :meth:`format` returns them), in input order."""
        raise NotImplementedError

    def score(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput], *,
              baselines: Optional[Sequence[CompletionInput]] = None) -> list[float]:
        """One reward per completion, in input order.

        ``score[i]`` is the model's scalar for ``completions[i]`` answering ``prompts[i]`` (higher is better; the
        scale is the model's own logit scale). With ``baselines``, ``score[i] = r(completions[i]) - r(baselines[i])``;
        each distinct (prompt, baseline) pair is scored once.
        """
        with self._timed():
            pairs = normalize_pairs(prompts, completions)
            texts = [self._render_at(m, c, f"prompts[{i}]") for i, (m, c) in enumerate(pairs)]
            if baselines is None:
                return self.score_texts(texts)
            base_pairs = normalize_pairs(prompts, baselines, "baselines")
            base_texts = [self._render_at(m, c, f"prompts[{i}]") for i, (m, c) in enumerate(base_pairs)]
            unique = list(dict.fromkeys(base_texts))
            rewards = self.score_texts(texts + unique)
            base_reward = dict(zip(unique, rewards[len(texts):]))
            return [r - base_reward[t] for r, t in zip(rewards[: len(texts)], base_texts)]


class PairwiseRewardModel(RewardModel):
    """A model that compares two completions of the same prompt. Subclasses implement
    :meth:`_compare_both_orders`; everything built on preferences (baselines, groups, ranking) lives in
    :mod:`rlhf_rewards.pairwise`."""

    kind = "pairwise"

    def format(self, prompt: PromptInput, completion_a: CompletionInput, completion_b: CompletionInput
               ) -> list[str]:
        """The exact texts the model reads to compare ``completion_a`` with ``completion_b`` (one per order, A
        first), before tokenization (for debugging)."""
        raise NotImplementedError

    def _compare_both_orders(self, items: list[tuple[list[Message], str, str]]
                             ) -> list[tuple[float, float, float]]:
        """For each ``(messages, a, b)``: ``(p_ab, p_ba, p)``, each a probability that ``a`` is better: from the
        order (a, b), from the swapped order (b, a), and the model's combination of the two."""
        raise NotImplementedError

    def compare(self, prompts: Sequence[PromptInput], completions_a: Sequence[CompletionInput],
                completions_b: Sequence[CompletionInput]) -> list[float]:
        """``P(completions_a[i] is better than completions_b[i])`` for ``prompts[i]``, in [0, 1], both orders
        combined to cancel position bias. 0.5 exactly is a tie. Order disagreements and ties go to ``stats``."""
        with self._timed():
            check_same_length(prompts=prompts, completions_a=completions_a, completions_b=completions_b)
            a = normalize_pairs(prompts, completions_a, "completions_a")
            b = normalize_pairs(prompts, completions_b, "completions_b")
            items = [(m, ca, cb) for (m, ca), (_, cb) in zip(a, b)]
            # identical strings are a tie by definition; GRPO groups often hold duplicates
            todo = [k for k, (_, ca, cb) in enumerate(items) if ca != cb]
            results = [(0.5, 0.5, 0.5)] * len(items)
            if todo:
                for k, r in zip(todo, self._compare_both_orders([items[k] for k in todo])):
                    results[k] = r
            self.stats.comparisons += len(results)
            self.stats.order_disagreements += sum((p1 > 0.5) != (p2 > 0.5) for p1, p2, _ in results)
            self.stats.ties += sum(p == 0.5 for _, _, p in results)
            for i, (_, _, p) in enumerate(results):
                if p != p:
                    raise ValueError(f"the model returned NaN for the comparison at index {i}")
            return [p for _, _, p in results]

    def score(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput], *,
              baselines: Optional[Sequence[CompletionInput]] = None, transform: str = "logodds") -> list[float]:
        """Scalar reward of each completion against its baseline: ``transform(P(completion better than
        baseline))``; see :mod:`rlhf_rewards.pairwise` for the transforms. ``baselines`` is required."""
        if baselines is None:
            raise ValueError("a pairwise model scores a completion against a baseline: pass baselines=[...] "
                             "(one reference completion per prompt), or use rlhf_rewards.pairwise.group_rewards")
        from ..pairwise import apply_transform

        return apply_transform(self.compare(prompts, completions, baselines), transform)

"""Scalar reward models: one reward per (prompt, completion), on the model's own scale."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional, Union

from ..conversation import CompletionInput, Message, PromptInput, Sample
from ..errors import NonFiniteRewardError, SampleError, nonfinite, raise_first
from ..policy_text import completion_text
from ..rendering import get_renderer
from .base import RewardModel, _decoded, _located

logger = logging.getLogger(__name__)


class ScalarModelBase(RewardModel):
    """A model giving one reward per (prompt, completion). Subclasses implement :meth:`_forward_texts`."""

    kind = "scalar"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._render = get_renderer(self.preset.text_format)

    def _render_at(self, messages: list[Message], completion: str, where: str) -> str:
        try:
            return self._render(messages, completion, self.tokenizer)
        except ValueError as err:
            raise ValueError(f"{where}{self.preset.name} cannot render this conversation: {err}") from None

    def format(self, prompt: PromptInput, completion: CompletionInput, *, tokens: bool = False) -> str:
        """The text the model reads for one prompt and completion (for debugging).

        Default: the text as the card renders it, before tokenization, control text inside the messages shown as
        typed. Tokenizing it may add special tokens of the tokenizer's own: Ray2333's card renders ``<s>[INST] ...``
        and tokenizes that with another BOS, so the model reads ``<s><s>[INST] ...``. ``tokens=True``: the token ids
        the model runs (:meth:`encode`, truncated as in scoring, control text read as ``control_text`` says) decoded
        with every special token shown, i.e. exactly what the model reads.
        """
        if tokens:
            return _decoded(self.tokenizer, self.encode(prompt, completion))
        return self.shown(self._rendered(prompt, completion, count=False))

    def render(self, prompt: PromptInput, completion: CompletionInput) -> str:
        """The model's input text as scoring passes it to :meth:`score_texts`: :meth:`format`'s text, with control
        text inside the messages escaped (see ``control_text``); identical to it when there is none."""
        return self._rendered(prompt, completion, count=True)

    def _rendered(self, prompt: PromptInput, completion: CompletionInput, *, count: bool) -> str:
        messages, fmt = self._prompt(prompt, "prompt")
        messages, (text,) = self._guard(messages, [completion_text(completion, fmt, "completion")], count=count)
        return self._render_at(messages, text, "prompt: ")

    def encode(self, prompt: PromptInput, completion: CompletionInput) -> list[int]:
        """The token ids the model runs for one prompt and completion: :meth:`render`'s text tokenized and truncated
        as in scoring, with every special token the tokenizer adds (decode them to see what the model reads; a
        truncation and control text count in ``stats`` as in scoring)."""
        with self.session("encode"):
            return self.tokenize([self.render(prompt, completion)])[0]

    def _forward_texts(self, texts: Sequence[str]) -> list[float]:
        """Rewards of already-rendered texts, in input order (NaN where the model gave NaN)."""
        raise NotImplementedError

    def _forward_items(self, items: list[Any]) -> list[Any]:
        return self._forward_texts(items)

    def forward_chars(self, items: Sequence[Any]) -> list[int]:
        return [len(text) for text in items]

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """Rewards of already-rendered texts (as :meth:`render` returns them), in input order. A text rendered
        elsewhere (or :meth:`format`'s) is tokenized as the card does: control strings in it become tokens. Raises
        :class:`~rlhf_rewards.errors.NonFiniteRewardError` naming the first input the model gave NaN or an infinite
        value."""
        rewards = self._forward_texts(texts)
        bad = [(i, nonfinite(r)) for i, r in enumerate(rewards) if nonfinite(r)]
        self.stats.nonfinite += len(bad)
        if bad:
            raise NonFiniteRewardError(bad[0][0], f"{self.preset.name} returned {bad[0][1]} for input {bad[0][0]}")
        return rewards

    def score(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput], *,
              baselines: Optional[Sequence[CompletionInput]] = None) -> list[float]:
        """One reward per completion, in input order.

        ``score[i]`` is the model's scalar for ``completions[i]`` answering ``prompts[i]`` (higher is better; the
        scale is the model's own logit scale). With ``baselines``, ``score[i] = r(completions[i]) - r(baselines[i])``;
        each distinct (prompt, baseline) pair is scored once. Raises ``ValueError`` naming the first sample that
        cannot be scored (see :meth:`score_samples` to get the others' rewards anyway).
        """
        return raise_first(self.score_samples(prompts, completions, baselines=baselines))

    def score_samples(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput], *,
                      baselines: Optional[Sequence[CompletionInput]] = None
                      ) -> list[Union[float, SampleError]]:
        with self.session("score"):
            prepared = self.prepare(prompts, completions, baselines)
            return _located(prepared, self.run(prepared), lambda i, r: f"{r.about}s[{i}]")

    def _render_samples(self, samples: Sequence[Union[Sample, SampleError, None]]
                        ) -> tuple[list[Optional[SampleError]], dict[int, tuple[str, Optional[str]]]]:
        """Per prepared sample its rendering error (``None`` where there is none), and the rendered texts of the
        completion and baseline (``None`` without one) of each renderable :class:`Sample`, by index."""
        errors: list[Optional[SampleError]] = [None] * len(samples)
        texts: dict[int, tuple[str, Optional[str]]] = {}
        for i, sample in enumerate(samples):
            if not isinstance(sample, Sample):
                continue
            messages, (completion, baseline) = self._guard(sample[0], sample[1:])
            try:
                text = self._render_at(messages, completion, "")
                base = None if baseline is None else self._render_at(messages, baseline, "")
            except ValueError as err:
                errors[i] = SampleError(i, str(err))
                continue
            texts[i] = (text, base)
        return errors, texts

    def _reward_of(self, output: Any) -> Union[float, SampleError]:
        """The reward in what :meth:`forward` gave for one text: the output itself, a float; backends whose forward
        gives more (or an error for one text) override this."""
        return output

    def run(self, samples: Sequence[Union[Sample, SampleError, None]]) -> list[Union[float, SampleError, None]]:
        results: list[Union[float, SampleError, None]]
        results, texts = self._render_samples(samples)  # type: ignore[assignment]
        done = list(texts)
        # each distinct baseline once: a group's shared reference is scored once
        bases = list(dict.fromkeys(texts[i][1] for i in done if texts[i][1] is not None))
        outputs = self.forward([texts[i][0] for i in done] + bases) if done else []
        rewards = [self._reward_of(out) for out in outputs]
        self.stats.nonfinite += sum(not isinstance(r, SampleError) and nonfinite(r) is not None for r in rewards)
        base_reward = dict(zip(bases, rewards[len(done):]))
        for i, r in zip(done, rewards):
            base = texts[i][1]
            b = None if base is None else base_reward[base]
            if isinstance(r, SampleError) or isinstance(b, SampleError):
                bad, of = (r, "") if isinstance(r, SampleError) else (b, "this sample's baseline: ")
                results[i] = SampleError(i, f"{of}{bad}", bad.about)
                continue
            what, of = nonfinite(r), "this sample"
            if what is None and b is not None:
                what, of = nonfinite(b), "this sample's baseline"
            if what is not None:
                results[i] = NonFiniteRewardError(i, f"{self.preset.name} returned {what} for {of}")
            else:
                results[i] = r - b if b is not None else r
        return results

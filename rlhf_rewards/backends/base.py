"""What every reward model shares: input checks, rendering, tokenization with counted truncation, batching,
device, stats, and per-sample errors.

Subclasses supply the forward pass. :class:`ScalarModelBase` backends implement ``_forward_texts``;
:class:`PairwiseRewardModel` backends implement ``_compare_both_orders``.

Every public scoring call runs through a per-sample entry point (``score_samples`` / ``compare_samples``) that
returns, in each sample's place, its result or the :class:`~rlhf_rewards.conversation.SampleError` saying why it
has none; ``score`` and ``compare`` raise the first of those errors. One bad sample therefore never stops the others
from being scored where the caller asks for per-sample results (``RewardFunction``, the server), and costs nothing
extra: each input is rendered and tokenized once.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Literal, Optional, TypeVar, Union

import torch

from ..batching import default_max_batch_tokens
from ..control_text import ControlText, ControlTextMode, check_mode, special_affixes
from ..conversation import CompletionInput, Message, PromptInput, Sample, check_same_length
from ..errors import NonFiniteRewardError, SampleError, nonfinite, raise_first
from ..policy_text import completion_text, prompt_messages
from ..presets import Preset
from ..rendering import get_renderer
from ..stats import RewardStats
from ..transforms import apply_transform, check_transform

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _decoded(tokenizer: Any, ids: list[int]) -> str:
    """``ids`` as text with every special token shown and no clean-up of spaces (what the model reads)."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


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
        parse_templates: a text prompt already rendered in a chat template (``<|im_start|>``, ``[INST]``,
            Llama-3 headers, ...; see :mod:`rlhf_rewards.chat_parsing`) is parsed back into its messages before
            the model renders it in its own format, and the policy's end-of-turn markers are stripped from the end
            of completions, as ``RewardFunction`` does (default ``True``). ``False``: a text prompt is one user turn
            as it is, markup included. Parsed prompts are counted in ``stats.templated_prompts``.
        control_text: what a string inside a message (a prompt's content, a completion) that spells one of the
            tokenizer's control tokens (``<|im_end|>``, ``<unk>``, ``[SEP]``, ...) becomes: ``"text"`` (default)
            ordinary text, so a completion cannot forge template turns or markers; ``"tokens"`` the token it spells,
            as the model cards' own code does (for parity checks). Occurrences are counted in
            ``stats.control_text`` in both modes, with one warning per call (see :mod:`rlhf_rewards.control_text`).
            Texts without control strings get the card's token ids in both modes.
        stats: a :class:`~rlhf_rewards.stats.RewardStats` of what was computed, truncated and split.
        lock: the model's own re-entrant lock: callers that may share the model across threads (reward functions,
            the server, the PPO adapter) score under it, so batches do not interleave and each call's share of
            ``stats`` is its own.
    """

    kind: ClassVar[Literal["scalar", "pairwise"]]
    packing: bool = False
    packing_reason: str = "this backend pads its batches"
    control_markers: ClassVar[tuple[str, ...]] = ()
    """Non-special added tokens the backend's input format uses as markers, guarded like special tokens."""
    _control_probe: ClassVar[dict[str, str]] = {}
    """How the load-time control-text check probes this backend's tokenization (see ``ControlText.check``)."""

    def __init__(self, *, preset: Preset, tokenizer: Any, device: torch.device, max_length: Optional[int],
                 max_batch_tokens: Optional[int], parse_templates: bool = True):
        self.preset = preset
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_length = max_length
        self.max_batch_tokens = max_batch_tokens or default_max_batch_tokens(self.device)
        self.parse_templates = parse_templates
        self.stats = RewardStats()
        self._prefix, self._suffix = map(len, special_affixes(tokenizer, preset.add_special_tokens))
        self._control = ControlText(tokenizer, add_special_tokens=preset.add_special_tokens,
                                    markers=self.control_markers)
        self._control_text: ControlTextMode = "text"
        if max_length is not None and max_length <= self._prefix + self._suffix:
            raise ValueError(f"max_length={max_length} leaves no room beside the {self._prefix + self._suffix} "
                             f"special tokens {preset.name}'s tokenizer adds to every input")
        self._depth = 0
        self.lock = threading.RLock()
        self._forward_via: Optional[Callable[[list[Any]], list[Any]]] = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["lock"]  # a lock does not copy or pickle; the copy gets its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(preset={self.preset.name!r}, device={str(self.device)!r}, "
                f"max_batch_tokens={self.max_batch_tokens}, packing={self.packing!r} ({self.packing_reason}))")

    @property
    def control_text(self) -> ControlTextMode:
        """``"text"`` or ``"tokens"`` (see the class docstring); setting ``"text"`` checks the tokenizer first."""
        return self._control_text

    @control_text.setter
    def control_text(self, mode: ControlTextMode) -> None:
        if check_mode(mode) == "text":
            self._control.check(self.preset.name, **self._control_probe)
        self._control_text = mode

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of rendered ``texts`` as the card tokenizes them (control text from messages read as text, see
        ``control_text``), truncated to ``max_length`` (counted in ``stats``)."""
        return [self.truncate(ids) for ids in self._token_ids(texts, self.preset.add_special_tokens)]

    def _token_ids(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        """Untruncated ids of rendered texts (see ``ControlText.token_ids``)."""
        return self._control.token_ids(texts, add_special_tokens, guarded=self._control_text == "text")

    def _guard(self, messages: list[Message], texts: Sequence[Optional[str]], *, count: bool = True
               ) -> tuple[list[Message], list[Optional[str]]]:
        """``messages`` and ``texts`` (completions; ``None`` passes through) escaped for rendering when
        ``control_text == "text"``, unchanged otherwise; the control strings found added to
        ``stats.control_text`` when ``count``."""
        messages, texts, found = self._control.escape_sample(messages, texts, change=self._control_text == "text")
        if count:
            self.stats.control_text += found
        return messages, texts

    def shown(self, text: str) -> str:
        """A rendered text as the model reads it, control text from messages spelled out (for display)."""
        return self._control.restore(text) if self._control_text == "text" else text

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
    def session(self, what: str) -> Iterator[None]:
        """One scoring call: its wall time into ``stats``, and one warning each when its inputs lost tokens to
        truncation, held control text, or gave NaN/infinite outputs (nested calls count once, in the outermost)."""
        self._depth += 1
        start = time.perf_counter()
        before = (self.stats.truncated, self.stats.truncated_tokens, self.stats.samples, self.stats.nonfinite,
                  self.stats.control_text)
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.stats.seconds += time.perf_counter() - start
        if self._depth == 0 and self.stats.nonfinite > before[3]:
            logger.warning("%s.%s: %d model outputs were NaN or infinite, and their samples got no reward (counted "
                           "in rm.stats.nonfinite); a broken checkpoint or a float16 overflow is the usual cause",
                           self.preset.name, what, self.stats.nonfinite - before[3])
        if self._depth == 0 and self.stats.truncated > before[0]:
            logger.warning("%s.%s: %d of %d model inputs were longer than max_length=%s and lost %d tokens in all "
                           "(%s); counted in rm.stats.truncated and truncated_tokens", self.preset.name, what,
                           self.stats.truncated - before[0], self.stats.samples - before[2], self.max_length,
                           self.stats.truncated_tokens - before[1], self._truncation_rule())
        if self._depth == 0 and self.stats.control_text > before[4]:
            became = ("were read as ordinary text, not as the tokens they spell" if self._control_text == "text"
                      else "became the control tokens they spell (control_text='tokens', as the model card does)")
            logger.warning("%s.%s: %d strings inside messages spell a control token of the model's tokenizer and "
                           "%s; counted in rm.stats.control_text", self.preset.name, what,
                           self.stats.control_text - before[4], became)

    def _truncation_rule(self) -> str:
        """How this model cuts an over-long input, for the truncation warning."""
        side = {"left": "start", "right": "end"}[self.preset.truncation_side]
        return f"cut from the {side} of the text, as the model card truncates"

    def _prompt(self, prompt: object, where: str, parse: Optional[bool] = None) -> tuple[list[Message], str]:
        """A caller's prompt as messages and its chat format (see ``parse_templates``); raises ``ValueError``."""
        messages, fmt = prompt_messages(prompt, where, self.parse_templates if parse is None else parse)
        if fmt != "plain":
            self.stats.templated_prompts += 1
        return messages, fmt

    def prepare(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput],
                others: Optional[Sequence[CompletionInput]] = None, *,
                names: tuple[str, str] = ("completions", "baselines"),
                parse_templates: Optional[bool] = None) -> list[Union[Sample, SampleError]]:
        """Per sample its validated :class:`~rlhf_rewards.conversation.Sample` or the
        :class:`~rlhf_rewards.errors.SampleError` saying why there is none, named ``prompts[i]``, ``{names[0]}[i]``
        or ``{names[1]}[i]``. Text prompts rendered in a policy chat template are parsed back into messages (with
        ``parse_templates``) and the policy's end-of-turn markers stripped from the ends of ``completions`` and
        ``others`` (a scalar model's baselines, a pairwise model's second completions); ``parse_templates``
        overrides the model's setting for this call. Only arguments wrong as a whole (not lists, unequal lengths)
        raise."""
        lists = {"prompts": prompts, names[0]: completions}
        if others is not None:
            lists[names[1]] = others
        n = check_same_length(**lists)
        parse = self.parse_templates if parse_templates is None else parse_templates
        out: list[Union[Sample, SampleError]] = []
        for i in range(n):
            try:
                messages, fmt = self._prompt(prompts[i], f"prompts[{i}]", parse)
                other = None if others is None else completion_text(others[i], fmt, f"{names[1]}[{i}]")
                out.append(Sample(messages, completion_text(completions[i], fmt, f"{names[0]}[{i}]"), other))
            except ValueError as err:
                out.append(SampleError(i, str(err)))
        return out

    def run(self, samples: Sequence[Union[Sample, SampleError, None]]) -> list[Union[float, SampleError, None]]:
        """Per prepared sample (anything but a :class:`~rlhf_rewards.conversation.Sample`, such as the error
        :meth:`prepare` gave, is skipped and gets ``None``): a scalar model's reward (minus the
        reward of ``other`` when set), a pairwise model's ``P(completion better than other)``, or the
        :class:`~rlhf_rewards.errors.SampleError` saying why there is none (its message names no location: the
        caller knows the sample's place). Call it inside :meth:`session`."""
        raise NotImplementedError

    def forward(self, items: list[Any]) -> list[Any]:
        """The batched forward entry point :meth:`run` ends in (a scalar model: rendered texts -> rewards; a
        pairwise model: ``(messages, a, b)`` -> ``(p_ab, p_ba, p)`` or an error), in input order. A :meth:`view`
        sends these calls to its ``forward`` instead."""
        if self._forward_via is not None:
            return self._forward_via(items)
        return self._forward_items(items)

    def _forward_items(self, items: list[Any]) -> list[Any]:
        raise NotImplementedError

    def forward_chars(self, items: Sequence[Any]) -> list[int]:
        """How many characters of text :meth:`forward` reads for each of ``items``: what a batcher in front of the
        model can weigh without tokenizing."""
        raise NotImplementedError

    def view(self, forward: Callable[[list[Any]], list[Any]]) -> RewardModel:
        """A shallow copy of the model (same weights and tokenizer; its own lock and ``stats``, starting at zero)
        whose :meth:`forward` calls go to ``forward``: the server runs each request on one, so everything but the
        forward pass runs in the request's thread with exactly the in-process code, while ``forward`` hands the
        forward passes to the thread that owns the model (under the model's lock)."""
        view = copy.copy(self)
        view.stats = RewardStats()
        view._forward_via = forward
        return view

    def score(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput], *,
              baselines: Optional[Sequence[CompletionInput]] = None) -> list[float]:
        raise NotImplementedError

    def score_samples(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput], *,
                      baselines: Optional[Sequence[CompletionInput]] = None
                      ) -> list[Union[float, SampleError]]:
        """:meth:`score` that never fails the call for one sample: each place holds the sample's reward or the
        :class:`~rlhf_rewards.conversation.SampleError` saying why it has none (bad input, a conversation the
        model's format cannot hold, a sample too long for any allowed truncation, a NaN or infinite model output:
        :class:`NonFiniteRewardError`). Only arguments that are wrong as a whole (not lists, unequal lengths)
        raise."""
        raise NotImplementedError


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

    def run(self, samples: Sequence[Union[Sample, SampleError, None]]) -> list[Union[float, SampleError, None]]:
        results: list[Union[float, SampleError, None]] = [None] * len(samples)
        texts: dict[int, tuple[str, Optional[str]]] = {}
        for i, sample in enumerate(samples):
            if not isinstance(sample, Sample):
                continue
            messages, (completion, baseline) = self._guard(sample[0], sample[1:])
            try:
                text = self._render_at(messages, completion, "")
                base = None if baseline is None else self._render_at(messages, baseline, "")
            except ValueError as err:
                results[i] = SampleError(i, str(err))
                continue
            texts[i] = (text, base)
        done = list(texts)
        # each distinct baseline once: a group's shared reference is scored once
        bases = list(dict.fromkeys(texts[i][1] for i in done if texts[i][1] is not None))
        rewards = self.forward([texts[i][0] for i in done] + bases) if done else []
        self.stats.nonfinite += sum(nonfinite(r) is not None for r in rewards)
        base_reward = dict(zip(bases, rewards[len(done):]))
        for i, r in zip(done, rewards):
            base = texts[i][1]
            what, of = nonfinite(r), "this sample"
            if what is None and base is not None:
                what, of = nonfinite(base_reward[base]), "this sample's baseline"
            if what is not None:
                results[i] = NonFiniteRewardError(i, f"{self.preset.name} returned {what} for {of}")
            else:
                results[i] = r - base_reward[base] if base is not None else r
        return results


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


def _located(prepared: Sequence[Union[Sample, SampleError]], results: Sequence[Union[T, SampleError, None]],
             where: Callable[[int, SampleError], str]) -> list[Union[T, SampleError]]:
    """Per sample: :meth:`RewardModel.prepare`'s error (already located), or :meth:`RewardModel.run`'s result, its
    errors prefixed with the location ``where(i, error)``."""
    return [p if isinstance(p, SampleError) else r.at(i, where(i, r)) if isinstance(r, SampleError) else r
            for i, (p, r) in enumerate(zip(prepared, results))]

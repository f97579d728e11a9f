"""What every reward model shares (:class:`RewardModel`): input checks, rendering, tokenization with counted
truncation and control text, device, stats, per-sample errors, and the per-sample protocol.

The per-sample protocol is the only way the layers above the backends (pairwise helpers, reward functions, the
server, the command line) talk to a model, and what a new model family implements (docs/architecture.md):

- :meth:`RewardModel.prepare`: callers' prompts and completions as validated
  :class:`~rlhf_rewards.conversation.Sample` objects (templated prompts parsed, end-of-turn markers stripped), or the
  :class:`~rlhf_rewards.errors.SampleError` naming the argument, index and reason;
- :meth:`RewardModel.run`: per prepared sample its reward (scalar: ``r(completion) - r(other)``) or preference
  (pairwise: ``P(completion better than other)``), or its error; every input rendered and tokenized once;
- :meth:`RewardModel.session`: one scoring call (its time, one warning each for truncation, control text and
  non-finite outputs); :attr:`RewardModel.lock`: the model's own lock;
- :meth:`RewardModel.forward`, :meth:`RewardModel.forward_chars` and :meth:`RewardModel.view`: the batched forward
  entry point, what it reads in characters, and a copy of the model whose forward calls go elsewhere (the server's
  cross-request batcher);
- :attr:`RewardModel.objective_names` and :meth:`RewardModel.with_objectives`: a multi-objective model's named
  objectives, and a copy of it whose reward is a weighted sum of them (a model with one reward has none).

:class:`~rlhf_rewards.backends.scalar_base.ScalarModelBase` backends implement ``_forward_texts``;
:class:`~rlhf_rewards.backends.pairwise_base.PairwiseRewardModel` backends implement ``_compare_both_orders``;
:class:`~rlhf_rewards.backends.process_base.ProcessRewardModel` backends implement ``_render_steps`` and
``_forward_steps``.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Literal, Optional, TypeVar, Union

import torch

from ..batching import default_max_batch_tokens
from ..control_text import ControlText, ControlTextMode, check_mode, special_affixes
from ..conversation import CompletionInput, Message, PromptInput, Sample, check_same_length
from ..errors import SampleError
from ..policy_text import completion_text, prompt_messages
from ..presets import Preset
from ..stats import RewardStats

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _decoded(tokenizer: Any, ids: list[int]) -> str:
    """``ids`` as text with every special token shown and no clean-up of spaces (what the model reads)."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class RewardModel:
    """Base class of loaded reward models (see :func:`rlhf_rewards.load_reward_model`).

    Attributes:
        kind: ``"scalar"``, ``"pairwise"`` or ``"process"`` (step rewards; see :mod:`.process_base`).
        preset: the :class:`~rlhf_rewards.presets.Preset` describing the model.
        tokenizer: the reward model's own tokenizer (never the policy's).
        device: where the model's weights live; inputs are moved there and rewards come back as Python floats.
        max_length: the per-input token limit; longer inputs are truncated on ``preset.truncation_side`` and counted.
        max_batch_tokens: the token budget of one forward pass (batch size x padded length, or rows x row width when
            packed); the default depends on the device (see :func:`rlhf_rewards.batching.default_max_batch_tokens`).
        packing: whether samples are packed into rows without padding; ``packing_reason`` says why (both in the repr).
        attn_implementation: the attention implementation the model runs (``"sdpa"``, ``"eager"``,
            ``"flash_attention_2"``...): as asked of :func:`~rlhf_rewards.load_reward_model`, else transformers'
            choice; it decides whether ``packing="auto"`` packs. ``None`` for a backend that does not say.
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
        name_or_path: which model this is: the real path of the local directory it was loaded from, or its hub id
            (``None`` for a model not built by :func:`~rlhf_rewards.load_reward_model`); reward statistics from
            ``rlhf-rewards calibrate`` are checked against it.
    """

    kind: ClassVar[Literal["scalar", "pairwise", "process"]]
    name_or_path: Optional[str] = None
    packing: bool = False
    packing_reason: str = "this backend pads its batches"
    attn_implementation: Optional[str] = None
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
                f"max_batch_tokens={self.max_batch_tokens}, attn_implementation={self.attn_implementation!r}, "
                f"packing={self.packing!r} ({self.packing_reason}))")

    @property
    def devices(self) -> tuple[str, ...]:
        """Every device the model's weights are on, ``device`` first: several for a model split over devices
        (``device_map``); weights offloaded to disk (the meta device) are not counted."""
        found = {str(self.device)}
        for part in vars(self).values():
            if isinstance(part, torch.nn.Module):
                for tensor in (*part.parameters(), *part.buffers()):
                    if tensor.device.type != "meta":
                        found.add(str(tensor.device))
        return (str(self.device), *sorted(found - {str(self.device)}))

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

    def with_packing(self, packing: bool) -> RewardModel:
        """A shallow copy of the model (same weights and tokenizer; its own lock and ``stats``, starting at zero) that
        pads its batches (``False``) or packs them as this model does (``True``; ``ValueError`` for a model that
        does not pack): the same samples scored both ways, as ``load_reward_model``'s packing check does."""
        if packing and not self.packing:
            raise ValueError(f"{self.preset.name} does not pack ({self.packing_reason}): no packed copy of it")
        view = copy.copy(self)
        view.stats = RewardStats()
        view.packing = bool(packing)
        return view

    objective_names: tuple[str, ...] = ()
    """The named objectives a multi-objective model scores besides its reward, in its card's order (empty for a
    model with one reward)."""

    def with_objectives(self, weights: Mapping[str, float]) -> RewardModel:
        """A copy of the model whose reward is ``sum(weight * objective)`` over the objectives named in ``weights``
        instead of its own reward (multi-objective models; see ``objective_names``). This model has none: raises
        ``ValueError``."""
        raise ValueError(f"{self.preset.name} gives one reward and has no named objectives to weigh; objectives=... "
                         "needs a multi-objective reward model (rm.objective_names lists a model's objectives)")

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


def _located(prepared: Sequence[Union[Sample, SampleError]], results: Sequence[Union[T, SampleError, None]],
             where: Callable[[int, SampleError], str]) -> list[Union[T, SampleError]]:
    """Per sample: :meth:`RewardModel.prepare`'s error (already located), or :meth:`RewardModel.run`'s result, its
    errors prefixed with the location ``where(i, error)``."""
    return [p if isinstance(p, SampleError) else r.at(i, where(i, r)) if isinstance(r, SampleError) else r
            for i, (p, r) in enumerate(zip(prepared, results))]

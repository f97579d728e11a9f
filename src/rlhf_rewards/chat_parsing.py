"""Parse text already rendered with a policy's chat template back into chat messages.

An RL policy's prompts often arrive as text rendered with the *policy's* chat template (a dataset column made
with ``apply_chat_template(..., tokenize=False, add_generation_prompt=True)``, or decoded policy output). A reward
model needs the conversation as messages so it can render it again in *its own* template; :func:`parse_chat` does
that inverse step.

Formats (the name :func:`parse_chat` and :func:`detect_chat_format` return), recognised only by how the text
*starts*, so that template lookalikes inside a message (a user quoting ``[INST]`` in a ChatML conversation) never
change the format:

``"chatml"``
    ChatML as used by Qwen, Yi, Hermes, Phi-4: ``<|im_start|>role\\ncontent<|im_end|>\\n``. Phi-4's ``<|im_sep|>``
    in place of the newline after the role is accepted. Optional leading ``<s>``, ``<|startoftext|>`` or
    ``<|endoftext|>`` (BOS tokens of ChatML fine-tunes), optional trailing ``<|endoftext|>``.
``"llama3"``
    Llama 3 / 3.1 / 3.2: ``<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``,
    optional trailing ``<|end_of_text|>``. The system block that 3.1+ templates always inject ("Cutting Knowledge
    Date: ...\\nToday Date: ...\\n\\n" before the caller's system text) is returned as that system message's content,
    unchanged: which of it is template boilerplate is the policy's business, not ours.
``"mistral"`` / ``"llama2"``
    One grammar, ``<s>[INST] user [/INST] assistant</s>[INST] ...``, in all its published spacings (Mistral
    v0.1/v0.2/v0.3, Llama-2), plus the ``[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]`` blocks of Mistral's v7 templates
    (Mistral Small 3, Magistral), which become system messages. The name is ``"llama2"`` exactly when the first
    ``[INST]`` opens with a Llama-2 ``<<SYS>>`` block, which becomes a system message; without one, Llama-2 text is
    indistinguishable from Mistral's and is reported as ``"mistral"``. Mistral v0.2/v0.3 templates fold the system
    message into the first/last user turn as ``system + "\\n\\n" + user``; that cannot be undone reliably, so it
    stays in the user content. A user turn ends at ``[/INST]``; an assistant reply ends at its first ``</s>``, which
    the tokenizer reads as EOS wherever it stands.
``"gemma"``
    ``<bos><start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n...``; role ``model`` becomes
    ``assistant``. Gemma templates fold the system message into the first user turn: it stays there. Optional
    trailing ``<eos>``.
``"zephyr"``
    ``<|system|>\\n...</s>\\n<|user|>\\n...</s>\\n<|assistant|>\\n...`` (Zephyr, TinyLlama-Chat).
``"phi3"``
    ``<|system|>\\n...<|end|>\\n<|user|>\\n...<|end|>\\n<|assistant|>\\n`` (Phi-3, Phi-3.5; Phi-4-mini without the
    newlines), optional leading ``<s>``/``<|endoftext|>`` and trailing ``<|endoftext|>``. Told apart from Zephyr by
    which marker, ``<|end|>`` or ``</s>``, closes the first turn.
``"plain"``
    Anything else: one user message holding the whole text, unchanged.

Whitespace. Content is returned exactly as it stands between the markers, minus the whitespace the template
itself writes:

- chatml: the newline after the role; one newline after ``<|im_end|>``.
- llama3: up to two newlines after ``<|end_header_id|>``. Llama-3 templates ``trim`` content, so a message's own
  leading/trailing whitespace is already gone from the text and cannot be recovered.
- mistral/llama2: one space after ``[INST]``, before ``[/INST]``, after ``[/INST]``, before ``</s>``, and before
  the next ``[INST]``; in llama2 the ``<<SYS>>\\n`` ... ``\\n<</SYS>>\\n\\n`` wrapper. Templates differ on which of
  these spaces they write, so a single space there that belonged to the message itself is indistinguishable from
  the template's and is removed too. ``[SYSTEM_PROMPT]`` content is returned verbatim.
- gemma: the newline after the role; one newline after ``<end_of_turn>``. Gemma templates ``trim`` content too.
- zephyr/phi3: one newline after the role tag; one newline after ``</s>`` / ``<|end|>``.

A trailing generation prompt (an assistant header with nothing after it but template whitespace, or Qwen3's
``<think>\\n\\n</think>\\n\\n`` written when thinking is disabled) is dropped, so a prompt ends with its user
message. A final assistant turn is kept: a closed one as it is; an unclosed one (a prefill or a completion cut
off before its end-of-turn marker) minus any trailing end-of-turn/EOS markers (see :func:`strip_completion`).
Text that starts like a template but breaks its grammar raises ``ValueError``: no character that is not
template markup is ever dropped.

Each parser is one left-to-right pass with precompiled patterns, linear in the length of the text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

from .conversation import Message

__all__ = ["parse_chat", "detect_chat_format", "strip_completion", "strip_tokens"]

_END_MARKERS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_end|>", "<|endoftext|>"),
    "llama3": ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
    "mistral": ("</s>",),
    "llama2": ("</s>",),
    "gemma": ("<end_of_turn>", "<eos>"),
    "zephyr": ("</s>",),
    "phi3": ("<|end|>", "<|endoftext|>"),
    # Without a template there is no telling which EOS the policy uses, and "</s>" may be real HTML.
    "plain": (),
}

_DETECT = re.compile(
    r"(?P<chatml>(?:<s>|<\|startoftext\|>|<\|endoftext\|>)*<\|im_start\|>)"
    r"|(?P<llama3>(?:<\|begin_of_text\|>)*<\|start_header_id\|>)"
    r"|(?P<gemma>(?:<bos>)*<start_of_turn>)"
    r"|(?P<llama2>(?:<s>)* ?\[INST\] ?<<SYS>>\n)"
    r"|(?P<mistral>(?:<s>)* ?\[(?:INST|SYSTEM_PROMPT)\])"
    r"|(?P<tagged>(?:<s>|<\|endoftext\|>)*<\|(?:system|user|assistant)\|>)"
)
# The end marker of a turn, where a next turn (or the end of the text) follows it: a "</s>" or "<|end|>" quoted
# inside the first message must not decide between Zephyr and Phi-3.
_TAGGED_TURN_END = re.compile(r"(?:<\|end\|>|</s>)(?=\n?(?:<\|(?:system|user|assistant)\|>|<\|endoftext\|>|\Z))")
_TAGGED_ANY_END = re.compile(r"<\|end\|>|</s>")


@dataclass(frozen=True)
class _TurnSyntax:
    """A template whose every turn is ``header content end [separator]``."""

    name: str
    label: str
    prefix: re.Pattern[str]  # BOS tokens that may precede the first turn
    opener: str  # how every turn header starts
    header: re.Pattern[str]  # a whole header with the whitespace the template puts after it; group "role"
    roles: Mapping[str, str]  # role as the template writes it -> message role
    end: str
    separator: str  # what the template writes after ``end``; optional when parsing
    eos: tuple[str, ...]  # tokens that may follow the last turn, and trail an unclosed final assistant turn
    nested: re.Pattern[str]  # markup that cannot occur inside content: finding it means a turn lost its ``end``
    generation_markup: tuple[str, ...] = ()  # what a generation prompt may add after the assistant header
    # what the template itself writes at the start of the first system turn (not the conversation's own words)
    system_preamble: Optional[re.Pattern] = None


_STANDARD_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}

_CHATML = _TurnSyntax(
    name="chatml",
    label="ChatML",
    prefix=re.compile(r"(?:<s>|<\|startoftext\|>|<\|endoftext\|>)*"),
    opener="<|im_start|>",
    header=re.compile(r"<\|im_start\|>(?P<role>\w+)(?:\n|<\|im_sep\|>)"),
    roles=_STANDARD_ROLES,
    end="<|im_end|>",
    separator="\n",
    eos=("<|endoftext|>",),
    nested=re.compile(re.escape("<|im_start|>")),
    generation_markup=("<think>\n\n</think>\n\n",),  # Qwen3 with enable_thinking=False
)
_LLAMA3 = _TurnSyntax(
    name="llama3",
    label="Llama-3",
    prefix=re.compile(r"(?:<\|begin_of_text\|>)*"),
    opener="<|start_header_id|>",
    header=re.compile(r"<\|start_header_id\|>(?P<role>\w+)<\|end_header_id\|>\n{0,2}"),
    roles=_STANDARD_ROLES,
    end="<|eot_id|>",
    separator="",
    eos=("<|end_of_text|>",),
    nested=re.compile(r"<\|(?:start_header_id|end_header_id|begin_of_text)\|>"),
    # Llama-3.1 and later templates open every conversation with their knowledge cutoff and a date
    system_preamble=re.compile(r"(?:Environment: ipython\n)?Cutting Knowledge Date: [^\n]*\nToday Date: [^\n]*\n\n"),
)
_GEMMA = _TurnSyntax(
    name="gemma",
    label="Gemma",
    prefix=re.compile(r"(?:<bos>)*"),
    opener="<start_of_turn>",
    header=re.compile(r"<start_of_turn>(?P<role>\w+)\n"),
    roles={"user": "user", "model": "assistant"},
    end="<end_of_turn>",
    separator="\n",
    eos=("<eos>",),
    nested=re.compile(re.escape("<start_of_turn>")),
)
_ZEPHYR = _TurnSyntax(
    name="zephyr",
    label="Zephyr",
    prefix=re.compile(r"(?:<s>)*"),
    opener="<|",
    header=re.compile(r"<\|(?P<role>\w+)\|>\n?"),
    roles=_STANDARD_ROLES,
    end="</s>",
    separator="\n",
    eos=(),
    # Zephyr's role tags are ordinary text to its tokenizer, so only a tag on a line of its own betrays a lost "</s>".
    nested=re.compile(r"\n<\|(?:system|user|assistant)\|>\n"),
)
_PHI3 = _TurnSyntax(
    name="phi3",
    label="Phi-3",
    prefix=re.compile(r"(?:<s>|<\|endoftext\|>)*"),
    opener="<|",
    header=re.compile(r"<\|(?P<role>\w+)\|>\n?"),
    roles=_STANDARD_ROLES,
    end="<|end|>",
    separator="\n",
    eos=("<|endoftext|>",),
    nested=re.compile(r"<\|(?:system|user|assistant)\|>"),
)
_TURN_SYNTAXES = {s.name: s for s in (_CHATML, _LLAMA3, _GEMMA, _ZEPHYR, _PHI3)}

_INST_MARK = re.compile(r"\[(/?)(INST|SYSTEM_PROMPT)\]")
_INST_PREFIX = re.compile(r"(?:<s>)* ?")
_AFTER_EOS = re.compile(r"(?:<s>)? ?")  # "</s><s>[INST]" (Llama-2), "</s> [INST]" (Mistral v0.1/v0.2)
_LLAMA2_SYS = re.compile(r"<<SYS>>\n(?P<system>.*?)\n<</SYS>>(?:\n\n|\Z)", re.S)


def detect_chat_format(text: str) -> str:
    """Return the name of the chat template ``text`` was rendered with, judged by how it starts.

    One of ``"chatml"``, ``"llama3"``, ``"mistral"``, ``"llama2"``, ``"gemma"``, ``"zephyr"``, ``"phi3"``, or
    ``"plain"`` when no template is recognised. Detection does not validate the rest of the text.
    """
    m = _DETECT.match(text)
    if m is None:
        return "plain"
    kind = m.lastgroup
    if kind != "tagged":
        return kind
    end = _TAGGED_TURN_END.search(text, m.end()) or _TAGGED_ANY_END.search(text, m.end())
    return "phi3" if end is not None and end.group() == "<|end|>" else "zephyr"


def parse_chat(text: str, *, where: str = "prompt") -> tuple[list[Message], str]:
    """Parse text rendered with a chat template back into messages.

    Returns ``(messages, format_name)``. ``messages`` is ``[{"role": "system" | "user" | "assistant",
    "content": str}, ...]`` in conversation order, without a trailing generation prompt; ``format_name`` is what
    :func:`detect_chat_format` returns for ``text`` (for plain text: ``"plain"`` and one user message holding
    ``text`` unchanged). See the module docstring for each format's whitespace rules.

    ``where`` names the input in error messages, e.g. ``"prompts[3]"``. Raises ``ValueError`` when ``text`` starts
    like a template but does not follow it (unclosed header or turn, unsupported role, markers out of order, text
    between turns) or holds no message at all.
    """
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected a string, got {type(text).__name__}")
    name = detect_chat_format(text)
    if name == "plain":
        return [{"role": "user", "content": text}], name
    if name in ("mistral", "llama2"):
        messages = _parse_inst(text, where)
        label = "Mistral/Llama-2"
    else:
        syntax = _TURN_SYNTAXES[name]
        messages = _parse_turns(text, syntax, where)
        label = syntax.label
    if not messages:
        raise ValueError(f"{where}: the {label} text holds no message, only template markup: {_snippet(text, 0)}")
    return messages, name


def strip_completion(text: str, format_name: str) -> str:
    """Return ``text`` without the end-of-turn / EOS markers of ``format_name`` that trail it.

    A policy's decoded completion may end with e.g. ``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ``<end_of_turn>`` or
    ``<|end|>`` (possibly several, like ``<|im_end|><|endoftext|>``); only those are removed, no whitespace, no
    markers elsewhere in the text. For ``"plain"`` the text is returned unchanged, as its EOS is unknown.
    Raises ``ValueError`` for an unknown ``format_name``.
    """
    markers = _END_MARKERS.get(format_name)
    if markers is None:
        raise ValueError(f"unknown chat format {format_name!r}; expected one of {', '.join(_END_MARKERS)}")
    return strip_tokens(text, markers)


def strip_tokens(text: str, tokens: tuple[str, ...], *, leading: bool = False) -> str:
    """``text`` without the run of ``tokens`` (non-empty strings) at its end, and at its start with ``leading``.
    Linear in the length of the run, however long: positions move, the text is copied once."""
    start = _skip_tokens(text, 0, tokens) if leading else 0
    end = len(text)
    while True:
        token = next((t for t in tokens if text.endswith(t, start, end)), None)
        if token is None:
            return text[start:end]
        end -= len(token)


def _skip_tokens(text: str, pos: int, tokens: tuple[str, ...]) -> int:
    """Return the offset after the run of ``tokens`` that starts at ``pos``."""
    while True:
        token = next((t for t in tokens if text.startswith(t, pos)), None)
        if token is None:
            return pos
        pos += len(token)


def _snippet(text: str, pos: int) -> str:
    piece = text[pos : pos + 40]
    return repr(piece) + ("..." if len(text) > pos + 40 else "")


def _parse_turns(text: str, syn: _TurnSyntax, where: str) -> list[Message]:
    messages: list[Message] = []
    n = len(text)
    pos = syn.prefix.match(text).end()
    while pos < n:
        if not text.startswith(syn.opener, pos):
            raise ValueError(f"{where}: unexpected text {_snippet(text, pos)} at offset {pos}; "
                             f"expected a {syn.label} turn header starting with {syn.opener!r}")
        head = syn.header.match(text, pos)
        if head is None:
            raise ValueError(f"{where}: {syn.label} turn header at offset {pos} is malformed or not closed: "
                             f"{_snippet(text, pos)}")
        written = head["role"]
        role = syn.roles.get(written)
        if role is None:
            raise ValueError(f"{where}: {syn.label} role {written!r} (offset {pos}) is not supported; "
                             f"expected one of {', '.join(syn.roles)}")
        start = head.end()
        stop = text.find(syn.end, start)
        closed = stop >= 0
        if not closed:
            stop = n
        nested = syn.nested.search(text, start, stop)
        if nested is not None:
            raise ValueError(f"{where}: {syn.label} {written!r} turn at offset {pos} is not closed by "
                             f"{syn.end!r} before {nested.group()!r} at offset {nested.start()}")
        if not closed:
            if role != "assistant":
                raise ValueError(f"{where}: {syn.label} {written!r} turn at offset {pos} is not closed by "
                                 f"{syn.end!r}")
            content = strip_tokens(text[start:], syn.eos)
            if content and content not in syn.generation_markup:
                messages.append({"role": role, "content": content})
            break
        content = text[start:stop]
        preamble = syn.system_preamble.match(content) if syn.system_preamble and not messages else None
        if role == "system" and preamble is not None:
            content = content[preamble.end():]  # re-rendering in a template of this family writes it again
        if content or role != "system" or preamble is None:
            messages.append({"role": role, "content": content})
        pos = stop + len(syn.end)
        if text.startswith(syn.separator, pos):
            pos += len(syn.separator)
        after_eos = _skip_tokens(text, pos, syn.eos)
        if after_eos == n:
            break
        if after_eos != pos:
            raise ValueError(f"{where}: {syn.label} text goes on after the end-of-text token at offset {pos}: "
                             f"{_snippet(text, pos)}")
    return messages


def _drop_spaces(s: str) -> str:
    """Remove one leading and one trailing space: the most any Mistral/Llama-2 template writes there."""
    if s.startswith(" "):
        s = s[1:]
    if s.endswith(" "):
        s = s[:-1]
    return s


def _parse_inst(text: str, where: str) -> list[Message]:
    messages: list[Message] = []
    pos = _INST_PREFIX.match(text).end()
    last_closed: str | None = None
    open_tag: str | None = None
    open_at = open_end = 0
    for mark in _INST_MARK.finditer(text, pos):
        closing, tag = bool(mark[1]), mark[2]
        if not closing:
            if open_tag is not None:
                raise ValueError(f"{where}: {mark[0]} at offset {mark.start()} opens a turn before [/{open_tag}] "
                                 f"closed the one opened at offset {open_at}")
            _inst_gap(text, pos, mark.start(), last_closed, where, messages)
            open_tag, open_at, open_end = tag, mark.start(), mark.end()
            continue
        if open_tag is None:
            raise ValueError(f"{where}: {mark[0]} at offset {mark.start()} has no [{tag}] before it to close")
        if open_tag != tag:
            raise ValueError(f"{where}: {mark[0]} at offset {mark.start()} cannot close the [{open_tag}] opened "
                             f"at offset {open_at}")
        body = text[open_end : mark.start()]
        if tag == "SYSTEM_PROMPT":
            messages.append({"role": "system", "content": body})
        else:
            body = _drop_spaces(body)
            if not messages and body.startswith("<<SYS>>\n"):
                sys_block = _LLAMA2_SYS.match(body)
                if sys_block is None:
                    raise ValueError(f"{where}: Llama-2 <<SYS>> block at offset {open_end} is not closed by "
                                     f"'\\n<</SYS>>\\n\\n'")
                messages.append({"role": "system", "content": sys_block["system"]})
                body = body[sys_block.end() :]
            messages.append({"role": "user", "content": body})
        open_tag, last_closed, pos = None, tag, mark.end()
    if open_tag is not None:
        raise ValueError(f"{where}: [{open_tag}] at offset {open_at} is never closed by [/{open_tag}]")
    _inst_gap(text, pos, len(text), last_closed, where, messages)
    return messages


def _inst_gap(text: str, start: int, stop: int, after: str | None, where: str, messages: list[Message]) -> None:
    """Handle the text between two Mistral/Llama-2 turns (``stop == len(text)`` for the text after the last one)."""
    gap = text[start:stop]
    if after != "INST":
        # Before the first turn or after a [/SYSTEM_PROMPT] the template writes nothing.
        if gap:
            raise ValueError(f"{where}: unexpected text {_snippet(text, start)} at offset {start}")
        return
    final = stop == len(text)
    eos = gap.find("</s>")
    if eos < 0:
        if final:
            # A prefill or a completion cut off before its "</s>"; a lone space is the template's.
            reply = gap[1:] if gap.startswith(" ") else gap
            if reply:
                messages.append({"role": "assistant", "content": reply})
            return
        if gap in ("", " "):  # a turn that follows [/INST] directly: no assistant reply in between
            return
        raise ValueError(f"{where}: assistant reply at offset {start} is not closed by '</s>' before "
                         f"{text[stop:stop + 15]!r} at offset {stop}")
    if _AFTER_EOS.fullmatch(gap, eos + len("</s>")) is None:
        raise ValueError(f"{where}: unexpected text {_snippet(text, start + eos + 4)} after '</s>' at offset "
                         f"{start + eos}")
    messages.append({"role": "assistant", "content": _drop_spaces(gap[:eos])})

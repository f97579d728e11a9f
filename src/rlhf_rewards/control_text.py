"""Control text: strings inside a message that spell one of the reward model's control tokens.

A model's input is built by rendering the conversation into one string and tokenizing it. Tokenizers split a text
at their added tokens first, so a completion containing the characters ``<|im_end|>`` gets the real ``<|im_end|>``
token: it can close its own turn and forge a new one, or (Starling-RM-34B reads its reward before the first id 0)
end the scored text with a literal ``<unk>``. A policy under RL finds such strings.

With ``control_text="text"`` (the default of every scoring path) text inside a message is tokenized as text:

1. Before rendering, :meth:`ControlText.escape` replaces each control string in a message's content by a
   placeholder, :data:`MARK` followed by one character naming which control string it was (and doubles any
   :data:`MARK` already there, so decoding is unambiguous). :data:`MARK` is U+FDD0, a Unicode noncharacter: no
   template writes it. A content string without control text (the usual case) is left as it is.
2. The rendered text stays a plain ``str`` (deduplication, batching across requests, pickling work unchanged).
3. :meth:`ControlText.encode` tokenizes a rendered text holding :data:`MARK` as the tokenizer would, except that
   placeholders are content: the text is split at the template's own added tokens (honouring their
   ``lstrip``/``rstrip``), each stretch between them, placeholders restored, is tokenized with no added token
   matched (the tokenizer's ``split_special_tokens``), and the template's tokens go in between as their ids, with
   the BOS/EOS the preset adds. A text without :data:`MARK` is tokenized exactly as before, in one call.

Which strings are control tokens: every added token marked ``special`` (turn and role markers, BOS/EOS/PAD/UNK,
Llama-3's headers) plus markers a backend declares (PairRM's ``<|source|>``/``<|candidate1|>``..., which are
non-special added tokens). Other non-special added tokens (e.g. Qwen3's ``<think>``) are vocabulary words the model
reads inside content, and stay as the card tokenizes them.

Some tokenizers produce a control id from plain text too (DeBERTa-v3's unigram vocabulary holds ``[CLS]``,
``[SEP]``, ``[PAD]`` as ordinary pieces of score 0), so stretches are tokenized by a copy of the tokenizer in which
control pieces cannot be matched, as in sentencepiece, where control symbols never come from text.

``control_text="tokens"`` keeps the model card's behaviour (the control string becomes the token) for parity checks;
occurrences are counted either way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Literal, Optional

ControlTextMode = Literal["text", "tokens"]
CONTROL_TEXT_MODES = ("text", "tokens")

MARK = "\ufdd0"
"""Starts each placeholder in rendered text (a Unicode noncharacter, which no chat template writes)."""
_FIRST_INDEX = 0xF0000  # placeholders name control string k with chr(_FIRST_INDEX + k) (private use plane 15)
_UNMATCHABLE = "\ufdd1control-piece-{}\ufdd1"  # what a control piece of the model's vocabulary is renamed to


def check_mode(value: object) -> ControlTextMode:
    """``value`` if it is a control-text mode, else ``ValueError`` naming the choices."""
    if value not in CONTROL_TEXT_MODES:
        raise ValueError(f"control_text must be 'text' (control-token strings inside messages are read as text) or "
                         f"'tokens' (they become the tokens they spell, as the model cards do), got {value!r}")
    return value  # type: ignore[return-value]


def special_affixes(tokenizer: Any, add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after every text when ``add_special_tokens`` is on (e.g. ``[BOS]``,
    ``[]``), found by encoding one letter both ways."""
    if not add_special_tokens:
        return [], []
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare):])
    return [], []


class ControlText:
    """Finding, escaping and tokenizing control text for one tokenizer (see the module docstring).

    Args:
        tokenizer: the reward model's tokenizer (a transformers fast tokenizer).
        add_special_tokens: whether the preset's tokenization adds the tokenizer's BOS/EOS around a text.
        markers: non-special added tokens the backend's format uses as markers, guarded like special tokens.

    Attributes:
        controls: the control strings, longest first.
    """

    def __init__(self, tokenizer: Any, *, add_special_tokens: bool, markers: Sequence[str] = ()):
        self.tokenizer = tokenizer
        added = {str(token): (i, token) for i, token in tokenizer.added_tokens_decoder.items()}
        self._markers = tuple(m for m in markers if m in added)
        controls = {s for s, (_, token) in added.items() if token.special} | set(self._markers)
        self.controls = tuple(sorted(controls, key=lambda s: (-len(s), s)))
        self._index = {c: k for k, c in enumerate(self.controls)}
        self._find = re.compile(_trie_pattern(self.controls + (MARK,)))
        self._placeholder = re.compile(f"{MARK}[{MARK}\U000f0000-\U000ffffd]")
        self._split = re.compile("|".join([self._placeholder.pattern, _trie_pattern(added)]))
        self._added = added
        self._control_ids = {added[c][0] for c in self.controls} - {tokenizer.unk_token_id}
        self._prefix, self._suffix = special_affixes(tokenizer, add_special_tokens)
        self._add_special_tokens = add_special_tokens
        self._backends: Optional[tuple[Optional[tuple[Any, Any]]]] = None

    # -- finding and escaping ----------------------------------------------------------------------------------
    def count(self, text: str) -> int:
        """How many control strings ``text`` holds."""
        return sum(m.group() != MARK for m in self._find.finditer(text))

    def escape(self, text: str) -> tuple[str, int]:
        """``text`` with each control string replaced by its placeholder (and each :data:`MARK` doubled), and how
        many control strings there were. ``text`` itself when it holds neither."""
        found = 0

        def placeholder(match: re.Match) -> str:
            nonlocal found
            s = match.group()
            if s == MARK:
                return MARK + MARK
            found += 1
            return MARK + chr(_FIRST_INDEX + self._index[s])

        escaped = self._find.sub(placeholder, text)
        return escaped, found

    def escape_sample(self, messages: list[dict[str, str]], texts: Sequence[Optional[str]], *, change: bool
                      ) -> tuple[list[dict[str, str]], list[Optional[str]], int]:
        """One sample's messages and texts (``None`` passes through) escaped when ``change`` (else as they are), and
        how many control strings they hold."""
        if not change:
            found = sum(self.count(m["content"]) for m in messages) + sum(self.count(t) for t in texts if t)
            return messages, list(texts), found
        found, escaped_messages, escaped_texts = 0, [], []
        for m in messages:
            content, n = self.escape(m["content"])
            found += n
            escaped_messages.append(m if content is m["content"] else {**m, "content": content})
        for t in texts:
            escaped, n = (t, 0) if t is None else self.escape(t)
            found += n
            escaped_texts.append(escaped)
        return escaped_messages, escaped_texts, found

    def restore(self, text: str) -> str:
        """``text`` with placeholders turned back into the strings they stand for (for display and decoding)."""
        if MARK not in text:
            return text
        return self._placeholder.sub(lambda m: self._original(m.group()), text)

    def _original(self, placeholder: str) -> str:
        code = placeholder[1]
        return MARK if code == MARK else self.controls[ord(code) - _FIRST_INDEX]

    # -- tokenizing --------------------------------------------------------------------------------------------
    def token_ids(self, texts: Sequence[str], add_special_tokens: bool, *, guarded: bool) -> list[list[int]]:
        """Untruncated ids of rendered texts: those holding escaped control text through :meth:`encode` when
        ``guarded``, the others (all of them otherwise) in one tokenizer call, as the card tokenizes."""
        texts = list(texts)
        special = {k for k, t in enumerate(texts) if guarded and MARK in t}
        plain = [k for k in range(len(texts)) if k not in special]
        out: list[list[int]] = [[] for _ in texts]
        if plain:
            encoded = self.tokenizer([texts[k] for k in plain], add_special_tokens=add_special_tokens)["input_ids"]
            for k, ids in zip(plain, encoded):
                out[k] = list(ids)
        if special:
            if add_special_tokens != self._add_special_tokens:
                raise ValueError("control text is framed as the preset tokenizes (add_special_tokens="
                                 f"{self._add_special_tokens})")
            for k, ids in zip(sorted(special), self.encode([texts[k] for k in sorted(special)])):
                out[k] = ids
        return out

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of rendered texts (with or without placeholders): the template's added tokens as their ids,
        everything between them tokenized as text, control strings from placeholders included, framed with the
        preset's BOS/EOS. Untruncated. On texts without control text this gives the tokenizer's own ids."""
        layouts = [self._layout(text) for text in texts]
        stretches = [(s, at_start) for layout in layouts for s, at_start in layout if isinstance(s, str)]
        encoded = iter(self._text_ids(stretches))
        out = []
        for layout in layouts:
            ids = list(self._prefix)
            for piece, _ in layout:
                ids += next(encoded) if isinstance(piece, str) else [piece]
            out.append(ids + self._suffix)
        return out

    def _layout(self, text: str) -> list[tuple[Any, bool]]:
        """``text`` as the tokenizer splits it: ``(stretch of text, whether it starts the text)`` and
        ``(token id, False)`` in order; placeholders are restored into their stretch."""
        layout: list[tuple[Any, bool]] = []
        stretch: list[str] = []
        position, strip_left = 0, False

        def close(strip_right: bool) -> None:
            s = "".join(stretch)
            s = s.lstrip() if strip_left else s
            s = s.rstrip() if strip_right else s
            if s:
                layout.append((s, not layout))  # nothing before it: the stretch starts the text
            stretch.clear()

        for match in self._split.finditer(text):
            stretch.append(text[position:match.start()])
            if match.group()[0] == MARK:
                stretch.append(self._original(match.group()))
            else:
                token_id, token = self._added[match.group()]
                close(token.lstrip)
                layout.append((token_id, False))
                strip_left = token.rstrip
            position = match.end()
        stretch.append(text[position:])
        close(False)
        return layout

    def _text_ids(self, stretches: list[tuple[str, bool]]) -> list[list[int]]:
        """Ids of stretches of text with no added token matched; ``at_start`` marks a stretch that begins the text
        (pre-tokenizers that prefix only the first word of a text treat it differently)."""
        if not stretches:
            return []
        backends = self._text_backends()
        if backends is None:
            encoded = self.tokenizer([s for s, _ in stretches], add_special_tokens=False,
                                     split_special_tokens=True)["input_ids"]
            out = [list(ids) for ids in encoded]
        else:
            out = self._copy_ids(backends, stretches)
        for ids, (s, _) in zip(out, stretches):
            self._check_text_ids(ids, s)
        return out

    @staticmethod
    def _copy_ids(backends: tuple[Any, Any], stretches: list[tuple[str, bool]]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in stretches]
        for backend, wanted in zip(backends, (True, False)):
            todo = [k for k, (_, at_start) in enumerate(stretches) if at_start == wanted]
            if todo:
                for k, enc in zip(todo, backend.encode_batch([stretches[k][0] for k in todo],
                                                             add_special_tokens=False)):
                    out[k] = list(enc.ids)
        return out

    def _check_text_ids(self, ids: list[int], text: str) -> None:
        forged = self._control_ids.intersection(ids)
        if forged:  # the copy's control pieces are unmatchable; this guards tokenizers of an unforeseen kind
            names = ", ".join(repr(self.tokenizer.convert_ids_to_tokens(i)) for i in sorted(forged))
            raise ValueError(f"the tokenizer produces control token {names} from plain text ({len(text)} "
                             "characters), so control_text='text' cannot keep it out of this input")

    def content_ids(self, marker: str, text: str) -> list[int]:
        """Ids of ``marker + text`` framed by the preset's BOS/EOS, ``marker`` a leading added token and ``text``
        (plain, placeholders already restored) read as text: PairRM's parts. The whole is normalized at once, as
        the tokenizer normalizes a text whose added tokens are matched after normalization."""
        first = self._text_backends()[0]  # declared markers always make a copy
        normalized = first.normalizer.normalize_str(marker + text) if first.normalizer else marker + text
        if not normalized.startswith(marker):
            raise ValueError(f"normalizing the text moved its leading {marker!r}")
        rest = normalized[len(marker):]
        words = first.pre_tokenizer.pre_tokenize_str(rest) if first.pre_tokenizer else [(rest, None)]
        ids = [token.id for word, _ in words for token in first.model.tokenize(word)]
        self._check_text_ids(ids, text)
        return self._prefix + [self._added[marker][0]] + ids + self._suffix

    def _text_backends(self) -> Optional[tuple[Any, Any]]:
        """``(for a stretch starting the text, for any other)``: copies of the tokenizer's backend that read every
        control string as text (built on first use), or ``None`` when its own ``split_special_tokens`` does."""
        if self._backends is None:
            self._backends = (_text_backends(self.tokenizer, self.controls, self._markers),)
        return self._backends[0]

    # -- checking ----------------------------------------------------------------------------------------------
    def check(self, model_name: str, marker: Optional[str] = None) -> None:
        """Raise ``ValueError`` unless reading control text as text leaves the ids of texts without any exactly as
        the tokenizer gives them, on the probe texts of :mod:`rlhf_rewards.tokenization` (whitespace, unicode, and
        text around each control token); ``marker``: check :meth:`content_ids` instead of :meth:`encode`."""
        from .tokenization import AFTER_SPECIAL, MAX_PROBED_SPECIALS, SENTENCEPIECE_PROBES

        named = [t for t in self.tokenizer.all_special_tokens if t in self._index]
        probed = list(dict.fromkeys(named + list(self.controls)))[:MAX_PROBED_SPECIALS]
        problems = self.problems(list(SENTENCEPIECE_PROBES) + [p.format(t=t) for t in probed for p in AFTER_SPECIAL],
                                 marker)
        if problems:
            raise ValueError(f"control_text='text' cannot reproduce the token ids of {model_name}'s tokenizer "
                             f"{self.tokenizer.name_or_path!r} ({'; '.join(problems[:3])}); load with "
                             "control_text='tokens' to tokenize as the model card does")

    def problems(self, probes: Sequence[str], marker: Optional[str] = None) -> list[str]:
        """Rendered texts on which :meth:`encode` differs from the tokenizer (each with both id lists); empty when
        it reproduces them all. With ``marker``, :meth:`content_ids` of the probes without control text is checked
        against the tokenizer on ``marker + text`` instead."""
        clean = [p for p in probes if MARK not in p and (marker is None or not self._find.search(p))]
        if marker is None:
            actual = self.encode(clean)
            expected = self.tokenizer(clean, add_special_tokens=self._add_special_tokens)["input_ids"]
        else:
            actual = [self.content_ids(marker, p) for p in clean]
            expected = self.tokenizer([marker + p for p in clean],
                                      add_special_tokens=self._add_special_tokens)["input_ids"]
        return [f"{p!r}: {list(e)} as the tokenizer gives, {a} read as text"
                for p, a, e in zip(clean, actual, expected) if list(e) != a]


def _trie_pattern(strings: Sequence[str]) -> str:
    """A regex matching any of ``strings``, the longest where several match at one position, written as a trie:
    a plain alternation would try every string (Llama-3 has 256 specials) at every ``<`` of a long text."""
    trie: dict = {}
    for string in strings:
        node = trie
        for char in string:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: dict) -> str:
        branches = [re.escape(char) + pattern(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        return f"(?:{body})?" if "" in node else body  # greedy: a longer string first, then the one ending here

    return pattern(trie) or "(?!)"


def _text_backends(tokenizer: Any, controls: Sequence[str], markers: Sequence[str]) -> Optional[tuple[Any, Any]]:
    """See :meth:`ControlText._text_backends`. A copy is needed when control strings are pieces of the model's own
    vocabulary, when markers must become special, or when the pre-tokenizer prefixes only a text's first word
    (a stretch after an added token must then get no prefix, as inside the whole text)."""
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer
    pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else None
    in_model = any(backend.model.token_to_id(c) is not None for c in controls)
    if not (in_model or markers or _never_prefix(pre)):
        return None
    data = json.loads(backend.to_str())
    for entry in data.get("added_tokens") or ():
        if entry["content"] in markers:
            entry["special"] = True
    _unmatchable_control_pieces(data["model"], set(controls))
    first = Tokenizer.from_str(json.dumps(data))
    later = first
    if _never_prefix(data.get("pre_tokenizer")):
        # "first": only the stretch at the very start of a text gets the word prefix
        later = Tokenizer.from_str(json.dumps(data))
    for copy in {id(first): first, id(later): later}.values():
        copy.no_truncation()
        copy.no_padding()
        copy.encode_special_tokens = True
    return first, later


def _unmatchable_control_pieces(model: dict, controls: set[str]) -> None:
    """Rename the control strings among the model's own vocabulary pieces (ids unchanged) and drop the BPE merges
    that build them, so no text maps to them."""
    kind = model.get("type")
    if kind == "Unigram":
        for k, entry in enumerate(model["vocab"]):
            if entry[0] in controls:
                entry[0] = _UNMATCHABLE.format(k)
    elif isinstance(model.get("vocab"), dict):
        vocab = model["vocab"]
        renamed = {piece: _UNMATCHABLE.format(vocab[piece]) for piece in controls if piece in vocab}
        if not renamed:
            return
        model["vocab"] = {renamed.get(piece, piece): i for piece, i in vocab.items()}
        if model.get("unk_token") in renamed:
            model["unk_token"] = renamed[model["unk_token"]]
        if "merges" in model:
            model["merges"] = [m for m in model["merges"] if not _builds(m, renamed)]


def _builds(merge: Any, pieces: dict[str, str]) -> bool:
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    return left in pieces or right in pieces or left + right in pieces


def _never_prefix(pre_tokenizer: Optional[dict]) -> bool:
    """Set every Metaspace ``prepend_scheme: first`` in the pre-tokenizer's JSON to ``never``; whether any was."""
    if not isinstance(pre_tokenizer, dict):
        return False
    changed = False
    if pre_tokenizer.get("type") == "Metaspace" and pre_tokenizer.get("prepend_scheme") == "first":
        pre_tokenizer["prepend_scheme"] = "never"
        changed = True
    for child in pre_tokenizer.get("pretokenizers") or ():
        changed = _never_prefix(child) or changed
    return changed

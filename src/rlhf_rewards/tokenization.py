"""Loading each reward model's own tokenizer, checking it against what the model was trained with, and repairing
the one known way transformers 5 gets it wrong.

The checks are the preset's :class:`~rlhf_rewards.presets.GoldenIds` (ids the real tokenizer gives),
``single_tokens`` (template markers that must stay one token) and, for presets whose models were trained with a
sentencepiece tokenizer (``Preset.sentencepiece_truth``), a comparison with sentencepiece itself whenever the
tokenizer comes with its ``tokenizer.model``: :data:`SENTENCEPIECE_PROBES` (whitespace runs, newlines, digits, byte
fallback, text right after each special token) must give the ids sentencepiece gives on each stretch of text between
the tokenizer's added tokens. Goldens need the real vocabulary; the sentencepiece comparison works for any
vocabulary, including fine-tuned ones and the small ones of test checkpoints. A tokenizer that fails is never used to
score: it is rebuilt from its ``tokenizer.model`` when that reproduces sentencepiece, refused otherwise.

Why a repair exists: the Llama-family sentencepiece tokenizers (Llama-2, Mistral v0.1/v0.2) were trained and used
through transformers 4, whose tokenizers behaved like sentencepiece itself run on each stretch of text between
special tokens ("legacy" behaviour: every stretch gets sentencepiece's dummy "▁" prefix, spaces are kept as they are,
merges apply in piece-score order). transformers 5 builds such tokenizers differently whenever the config names
``LlamaTokenizer``, and the ids change:

- without a ``tokenizer.json`` (Ray2333's repository) it converts ``tokenizer.model`` with the BPE merges in piece-id
  order instead of piece-score order, so runs of spaces split differently; next to a ``config.json`` of model type
  ``mistral`` it also drops the dummy prefix altogether (``"[INST]"`` gives ``[28792, ...]``, not ``[733, ...]``);
- otherwise, and also when a correct ``tokenizer.json`` is there (Mistral's and Llama-2's own repositories), it
  replaces the normalizer with a Metaspace pre-tokenizer that with ``legacy=False`` (the default) prefixes "▁" only
  at the very start of the text (``"<s>[INST]"`` loses the "▁" of ``"▁["``) and with ``legacy=True`` still drops
  the extra "▁" of a stretch that starts with a space.

:func:`sentencepiece_fast_tokenizer` rebuilds a fast tokenizer from the ``tokenizer.model`` that reproduces
sentencepiece exactly.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Mapping
from typing import Any, Optional, Union

from tokenizers import AddedToken, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .presets import Preset

logger = logging.getLogger(__name__)

#: Files whose presence makes a model directory its own tokenizer source.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

# sentencepiece ModelProto values (sentencepiece_model.proto).
_SP_BPE = 2
_SP_NORMAL, _SP_CONTROL, _SP_USER_DEFINED = 1, 3, 4
_SPACE = "▁"


class TokenizerDriftError(ValueError):
    """The tokenizer does not produce the token ids the reward model was trained with."""


def load_tokenizer(preset: Preset, name_or_path: str,
                   tokenizer: Union[str, PreTrainedTokenizerBase, None] = None) -> PreTrainedTokenizerBase:
    """Load, check and if needed repair the reward model's tokenizer.

    Where it comes from, first match wins:

    1. ``tokenizer`` as an object: used as it is (never modified: if its pad token must change, a copy is);
    2. ``tokenizer`` as a string: loaded from that local path or hub id;
    3. ``name_or_path`` when it is a local directory holding tokenizer files (:data:`TOKENIZER_FILES`);
    4. ``preset.tokenizer_source``, the model card's choice (e.g. ``01-ai/Yi-34B-Chat`` for Starling-RM-34B);
    5. ``name_or_path`` itself (a hub repository that ships its tokenizer).

    Local directories load with ``HF_HUB_OFFLINE=1``; hub ids need the hub or its local cache.

    Padding: when ``preset.pad_token`` is set (the cards that pad with ``unk``), the pad token becomes that token,
    which must exist in the vocabulary. Otherwise a tokenizer without a pad token pads with its EOS token, or its
    UNK token when it has no EOS; which id pads only matters for models whose reward position depends on it, and
    those presets set ``pad_token``.

    The tokenizer is then checked with :func:`verify_tokenizer`, against sentencepiece too when the preset's
    models were trained with sentencepiece and the tokenizer was loaded from files that include a ``tokenizer.model``
    (:func:`sentencepiece_model_file`). If that fails and there is such a file, the tokenizer is rebuilt from it
    with :func:`sentencepiece_fast_tokenizer` (same special tokens and ids, chat template, BOS/EOS settings), checked
    again the same way and used with a logged warning.

    Raises:
        TokenizerDriftError: the tokenizer fails the checks and cannot be repaired.
    """
    tok = _resolve(preset, name_or_path, tokenizer)
    tok = _with_pad_token(tok, preset, copy_first=tok is tokenizer)
    model_file = sentencepiece_model_file(tok) if preset.sentencepiece_truth else None
    try:
        verify_tokenizer(tok, preset, model_file)
        return tok
    except TokenizerDriftError as drift:
        if model_file is None:
            raise
        try:
            repaired = _with_pad_token(_rebuild_like(tok, model_file), preset, copy_first=False)
            verify_tokenizer(repaired, preset, model_file)
        except TokenizerDriftError as still:
            raise TokenizerDriftError(f"{drift}\nRebuilding it from {model_file} did not help: {still}") from still
        logger.warning("The tokenizer of %s as transformers loaded it gives token ids the model was not trained "
                       "with (%s); using a tokenizer rebuilt from %s that reproduces sentencepiece exactly.",
                       name_or_path, drift, model_file)
        return repaired


def verify_tokenizer(tokenizer: PreTrainedTokenizerBase, preset: Preset, model_file: Optional[str] = None) -> None:
    """Check ``tokenizer`` against ``preset``: every golden text whose ``vocab_size`` equals ``len(tokenizer)`` must
    give exactly its golden ids, every ``single_tokens`` string must encode (without special tokens added) to
    one id that is not the unknown token, and, when ``model_file`` (a sentencepiece model) is given, every probe of
    :func:`sentencepiece_problems` must give the ids sentencepiece gives.

    Raises:
        TokenizerDriftError: naming the failing texts (the first six, and how many more) with the expected and the
            actual ids.
    """
    problems = []
    for golden in preset.golden_ids:
        if len(tokenizer) != golden.vocab_size:
            continue
        ids = list(tokenizer(golden.text, add_special_tokens=golden.add_special_tokens)["input_ids"])
        if ids != list(golden.ids):
            problems.append(f"{golden.text!r} (add_special_tokens={golden.add_special_tokens}) should give "
                            f"{list(golden.ids)}, gives {ids}")
    for text in preset.single_tokens:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) != 1 or (ids[0] == tokenizer.unk_token_id and text != tokenizer.unk_token):
            problems.append(f"{text!r} should be one known token, gives {ids}")
    if model_file is not None:
        problems += sentencepiece_problems(tokenizer, model_file)
    if problems:
        shown = "; ".join(problems[:_PROBLEMS_SHOWN])
        more = f"; and {len(problems) - _PROBLEMS_SHOWN} more texts" if len(problems) > _PROBLEMS_SHOWN else ""
        raise TokenizerDriftError(f"tokenizer {tokenizer.name_or_path!r} does not match what preset "
                                  f"{preset.name!r} was trained with: {shown}{more}")


_PROBLEMS_SHOWN = 6


SENTENCEPIECE_PROBES = (
    "a  two", "a   three", "    indented four", "tab\tand\t\ttabs", " leading space", "trailing  ", " ", "  ",
    "five     ", "x" + " " * 7 + "y", " " * 9 + "nine", "a" + " " * 17 + "b",
    "line\nnext", "a\n\nb", "\n", "\n    return x  # note", "def f(x):\n\treturn x",
    "123", "2024-05-06 12:30", "3.14159", "$1,000,000 and 7%",
    "naïve café", "Привет, мир", "日本語のテキスト", "مرحبا", "🤗👍🏽", "e^{iπ} + 1 = 0", "\u00a0nbsp\u200b",
    "Hello, World! I'm here.", "[INST] Hi [/INST]", "<|im_start|>user", "▁literal",
)
"""Texts the loaded tokenizer must encode exactly as sentencepiece does (see :func:`sentencepiece_problems`)."""

AFTER_SPECIAL = ("{t}Hello", "{t} Hello", "{t}  two", "{t}\nnext", "{t}123", "x{t}[INST]", "{t}{t}")
"""How each added token is probed: text right after it (no space, one, two, a newline, digits), before it, twice."""


MAX_PROBED_SPECIALS = 16  # keeps the load-time check to ~150 texts even for vocabularies with many specials


def sentencepiece_model_file(tokenizer: PreTrainedTokenizerBase) -> Optional[str]:
    """The sentencepiece model file ``tokenizer`` was loaded with (transformers records the ``tokenizer.model`` it
    found next to the other files), or ``None``."""
    model_file = getattr(tokenizer, "vocab_file", None)
    if isinstance(model_file, str) and model_file.endswith(".model") and os.path.isfile(model_file):
        return model_file
    return None


def sentencepiece_problems(tokenizer: PreTrainedTokenizerBase, model_file: str) -> list[str]:
    """Compare ``tokenizer`` (encoding without special tokens added) with the sentencepiece model ``model_file`` run
    on each stretch of text between the tokenizer's added tokens, each added token being its own id (what
    transformers 4's legacy sentencepiece tokenizers, which the models were trained with, did). Probes:
    :data:`SENTENCEPIECE_PROBES` and, for each special token (at most 16), the :data:`AFTER_SPECIAL` patterns; a
    few dozen texts encoded in one call. Returns one line per differing text (empty: identical)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    added = {str(t): (i, t) for i, t in tokenizer.added_tokens_decoder.items()}
    probed = list(dict.fromkeys(t for t in tokenizer.all_special_tokens if t in added))[:MAX_PROBED_SPECIALS]
    texts = list(SENTENCEPIECE_PROBES) + [p.format(t=t) for t in probed for p in AFTER_SPECIAL]
    actual = tokenizer(texts, add_special_tokens=False)["input_ids"]
    problems = []
    for text, ids in zip(texts, actual):
        expected = _sentencepiece_ids(sp, text, added)
        if list(ids) != expected:
            problems.append(f"{text!r} should give {expected} as sentencepiece does, gives {list(ids)}")
    return problems


def _sentencepiece_ids(sp: Any, text: str, added: Mapping[str, tuple[int, AddedToken]]) -> list[int]:
    """sentencepiece's ids for each stretch of ``text`` between the ``added`` tokens (longest match first; an
    added token's ``lstrip``/``rstrip`` eat the whitespace beside it), the added tokens' own ids in between."""
    if not added:
        return list(sp.encode(text))
    pattern = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
    ids: list[int] = []
    stretch_start, rstrip_next = 0, False
    for match in pattern.finditer(text):
        token_id, token = added[match.group()]
        stretch = text[stretch_start:match.start()]
        ids += _encode_stretch(sp, stretch, lstrip=rstrip_next, rstrip=token.lstrip)
        ids.append(token_id)
        stretch_start, rstrip_next = match.end(), token.rstrip
    return ids + _encode_stretch(sp, text[stretch_start:], lstrip=rstrip_next, rstrip=False)


def _encode_stretch(sp: Any, stretch: str, *, lstrip: bool, rstrip: bool) -> list[int]:
    stretch = stretch.lstrip() if lstrip else stretch
    stretch = stretch.rstrip() if rstrip else stretch
    return list(sp.encode(stretch)) if stretch else []


def sentencepiece_fast_tokenizer(model_file: str, *, add_bos_token: bool, add_eos_token: bool,
                                 added_tokens: Optional[Mapping[int, AddedToken]] = None,
                                 **init_kwargs: Any) -> PreTrainedTokenizerFast:
    """A fast tokenizer giving the same ids as the sentencepiece BPE model ``model_file`` run on each stretch of
    text between special tokens (transformers 4's "legacy" Llama tokenizers, which the models were trained with).

    Args:
        model_file: a sentencepiece ``tokenizer.model`` of BPE type without a normalization rule (the Llama
            family's ``identity`` normalizer).
        add_bos_token, add_eos_token: whether encoding with ``add_special_tokens=True`` adds the BOS / EOS token.
        added_tokens: ``{id: token}`` for tokens split out of the text before sentencepiece runs (its control
            symbols are added on their own); each must land on its id, ids past the sentencepiece vocabulary
            included (e.g. Ray2333's ``[PAD]`` at 32000).
        init_kwargs: passed to :class:`~transformers.PreTrainedTokenizerFast`, e.g. ``bos_token``, ``eos_token``,
            ``unk_token``, ``pad_token``, ``chat_template``, ``padding_side``, ``model_max_length``.

    Raises:
        TokenizerDriftError: the model uses sentencepiece features this does not reproduce, or an added token
            cannot be given its id.
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != _SP_BPE or norm.precompiled_charsmap or norm.remove_extra_whitespaces \
            or trainer.treat_whitespace_as_suffix:
        raise TokenizerDriftError(f"{model_file}: only sentencepiece BPE models with the identity normalizer "
                                  "(the Llama family's) can be rebuilt")

    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = Tokenizer(BPE(vocab, _merges_by_score(proto.pieces, vocab), fuse_unk=True,
                            unk_token=proto.pieces[trainer.unk_id].piece, byte_fallback=trainer.byte_fallback))
    # Normalization runs on each stretch between added tokens, so each gets the dummy prefix, as sentencepiece
    # run on each stretch does; spaces are kept, no pre-tokenizer splits the text.
    prefix = [normalizers.Prepend(_SPACE)] if norm.add_dummy_prefix else []
    backend.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", _SPACE)])
    strip = [decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + strip)

    tokens = {i: AddedToken(p.piece, special=p.type == _SP_CONTROL, normalized=False)
              for i, p in enumerate(proto.pieces) if p.type in (_SP_CONTROL, _SP_USER_DEFINED)}
    tokens.update(added_tokens or {})
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, add_bos_token=add_bos_token, add_eos_token=add_eos_token,
                                  added_tokens_decoder=dict(sorted(tokens.items())), **init_kwargs)
    landed = {i: tok.convert_tokens_to_ids(str(t)) for i, t in tokens.items()}
    misplaced = [f"{str(tokens[i])!r} should be {i}, is {j}" for i, j in landed.items() if i != j]
    if misplaced:
        raise TokenizerDriftError(f"{model_file}: added tokens land on other ids: {', '.join(misplaced)}")
    return tok


def _merges_by_score(pieces: Any, vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """BPE merges for the sentencepiece ``pieces`` (the model proto's list) in the order sentencepiece applies
    them: it merges the adjacent pair whose joined piece scores highest, so every split of a normal piece into two
    vocabulary pieces ranks by that piece's score.

    Pieces of equal score (the whitespace runs ``▁▁``, ``▁▁▁``, ... that Llama-family vocabularies give -1e9) are
    merged by sentencepiece leftmost pair first, which grows a run of spaces from its left end into the longest piece
    available before starting the next one. A BPE merge list cannot rank by position, but ranking longer joined
    pieces first (then the longer left part) gives the same pieces whenever the run lengths in the vocabulary have no
    gaps (Mistral's 2..16); anything else is caught by the load-time probes and refused.

    (Deliberately not transformers 5's own extraction, which orders merges by piece id: Mistral's whitespace pieces
    have ids among the first merges but the lowest scores.)"""
    ranked = []
    for i, piece in enumerate(pieces):
        if piece.type != _SP_NORMAL:
            continue
        text = piece.piece
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((-piece.score, -len(text), -cut, i, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _resolve(preset: Preset, name_or_path: str, tokenizer: Union[str, PreTrainedTokenizerBase, None]
             ) -> PreTrainedTokenizerBase:
    """The tokenizer from the first source in :func:`load_tokenizer`'s order."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise TypeError(f"tokenizer must be a path, a hub id or a transformers tokenizer, not {type(tokenizer)}")
    if isinstance(tokenizer, str):
        source = tokenizer
    elif os.path.isdir(name_or_path) and any(os.path.isfile(os.path.join(name_or_path, f)) for f in TOKENIZER_FILES):
        source = name_or_path
    elif preset.tokenizer_source is not None:
        from .sources import locate

        source = locate(preset.tokenizer_source, "tokenizer")
    elif os.path.isdir(name_or_path):
        raise FileNotFoundError(f"{name_or_path!r} holds no tokenizer ({', '.join(TOKENIZER_FILES)}) and preset "
                                f"{preset.name!r} names no tokenizer source; pass tokenizer=...")
    else:
        source = name_or_path
    return AutoTokenizer.from_pretrained(source)


def _with_pad_token(tok: PreTrainedTokenizerBase, preset: Preset, *, copy_first: bool) -> PreTrainedTokenizerBase:
    """``tok`` with the pad token rules of :func:`load_tokenizer` applied (on a copy when ``copy_first``)."""
    if preset.pad_token is not None:
        if preset.pad_token not in tok.get_vocab():
            raise TokenizerDriftError(f"preset {preset.name!r} pads with {preset.pad_token!r}, which tokenizer "
                                      f"{tok.name_or_path!r} does not have")
        pad = preset.pad_token
    elif tok.pad_token is not None:
        return tok
    else:
        pad = tok.eos_token if tok.eos_token is not None else tok.unk_token
        if pad is None:
            raise ValueError(f"tokenizer {tok.name_or_path!r} has no pad, EOS or unknown token to pad with; "
                             "set its pad_token")
    if tok.pad_token == pad:
        return tok
    if copy_first:
        tok = copy.deepcopy(tok)
    tok.pad_token = pad
    return tok


def _rebuild_like(tok: PreTrainedTokenizerBase, model_file: str) -> PreTrainedTokenizerFast:
    """:func:`sentencepiece_fast_tokenizer` of ``model_file`` with everything else taken from ``tok``: its added
    tokens at their ids, named special tokens, chat template, BOS/EOS adding, sides, length limit and inputs."""
    # What the tokenizer adds around a text it gives no special tokens for.
    framed = tok("a", add_special_tokens=True)["input_ids"]
    named = {key: value for key, value in tok.special_tokens_map.items() if isinstance(value, str)}
    extra = [t for t in tok.all_special_tokens if t not in named.values()]
    return sentencepiece_fast_tokenizer(
        model_file,
        add_bos_token=tok.bos_token_id is not None and framed[0] == tok.bos_token_id,
        add_eos_token=tok.eos_token_id is not None and framed[-1] == tok.eos_token_id,
        added_tokens=dict(tok.added_tokens_decoder),
        extra_special_tokens=extra,
        chat_template=tok.chat_template,
        model_max_length=tok.model_max_length,
        padding_side=tok.padding_side,
        truncation_side=tok.truncation_side,
        clean_up_tokenization_spaces=tok.clean_up_tokenization_spaces,
        model_input_names=tok.model_input_names,
        name_or_path=tok.name_or_path,
        **named,
    )

"""Tokenizers for tiny test checkpoints, written in the file layout of the real repositories.

Real tokenizers where a PyPI package ships one: Mistral-7B v0.1/v0.2's ``tokenizer.model`` (``mistral-common``) and
Meta's own Llama-3 ``tokenizer.model`` (``llama-models``, tiktoken format, converted with transformers'
``TikTokenConverter``). Llama-2 and Yi have none on PyPI, so small sentencepiece
models are trained at build time on :data:`CORPUS` with each family's special tokens at their real ids; a ChatML
byte-level BPE stands in for an arbitrary sequence classifier's tokenizer. Everything is deterministic and offline.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Optional

import sentencepiece
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from ..presets.seeds import MISTRAL_V02_CHAT_TEMPLATE
from ..tokenization import sentencepiece_fast_tokenizer

# A few paragraphs of plain English (with digits, punctuation, code-ish indentation and a little non-ASCII) to train
# the small tokenizers on; written for this project.
CORPUS = """\
The reward model reads a conversation and returns a single number for the last answer.
A higher number means the answer was more helpful, more honest and less harmful.
Reward models are trained on pairs of answers to the same question, one preferred over the other.
During reinforcement learning the policy writes many answers, and each one is scored.
The scores are compared within a group of answers to the same prompt.
Please write a short poem about the sea, the wind and the boats in the harbour.
Sure! Here is a short poem: the waves roll in, the gulls call out, the evening light is gold.
What is 17 times 23? It is 391, because 17 times 20 is 340 and 17 times 3 is 51.
Can you explain how a hash map works? A hash map stores keys and values in buckets.
    def score(prompt, answer):
        tokens = tokenizer(prompt + answer)
        return model(tokens).item()
I'm going to the market tomorrow; do you need anything? Bread, milk, eggs and 2 apples.
The weather today is sunny with a high of 24 degrees and a light breeze from the west.
Translate "good morning" into French: bonjour. Into German: guten Morgen. Café, naïve, façade.
Sorry, I can't help with that request, but I can suggest a safer alternative.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
List three prime numbers: 2, 3 and 5. The next ones are 7, 11, 13, 17, 19 and 23.
Summaries should be short, accurate and written in the reader's language.
Thank you for your question. Let me think about it step by step before answering.
User: hello there. Assistant: hi, how can I help you today?
"""

# ChatML as Yi-34B-Chat and many sequence classifiers use it; it writes no BOS of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Meta-Llama-3-8B-Instruct's chat template (the one RLHFlow's preference model was fine-tuned with): content trimmed,
# BOS written by the template before the first message.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# What decoder-only models take (no token_type_ids), as the Llama tokenizers declare.
_MODEL_INPUTS = ("input_ids", "attention_mask")

# Llama-3 (3.0)'s named special tokens; its other ids from 128000 to 128255 are <|reserved_special_token_K|>,
# numbered in id order (Llama-3.1 later renamed some reserved ones, as llama-models' own code does).
_LLAMA3_BASE_TOKENS = 128000
_LLAMA3_NAMED_SPECIALS = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128009: "<|eot_id|>",
}
# Meta's pre-tokenization regex for Llama-3 (the one its tiktoken encoding is built with).
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class SentencePieceFamily:
    """How to train a small tokenizer of a sentencepiece (Llama-style BPE, byte fallback) family.

    Attributes:
        unk, bos, eos: the pieces at ids 0, 1 and 2.
        control: special pieces at ids 3, 4, ... in this order, split out of text as whole tokens.
        add_bos_token: whether encoding with special tokens prepends BOS (Llama-2: yes; Yi-34B-Chat: no).
        pad_token: the tokenizer's pad token, or ``None`` when the real one has none.
        chat_template: the real tokenizer's chat template, or ``None``.
        vocab_size: pieces in the trained model (ids 3+len(control) .. 258+len(control) are the 256 byte pieces).
    """

    unk: str
    bos: str
    eos: str
    control: tuple[str, ...] = ()
    add_bos_token: bool = True
    pad_token: Optional[str] = None
    chat_template: Optional[str] = None
    vocab_size: int = 512


LLAMA2 = SentencePieceFamily(unk="<unk>", bos="<s>", eos="</s>")

# Yi-34B-Chat: <|im_start|> = 6 and <|im_end|> = 7 as in the real vocabulary; ids 3-5 are placeholders for Yi's
# other special tokens, which no test relies on.
YI = SentencePieceFamily(
    unk="<unk>", bos="<|startoftext|>", eos="<|endoftext|>",
    control=("<|placeholder_3|>", "<|placeholder_4|>", "<|placeholder_5|>", "<|im_start|>", "<|im_end|>"),
    add_bos_token=False, pad_token="<unk>", chat_template=CHATML_TEMPLATE,
)


def mistral_tokenizer_model() -> str:
    """Path of the official Mistral-7B v0.1/v0.2 ``tokenizer.model`` shipped in ``mistral-common``."""
    return str(resources.files("mistral_common") / "data" / "tokenizer.model.v1")


def llama3_tokenizer_model() -> str:
    """Path of Meta's Llama-3 ``tokenizer.model`` (tiktoken ranks) shipped in ``llama-models``."""
    return str(resources.files("llama_models") / "llama3" / "tokenizer.model")


def llama3_special_tokens() -> list[str]:
    """Llama-3.0's 256 special tokens in id order (ids 128000 to 128255)."""
    reserved = iter(range(256))
    return [_LLAMA3_NAMED_SPECIALS.get(i) or f"<|reserved_special_token_{next(reserved)}|>"
            for i in range(_LLAMA3_BASE_TOKENS, _LLAMA3_BASE_TOKENS + 256)]


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def _write_json(path: str, data: dict, indent: Optional[int] = 2) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def _save_fast(tok: PreTrainedTokenizerFast, path: str) -> None:
    """Save ``tok`` and name its class ``PreTrainedTokenizerFast`` in the config, as hub repositories that ship
    only a ``tokenizer.json`` do (transformers 5 loads that file as it is, without rebuilding anything)."""
    tok.save_pretrained(path)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(config_path, config)


def write_ray2333_tokenizer(path: str, *, legacy: Optional[bool] = True) -> None:
    """Write the tokenizer files of Ray2333/reward-model-Mistral-7B-instruct-Unified-Feedback as reported:
    Mistral's real ``tokenizer.model``, a ``LlamaTokenizer`` ``tokenizer_config.json`` with ``[PAD]`` added at id
    32000 (vocabulary 32001) and Mistral-7B-Instruct-v0.2's chat template, ``special_tokens_map.json``, and no
    ``tokenizer.json``.

    ``legacy`` is the config's ``legacy`` flag (``None``: left out); transformers 5 loads both kinds wrongly.
    """
    write_mistral_tokenizer(path, pad_token="[PAD]", chat_template=MISTRAL_V02_CHAT_TEMPLATE, legacy=legacy)


def write_mistral_tokenizer(path: str, *, pad_token: Optional[str] = None, chat_template: Optional[str] = None,
                            legacy: Optional[bool] = True) -> None:
    """Write Mistral-7B v0.1/v0.2's tokenizer in the files its fine-tunes ship: the real ``tokenizer.model``, a
    ``LlamaTokenizer`` ``tokenizer_config.json`` (BOS added, no EOS), ``special_tokens_map.json``, and no
    ``tokenizer.json``. ``pad_token``: a pad token added after the vocabulary (id 32000), or ``None`` for none;
    ``chat_template``: the config's template, or ``None`` for none; ``legacy``: the config's ``legacy`` flag
    (``None``: left out)."""
    os.makedirs(path, exist_ok=True)
    shutil.copyfile(mistral_tokenizer_model(), os.path.join(path, "tokenizer.model"))
    decoder = {"0": _special("<unk>"), "1": _special("<s>"), "2": _special("</s>")}
    if pad_token is not None:
        decoder["32000"] = _special(pad_token)
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [],
        "bos_token": "<s>",
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": pad_token,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    if chat_template is None:
        del config["chat_template"]
    if legacy is not None:
        config["legacy"] = legacy
    _write_json(os.path.join(path, "tokenizer_config.json"), config)
    specials = {"bos_token": _special("<s>"), "eos_token": _special("</s>"), "unk_token": _special("<unk>")}
    if pad_token is not None:
        specials["pad_token"] = _special(pad_token)
    _write_json(os.path.join(path, "special_tokens_map.json"), specials)


def train_sentencepiece(family: SentencePieceFamily) -> bytes:
    """A sentencepiece BPE model of ``family`` trained on :data:`CORPUS`, serialized. The trainer options are the
    Llama family's (identity normalization, dummy "▁" prefix, spaces kept, digits split, byte fallback)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=model, model_type="bpe",
        vocab_size=family.vocab_size, hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, add_dummy_prefix=True,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece=family.unk,
        bos_piece=family.bos, eos_piece=family.eos, control_symbols=list(family.control), num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


WHITESPACE_SCORE = -1e9
"""The score Llama-family vocabularies give their whitespace-run pieces, so sentencepiece never forms them by merging
while anything else can be merged (see :func:`with_whitespace_pieces`)."""


def with_whitespace_pieces(model: bytes, longest: int = 4) -> bytes:
    """``model`` (a serialized sentencepiece BPE model) with the whitespace-run pieces ``▁▁`` .. ``▁`` * ``longest``
    laid out as in Mistral's and Llama-2's ``tokenizer.model``: ordinary pieces right after the byte pieces (low ids,
    so merges taken in id order apply them early) with score -1e9 (so sentencepiece applies them last). Trained
    whitespace pieces are dropped first."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    pieces = [p for p in proto.pieces if not (len(p.piece) > 1 and set(p.piece) == {"▁"})]
    at = max(i for i, p in enumerate(pieces) if p.type == sentencepiece_model_pb2.ModelProto.SentencePiece.BYTE) + 1
    runs = []
    for n in range(2, longest + 1):
        piece = sentencepiece_model_pb2.ModelProto.SentencePiece(piece="▁" * n, score=WHITESPACE_SCORE)
        runs.append(piece)
    del proto.pieces[:]
    proto.pieces.extend(pieces[:at] + runs + pieces[at:])
    return proto.SerializeToString()


def write_sentencepiece_tokenizer(path: str, family: SentencePieceFamily) -> PreTrainedTokenizerFast:
    """Train a tokenizer of ``family`` and write it as ``tokenizer.model`` plus an exact ``tokenizer.json``
    (:func:`~rlhf_rewards.tokenization.sentencepiece_fast_tokenizer`) and its config; return it."""
    os.makedirs(path, exist_ok=True)
    model_file = os.path.join(path, "tokenizer.model")
    with open(model_file, "wb") as f:
        f.write(train_sentencepiece(family))
    tok = sentencepiece_fast_tokenizer(
        model_file, add_bos_token=family.add_bos_token, add_eos_token=False, unk_token=family.unk,
        bos_token=family.bos, eos_token=family.eos, pad_token=family.pad_token, chat_template=family.chat_template,
        extra_special_tokens=list(family.control), clean_up_tokenization_spaces=False,
        model_input_names=list(_MODEL_INPUTS),
    )
    _save_fast(tok, path)
    return tok


def write_chatml_bpe_tokenizer(path: str, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on :data:`CORPUS` with ``<|endoftext|>`` (0, the pad token),
    ``<|im_start|>`` (1) and ``<|im_end|>`` (2, EOS), a ChatML chat template and no BOS; written and returned."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  extra_special_tokens=["<|im_start|>"], chat_template=CHATML_TEMPLATE,
                                  clean_up_tokenization_spaces=False, model_input_names=list(_MODEL_INPUTS))
    _save_fast(tok, path)
    return tok


@lru_cache(maxsize=4)
def _converted_llama3(special_tokens: tuple[str, ...]) -> str:
    """Meta's ``tokenizer.model`` converted by transformers' ``TikTokenConverter`` with ``special_tokens``, as the
    backend's JSON: the conversion takes seconds and every Llama-3 family preset's checkpoint repeats it; a string
    (immutable) so each caller builds its own backend from it."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    return TikTokenConverter(vocab_file=llama3_tokenizer_model(), pattern=_LLAMA3_PATTERN,
                             extra_special_tokens=list(special_tokens)).converted().to_str()


def write_llama3_tokenizer(path: str, *, special_tokens: Optional[list[str]] = None,
                           chat_template: str = LLAMA3_CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Meta-Llama-3-8B-Instruct's tokenizer as RLHFlow's preference model ships it: Meta's ``tokenizer.model``
    converted to a ``tokenizer.json`` (byte-level BPE, whole vocabulary words taken before merging as tiktoken does)
    with Llama-3.0's 256 special tokens, BOS ``<|begin_of_text|>`` (added by the tokenizer), EOS ``<|eot_id|>``, no
    pad token, the Llama-3 chat template. Later Llama-3 releases share the vocabulary and differ in
    ``special_tokens`` (ids 128000 to 128255, in id order) and ``chat_template``."""
    backend = Tokenizer.from_str(_converted_llama3(tuple(special_tokens or llama3_special_tokens())))
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, _LLAMA3_BASE_TOKENS)]),
    ])
    os.makedirs(path, exist_ok=True)
    backend.save(os.path.join(path, "tokenizer.json"))
    _write_json(os.path.join(path, "tokenizer_config.json"), {
        "bos_token": bos,
        "eos_token": "<|eot_id|>",
        "chat_template": chat_template,
        # Meta's config says true; transformers 5 ignores it for BPE with a warning on every load.
        "clean_up_tokenization_spaces": False,
        "model_input_names": list(_MODEL_INPUTS),
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    return PreTrainedTokenizerFast.from_pretrained(path)

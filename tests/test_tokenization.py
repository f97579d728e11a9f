"""Tokenizer loading, drift detection and repair, golden ids and pad token rules (rlhf_rewards.tokenization).

Ground truth for Mistral's vocabulary is the official Mistral-7B tokenizer.model (mistral-common's
tokenizer.model.v1) run by sentencepiece on each stretch of text between special tokens, with BOS in front when
special tokens are added: what transformers 4 fed the models in training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import pytest
from cases import mixed_texts, sentencepiece_stretches
from tokenizers import Tokenizer
from transformers import AutoTokenizer, MistralConfig, PreTrainedTokenizerFast

from rlhf_rewards.presets import GoldenIds, get_preset
from rlhf_rewards.presets.seeds import MISTRAL_V02_CHAT_TEMPLATE
from rlhf_rewards.testing import tokenizers as tiny_tokenizers
from rlhf_rewards.tokenization import (
    TokenizerDriftError,
    load_tokenizer,
    sentencepiece_fast_tokenizer,
    verify_tokenizer,
)

sentencepiece = pytest.importorskip("sentencepiece")
pytest.importorskip("mistral_common")

RAY = get_preset("ray2333-mistral-7b")
MISTRAL_SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2, "[PAD]": 32000}

# Fragments the probe strings are built from: chat markers, text right after special tokens, leading and repeated
# spaces, newlines and tabs, digits, punctuation, accents, other scripts and emoji (byte fallback).
FRAGMENTS = [
    "<s>", "</s>", "<unk>", "[PAD]", "[INST]", "[/INST]", " [INST] ", " [/INST]", "Hello", " hello", "world", " ",
    "  ", "    ", "\n", "\n\n", "\t", "123", " 4567", "3.14", "$1,000", "!", "?", "...", "Sure!", "don't", "I'm",
    "naïve", "café", "Привет", "日本語", "مرحبا", "🤗", "👍🏽", "e^{iπ}", "def f(x):\n    return x", "```", "▁",
    "<|im_start|>",
]


def sentencepiece_truth(sp, text: str, add_bos: bool) -> list[int]:
    """What the model was trained on: sentencepiece on each stretch between special tokens."""
    return ([MISTRAL_SPECIALS["<s>"]] if add_bos else []) + sentencepiece_stretches(sp, MISTRAL_SPECIALS, text)


def probe_strings(n: int = 1500) -> list[str]:
    texts = ["", " ", "<s>[INST]", "<s>[INST] Hi [/INST]Hello</s>", "</s> [/INST] ok", " leading", "a\n\nb",
             "  two", "trailing ", "<s> <s>", "[PAD][PAD]", "x<unk>y"]
    return texts + mixed_texts(FRAGMENTS, tiny_tokenizers.CORPUS, n, seed=1234, longest_slice=120, most_parts=12)


@pytest.fixture(scope="module")
def sp():
    return sentencepiece.SentencePieceProcessor(model_file=tiny_tokenizers.mistral_tokenizer_model())


@pytest.fixture(scope="module")
def ray_layouts(tmp_path_factory, tiny_dir):
    """Ray2333's tokenizer files as transformers 5 meets them: in the model directory next to its config.json
    (model_type mistral), alone with ``legacy: true``, and alone without a ``legacy`` flag."""
    root = tmp_path_factory.mktemp("ray_layouts")
    layouts = {"model-dir": tiny_dir("ray2333-mistral-7b")}
    for name, legacy in (("legacy-true", True), ("legacy-unset", None)):
        tiny_tokenizers.write_ray2333_tokenizer(str(root / name), legacy=legacy)
        layouts[name] = str(root / name)
    return layouts


@pytest.fixture(scope="module")
def repaired(ray_layouts):
    return {name: load_tokenizer(RAY, path) for name, path in ray_layouts.items()}


@pytest.fixture(scope="module")
def plain_mistral():
    """Mistral-7B's own tokenizer (32000 ids, no pad), built exactly from its tokenizer.model."""
    return sentencepiece_fast_tokenizer(tiny_tokenizers.mistral_tokenizer_model(), add_bos_token=True,
                                        add_eos_token=False, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# -- drift ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def drifting_mistral(plain_mistral):
    """Mistral's exact tokenizer with its merges re-ordered the way a drifting conversion orders them: whitespace-run
    pieces (``▁▁``, ``▁▁▁``, ... which sentencepiece scores -1e9 and never builds by merging) merged first, so
    ``"a  two"`` splits as ``▁a ▁▁ two`` instead of sentencepiece's ``▁a ▁ ▁two``."""
    data = json.loads(plain_mistral.backend_tokenizer.to_str())
    merges = data["model"]["merges"]
    runs = [m for m in merges if not "".join(m).strip("▁")]
    data["model"]["merges"] = runs + [m for m in merges if m not in runs]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", add_bos_token=True)


@pytest.mark.parametrize("layout", ["model-dir", "legacy-true", "legacy-unset"])
def test_ray2333_layouts_are_verified_or_refused_whatever_transformers_does(ray_layouts, sp, layout):
    # Whether or not this transformers release drifts on the layout, a tokenizer that verify_tokenizer accepts
    # gives sentencepiece's ids (what the model was trained with); load_tokenizer's repair is checked below.
    naive = AutoTokenizer.from_pretrained(ray_layouts[layout])
    try:
        verify_tokenizer(naive, RAY)
    except TokenizerDriftError:
        return
    for text in probe_strings(300):
        assert naive(text)["input_ids"] == sentencepiece_truth(sp, text, True), text


def test_a_drifting_tokenizer_is_refused_naming_text_and_ids(drifting_mistral, sp):
    assert drifting_mistral("a  two", add_special_tokens=False)["input_ids"] != sentencepiece_truth(sp, "a  two", False)
    with pytest.raises(TokenizerDriftError) as err:
        verify_tokenizer(drifting_mistral, RAY)
    message = str(err.value)
    assert repr(" Hello\n    world  123") in message
    assert "[28705, 22557, 13, 2287, 1526, 259, 28740, 28750, 28770]" in message  # expected
    gives = drifting_mistral(" Hello\n    world  123", add_special_tokens=False)["input_ids"]
    assert str(gives) in message  # actual


def test_a_wrong_tokenizer_is_detected_and_not_repaired(plain_mistral):
    llama2 = get_preset("starling-rm-7b-alpha")  # Llama-2 goldens, same vocabulary size as Mistral
    with pytest.raises(TokenizerDriftError, match=r"'\[INST\]' .* should give \[518, 25580, 29962\], gives \[733"):
        verify_tokenizer(plain_mistral, llama2)
    with pytest.raises(TokenizerDriftError):  # an object without a sentencepiece source cannot be rebuilt
        load_tokenizer(llama2, "unused", plain_mistral)


def test_single_tokens_must_be_one_known_token(plain_mistral):
    preset = dataclasses.replace(RAY, golden_ids=(), single_tokens=("<s>", "<|im_start|>"))
    with pytest.raises(TokenizerDriftError, match=r"'<\|im_start\|>' should be one known token"):
        verify_tokenizer(plain_mistral, preset)


def test_repair_that_does_not_help_raises(ray_layouts):
    wrong = dataclasses.replace(RAY, golden_ids=(GoldenIds("[INST]", (1, 2, 3), 32001),))
    with pytest.raises(TokenizerDriftError, match="did not help"):
        load_tokenizer(wrong, ray_layouts["legacy-true"])


# -- repair ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["model-dir", "legacy-true", "legacy-unset"])
def test_repaired_tokenizer_equals_sentencepiece(repaired, sp, layout):
    tok = repaired[layout]
    verify_tokenizer(tok, RAY)
    texts = probe_strings()
    with_bos = tok(texts)["input_ids"]
    bare = tok(texts, add_special_tokens=False)["input_ids"]
    for text, ids, ids_bare in zip(texts, with_bos, bare, strict=True):
        assert ids == sentencepiece_truth(sp, text, True), text
        assert ids_bare == sentencepiece_truth(sp, text, False), text


def test_repair_keeps_the_tokenizer_settings(repaired, ray_layouts):
    naive = AutoTokenizer.from_pretrained(ray_layouts["model-dir"])
    tok = repaired["model-dir"]
    assert len(tok) == len(naive) == 32001
    assert (tok.pad_token, tok.pad_token_id) == ("[PAD]", 32000)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.chat_template == naive.chat_template == MISTRAL_V02_CHAT_TEMPLATE
    assert {i: str(t) for i, t in tok.added_tokens_decoder.items()} == \
        {i: str(t) for i, t in naive.added_tokens_decoder.items()}
    assert (tok.padding_side, tok.truncation_side, tok.model_max_length) == \
        (naive.padding_side, naive.truncation_side, naive.model_max_length)
    # the card: chat template text (starting with "<s>") tokenized with BOS added again
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                   tokenize=False)
    assert text == "<s>[INST] Hi [/INST]Hello</s>"
    ids = tok(text)["input_ids"]
    assert ids[:3] == [1, 1, 733] and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "[INST] Hi [/INST]Hello"
    assert tok.decode(ids[:4]) == "<s><s> [INST"  # as the card shows its input


def test_an_exact_tokenizer_is_used_as_is(plain_mistral, caplog):
    with caplog.at_level(logging.WARNING, logger="rlhf_rewards.tokenization"):
        tok = load_tokenizer(RAY, "unused", plain_mistral)
    assert not caplog.records
    assert tok is not plain_mistral and plain_mistral.pad_token is None  # padded copy, the object is left alone
    assert tok.pad_token == "</s>"


# -- golden ids -----------------------------------------------------------------------------------------------------
def test_mistral_golden_ids_are_what_sentencepiece_gives(sp):
    assert {g.vocab_size for g in RAY.golden_ids} == {32000, 32001}
    for golden in RAY.golden_ids:
        assert list(golden.ids) == sentencepiece_truth(sp, golden.text, golden.add_special_tokens), golden.text


def test_exact_mistral_tokenizer_passes_the_goldens(plain_mistral):
    assert len(plain_mistral) == 32000
    verify_tokenizer(plain_mistral, RAY)


def test_llama3_golden_ids(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir("rlhflow-pair-pm-llama3-8b"))
    preset = get_preset("rlhflow-pair-pm-llama3-8b")
    assert len(tok) == 128256
    verify_tokenizer(tok, preset)
    assert tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]) == [128000, 128001, 128009]


def test_goldens_are_skipped_for_other_vocabulary_sizes(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir("starling-rm-7b-alpha"))
    assert len(tok) != 32000
    verify_tokenizer(tok, get_preset("starling-rm-7b-alpha"))


# -- pad token ------------------------------------------------------------------------------------------------------
def test_preset_pad_token_replaces_the_tokenizers(tiny_dir):
    original = AutoTokenizer.from_pretrained(tiny_dir("starling-rm-34b"))
    original.pad_token = "<|endoftext|>"
    tok = load_tokenizer(get_preset("starling-rm-34b"), "unused", original)
    assert (tok.pad_token, tok.pad_token_id) == ("<unk>", 0)
    assert original.pad_token == "<|endoftext|>"


def test_preset_pad_token_must_exist(tiny_dir):
    with pytest.raises(TokenizerDriftError, match="pads with '<unk>'"):
        load_tokenizer(get_preset("starling-rm-34b"), tiny_dir("sequence-classifier"))


def test_missing_pad_falls_back_to_eos_then_unk(plain_mistral, tiny_dir):
    generic = get_preset("sequence-classifier")
    assert load_tokenizer(generic, "unused", plain_mistral).pad_token == "</s>"
    no_eos = sentencepiece_fast_tokenizer(os.path.join(tiny_dir("starling-rm-7b-alpha"), "tokenizer.model"),
                                          add_bos_token=True, add_eos_token=False, unk_token="<unk>")
    assert no_eos.eos_token is None and no_eos.pad_token is None
    assert load_tokenizer(generic, "unused", no_eos).pad_token == "<unk>"


def test_existing_pad_token_is_kept(tiny_dir):
    tok = load_tokenizer(get_preset("sequence-classifier"), tiny_dir("sequence-classifier"))
    assert tok.pad_token == "<|endoftext|>"


# -- where the tokenizer comes from ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bare_model_dir(tmp_path_factory):
    """A model directory with a config.json and no tokenizer files."""
    path = tmp_path_factory.mktemp("bare_model")
    MistralConfig(vocab_size=32001).save_pretrained(str(path))
    return str(path)


def test_resolution_explicit_object_first(tiny_dir, plain_mistral):
    tok = AutoTokenizer.from_pretrained(tiny_dir("sequence-classifier"))
    assert load_tokenizer(get_preset("sequence-classifier"), tiny_dir("starling-rm-34b"), tok) is tok


def test_resolution_explicit_path_before_the_model_dir(tiny_dir):
    tok = load_tokenizer(get_preset("sequence-classifier"), tiny_dir("starling-rm-34b"),
                         tiny_dir("sequence-classifier"))
    assert tok.chat_template == tiny_tokenizers.CHATML_TEMPLATE and "<|im_start|>" in tok.get_vocab()
    assert "<|startoftext|>" not in tok.get_vocab()


def test_resolution_model_dir_before_the_preset_source(tiny_dir):
    preset = dataclasses.replace(get_preset("sequence-classifier"), tokenizer_source=tiny_dir("starling-rm-34b"))
    tok = load_tokenizer(preset, tiny_dir("sequence-classifier"))
    assert "<|startoftext|>" not in tok.get_vocab()


def test_resolution_preset_source_when_the_model_dir_has_no_tokenizer(bare_model_dir, ray_layouts, caplog):
    preset = dataclasses.replace(RAY, tokenizer_source=ray_layouts["legacy-unset"])
    with caplog.at_level(logging.WARNING, logger="rlhf_rewards.tokenization"):
        tok = load_tokenizer(preset, bare_model_dir)
    assert len(tok) == 32001 and tok.pad_token_id == 32000
    verify_tokenizer(tok, RAY)  # repaired from the source's tokenizer.model, with a warning saying so
    assert any("rebuilt from" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("legacy", [False, True])
def test_exact_tokenizer_json_declared_llama_tokenizer_is_repaired(tmp_path, repaired, sp, legacy):
    # Like Mistral's and Llama-2's own hub repositories: an exact tokenizer.json, the tokenizer.model and a
    # LlamaTokenizer config.
    repaired["legacy-true"].save_pretrained(str(tmp_path))
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="LlamaTokenizer", legacy=legacy)
    config_path.write_text(json.dumps(config))
    shutil.copyfile(tiny_tokenizers.mistral_tokenizer_model(), str(tmp_path / "tokenizer.model"))
    # transformers 5 (up to 5.24 at least) replaces the tokenizer.json's normalizer with its Metaspace
    # pre-tokenizer; whatever a release does, what we load gives sentencepiece's ids.
    tok = load_tokenizer(RAY, str(tmp_path))
    for text in probe_strings(300):
        assert tok(text)["input_ids"] == sentencepiece_truth(sp, text, True), text

"""The load-time comparison with sentencepiece, for every preset whose model was trained with a sentencepiece
tokenizer (issue 8, section 4), on tiny sentencepiece BPE models trained here whose whitespace-run pieces have score
-1e9 and low ids, as in Mistral's, Llama-2's and Yi's ``tokenizer.model``.

Ground truth is sentencepiece itself on each stretch between added tokens. The drifting tokenizer is built here
(BPE merges taken in piece-id order, the way transformers 5 converts such models), so the tests do not depend on
whether the installed transformers drifts.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
from cases import mixed_texts, sentencepiece_stretches
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rlhf_rewards.presets import get_preset
from rlhf_rewards.presets.seeds import MISTRAL_V02_CHAT_TEMPLATE
from rlhf_rewards.testing import tokenizers as tiny_tokenizers
from rlhf_rewards.tokenization import (
    SENTENCEPIECE_PROBES,
    TokenizerDriftError,
    load_tokenizer,
    sentencepiece_fast_tokenizer,
    sentencepiece_model_file,
    verify_tokenizer,
)

sentencepiece = pytest.importorskip("sentencepiece")
from sentencepiece import sentencepiece_model_pb2  # noqa: E402

# (preset, sentencepiece family, file layout) as each preset's real repository ships its tokenizer:
# Ray2333: tokenizer.model + a LlamaTokenizer config with [PAD] added after the vocabulary, no tokenizer.json;
# Yi-34B-Chat and Llama-2-7b-chat: tokenizer.model next to a tokenizer.json.
LAYOUTS = {
    "ray2333-mistral-7b": (tiny_tokenizers.LLAMA2, "model-only"),
    "starling-rm-34b": (tiny_tokenizers.YI, "with-tokenizer-json"),
    "starling-rm-7b-alpha": (tiny_tokenizers.LLAMA2, "with-tokenizer-json"),
}


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def write_layout(path: str, preset: str, *, drift: bool, model: bytes) -> str:
    """Write ``preset``'s tokenizer files with the sentencepiece ``model``; with ``drift``, a ``tokenizer.json``
    whose BPE merges go in piece-id order (and a config that makes transformers load it as it is)."""
    family, layout = LAYOUTS[preset]
    os.makedirs(path, exist_ok=True)
    model_file = os.path.join(path, "tokenizer.model")
    with open(model_file, "wb") as f:
        f.write(model)
    if layout == "model-only" and not drift:
        n = sentencepiece.SentencePieceProcessor(model_file=model_file).get_piece_size()
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                  "added_tokens_decoder": {"0": _special("<unk>"), "1": _special("<s>"), "2": _special("</s>"),
                                           str(n): _special("[PAD]")},
                  "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "[PAD]",
                  "chat_template": MISTRAL_V02_CHAT_TEMPLATE, "legacy": True, "clean_up_tokenization_spaces": False}
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
        return path
    exact = sentencepiece_fast_tokenizer(
        model_file, add_bos_token=family.add_bos_token, add_eos_token=False, unk_token=family.unk,
        bos_token=family.bos, eos_token=family.eos, pad_token=family.pad_token, chat_template=family.chat_template,
        extra_special_tokens=list(family.control), clean_up_tokenization_spaces=False)
    exact.save_pretrained(path)
    if drift:
        data = json.loads(exact.backend_tokenizer.to_str())
        vocab = data["model"]["vocab"]
        data["model"]["merges"].sort(key=lambda m: vocab["".join(m if isinstance(m, list) else m.split(" "))])
        with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w") as f:
        json.dump(config, f)
    return path


@pytest.fixture(scope="module")
def models():
    """Each family's tiny sentencepiece BPE model with -1e9 whitespace pieces, trained once."""
    return {name: tiny_tokenizers.with_whitespace_pieces(tiny_tokenizers.train_sentencepiece(family))
            for name, family in (("llama2", tiny_tokenizers.LLAMA2), ("yi", tiny_tokenizers.YI))}


def model_for(models, preset: str) -> bytes:
    return models["yi" if LAYOUTS[preset][0] is tiny_tokenizers.YI else "llama2"]


def random_texts(tok: PreTrainedTokenizerBase, n: int = 400) -> list[str]:
    """Texts other than the guard's own probes: corpus slices and mixes of whitespace, digits, scripts, specials."""
    fragments = [" ", "  ", "   ", "\n", "\n\n", "\t", "x", " y", "word", " 42", "7", "é", "ß", "中文", "🙂", "[INST]",
                 " [/INST]", *tok.all_special_tokens]
    return mixed_texts(fragments, tiny_tokenizers.CORPUS, n, seed=7, longest_slice=80, most_parts=10)


def assert_equals_sentencepiece(tok: PreTrainedTokenizerBase, model_file: str) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    added = {str(t): i for i, t in tok.added_tokens_decoder.items()}
    texts = random_texts(tok)
    for text, ids in zip(texts, tok(texts, add_special_tokens=False)["input_ids"], strict=True):
        assert ids == sentencepiece_stretches(sp, added, text), text


@pytest.mark.parametrize("preset", list(LAYOUTS))
def test_drifting_tokenizer_is_detected_and_repaired(tmp_path, models, preset, caplog):
    path = write_layout(str(tmp_path), preset, drift=True, model=model_for(models, preset))
    model_file = os.path.join(path, "tokenizer.model")
    naive = AutoTokenizer.from_pretrained(path)
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    # the constructed drift: "a  two" gets "▁▁" where sentencepiece keeps "▁" "▁t..."
    assert naive("a  two", add_special_tokens=False)["input_ids"] != sp.encode("a  two")
    assert sentencepiece_model_file(naive) == model_file
    with pytest.raises(TokenizerDriftError) as err:
        verify_tokenizer(naive, get_preset(preset), model_file)
    assert f"'a  two' should give {sp.encode('a  two')} as sentencepiece does" in str(err.value)

    with caplog.at_level(logging.WARNING, logger="rlhf_rewards.tokenization"):
        tok = load_tokenizer(get_preset(preset), path)
    assert any("rebuilt from" in r.getMessage() for r in caplog.records)
    assert_equals_sentencepiece(tok, model_file)
    assert tok.convert_tokens_to_ids(tok.all_special_tokens) == naive.convert_tokens_to_ids(naive.all_special_tokens)
    assert tok.chat_template == naive.chat_template


@pytest.mark.parametrize("preset", list(LAYOUTS))
def test_tokenizer_as_transformers_loads_it_ends_up_exact(tmp_path, models, preset):
    """Whatever the installed transformers makes of each layout, the tokenizer used is sentencepiece's."""
    path = write_layout(str(tmp_path), preset, drift=False, model=model_for(models, preset))
    tok = load_tokenizer(get_preset(preset), path)
    assert_equals_sentencepiece(tok, os.path.join(path, "tokenizer.model"))


def test_a_drifting_tokenizer_object_is_repaired_on_a_copy(tmp_path, models):
    preset = "starling-rm-7b-alpha"
    path = write_layout(str(tmp_path), preset, drift=True, model=model_for(models, preset))
    naive = AutoTokenizer.from_pretrained(path)
    before = naive("a  two", add_special_tokens=False)["input_ids"]
    tok = load_tokenizer(get_preset(preset), "unused", naive)
    assert tok is not naive and naive("a  two", add_special_tokens=False)["input_ids"] == before
    assert_equals_sentencepiece(tok, os.path.join(path, "tokenizer.model"))


def test_unrepairable_drift_is_refused_naming_the_text(tmp_path, models):
    """A sentencepiece model whose normalizer the rebuild cannot reproduce (runs of spaces collapsed): the drifting
    tokenizer is refused, never used."""
    path = write_layout(str(tmp_path), "starling-rm-7b-alpha", drift=True, model=models["llama2"])
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(models["llama2"])
    proto.normalizer_spec.remove_extra_whitespaces = True
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(proto.SerializeToString())
    with pytest.raises(TokenizerDriftError, match=r"(?s)'a  two' should give .* as sentencepiece does.*did not help"):
        load_tokenizer(get_preset("starling-rm-7b-alpha"), path)


def test_presets_trained_with_sentencepiece_are_guarded():
    guarded = {name for name in ("ray2333-mistral-7b", "starling-rm-34b", "starling-rm-7b-alpha",
                                 "rlhflow-pair-pm-llama3-8b", "sequence-classifier")
               if get_preset(name).sentencepiece_truth}
    assert guarded == set(LAYOUTS)


def test_probes_cover_what_drifts():
    texts = " ".join(SENTENCEPIECE_PROBES)
    assert "  " in texts and "   " in texts and "\n" in texts and "\t" in texts and any(c.isdigit() for c in texts)
    assert any(ord(c) > 0xFFFF for c in texts)  # characters only byte fallback can encode

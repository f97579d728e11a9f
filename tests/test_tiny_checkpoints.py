"""Tiny checkpoints (rlhf_rewards.testing): each builds, has its hub repository's file layout, reloads offline with
plain transformers / torch and gives finite outputs. Built once per session by conftest's ``tiny_dir``."""

from __future__ import annotations

import filecmp
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralForSequenceClassification,
)

from cases import sentencepiece_stretches
from rlhf_rewards.backends.value_head import ValueHeadRewardModel, find_state_dict_file, load_value_head_state_dict
from rlhf_rewards.presets import get_preset, resolve_preset
from rlhf_rewards.presets.seeds import MISTRAL_V02_CHAT_TEMPLATE
from rlhf_rewards.testing import make_tiny_checkpoint
from rlhf_rewards.testing import tokenizers as tiny_tokenizers
from rlhf_rewards.tokenization import load_tokenizer

TEXTS = ["Hello there, how are you?", "A much longer answer with 12 numbers, some punctuation; and a newline\nhere."]


def config_json(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def batch(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tok(texts, padding=True, return_tensors="pt"))


def test_ray2333_layout_and_model(tiny_dir):
    pytest.importorskip("mistral_common")
    path = tiny_dir("ray2333-mistral-7b")
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "special_tokens_map.json",
                                        "tokenizer.model", "tokenizer_config.json"]  # no tokenizer.json
    assert filecmp.cmp(os.path.join(path, "tokenizer.model"), tiny_tokenizers.mistral_tokenizer_model(), shallow=False)
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        tok_config = json.load(f)
    assert tok_config["tokenizer_class"] == "LlamaTokenizer"
    assert tok_config["added_tokens_decoder"]["32000"]["content"] == "[PAD]"
    assert tok_config["chat_template"] == MISTRAL_V02_CHAT_TEMPLATE
    config = config_json(path)
    assert config["architectures"] == ["MistralForSequenceClassification"]
    assert (config["vocab_size"], config["pad_token_id"]) == (32001, 32000)
    assert resolve_preset(path, None).name == "ray2333-mistral-7b"

    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
    assert isinstance(model, MistralForSequenceClassification) and model.config.num_labels == 1
    assert model.config.hidden_size <= 64 and model.config.num_hidden_layers == 2
    assert model.dtype == torch.float32
    tok = load_tokenizer(get_preset("ray2333-mistral-7b"), path)  # repaired on load
    chat = [{"role": "user", "content": t} for t in TEXTS]
    texts = [tok.apply_chat_template([m, {"role": "assistant", "content": "Sure."}], tokenize=False) for m in chat]
    with torch.no_grad():
        logits = model(**batch(tok, texts)).logits
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()


def test_starling_34b_layout_and_model(tiny_dir):
    path = tiny_dir("starling-rm-34b")
    files = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= files
    config = config_json(path)
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["rlhf_rewards_preset"] == "starling-rm-34b"
    assert config["max_position_embeddings"] >= 4096
    assert resolve_preset(path, None).name == "starling-rm-34b"
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "v_head.weight" in keys and all(k.startswith("transformer.") for k in keys - {"v_head.weight"})

    model, info = ValueHeadRewardModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    specials = ["<unk>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.convert_tokens_to_ids(specials) == [0, 1, 2, 6, 7]
    assert (tok.pad_token, tok.pad_token_id) == ("<unk>", 0)
    sample = "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi, how can I help you?<|im_end|>"
    ids = tok(sample)["input_ids"]
    assert ids[0] == 6 and ids[-1] == 7 and 1 not in ids  # Yi-34B-Chat adds no BOS
    with torch.no_grad():
        values = model(**batch(tok, [sample, TEXTS[0]]))
    assert values.shape[0] == 2 and torch.isfinite(values).all()


def test_starling_7b_layout_and_model(tiny_dir):
    path = tiny_dir("starling-rm-7b-alpha")
    files = set(os.listdir(path))
    assert "pytorch_model.bin" in files and not any(f.endswith(".safetensors") for f in files)
    assert find_state_dict_file(path) == os.path.join(path, "pytorch_model.bin")
    state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    assert "v_head.weight" in state and all(k.startswith("transformer.") for k in set(state) - {"v_head.weight"})
    config = config_json(path)
    assert config["rlhf_rewards_preset"] == "starling-rm-7b-alpha" and config["max_position_embeddings"] >= 4096
    assert resolve_preset(path, None).name == "starling-rm-7b-alpha"

    model = ValueHeadRewardModel(LlamaConfig.from_pretrained(path, local_files_only=True))
    load_value_head_state_dict(model, os.path.join(path, "pytorch_model.bin"))
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tok("<unk>")["input_ids"] == [1, 0]  # BOS added, as Llama-2's tokenizer does
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    tok.pad_token = tok.unk_token  # the card's padding
    sample = "<s>[INST] Hello </s> [/INST] Hi, how can I help you?</s>"
    with torch.no_grad():
        values = model.eval()(**batch(tok, [sample, TEXTS[1]]))
    assert torch.isfinite(values).all()


def test_sequence_classifier_layout_and_model(tiny_dir):
    path = tiny_dir("sequence-classifier")
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert isinstance(model, LlamaForSequenceClassification) and model.config.num_labels == 1
    assert model.config.pad_token_id == tok.pad_token_id is not None
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                   tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    assert tok(text)["input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")  # no BOS
    with torch.no_grad():
        logits = model(**batch(tok, [text, TEXTS[1]])).logits
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()


def test_rlhflow_layout_and_model(tiny_dir):
    path = tiny_dir("rlhflow-pair-pm-llama3-8b")
    config = config_json(path)
    assert config["rlhf_rewards_preset"] == "rlhflow-pair-pm-llama3-8b"
    assert resolve_preset(path, None).name == "rlhflow-pair-pm-llama3-8b"
    with open(os.path.join(path, "tokenizer.json")) as f:
        assert json.load(f)["model"]["ignore_merges"] is True
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert isinstance(model, LlamaForCausalLM) and not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.vocab_size == len(tok) == 128256
    assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert [tok.encode(c, add_special_tokens=False) for c in "AB"] == [[32], [33]]
    text = tok.apply_chat_template([{"role": "user", "content": "  [CONTEXT] hi [RESPONSE A] a [RESPONSE B] b \n"}],
                                   tokenize=False)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                    "[CONTEXT] hi [RESPONSE A] a [RESPONSE B] b<|eot_id|>")  # content trimmed, BOS from the template
    ids = tok(text.replace(tok.bos_token, ""), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids, logits_to_keep=1).logits
    assert logits.shape == (1, 1, 128256) and torch.isfinite(logits).all()


def test_rlhflow_tokenizer_gives_meta_tiktoken_ids(tiny_dir):
    """Oracle: Meta's own Llama-3 tokenizer is tiktoken over its ``tokenizer.model`` ranks, Meta's split pattern and
    the 256 special tokens from id 128000; the converted tokenizer.json must give the same ids, BOS in front."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    from rlhf_rewards.testing import tokenizers

    specials = tokenizers.llama3_special_tokens()
    meta = tiktoken.Encoding("llama3", mergeable_ranks=load_tiktoken_bpe(tokenizers.llama3_tokenizer_model()),
                             pat_str=r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                             special_tokens={t: 128000 + i for i, t in enumerate(specials)})
    tok = AutoTokenizer.from_pretrained(tiny_dir("rlhflow-pair-pm-llama3-8b"), local_files_only=True)
    assert specials[:10] == ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                             "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                             "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|reserved_special_token_4|>", "<|eot_id|>"] and len(specials) == 256
    texts = [" milyon", "a  two\n\n\tx  ", "Café naïve 日本語 😀 1234567 don't I'LL",
             "<|start_header_id|>user<|end_header_id|>\n\n[CONTEXT] hi [RESPONSE A] a [RESPONSE B] b<|eot_id|>",
             "    def f(x):\r\n        return x  # ok?!"] + tokenizers.CORPUS.splitlines(keepends=True)
    for text in texts:
        assert tok(text)["input_ids"] == [128000] + meta.encode(text, allowed_special="all"), text


@pytest.mark.parametrize("name", ["starling-rm-34b", "starling-rm-7b-alpha"])
def test_trained_tokenizers_equal_their_sentencepiece_model(tiny_dir, name):
    """The shipped tokenizer.json gives what the shipped tokenizer.model gives on each stretch between special
    tokens, for text right after special tokens, leading and repeated spaces and newlines too."""
    sentencepiece = pytest.importorskip("sentencepiece")
    path = tiny_dir(name)
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    specials = {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}

    def truth(text: str) -> list[int]:
        return sentencepiece_stretches(sp, specials, text)

    lines = tiny_tokenizers.CORPUS.splitlines()
    texts = lines + [f" {a}{s}{b}  x\n" for a, b in zip(lines, lines[1:], strict=False) for s in specials]
    for text in texts:
        assert tok(text, add_special_tokens=False)["input_ids"] == truth(text), text


@pytest.mark.parametrize("name", ["ray2333-mistral-7b", "starling-rm-34b", "starling-rm-7b-alpha",
                                  "sequence-classifier"])
def test_same_seed_same_files(tmp_path, name):
    first = make_tiny_checkpoint(name, str(tmp_path / "a"), seed=3)
    again = make_tiny_checkpoint(name, str(tmp_path / "b"), seed=3)
    names = sorted(os.listdir(first))
    assert names == sorted(os.listdir(again))
    assert all(filecmp.cmp(os.path.join(first, n), os.path.join(again, n), shallow=False) for n in names)


def test_other_seed_other_weights_same_tokenizer(tmp_path):
    first = make_tiny_checkpoint("starling-rm-34b", str(tmp_path / "a"), seed=3)
    other = make_tiny_checkpoint("starling-rm-34b", str(tmp_path / "b"), seed=4)
    assert not filecmp.cmp(os.path.join(first, "model.safetensors"), os.path.join(other, "model.safetensors"),
                           shallow=False)
    assert filecmp.cmp(os.path.join(first, "tokenizer.json"), os.path.join(other, "tokenizer.json"), shallow=False)


def test_pairrm_is_dispatched(tiny_dir):
    pytest.importorskip("rlhf_rewards.testing.pairrm")
    path = tiny_dir("pairrm")
    assert os.path.isfile(os.path.join(path, "config.json"))


def test_unknown_preset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="no tiny checkpoint for preset 'nope'"):
        make_tiny_checkpoint("nope", str(tmp_path))

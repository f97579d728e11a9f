"""Scalar presets against oracles that follow each model card's own procedure step by step: its text, its
tokenization, its padding to max_length, batch size 1, and its pooling rule. The oracles share no code with the
package."""

from __future__ import annotations

import json
import os

import pytest
import sentencepiece as spm
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, LlamaModel

from rlhf_rewards import load_reward_model

from cases import CONVERSATIONS, sentencepiece_stretches

TOL = 1e-4


def messages_of(prompt, completion):
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    text = completion if isinstance(completion, str) else completion[0]["content"]
    return msgs + [{"role": "assistant", "content": text}]


# ---- card 001: Ray2333 Mistral RM ------------------------------------------------------------------------------

def sentencepiece_encode(model_file: str, text: str, specials: dict[str, int]) -> list[int]:
    """What Mistral's original (sentencepiece, legacy) tokenizer gives: special-token strings split out, every
    other segment encoded by sentencepiece with its dummy-prefix space."""
    return sentencepiece_stretches(spm.SentencePieceProcessor(model_file=model_file), specials, text)


def card001_reward(model_dir: str, conversation: list[dict]) -> float:
    # the card: text = apply_chat_template(message, tokenize=False); Mistral v0.2's template has no system role,
    # so a system prompt is folded into the first user turn (the package's documented rule)
    if conversation[0]["role"] == "system":
        conversation = [{"role": "user", "content": conversation[0]["content"] + "\n\n" + conversation[1]["content"]}
                        ] + conversation[2:]
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        tok_config = json.load(f)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(tok_config["chat_template"]).render(messages=conversation, bos_token="<s>",
                                                                eos_token="</s>")
    # encode_plus(text, padding='max_length', truncation=True): BOS added in front of the text's own "<s>"
    ids = [1] + sentencepiece_encode(os.path.join(model_dir, "tokenizer.model"), text,
                                     {"<s>": 1, "</s>": 2, "[PAD]": 32000})
    max_length = len(ids) + 17
    input_ids = torch.tensor([ids + [32000] * (max_length - len(ids))])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (max_length - len(ids))])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids, attention_mask=attention_mask).logits.reshape(-1).item()


@pytest.mark.parametrize("packing", [True, False])
def test_ray2333_matches_card(tiny_dir, packing):
    path = tiny_dir("ray2333-mistral-7b")
    rm = load_reward_model(path, preset="ray2333-mistral-7b", device="cpu", packing=packing)
    assert rm.kind == "scalar"
    prompts = [p for p, _ in CONVERSATIONS]
    completions = [c for _, c in CONVERSATIONS]
    ours = rm.score(prompts, completions)
    for (p, c), r in zip(CONVERSATIONS, ours):
        assert abs(r - card001_reward(path, messages_of(p, c))) < TOL


def test_ray2333_text_has_double_bos(tiny_dir):
    rm = load_reward_model(tiny_dir("ray2333-mistral-7b"), preset="ray2333-mistral-7b", device="cpu")
    text = rm.format("Hi", "Yo")
    assert text == "<s>[INST] Hi [/INST]Yo</s>"
    assert rm.tokenize([text])[0][:5] == [1, 1, 733, 16289, 28793]


# ---- card 002: Starling-RM-34B ---------------------------------------------------------------------------------

class CardStarling(nn.Module):
    """The card's LlamaForSequenceClassification: transformer + v_head, reward before the first PAD_ID."""

    def __init__(self, config, pad_id):
        super().__init__()
        self.transformer = LlamaModel(config)
        self.v_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.PAD_ID = pad_id

    def forward(self, input_ids, attention_mask):
        out = self.transformer(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        rewards = self.v_head(out.hidden_states[-1]).squeeze(-1)
        scores = []
        for i in range(input_ids.shape[0]):
            c_inds = (input_ids[i] == self.PAD_ID).nonzero()
            c_ind = c_inds[0].item() if len(c_inds) > 0 else input_ids.shape[1]
            scores.append(rewards[i, c_ind - 1])
        return torch.stack(scores)


def card_get_reward(model, tokenizer, samples):
    enc = tokenizer(samples, truncation=True, max_length=2048, padding="max_length", return_tensors="pt")
    out = []
    with torch.no_grad():
        for i in range(len(samples)):  # reward_batch_size = 1
            out.append(model(enc["input_ids"][i:i + 1], enc["attention_mask"][i:i + 1]))
    return torch.hstack(out).tolist()


def load_card_starling_34b(path):
    from safetensors.torch import load_file

    model = CardStarling(AutoConfig.from_pretrained(path), pad_id=0)
    state = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(path, name)))
    model.load_state_dict(state)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.truncation_side = "left"
    return model.eval(), tokenizer


def yi_text(conversation):
    return "\n".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>" for m in conversation)


@pytest.mark.parametrize("packing", [True, False])
def test_starling_34b_matches_card(tiny_dir, packing):
    path = tiny_dir("starling-rm-34b")
    model, tokenizer = load_card_starling_34b(path)
    long_prompt = " ".join(["word"] * 3000)  # longer than 2048 tokens: left truncation on both sides
    cases = CONVERSATIONS + [(long_prompt, "the end")]
    rm = load_reward_model(path, device="cpu", packing=packing)
    assert rm.preset.name == "starling-rm-34b"
    ours = rm.score([p for p, _ in cases], [c for _, c in cases])
    card = card_get_reward(model, tokenizer, [yi_text(messages_of(p, c)) for p, c in cases])
    assert ours == pytest.approx(card, abs=TOL)
    assert rm.stats.truncated == 1
    assert rm.format("Hello!", "Hi, how can I help you?") == (
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi, how can I help you?<|im_end|>")


def test_starling_34b_reads_before_an_inner_pad_id(tiny_dir):
    """A literal "<unk>" (id 0) inside the text moves the card's reading position; so must ours when asked for the
    card's behaviour (by default it is read as text: tests/test_attack_security.py)."""
    path = tiny_dir("starling-rm-34b")
    model, tokenizer = load_card_starling_34b(path)
    rm = load_reward_model(path, device="cpu", control_text="tokens")
    text_cases = [("Say <unk> please", "Sure: <unk>"), ("<unk>", "starts with the pad id")]
    ours = rm.score([p for p, _ in text_cases], [c for _, c in text_cases])
    card = card_get_reward(model, tokenizer, [yi_text(messages_of(p, c)) for p, c in text_cases])
    assert ours == pytest.approx(card, abs=TOL)


# ---- Starling-RM-7B-alpha --------------------------------------------------------------------------------------

def load_card_starling_7b(path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.truncation_side = "left"
    pad_id = tokenizer(tokenizer.pad_token)["input_ids"][0]
    model = CardStarling(AutoConfig.from_pretrained(path), pad_id=pad_id)
    state = torch.load(os.path.join(path, "pytorch_model.bin"), weights_only=True)
    model.load_state_dict({k: v for k, v in state.items() if k.startswith(("transformer.", "v_head."))})
    return model.eval(), tokenizer


def starling_7b_text(conversation):
    # the card's format, one exchange per [INST]; system prompts go in a Llama-2 <<SYS>> block
    system = ""
    if conversation[0]["role"] == "system":
        system, conversation = conversation[0]["content"], conversation[1:]
    out = ""
    for j in range(0, len(conversation), 2):
        user = conversation[j]["content"]
        if j == 0 and system:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        out += f"<s>[INST] {user} </s> [/INST] {conversation[j + 1]['content']}</s>"
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_starling_7b_matches_card(tiny_dir, packing):
    path = tiny_dir("starling-rm-7b-alpha")
    model, tokenizer = load_card_starling_7b(path)
    assert model.PAD_ID == 1  # BOS, as REFERENCE.md found for the real Llama-2 tokenizer
    long_prompt = " ".join(["word"] * 3000)
    cases = CONVERSATIONS + [(long_prompt, "the end")]
    rm = load_reward_model(path, preset="starling-rm-7b-alpha", device="cpu", packing=packing)
    ours = rm.score([p for p, _ in cases], [c for _, c in cases])
    card = card_get_reward(model, tokenizer, [starling_7b_text(messages_of(p, c)) for p, c in cases])
    assert ours == pytest.approx(card, abs=TOL)
    assert rm.stats.truncated == 1


# ---- generic sequence classifier ---------------------------------------------------------------------------------

@pytest.mark.parametrize("packing", [True, False])
def test_sequence_classifier_matches_transformers(tiny_dir, packing):
    """TRL-style reference: the RM tokenizer's chat template, then the model's own forward and pooling."""
    path = tiny_dir("sequence-classifier")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    rm = load_reward_model(path, preset="sequence-classifier", device="cpu", packing=packing)
    ours = rm.score([p for p, _ in CONVERSATIONS], [c for _, c in CONVERSATIONS])
    for (p, c), r in zip(CONVERSATIONS, ours):
        text = tokenizer.apply_chat_template(messages_of(p, c), tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            expected = model(**ids).logits[0, 0].item()
        assert abs(r - expected) < TOL

"""INF-ORM-Llama3.1-70B against an oracle that follows its card step by step (benchmarks/cards.py: its own copy of the
card's class and pooling, the card's tokenizer call, one conversation at a time), batch invariance, resolution and
drift guards."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from benchmarks.cards import InformCard
from rlhf_rewards import load_reward_model
from rlhf_rewards.tokenization import TokenizerDriftError
from rlhf_rewards.presets import get_preset, resolve_preset

from cases import CONVERSATIONS

PRESET = "inf-orm-llama3.1-70b"
TOL = 1e-4


def messages_of(prompt, completion):
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    text = completion if isinstance(completion, str) else completion[0]["content"]
    return msgs + [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def card(tiny_dir):
    return InformCard(tiny_dir(PRESET))


@pytest.fixture(scope="module")
def rm(tiny_dir):
    return load_reward_model(tiny_dir(PRESET), device="cpu")


@pytest.mark.parametrize("packing", [True, False])
def test_matches_the_card_multi_turn_included(tiny_dir, card, packing):
    rm = load_reward_model(tiny_dir(PRESET), device="cpu", packing=packing)
    ours = rm.score([p for p, _ in CONVERSATIONS], [c for _, c in CONVERSATIONS])
    for (p, c), r in zip(CONVERSATIONS, ours):
        assert r == pytest.approx(card(messages_of(p, c)), abs=TOL)


def test_a_pad_token_in_the_text_moves_the_read_position_as_in_the_card(tiny_dir, card):
    """With control_text='tokens' (the card's reading) a literal pad token ends what the head reads, as the card's
    pooling does; by default it is text and the last token is read."""
    prompt, answer = "Say something.", "first part<|finetune_right_pad_id|> ignored tail"
    as_card = load_reward_model(tiny_dir(PRESET), device="cpu", control_text="tokens")
    expected = card(messages_of(prompt, answer))
    assert as_card.score([prompt], [answer])[0] == pytest.approx(expected, abs=TOL)
    assert as_card.score([prompt], ["first part<|finetune_right_pad_id|> other"])[0] == pytest.approx(expected, abs=TOL)
    as_text = load_reward_model(tiny_dir(PRESET), device="cpu")
    assert as_text.score([prompt], [answer])[0] != pytest.approx(expected, abs=TOL)


def test_batch_composition_does_not_change_a_score(rm):
    prompts = [p for p, _ in CONVERSATIONS] * 2
    completions = [c for _, c in CONVERSATIONS] + ["x" * 40, "short", "", "a much longer answer " * 5, "?", "ok"]
    together = rm.score(prompts, completions)
    alone = [rm.score([p], [c])[0] for p, c in zip(prompts, completions)]
    reversed_ = rm.score(prompts[::-1], completions[::-1])[::-1]
    small = load_reward_model(rm_path(rm), device="cpu", max_batch_tokens=64).score(prompts, completions)
    for batch in (alone, reversed_, small):
        assert batch == pytest.approx(together, abs=1e-5)


def rm_path(rm) -> str:
    return rm.model.config._name_or_path


def test_text_is_the_llama31_template_with_one_bos(rm):
    text = rm.format("  Hello!  ", "Hi")
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                           "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>")
    assert text.endswith("<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>assistant"
                         "<|end_header_id|>\n\nHi<|eot_id|>")
    ids = rm.encode("Hello!", "Hi")
    assert ids.count(128000) == 1 and ids[0] == 128000


def test_resolved_by_hub_id_and_by_config(tiny_dir):
    assert resolve_preset("infly/INF-ORM-Llama3.1-70B", None).name == PRESET
    assert resolve_preset("INFLY/inf-orm-llama3.1-70b", None).name == PRESET
    assert resolve_preset(tiny_dir(PRESET), None).name == PRESET  # config.json: INFORMForSequenceClassification


def test_golden_ids_are_metas_tokenizer():
    tiktoken_tok = pytest.importorskip("llama_models.llama3.tokenizer").Tokenizer.get_instance()
    for golden in get_preset(PRESET).golden_ids:
        assert tiktoken_tok.encode(golden.text, bos=False, eos=False, allowed_special="all") == list(golden.ids)


def test_a_drifted_tokenizer_is_refused(tiny_dir, tmp_path):
    """The drift a third-party tokenizer.json of Llama-3 has shown: merging pair by pair instead of taking whole
    vocabulary words first."""
    path = shutil.copytree(tiny_dir(PRESET), tmp_path / "drift")
    with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
        data = json.load(f)
    data["model"]["ignore_merges"] = False
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(data, f)
    with pytest.raises(TokenizerDriftError, match="milyon"):
        load_reward_model(str(path), device="cpu")


def test_a_checkpoint_missing_head_weights_is_refused(tiny_dir, tmp_path):
    path = shutil.copytree(tiny_dir(PRESET), tmp_path / "broken")
    weights = load_file(os.path.join(path, "model.safetensors"))
    del weights["score.2.bias"]
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="score.2.bias"):
        load_reward_model(str(path), device="cpu")

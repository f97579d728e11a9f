"""Nemotron reward models against their card's own procedure: the real ``model.generate(max_new_tokens=1,
return_dict_in_generate=True, output_scores=True)`` and ``scores[0][0][0]``, one conversation at a time, with the
tiny repository's generation_config.json as built and rewritten with settings that change ``scores`` (temperature,
top-k, top-p, repetition penalty, transformers' default top-k under sampling) and ones that do not."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil

import pytest
import torch

from benchmarks.cards import NemotronCard
from rlhf_rewards import load_reward_model
from rlhf_rewards.errors import NonFiniteRewardError
from rlhf_rewards.presets import get_preset, resolve_preset

from cases import CONVERSATIONS

PRESET = "nemotron-reward"
TOL = 1e-4
# several answers end in "!", Llama-3's id 0, so the repetition penalty meets the reward's own token
SAMPLES = [(p, c) for p, c in CONVERSATIONS] + [("Greet me.", "Hello!"), ("Say it twice!", "Yes! Yes!"),
                                                 ("Nothing here", "plain answer")]


def messages_of(prompt, completion):
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    text = completion if isinstance(completion, str) else completion[0]["content"]
    return msgs + [{"role": "assistant", "content": text}]


@functools.lru_cache(maxsize=None)
def card_rewards(path: str) -> tuple[list[float], list[torch.Tensor]]:
    """The card, sample by sample: the reward and the raw last-position logits (to choose cut-offs)."""
    card = NemotronCard(path)
    rewards, raw = [], []
    for prompt, completion in SAMPLES:
        reward, logits = card(messages_of(prompt, completion))
        rewards.append(reward)
        raw.append(logits)
    return rewards, raw


def with_generation_config(tiny_dir, tmp_path, settings: dict) -> str:
    path = shutil.copytree(tiny_dir(PRESET), tmp_path / "repo")
    config_file = os.path.join(path, "generation_config.json")
    with open(config_file) as f:
        config = json.load(f)
    with open(config_file, "w") as f:
        json.dump({**config, **settings}, f)
    return str(path)


def assert_card_exact(path: str, *, packing: bool = False) -> list[float]:
    expected, _ = card_rewards(path)
    rm = load_reward_model(path, device="cpu", packing=packing)
    got = rm.score_samples([p for p, _ in SAMPLES], [c for _, c in SAMPLES])
    for i, (ours, card) in enumerate(zip(got, expected)):
        if math.isinf(card):  # generate cut id 0: no number, an error naming why
            assert isinstance(ours, NonFiniteRewardError), (i, ours)
        else:
            assert ours == pytest.approx(card, abs=TOL), i
    return expected


@pytest.mark.parametrize("packing", [False, True])
def test_plain_generation_config_reads_the_raw_logit_of_id_0(tiny_dir, packing):
    expected = assert_card_exact(tiny_dir(PRESET), packing=packing)
    assert all(math.isfinite(r) for r in expected)


@pytest.mark.parametrize("settings", [
    {"do_sample": True, "temperature": 0.7},
    {"repetition_penalty": 1.3},
    {"do_sample": True, "temperature": 0.6, "repetition_penalty": 1.2},
    {"do_sample": False, "temperature": 0.6, "top_p": 0.9, "top_k": 5},  # greedy: none of them run
], ids=["temperature", "repetition", "temperature+repetition", "greedy-ignores-warpers"])
def test_elementwise_settings_match_generate(tiny_dir, tmp_path, settings):
    path = with_generation_config(tiny_dir, tmp_path, {**settings, "top_k": settings.get("top_k", 0)})
    assert load_reward_model(path, device="cpu").scoring.cutting is False  # only the row of id 0 is computed
    expected = assert_card_exact(path)
    plain, _ = card_rewards(tiny_dir(PRESET))
    if settings.get("do_sample") or "repetition_penalty" in settings:
        assert expected != pytest.approx(plain, abs=TOL)  # the setting matters, and we follow it


def test_top_k_cuts_some_samples_as_generate_does(tiny_dir, tmp_path):
    _, raw = card_rewards(tiny_dir(PRESET))
    ranks = sorted(int((row > row[0]).sum()) + 1 for row in raw)  # where id 0 ranks in each sample
    top_k = ranks[len(ranks) // 2]  # about half the samples keep id 0
    path = with_generation_config(tiny_dir, tmp_path, {"do_sample": True, "temperature": 0.8, "top_k": top_k})
    assert load_reward_model(path, device="cpu").scoring.cutting is True
    expected = assert_card_exact(path)
    assert any(math.isinf(r) for r in expected) and any(math.isfinite(r) for r in expected)


def test_top_p_and_the_default_top_k_under_sampling(tiny_dir, tmp_path):
    # do_sample alone: transformers' default top_k=50 applies, and cuts id 0 from every sample here
    expected = assert_card_exact(with_generation_config(tiny_dir, tmp_path / "a", {"do_sample": True}))
    assert all(math.isinf(r) for r in expected)
    assert_card_exact(with_generation_config(tiny_dir, tmp_path / "b", {"do_sample": True, "top_k": 0,
                                                                        "top_p": 0.999, "temperature": 3.0}))
    assert_card_exact(with_generation_config(tiny_dir, tmp_path / "c", {"do_sample": True, "top_k": 0,
                                                                        "renormalize_logits": True}))


def test_settings_not_reproduced_are_refused_naming_them(tiny_dir, tmp_path):
    refused = [({"num_beams": 2}, "num_beams"), ({"suppress_tokens": [0]}, "suppress_tokens"),
               ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size"),
               ({"do_sample": True, "temperature": 0.0}, "temperature=0.0")]
    for i, (settings, name) in enumerate(refused):
        path = with_generation_config(tiny_dir, tmp_path / str(i), settings)
        with pytest.raises(ValueError, match=name):
            load_reward_model(path, device="cpu")


def test_batch_composition_does_not_change_a_score(tiny_dir, tmp_path):
    path = with_generation_config(tiny_dir, tmp_path, {"repetition_penalty": 1.3})
    rm = load_reward_model(path, device="cpu")
    prompts, completions = [p for p, _ in SAMPLES], [c for _, c in SAMPLES]
    together = rm.score(prompts, completions)
    alone = [rm.score([p], [c])[0] for p, c in zip(prompts, completions)]
    small = load_reward_model(path, device="cpu", max_batch_tokens=48).score(prompts, completions)
    assert alone == pytest.approx(together, abs=1e-5) and small == pytest.approx(together, abs=1e-5)


def test_settings_are_shown_and_resolution(tiny_dir, tmp_path):
    rm = load_reward_model(with_generation_config(tiny_dir, tmp_path, {"do_sample": True, "temperature": 0.5,
                                                                       "top_p": 0.9}), device="cpu")
    assert rm.generation_settings == "temperature=0.5, top_k=50, top_p=0.9"
    for hub_id in get_preset(PRESET).hub_ids:
        assert resolve_preset(hub_id, None).name == PRESET
    assert resolve_preset(tiny_dir(PRESET), None).name == PRESET


def test_golden_ids_are_metas_tokenizer():
    tiktoken_tok = pytest.importorskip("llama_models.llama3.tokenizer").Tokenizer.get_instance()
    for golden in get_preset(PRESET).golden_ids:
        assert tiktoken_tok.encode(golden.text, bos=False, eos=False, allowed_special="all") == list(golden.ids)

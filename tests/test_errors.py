"""Errors that name what is wrong (issue 8 section 2) and nothing silent (section 3): per-sample errors instead of
a failed batch, counted and reported truncation, templated prompts in the direct API."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from rlhf_rewards import RewardFunction, SampleError, best_of_n, group_rewards, load_reward_model
from rlhf_rewards.errors import TooLongError

from serving_helpers import StalledServer

PM = "rlhflow-pair-pm-llama3-8b"


@pytest.fixture(scope="module")
def models(tiny_dir):
    cache = {}

    def get(preset, **kwargs):
        key = (preset, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = load_reward_model(tiny_dir(preset), **kwargs)
        return cache[key]

    return get


# -- section 2: loading ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["ray2333-mistral-7b", "starling-rm-34b", PM, "pairrm"])
def test_a_path_that_does_not_exist_is_named(tmp_path, preset):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match=f"model directory '{missing}' does not exist"):
        load_reward_model(missing, preset=preset)


@pytest.mark.parametrize("preset", ["ray2333-mistral-7b", "starling-rm-34b", PM, "pairrm"])
def test_an_empty_directory_is_named(tmp_path, preset):
    with pytest.raises(FileNotFoundError, match=f"'{tmp_path}' is empty: it holds no model files"):
        load_reward_model(str(tmp_path), preset=preset)


@pytest.mark.parametrize("directory, preset, found", [
    ("ray2333-mistral-7b", "pairrm", "'mistral'"),
    ("pairrm", "ray2333-mistral-7b", "'deberta-v2'"),
    ("ray2333-mistral-7b", PM, "'mistral'"),
])
def test_the_wrong_preset_for_a_directory_names_both(tiny_dir, directory, preset, found):
    with pytest.raises(ValueError, match=f"holds a {found} model.*preset '{preset}' loads.*looks like preset "
                                         f"'{directory}'"):
        load_reward_model(tiny_dir(directory), preset=preset)


def test_an_uncached_hub_id_offline_fails_at_once_naming_the_repository(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="'Nexusflow/Starling-RM-34B' is not in the local Hugging Face cache and "
                                      "HF_HUB_OFFLINE=1"):
        load_reward_model("Nexusflow/Starling-RM-34B")
    with pytest.raises(OSError, match="'someone/some-classifier' is not in the local"):
        load_reward_model("someone/some-classifier", preset="sequence-classifier")


def test_an_unreachable_hub_fails_fast_naming_the_repository(monkeypatch, tmp_path):
    """transformers' own retries against a hub that did not answer took ~55 s; one short probe decides instead. The
    hub here accepts connections and never answers: it must be asked once, by that probe, and nothing more."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("rlhf_rewards.sources.HUB_PROBE_SECONDS", 0.5)
    hub = StalledServer(hold=30)  # closes what it holds after 30 s: a client without a timeout fails, not hangs
    with hub as url:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", url)
        with pytest.raises(OSError, match="cannot download model 'RLHFlow/pair-preference-model-LLaMA3-8B': the "
                                          "hub does not answer"):
            load_reward_model("RLHFlow/pair-preference-model-LLaMA3-8B")
    assert hub.requests() == ["HEAD / HTTP/1.1"]


def test_a_lowercase_hub_id_resolves_to_its_preset(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="'Nexusflow/Starling-RM-34B' is not in the local"):
        load_reward_model("nexusflow/starling-rm-34b")
    from rlhf_rewards.presets import resolve_preset

    assert resolve_preset("nexusflow/starling-rm-34b", None).name == "starling-rm-34b"


def test_a_cuda_device_without_cuda_fails_before_loading(tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import rlhf_rewards.backends as backends

    monkeypatch.setattr(backends, "LOADERS", {})  # any attempt to load would raise KeyError instead
    with pytest.raises(ValueError, match="device 'cuda:1': .*use device='cpu'"):
        load_reward_model(tiny_dir("starling-rm-34b"), device="cuda:1")


def test_dtype_aliases_are_accepted_and_unknown_names_list_the_accepted(tiny_dir):
    from rlhf_rewards.backends.weights import resolve_dtype
    from rlhf_rewards.presets import get_preset

    preset, cpu = get_preset("starling-rm-34b"), torch.device("cpu")
    for name, dtype in [("bf16", torch.bfloat16), ("BF16", torch.bfloat16), ("fp16", torch.float16),
                        ("half", torch.float16), ("fp32", torch.float32), ("float", torch.float32),
                        ("torch.bfloat16", torch.bfloat16)]:
        assert resolve_dtype(name, preset, cpu) == dtype
    with pytest.raises(ValueError, match="unknown dtype 'int4'; accepted: bfloat16, bf16, float16, fp16, half"):
        load_reward_model(tiny_dir("starling-rm-34b"), dtype="int4")


@pytest.mark.parametrize("value", [0, -5, 2.5])
def test_max_length_must_be_positive_at_load(tiny_dir, value):
    with pytest.raises(ValueError, match=f"max_length must be a positive number of tokens.*got {value}"):
        load_reward_model(tiny_dir("ray2333-mistral-7b"), max_length=value)


# -- section 2: calls ------------------------------------------------------------------------------------------------

def test_best_of_n_with_no_prompts_is_empty_for_every_kind(models):
    assert best_of_n(models(PM), [], []) == []
    assert best_of_n(models("ray2333-mistral-7b"), [], []) == []


def test_reward_function_without_completions_says_so(models):
    with pytest.raises(ValueError, match="completions is None"):
        RewardFunction(models("ray2333-mistral-7b"))(prompts=["Hi"], completions=None)


def test_pairwise_score_length_errors_name_completions_and_baselines(models):
    with pytest.raises(ValueError, match=r"len\(prompts\)=2, len\(completions\)=1, len\(baselines\)=2"):
        models(PM).score(["a", "b"], ["x"], baselines=["y", "z"])


def test_a_bytes_completion_is_reported_as_bytes(models):
    with pytest.raises(ValueError, match=r"completions\[0\]: expected a string .* got bytes"):
        models("ray2333-mistral-7b").score(["Hi"], [b"hello"])
    with pytest.raises(ValueError, match=r"prompts\[0\]: expected a string or a list of messages, got bytes"):
        models(PM).compare([b"Hi"], ["a"], ["b"])


# -- section 3: one bad sample never fails the others ----------------------------------------------------------------

def _long_text(model, tokens: int) -> str:
    """A response of about ``tokens`` tokens in the model's tokenizer."""
    text = ""
    while len(model.tokenizer.encode(text, add_special_tokens=False)) < tokens:
        text += "lorem ipsum dolor sit amet "
    return text


def test_an_over_long_pair_names_index_and_token_counts_and_spares_the_rest(models):
    pm = models(PM, max_length=256)
    long_a, long_b = _long_text(pm, 200), _long_text(pm, 150)
    prompts, a, b = ["Q1", "Q2", "Q3"], ["short one", long_a, "fine"], ["short two", long_b, "good"]
    results = pm.compare_samples(prompts, a, b)
    assert isinstance(results[1], TooLongError) and isinstance(results[1], SampleError) and results[1].index == 1
    message = str(results[1])
    assert message.startswith("completions_a[1] and completions_b[1]: the two responses take ")
    assert "max_length=256" in message
    # the others are exactly what they are alone
    assert [results[0], results[2]] == pytest.approx(pm.compare(["Q1", "Q3"], ["short one", "fine"],
                                                               ["short two", "good"]), abs=1e-6)
    with pytest.raises(TooLongError, match=r"completions_a\[1\] and completions_b\[1\]"):
        pm.compare(prompts, a, b)


def test_reward_function_gives_none_to_the_over_long_sample_only(models, caplog):
    pm = models(PM, max_length=256)
    huge = _long_text(pm, 300)
    completions = ["Paris.", "It is Paris, of course.", huge, "Lyon?"]
    prompts = ["Capital of France?"] * 4
    with caplog.at_level(logging.WARNING):
        rewards = RewardFunction(pm, pairing="group", group_size=4)(prompts=prompts, completions=completions)
    assert rewards[2] is None
    assert all(isinstance(r, float) for k, r in enumerate(rewards) if k != 2)
    assert "sample 2: completions[2]: the two responses take" in caplog.text
    # the others' rewards are their mean log-odds over the comparisons that could be made
    alone = group_rewards(pm, prompts[:2] + prompts[3:], completions[:2] + completions[3:], 3)
    assert [rewards[0], rewards[1], rewards[3]] == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("preset", ["ray2333-mistral-7b", PM])
def test_render_errors_are_found_where_scoring_renders_without_a_second_render(models, preset, monkeypatch):
    model = models(preset)
    import rlhf_rewards.backends.pair_pm as pair_pm

    calls = []
    if preset == PM:
        real = pair_pm.render_rlhflow_context
        monkeypatch.setattr(pair_pm, "render_rlhflow_context", lambda *a: calls.append(1) or real(*a))
    else:
        real = model._render
        monkeypatch.setattr(model, "_render", lambda *a: calls.append(1) or real(*a))
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    prompts = ["Hi", bad, "Hello"]
    fn = RewardFunction(model, baseline_column="ref") if preset == PM else RewardFunction(model)
    extra = {"ref": ["base", "base", "base"]} if preset == PM else {}
    rewards = fn(prompts=prompts, completions=["x", "y", "z"], **extra)
    assert rewards[1] is None and None not in (rewards[0], rewards[2])
    # one render per sample (scalar) or per distinct prompt (pair-PM context): no pre-pass
    assert len(calls) == 3


def test_truncation_in_the_direct_api_is_warned_once_per_call_and_counted(models, caplog):
    rm = models("starling-rm-34b", max_length=64)
    long = _long_text(rm, 200)
    before = rm.stats.truncated
    with caplog.at_level(logging.WARNING, logger="rlhf_rewards"):
        rm.score(["Hi", "Hi", "Hi"], [long, long + "!", "short"])
    warnings = [r for r in caplog.records if "max_length=64" in r.getMessage()]
    assert len(warnings) == 1
    assert "2 of 3 model inputs" in warnings[0].getMessage()
    assert rm.stats.truncated - before == 2


def test_templated_prompts_are_parsed_in_the_direct_api_with_a_switch(tiny_dir, models):
    rm = models("starling-rm-34b")
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert rm.format(chatml, "Hello<|im_end|>") == rm.format(messages, "Hello")
    assert rm.score([chatml], ["Hello"]) == pytest.approx(rm.score([messages], ["Hello"]), abs=1e-6)
    raw = load_reward_model(tiny_dir("starling-rm-34b"), parse_templates=False)
    assert chatml in raw.format(chatml, "Hello")  # nested as one user turn, markup and all
    pm = models(PM)
    llama3 = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    assert pm.format(llama3, "a", "b") == pm.format("Hi", "a", "b")


def test_more_of_the_same_kind_named_before_loading(tiny_dir, monkeypatch):
    path = tiny_dir("ray2333-mistral-7b")
    with pytest.raises(ValueError, match="max_length=1 leaves no room beside the 1 special tokens"):
        load_reward_model(path, max_length=1)
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive number of tokens.*got 0"):
        load_reward_model(path, max_batch_tokens=0)
    with pytest.raises(ValueError, match="quantization must be None, '8bit' or '4bit', got 'int8'"):
        load_reward_model(path, quantization="int8")
    with pytest.raises(ValueError, match="cannot read device 'gpu'"):
        load_reward_model(path, device="gpu")
    with pytest.raises(ValueError, match="'Nexusflow/Starling-RM-34B' is the hub id of preset 'starling-rm-34b'"):
        load_reward_model(path, preset="Nexusflow/Starling-RM-34B")
    assert load_reward_model(path, preset="Ray2333-Mistral-7B").preset.name == "ray2333-mistral-7b"
    with pytest.raises(FileNotFoundError, match="is a file; pass the directory"):
        load_reward_model(os.path.join(path, "config.json"), preset="ray2333-mistral-7b")
    with pytest.raises(FileNotFoundError, match="tokenizer directory '/no/such/tokenizer' does not exist"):
        load_reward_model(path, tokenizer="/no/such/tokenizer")

"""Where the reward model goes (per local rank), and that 8-bit/4-bit quantization and PEFT adapters load as a user
expects: quantized scores close to float32, an adapter's scores equal to merging it into the weights by hand."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from rlhf_rewards import load_reward_model
from rlhf_rewards.backends.weights import resolve_device

from cases import CONVERSATIONS

PROMPTS = [p for p, _ in CONVERSATIONS]
COMPLETIONS = [c for _, c in CONVERSATIONS]


# -- devices -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank, spec, expected", [
    ("3", "cuda:{local_rank}", "cuda:3"),
    ("3", "cuda:{local_rank+4}", "cuda:7"),
    ("1", "cuda:{local_rank + 4}", "cuda:5"),
    ("1", ["cuda:4", "cuda:5"], "cuda:5"),
    ("0", ["cuda:4", "cuda:5"], "cuda:4"),
    ("1", ["cuda:2", "cuda:2"], "cuda:2"),  # two ranks sharing one reward GPU
    ("2", 6, "cuda:6"),
    ("5", "cuda:1", "cuda:1"),  # a fixed device is the same on every rank
    (None, "cuda:{local_rank+1}", "cuda:1"),  # not distributed: rank 0
])
def test_device_per_local_rank(monkeypatch, rank, spec, expected):
    if rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", rank)
    assert resolve_device(spec) == torch.device(expected)


def test_device_errors(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="no entry for local rank 2"):
        resolve_device(["cuda:4", "cuda:5"])
    with pytest.raises(ValueError, match="cannot read device"):
        resolve_device("cuda:{rank}")


def test_default_device_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")


def test_the_model_is_loaded_on_its_ranks_device(monkeypatch, tiny_dir):
    monkeypatch.setenv("LOCAL_RANK", "1")
    rm = load_reward_model(tiny_dir("starling-rm-34b"), device=["cuda:0", "cpu"])
    assert rm.device == torch.device("cpu")
    assert all(p.device == rm.device for p in rm.model.parameters())
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="no entry for local rank 2"):
        load_reward_model(tiny_dir("starling-rm-34b"), device=["cuda:0", "cpu"])


# -- quantization ----------------------------------------------------------------------------------------------------

QUANT_PRESETS = ["sequence-classifier", "starling-rm-34b"]


@pytest.fixture(scope="module")
def fp32_scores(tiny_dir):
    return {preset: load_reward_model(tiny_dir(preset), preset=preset, device="cpu").score(PROMPTS, COMPLETIONS)
            for preset in QUANT_PRESETS}


# Tolerances about 3x the largest error measured on these tiny models (int8 5e-4, NF4 7e-3). The brief's 0.02 / 0.2
# are for models whose scores span several units; these tiny random models' scores span only 0.01-0.04.
@pytest.mark.parametrize("quantization, module_class, tolerance", [
    ("8bit", "Linear8bitLt", 2e-3),
    ("4bit", "Linear4bit", 2e-2),
])
@pytest.mark.parametrize("preset", QUANT_PRESETS)
def test_quantized_scores_are_close_to_float32(monkeypatch, tiny_dir, fp32_scores, preset, quantization,
                                               module_class, tolerance):
    # bitsandbytes' AVX512-BF16 CPU path repacks 4-bit weights in blocks of 64 input features and fails on the tiny
    # models' 32; the portable path quantizes the same way.
    monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: False)
    rm = load_reward_model(tiny_dir(preset), preset=preset, device="cpu", quantization=quantization)
    layers = [type(m).__name__ for m in rm.model.modules()]
    assert layers.count(module_class) == 14  # 7 linear layers in each of 2 blocks
    assert type(rm.head) is torch.nn.Linear and rm.head.weight.dtype == torch.float32  # the head stays exact
    scores = rm.score(PROMPTS, COMPLETIONS)
    assert scores != fp32_scores[preset]
    assert scores == pytest.approx(fp32_scores[preset], abs=tolerance)


# -- adapters --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=QUANT_PRESETS)
def adapter(request, tiny_dir, tmp_path_factory):
    """``(preset, adapter_dir)``: a LoRA adapter (q_proj, v_proj) with random non-zero weights and a retrained
    reward head, saved with PEFT as a reward-model fine-tune is."""
    preset = request.param
    base = load_reward_model(tiny_dir(preset), preset=preset, device="cpu").model
    head = "score" if preset == "sequence-classifier" else "v_head"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=[head],
                        init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = get_peft_model(base, config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "modules_to_save" in name:
                    param.add_(0.05 * torch.randn_like(param))
    path = str(tmp_path_factory.mktemp("adapter") / preset)
    peft_model.save_pretrained(path)
    return preset, path


def merged_by_hand(preset: str, path: str, adapter_dir: str):
    """The reward model with the adapter's weights written into it: ``W + (alpha / r) * B @ A`` for each LoRA
    pair, and the saved head copied over."""
    rm = load_reward_model(path, preset=preset, device="cpu")
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    scaling = config["lora_alpha"] / config["r"]
    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    params = dict(rm.model.named_parameters())
    with torch.no_grad():
        for key, value in weights.items():
            name = key.removeprefix("base_model.model.")
            if name.endswith(".lora_A.weight"):
                target = name.removesuffix(".lora_A.weight") + ".weight"
                params[target] += scaling * weights[key.replace("lora_A", "lora_B")] @ value
            elif ".lora_B." not in name:
                params[name].copy_(value)
    return rm


def test_adapter_scores_equal_merging_by_hand(tiny_dir, adapter):
    preset, adapter_dir = adapter
    with_adapter = load_reward_model(tiny_dir(preset), preset=preset, device="cpu", adapter=adapter_dir)
    expected = merged_by_hand(preset, tiny_dir(preset), adapter_dir).score(PROMPTS, COMPLETIONS)
    scores = with_adapter.score(PROMPTS, COMPLETIONS)
    assert scores == pytest.approx(expected, abs=1e-5)
    base = load_reward_model(tiny_dir(preset), preset=preset, device="cpu").score(PROMPTS, COMPLETIONS)
    assert all(abs(a - b) > 1e-3 for a, b in zip(scores, base))  # the adapter changed every score


def test_adapter_on_an_8bit_model(tiny_dir, adapter):
    preset, adapter_dir = adapter
    rm = load_reward_model(tiny_dir(preset), preset=preset, device="cpu", quantization="8bit", adapter=adapter_dir)
    assert any(type(m).__name__ == "Linear8bitLt" for m in rm.model.modules())
    expected = merged_by_hand(preset, tiny_dir(preset), adapter_dir).score(PROMPTS, COMPLETIONS)
    # the int8 tolerance of the brief: the adapter's scores here span about 0.4 (int8 error measured: 6e-3)
    assert rm.score(PROMPTS, COMPLETIONS) == pytest.approx(expected, abs=0.02)


# -- third-party noise ----------------------------------------------------------------------------------------------

BNB_LOGGER = "bitsandbytes.autograd._functions"


def test_8bit_notices_are_logged_once_each(monkeypatch, caplog):
    import logging

    from rlhf_rewards.backends.weights import quantization_config

    logger = logging.getLogger(BNB_LOGGER)
    monkeypatch.setattr(logger, "filters", [])  # a fresh filter for this test, restored after it
    quantization_config("8bit", torch.float32, ["v_head"])
    quantization_config("8bit", torch.float32, ["v_head"])  # asking twice installs one filter
    with caplog.at_level(logging.WARNING, logger=BNB_LOGGER):
        for _ in range(3):
            logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
        logger.warning("another notice")  # a different message still gets through
    assert [r.getMessage() for r in caplog.records] == [
        "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization", "another notice"]


def test_scoring_an_8bit_model_repeats_no_bitsandbytes_notice(monkeypatch, caplog, tiny_dir):
    import logging

    monkeypatch.setattr(logging.getLogger(BNB_LOGGER), "filters", [])
    preset = "starling-rm-34b"
    with caplog.at_level(logging.WARNING, logger=BNB_LOGGER):
        rm = load_reward_model(tiny_dir(preset), preset=preset, device="cpu", quantization="8bit")
        rm.score(PROMPTS, COMPLETIONS)
        rm.score(PROMPTS, COMPLETIONS)
    assert len([r for r in caplog.records if r.name == BNB_LOGGER]) <= 1  # 28 matrix products, each logged before

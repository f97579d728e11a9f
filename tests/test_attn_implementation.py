"""``load_reward_model(attn_implementation=...)`` and ``--attn-implementation``: the chosen attention reaches the
model (``rm.attn_implementation``, repr, ``packing_reason``, ``/v1/models``), scores agree across transformers' own
kernels, packing under eager's additive block mask equals padding, and values that cannot work fail before any
weights load, naming the option, the value and the fix."""

from __future__ import annotations

import json

import pytest

from rlhf_rewards import load_reward_model
from rlhf_rewards.backends import LOADERS
from rlhf_rewards.cli import main

DECODER, PRM = "ray2333-mistral-7b", "qwen2.5-math-prm"
PROMPTS = ["Hello!", "What is 2+2?", "Name a colour, then explain why you like it."]
COMPLETIONS = {
    DECODER: ["Hi there.", "4, of course.", "Blue " * 40],
    PRM: ["Say hi.\n\nHi there.", "2+2 is 4.\n\nSo 4.", "Blue.\n\n" + "It is calm. " * 20 + "\n\nDone."],
}


@pytest.fixture(scope="module")
def models(tiny_dir):
    """``models(preset, implementation)``: that tiny checkpoint loaded on the CPU in float32, once per module."""
    built = {}

    def get(preset: str, implementation: str, **options):
        key = (preset, implementation, tuple(sorted(options.items())))
        if key not in built:
            built[key] = load_reward_model(tiny_dir(preset), preset=preset, device="cpu", dtype="float32",
                                           attn_implementation=implementation, **options)
        return built[key]

    return get


@pytest.fixture
def no_loading(monkeypatch):
    """Every backend's loader fails the test if called: a refusal must come before any weights load."""
    for backend in list(LOADERS):
        monkeypatch.setitem(LOADERS, backend, lambda *a, **k: pytest.fail("weights were loaded"))


@pytest.mark.parametrize("preset", [DECODER, PRM])
def test_eager_and_sdpa_are_the_models_attention_and_score_alike(models, preset):
    eager, sdpa = models(preset, "eager"), models(preset, "sdpa")
    for rm, name in ((eager, "eager"), (sdpa, "sdpa")):
        assert rm.attn_implementation == name
        assert f"attn_implementation={name!r}" in repr(rm)
        # on the CPU "auto" pads under either, and says which attention made it so
        assert rm.packing is False and rm.packing_reason.startswith(f"auto: {name} with a block mask")
        assert rm.packing_reason in repr(rm)
    scores = [rm.score(PROMPTS, COMPLETIONS[preset]) for rm in (eager, sdpa)]
    assert all(isinstance(s, float) for s in scores[0])
    assert scores[0] == pytest.approx(scores[1], abs=1e-5)


@pytest.mark.parametrize("preset", [DECODER, PRM])
def test_packing_true_under_eager_equals_padded(models, preset):
    """eager reads the block mask as an additive one (0 or the dtype's minimum)."""
    packed = models(preset, "eager", packing=True)
    assert packed.packing is True and packed.attn_implementation == "eager"
    assert packed.packing_reason.startswith("packing=True (eager: a block mask)")
    assert "checked:" in packed.packing_reason
    padded = models(preset, "eager")
    before = packed.stats.batches
    got = packed.score(PROMPTS, COMPLETIONS[preset])
    assert packed.stats.batches - before < 3  # the two short samples shared a packed row
    assert got == pytest.approx(padded.score(PROMPTS, COMPLETIONS[preset]), abs=1e-5)


def test_default_is_transformers_choice(models):
    assert models(DECODER, None).attn_implementation == "sdpa"


@pytest.mark.parametrize("value, message", [
    ("sdpa2", r"attn_implementation='sdpa2' is not an attention implementation transformers knows here; choose one "
              r"of eager, .*sdpa"),
    ("paged|eager", r"attn_implementation='paged\|eager' is not an attention implementation"),
    (2, r"attn_implementation=2 is not an attention implementation"),
    ("flash_attention_2", r"attn_implementation='flash_attention_2' needs the flash_attn package, which does not "
                          r"import here \(pip install flash-attn on a CUDA machine\); leave attn_implementation unset "
                          r"or use 'sdpa'"),
])
def test_bad_values_fail_before_loading(tiny_dir, no_loading, monkeypatch, value, message):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    with pytest.raises(ValueError, match=message):
        load_reward_model(tiny_dir(DECODER), preset=DECODER, device="cpu", attn_implementation=value)


def test_flash_attention_needs_a_cuda_device(tiny_dir, no_loading, monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)  # as if installed
    with pytest.raises(ValueError, match=r"attn_implementation='flash_attention_2' runs on CUDA devices only, not "
                                         r"cpu; put the model on a GPU or use 'sdpa'"):
        load_reward_model(tiny_dir(DECODER), preset=DECODER, device="cpu", attn_implementation="flash_attention_2")


def test_pairrm_takes_only_its_own_attention(tiny_dir, monkeypatch):
    rm = load_reward_model(tiny_dir("pairrm"), preset="pairrm", device="cpu", attn_implementation="eager")
    assert rm.attn_implementation == "eager" and "attn_implementation='eager'" in repr(rm)
    from rlhf_rewards.backends import pairrm_loading

    monkeypatch.setattr(pairrm_loading, "load_pairrm", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=r"attn_implementation='sdpa' is not possible for PairRM: its DeBERTa-v2 "
                                         r"encoder runs only its own disentangled attention .*use 'eager'"):
        load_reward_model(tiny_dir("pairrm"), preset="pairrm", device="cpu", attn_implementation="sdpa")


def test_a_model_without_the_kernel_names_the_option(tiny_dir):
    """Gemma-2 (Skywork-Reward) soft-caps its attention scores, which sdpa cannot: transformers refuses, and the
    error says which of our options to change."""
    with pytest.raises(ValueError, match=r"attn_implementation='sdpa': .*skywork-reward \(AutoModelForSequence"
                                         r"Classification\) cannot run it: Gemma2ForSequenceClassification does not "
                                         r"support .*scaled_dot_product_attention.* Leave attn_implementation unset"):
        load_reward_model(tiny_dir("skywork-reward"), preset="skywork-reward", device="cpu",
                          attn_implementation="sdpa")


def test_the_command_line_flag_reaches_the_model(tiny_dir, capsys):
    common = ["format", "--model", tiny_dir(DECODER), "--preset", DECODER, "--device", "cpu", "--prompt", "Hi",
              "--completion", "Hello.", "--json"]
    assert main(common + ["--attn-implementation", "eager"]) == 0
    assert json.loads(capsys.readouterr().out)["attn_implementation"] == "eager"
    with pytest.raises(SystemExit) as exited:
        main(common + ["--attn-implementation", "sdpa2"])
    assert exited.value.code == 2
    assert "--attn-implementation: attn_implementation='sdpa2' is not an attention implementation" in \
        capsys.readouterr().err


def test_serve_checks_the_flag_before_loading(tiny_dir, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", tiny_dir(DECODER), "--attn-implementation", "flash_attention_2"])
    assert exited.value.code == 2
    assert "needs the flash_attn package" in capsys.readouterr().err


def test_v1_models_states_the_attention(models):
    from rlhf_rewards.serving.engine import RewardEngine

    engine = RewardEngine(models(DECODER, "eager"))
    assert engine.describe()["attn_implementation"] == "eager"

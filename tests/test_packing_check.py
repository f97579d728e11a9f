"""The load-time packing check (rlhf_rewards.packing_check): a model about to pack scores synthetic samples packed
and padded and packs only if they agree. Here: it runs and passes on every packing family with honest kernels, a
disagreement makes ``"auto"`` pad (reason and warning) and ``True`` raise, ``"auto"`` reaches it through a real
variable-length attention implementation on the CPU, and models that pad never pay for it."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from rlhf_rewards import load_reward_model, packing_check
from rlhf_rewards.backends.scalar import ScalarRewardModel
from rlhf_rewards.packing_check import PackingMismatchError, check_packing, dtype_tolerance

VARLEN = "flash_varlen_reference"
"""A variable-length attention implementation registered for these tests: "flash" in its name makes the package
treat it as flash-attention (packed rows flattened into one, no mask, samples' bounds read from position ids)."""

_VARLEN_SEQUENCES: list[int] = []
"""Per row the varlen attention ran: how many sequences it held."""


def _varlen_attention(module, query, key, value, attention_mask, *, scaling=None, sliding_window=None,
                      position_ids=None, **kwargs):
    """Attention over packed sequences as variable-length kernels compute it: each sequence (a run of position ids
    starting at 0) attends causally within itself only, nothing masked, nothing padded. Written out with one sdpa
    call per sequence."""
    # what flash-attention receives; padded batches share one row of position ids
    assert attention_mask is None and position_ids is not None
    groups = query.shape[1] // key.shape[1]
    out = torch.empty_like(query)
    for b in range(query.shape[0]):
        starts = (position_ids[min(b, len(position_ids) - 1)] == 0).nonzero().flatten().tolist() + [query.shape[2]]
        _VARLEN_SEQUENCES.append(len(starts) - 1)
        for s, e in zip(starts, starts[1:]):
            i = torch.arange(e - s, device=query.device)
            allowed = i[:, None] >= i[None, :]
            if sliding_window is not None:
                allowed &= i[:, None] - i[None, :] < sliding_window
            k = key[b:b + 1, :, s:e].repeat_interleave(groups, dim=1)
            v = value[b:b + 1, :, s:e].repeat_interleave(groups, dim=1)
            out[b:b + 1, :, s:e] = F.scaled_dot_product_attention(query[b:b + 1, :, s:e], k, v, attn_mask=allowed,
                                                                  scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture
def varlen_dir(tiny_dir, tmp_path, monkeypatch):
    """``varlen_dir(preset)``: a copy of the preset's tiny checkpoint whose config asks for :data:`VARLEN`."""
    import transformers.modeling_utils
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, _varlen_attention)
    real_import = transformers.modeling_utils.lazy_import_flash_attention

    # transformers imports the flash-attn package for any implementation named "flash..."; ours needs none
    def lazy_import(implementation, *args, **kwargs):
        return None if implementation == VARLEN else real_import(implementation, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "lazy_import_flash_attention", lazy_import)
    _VARLEN_SEQUENCES.clear()

    def get(preset: str) -> str:
        path = str(tmp_path / preset)
        shutil.copytree(tiny_dir(preset), path)
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        config["attn_implementation"] = VARLEN
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
        return path

    return get


def perturbed_packed_forward(monkeypatch, by: float = 1e-2) -> None:
    """Make the scalar models' packed forward disagree with the padded one by ``by``."""
    real = ScalarRewardModel._forward_packed

    def forward_packed(self, rows):
        return [r + by for r in real(self, rows)]

    monkeypatch.setattr(ScalarRewardModel, "_forward_packed", forward_packed)


def test_tolerances_follow_the_dtypes_precision():
    assert dtype_tolerance(torch.float32) == 1e-4
    assert dtype_tolerance(torch.bfloat16) == 8 * 2 ** -8
    assert dtype_tolerance(torch.float16) == 8 * 2 ** -11


@pytest.mark.parametrize("preset", ["ray2333-mistral-7b", "starling-rm-7b-alpha", "rlhflow-pair-pm-llama3-8b",
                                    "qwen2.5-math-prm", "math-shepherd", "nemotron-reward"])
def test_packing_true_runs_the_check_and_honest_models_pass(tiny_dir, preset):
    """Every family that packs (sequence classifier, value head with the card's hidden pad, pair-PM on cached
    prefixes, backbone PRM, label-token PRM, first-token score) agrees with itself padded on sdpa."""
    rm = load_reward_model(tiny_dir(preset), preset=preset, device="cpu", packing=True)
    assert rm.packing is True
    assert "checked: packed and padded scores of 6 synthetic samples" in rm.packing_reason
    assert rm.stats.samples == 0 and rm.stats.batches == 0  # the check scored copies: the model's stats are clean
    check = check_packing(rm, torch.float32)
    assert check.passed and check.compared >= 6 and check.difference <= 1e-5


def test_a_disagreement_on_sdpa_makes_packing_true_raise(tiny_dir, monkeypatch):
    perturbed_packed_forward(monkeypatch)
    with pytest.raises(PackingMismatchError, match=r"packing=True failed its check: .*differ by up to 1\.0e-02.*"
                                                   r"float32 tolerance is 1\.0e-04.*packing=False") as raised:
        load_reward_model(tiny_dir("ray2333-mistral-7b"), device="cpu", packing=True)
    assert isinstance(raised.value, ValueError)  # what callers catching ValueError before still catch
    assert not raised.value.check.passed and raised.value.check.difference == pytest.approx(1e-2, rel=0.2)


def test_auto_with_variable_length_attention_checks_and_packs(varlen_dir):
    rm = load_reward_model(varlen_dir("ray2333-mistral-7b"), preset="ray2333-mistral-7b", device="cpu")
    assert rm.attn_implementation == VARLEN
    assert rm.packing is True and "variable-length kernels" in rm.packing_reason and "checked:" in rm.packing_reason
    assert max(_VARLEN_SEQUENCES) > 1  # the check's packed pass ran several samples through one varlen row
    # and it scores as the same model padded does
    padded = rm.with_packing(False)
    prompts, completions = ["Hello!", "What is 2+2?", "Name a colour."], ["Hi.", "4, of course.", "Blue " * 9]
    assert rm.score(prompts, completions) == pytest.approx(padded.score(prompts, completions), abs=1e-4)


def test_auto_falls_back_to_padding_when_packed_disagrees(varlen_dir, monkeypatch, caplog):
    path = varlen_dir("ray2333-mistral-7b")
    perturbed_packed_forward(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="rlhf_rewards.packing_check"):
        rm = load_reward_model(path, preset="ray2333-mistral-7b", device="cpu")
    assert rm.packing is False
    assert rm.packing_reason.startswith("auto: padded, because packed and padded scores of 6 synthetic samples "
                                        "differ by up to 1.0e-02")
    assert "float32 tolerance is 1.0e-04" in rm.packing_reason and rm.packing_reason in repr(rm)
    assert any("packing turned off" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    with pytest.raises(ValueError, match="packing=True failed its check"):
        load_reward_model(path, preset="ray2333-mistral-7b", device="cpu", packing=True)


def test_models_that_pad_skip_the_check(tiny_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the packing check ran for a model that pads")

    monkeypatch.setattr(packing_check, "check_packing", refuse)
    assert load_reward_model(tiny_dir("ray2333-mistral-7b"), device="cpu", packing=False).packing is False
    assert load_reward_model(tiny_dir("ray2333-mistral-7b"), device="cpu").packing is False  # auto on sdpa pads
    assert load_reward_model(tiny_dir("pairrm"), device="cpu").packing is False

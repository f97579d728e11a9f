"""Shared fixtures: tiny checkpoints built once per test session, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(preset)``: the path of that preset's tiny checkpoint, built on first use."""
    from rlhf_rewards.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, str] = {}

    def get(preset: str) -> str:
        if preset not in built:
            built[preset] = make_tiny_checkpoint(preset, str(root / preset), seed=0)
        return built[preset]

    return get


@pytest.fixture(scope="module")
def path(tiny_dir, request):
    """The tiny checkpoint of the requesting test module's ``PRESET``."""
    return tiny_dir(request.module.PRESET)


@pytest.fixture(scope="module")
def prm(path):
    """The requesting test module's ``PRESET`` (a process reward model) loaded on the CPU."""
    from rlhf_rewards import load_reward_model

    return load_reward_model(path, device="cpu")

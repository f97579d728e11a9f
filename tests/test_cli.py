"""The README's main job: `rlhf-rewards demo` builds every preset's tiny checkpoint and scores with it."""

from __future__ import annotations

from rlhf_rewards import list_presets
from rlhf_rewards.cli import main


def test_presets_command_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in list_presets():
        assert name in out


def test_demo_scores_with_every_preset(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in list_presets():
        assert f"=== {name} " in out
        assert (tmp_path / name / "config.json").is_file()
    assert out.count("reward(good)=") == 4 * 3  # four scalar presets, three conversations each
    assert out.count("P(good better than bad)=") == 2 * 3
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in out  # Starling-34B's exact text

"""The README's main job (`rlhf-rewards demo`) and the command line a newcomer meets first."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import rlhf_rewards
from rlhf_rewards import list_presets
from rlhf_rewards.presets import get_preset
from rlhf_rewards.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent


def test_presets_command_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in list_presets():
        assert name in out
    assert not re.search(r"card \d{3}", out)  # people read model names and "model card", not our seed numbers


def test_demo_scores_with_every_preset(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "a bad answer scoring above the good one is expected" in out
    for name in list_presets():
        assert f"=== {name}: " in out
        assert (tmp_path / name / "config.json").is_file()  # --out keeps the checkpoints
    scalar = re.findall(r"conversation \d: good answer [+-]\d\.\d{4}   bad answer [+-]\d\.\d{4}\n", out)
    pairwise = re.findall(r"conversation \d: [01]\.\d{4}\n", out)
    kinds = [get_preset(name).kind for name in list_presets()]
    # a process model's line gives each answer's reward (the minimum of its step rewards) as a scalar model's does
    # a process model that cannot read a conversation (Math-Shepherd: one question, no system message) says why
    refused = re.findall(r"conversation \d: not scored: prompts\[\d\]: ", out)
    assert len(scalar) + len(refused) == (kinds.count("scalar") + kinds.count("process")) * 3  # 3 conversations
    assert len(pairwise) == kinds.count("pairwise") * 3
    assert out.count("best of n, candidates [0] = bad answer, [1] = good answer; index chosen per conversation") \
        == len(kinds)
    # the ids each model runs, decoded with every special token: Ray2333's card tokenizes the chat template's text,
    # which starts with <s>, with BOS added again
    assert "\n<s><s> [INST] What is the capital of France? [/INST]The capital of France is Paris.</s>\n" in out
    # RLHFlow's card: the plain <turn> context inside one Llama-3 user message, content trimmed, BOS string removed
    assert ("\n<|start_header_id|>user<|end_header_id|>\n\n[CONTEXT] \n\n<turn> user\n What is the capital of "
            "France?\n [RESPONSE A] The capital of France is Paris. [RESPONSE B] I believe it is Marseille."
            "<|eot_id|>\n") in out
    # stats as sentences, and the pair-PM's prefix reuse explained where computed tokens are fewer than real ones
    assert out.count("model inputs scored in") == len(kinds) and "{'samples'" not in out
    assert "fewer computed than in the inputs" in out


def test_demo_deletes_its_temporary_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["demo", "--presets", "sequence-classifier"]) == 0
    out = capsys.readouterr().out
    assert f"written to {tmp_path}{os.sep}rlhf-rewards-demo-" in out and "deleted at the end" in out
    assert "=== sequence-classifier: " in out and "=== pairrm" not in out
    written = Path(re.search(r"written to (\S+), deleted", out).group(1))
    assert written.parent == tmp_path and not written.exists()
    assert not list(tmp_path.glob("rlhf-rewards-demo-*"))  # (torch may leave its own cache directory there)


def test_demo_names_an_unknown_preset():
    with pytest.raises(SystemExit, match="unknown preset.*'?no-such-model"):
        main(["demo", "--presets", "no-such-model"])


def test_version_matches_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    version = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert capsys.readouterr().out.strip() == f"rlhf-rewards {version}" == f"rlhf-rewards {rlhf_rewards.__version__}"


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)])
def test_python_m_help_is_plain_and_quiet(command):
    # `python -m rlhf_rewards` is the command; help is plain text (no reStructuredText markup) and nothing a user
    # cannot act on (third-party start-up warnings) lands on stderr
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "rlhf_rewards", *command, "--help"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: rlhf-rewards{' ' + command[0] if command else ''} ")
    assert "``" not in done.stdout and ":func:" not in done.stdout and ":data:" not in done.stdout
    assert done.stderr == ""

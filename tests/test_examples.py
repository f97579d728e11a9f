"""Every script in examples/ runs with --tiny (CPU, offline, tiny random checkpoints), exits 0 and prints rewards.

The scripts start together at the first test and each test waits for its own, so their start-ups (importing torch,
transformers and trl, about 5 s each) overlap instead of adding up.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES = ["grpo_starling", "rloo_mistral", "online_dpo_pairrm", "best_of_n_pair_pm", "ppo_adapter"]
# a printed reward: "reward" then, on the same line, a number with four decimals
REWARD_LINE = re.compile(r"reward[^\n]*?[-+]?\d+\.\d{4}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{example: (process, stdout file, stderr file)}``, all started at once in an empty working directory."""
    cwd = tmp_path_factory.mktemp("examples")
    # one thread each: the processes share the machine's cores
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    started = {}
    for name in EXAMPLES:
        # files, not pipes: a full pipe would block a script while the test waits for another one
        out, err = cwd / f"{name}.out", cwd / f"{name}.err"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            process = subprocess.Popen([sys.executable, str(EXAMPLES_DIR / f"{name}.py"), "--tiny"], cwd=cwd,
                                       env=env, stdout=stdout, stderr=stderr)
        started[name] = (process, out, err)
    yield started
    for process, _, _ in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def test_every_example_is_run():
    assert sorted(p.stem for p in EXAMPLES_DIR.glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_tiny(runs, name):
    process, out, err = runs[name]
    returncode = process.wait(timeout=300)
    stdout = out.read_text()
    assert returncode == 0, err.read_text()[-4000:]
    assert REWARD_LINE.search(stdout), stdout

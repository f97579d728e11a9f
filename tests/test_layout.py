"""The installed package is the one a script imports, wherever the script runs."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_folder_named_like_the_package_beside_a_script_does_not_shadow_it(tmp_path):
    """A checkout cloned under the package's name, beside the script that uses it, is a folder without
    ``__init__.py``; with the flat layout's editable install it was imported as an empty namespace package
    (``ImportError: cannot import name 'load_reward_model'``)."""
    (tmp_path / "rlhf_rewards" / "tests").mkdir(parents=True)
    (tmp_path / "train.py").write_text("from rlhf_rewards import load_reward_model, RewardFunction\n"
                                       "import rlhf_rewards\n"
                                       "print(rlhf_rewards.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith(os.path.join("rlhf_rewards", "__init__.py"))

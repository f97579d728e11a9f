"""`rlhf-rewards calibrate`: its statistics against numpy over rewards scored one row at a time in-process,
unscored rows counted by reason, --resume of an interrupted run, process and multi-objective models, and the file
it writes as ``normalize="stats"`` reads it (refused for another model)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from rlhf_rewards import RewardFunction, load_reward_model
from rlhf_rewards.cli import main

pytest.importorskip("datasets")

SCALAR, PROCESS, ARMORM = "sequence-classifier", "math-shepherd", "armorm-llama3-8b"
ROWS = [{"id": f"r{i}", "prompt": f"What is {i} + {i}?", "completion": f"It is {2 * i}." if i % 3 else "No idea."}
        for i in range(10)]
BAD = [{"id": "bad1", "prompt": None, "completion": "x"}, {"id": "bad2", "prompt": "Hi", "completion": None},
       {"id": "bad3", "prompt": None, "completion": "y"}]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def calibrate(data, model_dir, preset, output, *extra):
    return main(["calibrate", data, "--model", model_dir, "--preset", preset, "--device", "cpu",
                 "--output", str(output), *extra])


def assert_statistics(record, rewards):
    """The file's numbers against numpy over ``rewards`` (scored separately)."""
    assert record["n_scored"] == len(rewards)
    assert record["std_kind"] == "sample (n - 1)"
    assert record["mean"] == pytest.approx(np.mean(rewards), rel=1e-5)
    assert record["std"] == pytest.approx(np.std(rewards, ddof=1), rel=1e-5)
    assert (record["min"], record["max"]) == pytest.approx((np.min(rewards), np.max(rewards)), rel=1e-5)
    assert list(record["quantiles"]) == ["1", "5", "25", "50", "75", "95", "99"]
    for q, value in record["quantiles"].items():
        assert value == pytest.approx(np.percentile(rewards, float(q)), rel=1e-5)


@pytest.fixture(scope="module")
def scalar(tiny_dir):
    return load_reward_model(tiny_dir(SCALAR), preset=SCALAR, device="cpu")


def test_statistics_of_a_scalar_model_and_unscored_rows_by_reason(scalar, tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS + BAD)
    assert calibrate(data, tiny_dir(SCALAR), SCALAR, tmp_path / "stats.json", "--chunk-size", "4") == 0
    record = json.loads((tmp_path / "stats.json").read_text())
    rewards = [scalar.score([r["prompt"]], [r["completion"]])[0] for r in ROWS]  # one row at a time
    assert_statistics(record, rewards)
    assert record["n_unscored"] == 3
    assert record["unscored_reasons"] == {"prompt: prompt is None": 2, "completion: completion is None": 1}
    assert record["model"] == {"name_or_path": os.path.realpath(tiny_dir(SCALAR)), "preset": SCALAR,
                               "kind": "scalar", "dtype": "float32", "tokenizer": None, "max_length": None}
    assert record["data"]["rows"] == 13 and len(record["data"]["blake2b"]) == 32
    assert record["reward"] == {"kind": "scalar", "baseline": False, "transform": None, "aggregate": None,
                                "objectives": None}
    assert "mean" in capsys.readouterr().err
    # the file is what normalize="stats" reads
    raw = RewardFunction(scalar)([r["prompt"] for r in ROWS], [r["completion"] for r in ROWS])
    fn = RewardFunction(scalar, normalize="stats", calibration=str(tmp_path / "stats.json"))
    normalised = fn([r["prompt"] for r in ROWS], [r["completion"] for r in ROWS])
    assert normalised == pytest.approx([(r - record["mean"]) / record["std"] for r in raw], rel=1e-9)


def test_resume_completes_an_interrupted_run(scalar, tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    out = tmp_path / "stats.json"
    assert calibrate(data, tiny_dir(SCALAR), SCALAR, out, "--id-column", "id", "--chunk-size", "3") == 0
    whole = json.loads(out.read_text())
    scores = tmp_path / "stats.json.scores.jsonl"
    lines = scores.read_text().splitlines(keepends=True)
    scores.write_text("".join(lines[:4]) + lines[4][:10])  # a run killed mid-write: 4 rows and a torn line
    out.unlink()
    capsys.readouterr()
    assert calibrate(data, tiny_dir(SCALAR), SCALAR, out, "--id-column", "id") == 2  # scores exist: not fresh
    assert "already exists" in capsys.readouterr().err
    assert calibrate(data, tiny_dir(SCALAR), SCALAR, out, "--id-column", "id", "--resume") == 0
    resumed = json.loads(out.read_text())
    assert resumed["n_scored"] == 10
    for key in ("mean", "std", "min", "max", "quantiles"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-6)
    capsys.readouterr()
    assert calibrate(data, tiny_dir(SCALAR), SCALAR, out, "--id-column", "id", "--resume", "--max-length", "64") == 2
    assert "--max-length" in capsys.readouterr().err  # another run's options cannot complete this file


def test_a_process_model_is_calibrated_on_its_aggregate(tiny_dir, tmp_path):
    model = load_reward_model(tiny_dir(PROCESS), preset=PROCESS, device="cpu")
    rows = [{"prompt": f"Compute {i} * 3.", "completion": f"Step 1: {i} * 3.\n\nStep 2: it is {3 * i}."}
            for i in range(6)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    assert calibrate(data, tiny_dir(PROCESS), PROCESS, tmp_path / "stats.json", "--aggregate", "last") == 0
    record = json.loads((tmp_path / "stats.json").read_text())
    rewards = [model.score_steps([r["prompt"]], [r["completion"]])[0][-1] for r in rows]
    assert_statistics(record, rewards)
    assert record["reward"]["aggregate"] == "last"
    RewardFunction(model, aggregate="last", normalize="stats", calibration=str(tmp_path / "stats.json"))
    with pytest.raises(ValueError, match="aggregate='last'.*aggregate='min'"):
        RewardFunction(model, normalize="stats", calibration=str(tmp_path / "stats.json"))


def test_a_multi_objective_model_is_calibrated_on_the_reward_it_scores(tiny_dir, tmp_path):
    model = load_reward_model(tiny_dir(ARMORM), preset=ARMORM, device="cpu")
    objectives = {"helpsteer-correctness": 1.0, "beavertails-is_safe": 0.5}
    data = write_jsonl(tmp_path / "data.jsonl", ROWS[:5])
    assert calibrate(data, tiny_dir(ARMORM), ARMORM, tmp_path / "stats.json",
                     "--objectives", json.dumps(objectives)) == 0
    record = json.loads((tmp_path / "stats.json").read_text())
    weighted = model.with_objectives(objectives)
    assert_statistics(record, [weighted.score([r["prompt"]], [r["completion"]])[0] for r in ROWS[:5]])
    assert record["reward"]["objectives"] == objectives
    RewardFunction(model, objectives=objectives, normalize="stats", calibration=str(tmp_path / "stats.json"))
    with pytest.raises(ValueError, match="objectives="):  # the model's own reward is another distribution
        RewardFunction(model, normalize="stats", calibration=str(tmp_path / "stats.json"))


def test_bad_options_exit_2_before_loading(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    assert calibrate(data, tiny_dir(SCALAR), SCALAR, tmp_path / "s.json", "--objectives", '{"x": 1}') == 2
    assert "has a single reward" in capsys.readouterr().err
    assert calibrate(data, tiny_dir(SCALAR), SCALAR, tmp_path / "s.json", "--aggregate", "min") == 2
    assert "only process reward models" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "s.json.scores.jsonl").exists()


def test_a_calibration_of_another_checkpoint_is_refused(scalar, tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS[:4])
    other = tmp_path / "other-rm"
    shutil.copytree(tiny_dir(SCALAR), other)  # same preset, another model directory
    assert calibrate(data, str(other), SCALAR, tmp_path / "stats.json") == 0
    with pytest.raises(ValueError, match=f"describes model {other}, but the loaded model is "
                                         f"{os.path.realpath(tiny_dir(SCALAR))}"):
        RewardFunction(scalar, normalize="stats", calibration=str(tmp_path / "stats.json"))
    # serve refuses it before the model loads
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "/src"}
    done = subprocess.run([sys.executable, "-m", "rlhf_rewards", "serve", tiny_dir(SCALAR), "--preset", SCALAR,
                           "--device", "cpu", "--port", "0", "--calibration", str(tmp_path / "stats.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"--calibration: {tmp_path / 'stats.json'} (rlhf-rewards calibrate) describes model {other}" in done.stderr

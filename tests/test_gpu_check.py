"""``python -m benchmarks.gpu_check`` on the CPU at smoke scale, so the GPU check does not rot: its report's
structure, every preset's exactness checks comparing real numbers, and an injected wrong reward failing the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.gpu_check import bf16_tolerance
from benchmarks.gpu_check.run import main
from rlhf_rewards.presets import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--scale", "smoke",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_preset_is_compared_with_its_card_on_the_cpu(report):
    data, _ = report
    assert not data["failed"]
    by_kind: dict = {}
    for check in data["checks"]:
        by_kind.setdefault((check["check"], check["setting"]), set()).add(check["preset"])
        if check["check"] in ("card", "batch invariance"):  # nothing skipped on the CPU: numbers were compared
            assert check["skipped"] is None and check["compared"] > 0 and check["max_diff"] is not None, check
            assert check["max_diff"] <= check["tolerance"] and check["passed"]
    for setting in ("float32", "bfloat16"):
        assert by_kind[("card", setting)] == set(PRESETS)
    assert by_kind[("batch invariance", "bfloat16")] == set(PRESETS)
    packing = [c for c in data["checks"] if c["check"] == "packing"]
    assert {c["setting"] for c in packing} == {"sdpa, float32", "sdpa, bfloat16"}
    assert all(c["compared"] > 0 and "computed / real tokens" in c["detail"] for c in packing)
    leak = [c for c in data["checks"] if c["check"] == "row-mate leak"]
    assert len(leak) == 1 and leak[0]["passed"] and leak[0]["compared"] == 3
    assert any("flash_attention_2: skipped" in s for s in data["skipped"])


def test_the_report_holds_the_machine_and_every_measurement(report):
    data, text = report
    machine = data["machine"]
    assert {"gpu", "driver", "torch", "transformers", "flash_attn", "cuda"} <= set(machine)
    assert text.startswith("GPU: none (CPU run); driver none; CUDA ")
    throughput = data["throughput"]
    assert len(throughput["workloads"]) == 2
    for rows in throughput["workloads"].values():
        assert {r["method"] for r in rows} >= {"card", "TRL", "ours", "floor"}
        assert all(r["seconds"] > 0 and r["calls"] > 0 for r in rows)
    budgets = throughput["budgets"]
    assert [b["budget"] for b in budgets] == [2048, 4096, 8192] and [b["default"] for b in budgets] == [0, 1, 0]
    serving = data["serving"]
    assert serving["senders"] == 64 and serving["speedup"] > 0
    assert serving["batching"]["p99_ms"] >= serving["batching"]["p50_ms"] > 0
    # each server measured with its own setting (both start early, side by side): without batching one forward per
    # one-sample request, with it never more
    assert serving["no_batching"]["forward_batches"] == serving["requests"] == 64
    assert 0 < serving["batching"]["forward_batches"] <= serving["requests"]
    assert data["quantization"] == {"skipped": "bitsandbytes quantization needs CUDA, not cpu"}
    for part in ("## Exactness", "## Throughput", "## Serving", "## Skipped (not failures)"):
        assert part in text


def test_an_injected_wrong_reward_fails_the_run(tmp_path, capsys):
    def off_by_one_on_the_first(results: list[float]) -> list[float]:
        return [results[0] + 1.0, *results[1:]]

    args = ["--device", "cpu", "--scale", "smoke", "--presets", "ray2333-mistral-7b",
            "--skip", "packing,throughput,serving,quantization"]
    assert main([*args, "--out", str(tmp_path / "ok")]) == 0
    assert main([*args, "--out", str(tmp_path / "bad")], inject=off_by_one_on_the_first) == 1
    data = json.loads((tmp_path / "bad" / "gpu_check.json").read_text())
    assert "card ray2333-mistral-7b (float32)" in data["failed"]
    assert "FAILED: card ray2333-mistral-7b (float32)" in capsys.readouterr().out


def test_bf16_tolerance_follows_the_results_scale():
    assert bf16_tolerance([0.2, -0.5]) == pytest.approx(8 / 256)
    assert bf16_tolerance([12.0, -3.0]) == pytest.approx(12 * 8 / 256)

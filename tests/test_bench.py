"""The throughput benchmark: its smoke version end to end, its workload, and robustness under load (out of memory in
a real model's forward)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

from benchmarks.report import section_rows, targets
from benchmarks.run import main, run
from benchmarks.workload import FULL, LLAMA3_8B, SMOKE, Writer, corpus_words, lm_head_share, make_workload
from rlhf_rewards import load_reward_model

from cases import CONVERSATIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke():
    # the seeds' families; the later ones cost a minute more at smoke scale (Llama-3's and Qwen2.5's real
    # vocabularies): a subset of them runs in test_later_families_against_their_cards
    return run(SMOKE, scale_name="smoke", isolate=False, families=("scalar", "pair-pm", "pairrm"))


def rows(report, title_start: str) -> dict[str, dict]:

    section = next(s for s in report.sections if s.title.startswith(title_start))
    return {r["method"]: r for r in section_rows(section)}


def test_smoke_benchmark_runs_every_method_with_card_exact_results(smoke):
    titles = [s.title for s in smoke.sections]
    for preset in ("ray2333-mistral-7b", "starling-rm-34b", "starling-rm-7b-alpha", "sequence-classifier"):
        assert preset in titles
    assert sum(t.startswith("rlhflow-pair-pm-llama3-8b") for t in titles) == 3
    assert sum(t.startswith("pairrm") for t in titles) == 2
    for section in smoke.sections:
        assert all(m.error is None for m in section.measurements), section.title
    parity = [(t, ok, v) for t, ok, v in targets(smoke.sections) if "within 1e-4" in t]
    # every section but the pair-PM's round robin (ours alone) has a reference
    assert len(parity) == len(smoke.sections) - 1 and all(ok for _, ok, _ in parity), parity


def test_smoke_benchmark_counts_tokens(smoke):
    starling = rows(smoke, "starling-rm-34b")
    assert starling["card"]["computed_per_real"] > 5  # every input padded to 2048
    assert starling["floor"]["computed_per_real"] == pytest.approx(1.0)
    assert starling["floor"]["padded"] == 0.0
    # packed rows: no padding, only each batch's short last row
    assert starling["ours, packing=True"]["computed_per_real"] <= starling["ours"]["computed_per_real"]
    plain = rows(smoke, "ray2333-mistral-7b")
    for name in ("ours, plain process", "floor, plain process"):  # a fresh interpreter each, as users run
        assert plain[name]["seconds"] > 0 and plain[name]["max_diff"] < 1e-4
    trl = rows(smoke, "sequence-classifier")["TRL"]
    assert trl["calls"] == 1 and trl["padded"] > 0  # one forward, right-padded to the longest
    pm = rows(smoke, "rlhflow-pair-pm-llama3-8b, 1 group(s) of 3, each")
    assert set(rows(smoke, "rlhflow-pair-pm-llama3-8b, 1 group(s) of 3, round")) == {"ours"}
    assert pm["card"]["calls"] == 2 * 3 and pm["card"]["computed_per_real"] == pytest.approx(1.0)
    assert pm["ours"]["computed_per_real"] < 1  # shared prefixes ran once
    assert pm["ours, packing=True"]["computed_per_real"] < 1
    short = rows(smoke, "rlhflow-pair-pm-llama3-8b, 2 group(s) of 3 (contexts ~15 tokens, responses ~30), each")
    assert {"card", "ours", "ours, packing=True"} <= set(short)
    assert pm["floor"]["computed_per_real"] < 1  # the shared context ran once
    blender = rows(smoke, "pairrm, 2 group(s)")
    assert blender["llm-blender"]["calls"] == 2 * 2  # 6 comparisons: batches of 4 and 2, one forward per order


def test_later_families_against_their_cards():
    """Skywork-V2 (with TRL's path) and the three process models: every method of each runs, ours equals the card's
    results (step rewards for the process models), the floor pads nothing."""
    report = run(SMOKE, scale_name="smoke", isolate=False, families=("skywork", "prm"))
    assert [s.preset for s in report.sections] == ["skywork-reward-v2", "qwen2.5-math-prm", "rlhflow-prm",
                                                    "math-shepherd"]
    parity = [(t, ok, v) for t, ok, v in targets(report.sections) if "within 1e-4" in t]
    assert len(parity) == len(report.sections) and all(ok for _, ok, _ in parity), parity
    for section in report.sections:
        got = {r["method"]: r for r in section_rows(section)}
        assert {"card", "ours", "ours, packing=True", "floor"} <= set(got), section.title
        assert got["floor"]["computed_per_real"] == pytest.approx(1.0) and got["floor"]["padded"] == 0.0
        assert got["ours"]["max_diff"] < 1e-4
    assert "TRL" in rows(report, "skywork-reward-v2")
    rlhflow = rows(report, "rlhflow-prm")
    assert rlhflow["card"]["computed_per_real"] > 1  # one forward per step over the growing conversation


def test_report_renders_and_serialises(smoke):
    text = smoke.markdown()
    assert text.startswith("Machine: ") and "### Targets" in text
    assert "| method | time (s) | x ours | computed / real tokens |" in text
    data = json.loads(json.dumps(smoke.as_json()))
    assert data["scale"] == "smoke" and len(data["sections"]) == len(smoke.sections)


def test_cli_runs_the_smoke_benchmark_isolated(tmp_path):
    """Through the command line in a fresh process: methods run in forked children that report peak memory."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--families", "pairrm", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "### pairrm" in done.stdout
    data = json.loads(out.read_text())
    for section in data["sections"]:
        assert all(r["peak_mb"] is not None and r["peak_mb"] > 0 for r in section["rows"])


def test_main_writes_markdown_and_json(tmp_path, capsys):
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    assert main(["--smoke", "--families", "pairrm", "--no-isolate", "--markdown", str(md), "--json", str(js)]) == 0
    assert md.read_text() in capsys.readouterr().out
    assert json.loads(js.read_text())["targets"]


def test_workload_lengths_and_structure():
    conversations, groups = make_workload(FULL, seed=0)
    assert len(conversations) == 256 and conversations == make_workload(FULL, seed=0)[0]
    prompts = [sum(t.tokens for t in c.turns) for c in conversations]
    responses = [c.response.tokens for c in conversations]
    assert 120 <= statistics.median(prompts) <= 180 and 250 <= statistics.median(responses) <= 350
    assert max(prompts) > 800 and max(responses) > 800 and max(prompts + responses) <= 1500 + 5
    assert sum(len(c.turns) > 1 for c in conversations) > 30  # multi-turn ones
    assert all(len(g.completions) == 8 for g in groups)


def test_writer_hits_target_lengths_in_each_tokenizers_tokens(tiny_dir):

    conversations, _ = make_workload(FULL, seed=0)
    words = corpus_words()
    for preset in ("starling-rm-34b", "rlhflow-pair-pm-llama3-8b"):
        tokenizer = load_reward_model(tiny_dir(preset), device="cpu").tokenizer
        writer = Writer(tokenizer, words)
        ratios = [len(tokenizer(writer.text(c.response), add_special_tokens=False)["input_ids"]) / c.response.tokens
                  for c in conversations[:40]]
        assert 0.85 < statistics.median(ratios) < 1.15, preset


def test_pair_pm_model_keeps_llama3_8b_lm_head_share():
    share = lm_head_share(FULL.sizes["rlhflow-pair-pm-llama3-8b"])
    assert lm_head_share(LLAMA3_8B) == pytest.approx(0.070, abs=0.002)
    assert share == pytest.approx(lm_head_share(LLAMA3_8B), abs=0.005)


# -- robustness under load --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["starling-rm-34b", "ray2333-mistral-7b"])
def test_out_of_memory_in_a_real_forward_splits_and_gives_identical_results(tiny_dir, preset):
    """An accelerator out-of-memory error raised inside the model's own forward (here: any batch of more than two
    inputs) splits the batch until it fits; every reward is what an unconstrained run gives."""
    rm = load_reward_model(tiny_dir(preset), preset=preset, device="cpu")
    prompts = [p for p, _ in CONVERSATIONS] * 2
    completions = [c for _, c in CONVERSATIONS] * 2
    expected = rm.score(prompts, completions)
    original = rm.backbone.forward

    def forward(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB (injected)")
        return original(*args, **kwargs)

    rm.stats.reset()
    rm.backbone.forward = forward
    try:
        again = rm.score(prompts, completions)
    finally:
        del rm.backbone.forward
    assert again == pytest.approx(expected, abs=1e-6)
    assert rm.stats.oom_splits >= 2
    assert rm.stats.samples == len(prompts)

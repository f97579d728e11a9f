"""`rlhf-rewards score`, `label`, `eval` and `format` on tiny checkpoints, against in-process scoring one row at a
time; resume after SIGKILL; every bad-input case exits 2 with a message naming what and where."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from rlhf_rewards import load_reward_model
from rlhf_rewards.cli import main
from rlhf_rewards.cli.data_io import sample_preferences_path

pytest.importorskip("datasets")
pytest.importorskip("matplotlib")

SCALAR, PAIRWISE = "ray2333-mistral-7b", "pairrm"

PROMPTS = ["What is 2 + 2?", "Name a colour.", "Say hello.", "Why is the sky blue?", "Name a prime.", "Hi"]
COMPLETIONS = ["4", "Blue.", "Hello!", "Rayleigh scattering.", "7", "Hi"]
BASELINES = ["5", "Loud.", "Bye.", "It is not.", "8", "Hi"]  # the last equals its completion: an exact tie


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def generations(n: int) -> list[dict]:
    return [{"id": f"g{i}", "prompt": PROMPTS[i % 6], "completion": COMPLETIONS[(i // 6) % 6] + " " * (i % 3),
             "ref": BASELINES[i % 6]} for i in range(n)]


def logodds(p: float) -> float:
    return max(-10.0, min(10.0, math.log(p / (1 - p)))) if 0 < p < 1 else math.copysign(10.0, p - 0.5)


@pytest.fixture(scope="module")
def models(tiny_dir):
    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = load_reward_model(tiny_dir(name), preset=name, device="cpu")
        return loaded[name]

    return get


# -- score -----------------------------------------------------------------------------------------------------------
def test_score_scalar_matches_in_process_row_by_row(tmp_path, tiny_dir, models, capsys):
    rows = generations(12)
    rows[3]["completion"] = None  # cannot be scored: reported on its row, the others still scored
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert main(["score", data, "--model", tiny_dir(SCALAR), "--preset", SCALAR, "--output", str(out),
                 "--id-column", "id", "--chunk-size", "5"]) == 0
    written = read_jsonl(out)
    assert [r["id"] for r in written] == [r["id"] for r in rows]
    rm = models(SCALAR)
    for src, got in zip(rows, written):
        assert {k: got[k] for k in src} == src  # every input field carried unchanged
        if src["completion"] is None:
            assert got["reward"] is None and "completion is None" in got["reward_error"]
        else:
            assert "reward_error" not in got
            assert got["reward"] == pytest.approx(rm.score([src["prompt"]], [src["completion"]])[0], abs=1e-5)
    err = capsys.readouterr().err
    assert "rows: 12" in err and "unscored rows (reward null, see reward_error): 1" in err

    # TRL's conversational form gives the same rewards as the text form
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows if r["completion"]]
    conv_out = tmp_path / "conv.jsonl"
    assert main(["score", write_jsonl(tmp_path / "conv_in.jsonl", conv), "--model", tiny_dir(SCALAR),
                 "--output", str(conv_out)]) == 0
    text_rewards = [r["reward"] for r in written if r["reward"] is not None]
    assert [r["reward"] for r in read_jsonl(conv_out)] == pytest.approx(text_rewards, abs=1e-6)


def test_score_pairwise_against_baseline_column(tmp_path, tiny_dir, models, capsys):
    rows = generations(6)
    rows[5]["completion"] = rows[5]["ref"]
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    out = tmp_path / "out.jsonl"
    args = ["score", data, "--model", tiny_dir(PAIRWISE), "--preset", PAIRWISE, "--output", str(out)]
    assert main(args) == 2
    assert "--baseline-column" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--baseline-column", "ref"]) == 0
    rm = models(PAIRWISE)
    for src, got in zip(rows, read_jsonl(out)):
        p = rm.compare([src["prompt"]], [src["completion"]], [src["ref"]])[0]
        assert got["reward"] == pytest.approx(logodds(p), abs=1e-5)
    assert read_jsonl(out)[5]["reward"] == 0.0  # completion == baseline: an exact tie


def same_rows(got_path, want_path) -> None:
    got, want = read_jsonl(got_path), read_jsonl(want_path)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k != "reward"} == {k: v for k, v in w.items() if k != "reward"}
        assert g["reward"] == pytest.approx(w["reward"], abs=1e-6)


def test_score_resumes_after_sigkill_to_the_uninterrupted_result(tmp_path, tiny_dir, capsys):
    rows = generations(150)
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    model = ["--model", tiny_dir(SCALAR), "--preset", SCALAR, "--device", "cpu"]
    whole = tmp_path / "whole.jsonl"
    assert main(["score", data, "--output", str(whole), "--id-column", "id", *model]) == 0

    killed = tmp_path / "killed.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_rewards", "score", data, "--output", str(killed),
                             "--chunk-size", "2", "--id-column", "id", *model], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if killed.exists() and killed.read_bytes().count(b"\n") >= 6:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the scoring run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 6 <= killed.read_bytes().count(b"\n") < len(rows)
    with open(killed, "ab") as f:  # a row torn mid-write, as a kill inside write() leaves it
        f.write(b'{"id": "g999", "prompt": "Wh')
    complete = killed.read_bytes().count(b"\n")
    capsys.readouterr()
    assert main(["score", data, "--output", str(killed), "--resume", "--id-column", "id", *model]) == 0
    same_rows(killed, whole)
    err = capsys.readouterr().err  # the torn line is dropped out loud: where, and counted in the summary
    assert f"warning: {killed}:{complete + 1}: dropped its last line, cut short by an interrupted run (28 bytes" in err
    assert "torn last line dropped from the output and its row scored again: 1" in err

    # without --id-column, by row number (the sidecar says what wrote the file)
    by_number = tmp_path / "by_number.jsonl"
    lines = whole.read_bytes().splitlines(keepends=True)
    by_number.write_bytes(b"".join(lines[:37]) + lines[37][:20])
    (tmp_path / "by_number.jsonl.meta.json").write_bytes((tmp_path / "whole.jsonl.meta.json").read_bytes())
    assert main(["score", data, "--output", str(by_number), "--resume", *model]) == 0
    same_rows(by_number, whole)
    assert f"{by_number}:38: dropped its last line" in capsys.readouterr().err


# -- label -----------------------------------------------------------------------------------------------------------
def candidate_rows() -> list[dict]:
    rows = [{"id": i, "prompt": PROMPTS[i], "responses": [COMPLETIONS[(i + k) % 6] for k in range(4)]}
            for i in range(5)]
    rows.append({"id": 5, "prompt": "Hi", "responses": ["same", "same"]})  # one distinct candidate: no pair
    return rows


def test_label_scalar_picks_highest_and_lowest_reward(tmp_path, tiny_dir, models):
    rows = candidate_rows()
    out, skipped = tmp_path / "dpo.jsonl", tmp_path / "skipped.jsonl"
    assert main(["label", write_jsonl(tmp_path / "c.jsonl", rows), "--model", tiny_dir(SCALAR), "--id-column", "id",
                 "--output", str(out), "--skipped-output", str(skipped)]) == 0
    rm = models(SCALAR)
    pairs = read_jsonl(out)
    assert [p["id"] for p in pairs] == [0, 1, 2, 3, 4]
    for row, pair in zip(rows, pairs):
        rewards = [rm.score([row["prompt"]], [c])[0] for c in row["responses"]]
        assert pair["chosen"] == row["responses"][rewards.index(max(rewards))]
        assert pair["rejected"] == row["responses"][rewards.index(min(rewards))]
        assert pair["chosen_reward"] == pytest.approx(max(rewards), abs=1e-5)
        assert pair["rejected_reward"] == pytest.approx(min(rewards), abs=1e-5)
        assert set(pair) == {"id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}
    assert read_jsonl(skipped) == [{"row": 5, "id": 5, "reason": "fewer than two distinct candidates",
                                    "detail": "fewer than two distinct candidates: 1 of 2"}]


def test_label_pairwise_by_knockouts(tmp_path, tiny_dir, models):
    rows = candidate_rows()[:5]
    out = tmp_path / "dpo.jsonl"
    assert main(["label", write_jsonl(tmp_path / "c.jsonl", rows), "--model", tiny_dir(PAIRWISE), "--output",
                 str(out), "--skipped-output", str(tmp_path / "skipped.jsonl")]) == 0
    rm = models(PAIRWISE)
    pairs = {p["prompt"]: p for p in read_jsonl(out)}
    skipped = {s["row"]: s for s in read_jsonl(tmp_path / "skipped.jsonl")}
    assert len(pairs) + len(skipped) == len(rows)
    for k, row in enumerate(rows):
        prompt, cands = row["prompt"], row["responses"]
        best = worst = 0  # the oracle: one comparison at a time, the holder kept unless strictly beaten
        for j in range(1, len(cands)):
            if rm.compare([prompt], [cands[j]], [cands[best]])[0] > 0.5:
                best = j
            if rm.compare([prompt], [cands[j]], [cands[worst]])[0] < 0.5:
                worst = j
        p = rm.compare([prompt], [cands[best]], [cands[worst]])[0]
        if best == worst or p <= 0.5:
            assert skipped[k]["reason"] in ("cyclic preferences", "tie")
            continue
        pair = pairs[prompt]
        assert (pair["chosen"], pair["rejected"]) == (cands[best], cands[worst])
        assert pair["chosen_reward"] == pytest.approx(logodds(p), abs=1e-5)
        assert pair["rejected_reward"] == pytest.approx(-logodds(p), abs=1e-5)


# -- eval ------------------------------------------------------------------------------------------------------------
REWARDBENCH_COUNTS = {  # rewardbench/constants.py EXAMPLE_COUNTS, for the subsets the sample file uses
    "alpacaeval-easy": 100, "mt-bench-easy": 28, "mt-bench-hard": 37, "llmbar-natural": 100,
    "refusals-dangerous": 100, "xstest-should-respond": 250, "math-prm": 984, "hep-python": 164}
REWARDBENCH_SECTIONS = {"Chat": ["alpacaeval-easy", "mt-bench-easy"],
                        "Chat Hard": ["mt-bench-hard", "llmbar-natural"],
                        "Safety": ["refusals-dangerous", "xstest-should-respond"],
                        "Reasoning": ["math-prm", "hep-python"]}


def test_eval_accuracy_and_sections_against_an_independent_computation(tmp_path, tiny_dir, models, capsys):
    sample = read_jsonl(sample_preferences_path())
    rows = [r for r in sample if sum(s["subset"] == r["subset"] for s in sample[:sample.index(r) + 1]) <= 2]
    rows.append({"id": 99, "subset": "my-own", "prompt": "Hi", "chosen": "Hello.", "rejected": "Hello."})
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    out_dir = tmp_path / "results"
    assert main(["eval", data, "--model", tiny_dir(SCALAR), "--preset", SCALAR, "--model", tiny_dir(PAIRWISE),
                 "--preset", PAIRWISE, "--output-dir", str(out_dir), "--id-column", "id"]) == 0
    results = json.loads((out_dir / "results.json").read_text())["models"]
    assert [r["kind"] for r in results] == ["scalar", "pairwise"]
    for name, result in zip((SCALAR, PAIRWISE), results):
        rm = models(name)
        margins = []
        for r in rows:  # one row at a time: a row's result must not depend on its neighbours
            if rm.kind == "scalar":
                margins.append(rm.score([r["prompt"]], [r["chosen"]])[0] - rm.score([r["prompt"]], [r["rejected"]])[0])
            else:
                margins.append(logodds(rm.compare([r["prompt"]], [r["chosen"]], [r["rejected"]])[0]))
        accuracy = {}
        for subset in {r["subset"] for r in rows}:
            ms = [m for m, r in zip(margins, rows) if r["subset"] == subset]
            got = result["subsets"][subset]
            assert got["n"] == len(ms)
            assert got["correct"] == sum(m > 0 for m in ms)
            assert got["mean_margin"] == pytest.approx(sum(ms) / len(ms), abs=1e-5)
            accuracy[subset] = sum(m > 0 for m in ms) / len(ms)
        assert result["subsets"]["my-own"]["ties"] == 1 and result["subsets"]["my-own"]["correct"] == 0
        for section, subsets in REWARDBENCH_SECTIONS.items():
            weighted = sum(accuracy[s] * REWARDBENCH_COUNTS[s] for s in subsets)
            assert result["sections"][section]["score"] == pytest.approx(
                weighted / sum(REWARDBENCH_COUNTS[s] for s in subsets), abs=1e-12)
        assert result["score"] == pytest.approx(sum(result["sections"][s]["score"] for s in REWARDBENCH_SECTIONS) / 4)
    table = (out_dir / "results.md").read_text()
    names = [os.path.basename(tiny_dir(name)) for name in (SCALAR, PAIRWISE)]
    assert table.splitlines()[0] == f"| | {names[0]} | {names[1]} |"
    assert "| my-own | 0.0 (1, 1) | 0.0 (1, 1) |" in table
    assert len(read_jsonl(out_dir / "rows.jsonl")) == len(rows)
    from PIL import Image

    for png in ("margins.png", "subsets.png"):
        with Image.open(out_dir / png) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
            image.verify()


def test_eval_runs_on_the_shipped_sample(tmp_path, tiny_dir):
    assert main(["eval", "sample:preferences", "--model", tiny_dir(SCALAR), "--output-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["rows"] >= 30 and set(result["models"][0]["sections"]) == set(REWARDBENCH_SECTIONS)


# -- format ----------------------------------------------------------------------------------------------------------
def test_format_prints_the_exact_text_and_ids(tiny_dir, models, capsys):
    rm = models(SCALAR)
    assert main(["format", "--model", tiny_dir(SCALAR), "--prompt", "Hi", "--completion", "Hello", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["inputs"]
    text = rm.format("Hi", "Hello")
    assert [s["text"] for s in shown] == [text]
    assert shown[0]["token_ids"] == rm.tokenizer(text, add_special_tokens=rm.preset.add_special_tokens)["input_ids"]

    name = "rlhflow-pair-pm-llama3-8b"
    pm = load_reward_model(tiny_dir(name), preset=name, device="cpu")
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert main(["format", "--model", tiny_dir(name), "--prompt-json", json.dumps(prompt), "--completion", "Hello",
                 "--baseline", "Yo", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["inputs"]
    assert [s["order"] for s in shown] == ["(A, B)", "(B, A)"]
    assert [s["text"] for s in shown] == pm.format(prompt, "Hello", "Yo")
    assert [s["token_ids"] for s in shown] == [pm.tokenizer.encode(t, add_special_tokens=False)
                                               for t in pm.format(prompt, "Hello", "Yo")]


# -- bad input: exit 2, a message naming what and where, nothing written -------------------------------------------
def test_bad_input_exits_2_before_scoring(tmp_path, tiny_dir, capsys):
    model = ["--model", tiny_dir(SCALAR)]
    good = write_jsonl(tmp_path / "good.jsonl", generations(8))

    def fails(argv, *needles):
        assert main(argv) == 2
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, err

    fails(["score", good, "--completion-column", "answer", *model], "no column 'answer'",
          "the columns are: id, prompt, completion, ref")
    fails(["eval", good, *model, "--output-dir", str(tmp_path / "e")], "no column 'chosen'")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": }\n')
    fails(["score", str(bad), *model], f"{bad}:2: malformed JSON")
    fails(["label", str(tmp_path / "missing.jsonl"), *model], "missing.jsonl: no such file or directory")
    (tmp_path / "notes.txt").write_text("hello")
    fails(["score", str(tmp_path / "notes.txt"), *model], "unknown file type .txt")
    fails(["score", str(tmp_path), *model], "not a dataset saved with save_to_disk")
    fails(["score", good, *model, "--output", str(tmp_path / "no" / "such" / "dir.jsonl")],
          "directory", "does not exist")
    fails(["eval", good, *model, "--output-dir", str(tmp_path / "notes.txt" / "x")], "cannot create")
    existing = tmp_path / "existing.jsonl"
    existing.write_text("keep me\n")
    fails(["score", good, *model, "--output", str(existing)], "already exists", "--resume")
    fails(["label", good, *model, "--output", str(existing)], "already exists")
    assert existing.read_text() == "keep me\n"
    fails(["score", good, "--model", tiny_dir(PAIRWISE)], "pairwise model", "--baseline-column")
    fails(["format", "--model", tiny_dir(PAIRWISE), "--prompt", "a", "--completion", "b"], "--baseline")
    fails(["eval", good, *model, "--model", tiny_dir(PAIRWISE), "--preset", SCALAR], "--preset was given 1 times")
    fails(["score", good, *model, "--id-column", "prompt"], "share 'prompt'")

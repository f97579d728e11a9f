"""ProcessBench in `rlhf-rewards eval`: the scoring against an oracle written here from the paper's definition and
QwenLM/ProcessBench's scripts (a step is right when its score is above the threshold, the prediction is the first
step that is not, -1 when none; accuracy on erroneous and on correct rows, their harmonic mean per subset, the mean
of the four subsets' F1), on hand-made step rewards with rewards exactly at the threshold and rows labelled -1 and 0;
the command end to end with a duck-typed process model standing in for a real one; per-row errors counted; bad
layouts and non-process models refused before any model loads."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pytest

from rlhf_rewards.cli import eval as eval_cli
from rlhf_rewards.cli import main
from rlhf_rewards.cli.data_io import sample_path
from rlhf_rewards.cli.eval_processbench import RowInfo, row_margin, summarize
from rlhf_rewards.errors import SampleError
from rlhf_rewards.presets import PRESETS, Preset
from rlhf_rewards.rewardbench import processbench as pb
from rlhf_rewards.stats import RewardStats

pytest.importorskip("datasets")
pytest.importorskip("matplotlib")

FOUR = ["gsm8k", "math", "olympiadbench", "omnimath"]


# -- the oracle: the paper's definition, as the reference scripts compute it -------------------------------------------
def oracle(rows: list[dict], threshold: float) -> dict:
    """``rows``: dicts with subset, label and ``rewards`` (one per step). Returns ``{subset: (error acc %, correct
    acc %, F1 %)}`` and ``"average"`` (the mean F1 of the four subsets)."""
    groups = defaultdict(list)
    for r in rows:
        correct_steps = np.array(r["rewards"]) > threshold  # "a threshold above which steps are considered correct"
        wrong = np.nonzero(~correct_steps)[0]
        prediction = int(wrong[0]) if wrong.size else -1
        groups[r["subset"]].append({"label": r["label"], "match": prediction == r["label"]})
    out = {}
    for subset, data in groups.items():
        data1 = [e for e in data if e["label"] != -1]
        data2 = [e for e in data if e["label"] == -1]
        acc1 = np.mean([e["match"] for e in data1]) * 100
        acc2 = np.mean([e["match"] for e in data2]) * 100
        out[subset] = (acc1, acc2, 2 * acc1 * acc2 / (acc1 + acc2))
    out["average"] = np.mean([out[s][2] for s in FOUR])
    return out


def hand_row(subset, label, rewards):
    return {"subset": subset, "label": label, "rewards": [float(x) for x in rewards]}


HAND_MADE = [
    hand_row("gsm8k", -1, [0.9, 0.8, 0.7]),          # all above: predicted -1, a match
    hand_row("gsm8k", -1, [0.9, 0.5, 0.9]),          # a reward exactly at the threshold is wrong: predicted 1
    hand_row("gsm8k", 1, [0.9, 0.5, 0.1]),           # the first step at the threshold is the prediction: a match
    hand_row("gsm8k", 0, [0.6, 0.3, 0.2]),           # label 0 flagged at 1: a miss
    hand_row("math", 0, [0.5, 0.9]),                 # label 0 at exactly the threshold: a match
    hand_row("math", 0, [0.500001, 0.9]),            # just above: predicted -1, a miss
    hand_row("math", -1, [0.51]),                    # one step
    hand_row("math", 2, [0.9, 0.9, 0.49, 0.0]),
    hand_row("olympiadbench", 1, [0.9, 0.9, 0.1]),   # flagged too late: a miss
    hand_row("olympiadbench", 2, [0.9, 0.1, 0.1]),   # flagged too early: a miss
    hand_row("olympiadbench", -1, [0.0, 1.0]),
    hand_row("olympiadbench", -1, [1.0, 1.0]),
    hand_row("omnimath", 0, [0.0, 0.0]),             # reward 0: wrong at any threshold
    hand_row("omnimath", 3, [0.7, 0.6, 0.55, 0.45]),
    hand_row("omnimath", -1, [0.6, 0.6, 0.6]),
    hand_row("omnimath", -1, [1.0]),
]


def info_of(rows):
    return [RowInfo(r["subset"], n, r["label"], len(r["rewards"])) for n, r in enumerate(rows)]


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.6, 0.0, 1.0])
def test_scores_match_the_papers_definition_on_hand_made_rewards(threshold):
    got = summarize(info_of(HAND_MADE), [(r["rewards"], None) for r in HAND_MADE], threshold)
    with np.errstate(invalid="ignore"):
        want = oracle(HAND_MADE, threshold)
    for subset in FOUR:
        acc1, acc2, f1 = want[subset]
        entry = got["subsets"][subset]
        assert 100 * entry["error_accuracy"] == pytest.approx(acc1, abs=1e-9), subset
        assert 100 * entry["correct_accuracy"] == pytest.approx(acc2, abs=1e-9), subset
        if math.isnan(f1):  # the reference script divides 0 by 0: the harmonic mean's limit there is 0
            assert acc1 == acc2 == 0 and entry["f1"] == 0.0
        else:
            assert 100 * entry["f1"] == pytest.approx(f1, abs=1e-9), subset
    if not math.isnan(want["average"]):
        assert 100 * got["average_f1"] == pytest.approx(want["average"], abs=1e-9)
    assert got["missing"] == [] and got["overall"] == {"rows": 16, "n": 16, "errors": 0}


def test_the_threshold_edges_and_labels_minus_one_and_zero():
    got = summarize(info_of(HAND_MADE), [(r["rewards"], None) for r in HAND_MADE], 0.5)["subsets"]
    # gsm8k: erroneous 1 of 2 matched (the 0.5 step is the wrong one), correct 1 of 2 (0.5 flags a correct row)
    assert (got["gsm8k"]["erroneous"], got["gsm8k"]["erroneous_matched"]) == (2, 1)
    assert (got["gsm8k"]["correct"], got["gsm8k"]["correct_matched"]) == (2, 1)
    assert got["gsm8k"]["f1"] == pytest.approx(0.5)
    # math: label 0 at exactly 0.5 matched, just above it missed; label 2 matched
    assert (got["math"]["erroneous"], got["math"]["erroneous_matched"]) == (3, 2)
    # olympiadbench: too late and too early are both misses: error accuracy 0, correct accuracy 1/2, F1 0
    assert got["olympiadbench"]["error_accuracy"] == 0.0 and got["olympiadbench"]["f1"] == 0.0
    assert pb.first_error_step([0.5], 0.5) == 0 and pb.first_error_step([0.5000001], 0.5) == -1
    assert pb.first_error_step([0.0, 0.0], 0.0) == 0 and pb.first_error_step([1.0], 1.0) == 0
    assert pb.first_error_step([], 0.5) == -1
    # the plotted row margin: positive when matched, negative when missed, 0 at a reward exactly at the threshold
    assert [round(row_margin(r["rewards"], r["label"], 0.5), 6) for r in HAND_MADE[:6]] == \
        [0.2, 0.0, 0.0, -0.1, 0.0, -0.000001]


def test_what_cannot_be_averaged_is_none():
    assert pb.harmonic_mean(0.0, 0.0) == 0.0 and pb.harmonic_mean(None, 1.0) is None
    only_correct = pb.subset_score([-1, -1], [-1, 0])
    assert only_correct.error_accuracy is None and only_correct.correct_accuracy == 0.5 and only_correct.f1 is None
    assert pb.average_f1({"gsm8k": 0.5, "math": 0.5, "olympiadbench": 0.5}) is None
    assert pb.average_f1({**{s: 0.5 for s in FOUR}, "math": None}) is None
    assert pb.average_f1({"gsm8k": 0.2, "math": 0.4, "olympiadbench": 0.6, "omnimath": 0.8, "x": 0.0}) == \
        pytest.approx(0.5)
    assert [pb.subset_of_id(i) for i in ("gsm8k-0", "omnimath-805", "math", "mmlu-3", 7)] == \
        ["gsm8k", "omnimath", None, None, None]


# -- end to end, with a process model that is a stand-in --------------------------------------------------------------
class FakeProcessModel:
    """A duck-typed process reward model: ``score_steps_samples`` gives the step rewards the test chose for each
    (problem, steps); a SampleError for any other; the whole call raises when ``raise_on`` is one of the problems."""

    kind = "process"

    def __init__(self, rewards: dict, raise_on: str = ""):
        self.rewards = rewards
        self.raise_on = raise_on
        self.preset = PRESETS["fake-prm"]
        self.stats = RewardStats()
        self.calls: list[int] = []

    def score_steps_samples(self, prompts, completions):
        assert all(isinstance(c, list) and all(isinstance(s, str) for s in c) for c in completions)
        self.calls.append(len(prompts))
        if self.raise_on in prompts:
            raise RuntimeError("this batch cannot run")
        return [list(self.rewards[p, tuple(c)]) if (p, tuple(c)) in self.rewards else
                SampleError(i, f"completions[{i}]: the stand-in has no reward for it", "completion")
                for i, (p, c) in enumerate(zip(prompts, completions))]


SAMPLE_REWARDS = {  # per sample id: hand-made, some exactly at 0.5
    "gsm8k-0": [0.9, 0.8, 0.7, 0.95], "gsm8k-1": [0.9, 0.5, 0.2, 0.1], "gsm8k-2": [0.6, 0.3, 0.2],
    "gsm8k-3": [0.9, 0.5, 0.9], "math-0": [0.51, 0.6, 0.7, 0.8], "math-1": [0.2, 0.9, 0.9],
    "math-2": [0.8, 0.1, 0.1], "math-3": [0.5, 0.9, 0.9], "olympiadbench-0": [0.9, 0.9, 0.9, 0.9],
    "olympiadbench-1": [0.9, 0.9, 0.7, 0.3], "olympiadbench-2": [0.4, 0.9, 0.9, 0.9],
    "olympiadbench-3": [0.9, 0.9, 0.9, 0.50001], "omnimath-0": [0.6, 0.6, 0.6, 0.6],
    "omnimath-1": [0.9, 0.3, 0.1, 0.1], "omnimath-2": [0.0, 0.0, 0.0], "omnimath-3": [1.0, 1.0, 1.0],
}


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture
def fake_models(monkeypatch):
    """Registers the stand-in's preset (kind "process") and makes the command load ``models[name]``; any other
    name fails the test if it gets as far as loading."""
    monkeypatch.setitem(PRESETS, "fake-prm", Preset(name="fake-prm", kind="process", hub_ids=(), backend="none",
                                                    text_format="none"))
    models: dict[str, FakeProcessModel] = {}
    loaded: list[str] = []

    def load(args, name, preset, tokenizer):
        loaded.append(name)
        return models[name]

    monkeypatch.setattr(eval_cli, "load_model", load)
    return models, loaded


def sample_with_bad_rows() -> list[dict]:
    rows = read_jsonl(sample_path("sample:processbench"))
    base = rows[0]
    for i, subset in enumerate(FOUR + ["gsm8k"]):  # rows the model cannot score, for five different reasons
        rows.append({**base, "id": f"{subset}-{90 + i}", "problem": f"Unscorable {subset} problem {i}.",
                     "label": -1 if i % 2 else 1})
    return rows


def stand_in_rewards(rows: list[dict]) -> dict:
    rewards = {(r["problem"], tuple(r["steps"])): SAMPLE_REWARDS[r["id"]] for r in rows if r["id"] in SAMPLE_REWARDS}
    bad = {r["id"]: (r["problem"], tuple(r["steps"])) for r in rows if r["id"] not in SAMPLE_REWARDS}
    rewards[bad["math-91"]] = [0.9, 0.9]                           # 2 rewards for 4 steps
    rewards[bad["olympiadbench-92"]] = [0.9, float("nan"), 0.9, 0.9]  # NaN would read as above any threshold
    rewards[bad["omnimath-93"]] = [0.9, 1.5, 0.9, 0.9]              # not a probability
    omnimath_0 = next(k for k, v in rewards.items() if v is SAMPLE_REWARDS["omnimath-0"])
    rewards[omnimath_0] = [np.float32(0.6)] * 4                     # numpy floats are numbers too
    rewards[bad["gsm8k-94"]] = [0.9] * 4                            # its batch raises, and so does its own call
    return rewards                                                  # gsm8k-90: no reward, a SampleError


@pytest.mark.parametrize("threshold", [None, "0.3", "0.9"])
def test_eval_on_the_shipped_sample_with_a_process_model(tmp_path, fake_models, capsys, threshold):
    models, loaded = fake_models
    rows = sample_with_bad_rows()
    models["stand-in"] = FakeProcessModel(stand_in_rewards(rows), raise_on="Unscorable gsm8k problem 4.")
    models["pessimist"] = FakeProcessModel({(r["problem"], tuple(r["steps"])): [0.2] * len(r["steps"])
                                            for r in rows})
    out = tmp_path / "results"
    extra = ["--threshold", threshold] if threshold else []
    assert main(["eval", write_jsonl(tmp_path / "pb.jsonl", rows), "--model", "stand-in", "--preset", "fake-prm",
                 "--model", "pessimist", "--preset", "fake-prm", "--output-dir", str(out), "--chunk-size", "7",
                 *extra]) == 0
    t = float(threshold or 0.5)
    assert loaded == ["stand-in", "pessimist"]
    assert "5 rows could not be scored" in capsys.readouterr().err
    assert len(models["stand-in"].calls) > 3  # the batch that raised was retried one row at a time
    results = json.loads((out / "results.json").read_text())["models"]
    rows = [{**r, "subset": r["id"].rsplit("-", 1)[0]} for r in rows]
    scored = [{**r, "rewards": SAMPLE_REWARDS[r["id"]]} for r in rows if r["id"] in SAMPLE_REWARDS]
    for result, rewards in ((results[0], None), (results[1], 0.2)):
        with np.errstate(invalid="ignore", divide="ignore"):
            want = oracle(scored if rewards is None else [{**r, "rewards": [rewards] * len(r["steps"])}
                                                          for r in rows], t)
        assert result["kind"] == "process" and result["benchmark"] == "ProcessBench" and result["threshold"] == t
        for subset in FOUR:
            acc1, acc2, f1 = want[subset]
            entry = result["subsets"][subset]
            assert 100 * entry["error_accuracy"] == pytest.approx(acc1) and \
                100 * entry["correct_accuracy"] == pytest.approx(acc2), subset
            assert 100 * entry["f1"] == pytest.approx(0.0 if math.isnan(f1) else f1), subset
        assert 100 * result["average_f1"] == pytest.approx(np.nan_to_num(want["average"]))
    stand_in = results[0]
    assert stand_in["overall"] == {"rows": 21, "n": 16, "errors": 5}
    assert [stand_in["subsets"][s]["errors"] for s in FOUR] == [2, 1, 1, 1]
    assert all(stand_in["subsets"][s]["n"] == 4 for s in FOUR)
    assert results[1]["overall"]["errors"] == 0
    written = read_jsonl(out / "rows.jsonl")
    assert [w["id"] for w in written] == [r["id"] for r in rows]
    reasons = {w["id"]: w.get("error_0") for w in written}
    assert reasons["gsm8k-90"] == "SampleError: completions[0]: the stand-in has no reward for it"
    assert reasons["gsm8k-94"] == "RuntimeError: this batch cannot run"
    assert reasons["math-91"] == "the model gave 2 step rewards for 4 steps"
    assert reasons["olympiadbench-92"] == "step 1's reward nan is not a number in [0, 1]"
    assert reasons["omnimath-93"] == "step 1's reward 1.5 is not a number in [0, 1]"
    for w in written:
        if w["id"] in SAMPLE_REWARDS:
            assert w["step_rewards_0"] == pytest.approx(SAMPLE_REWARDS[w["id"]]) and "error_0" not in w
            assert w["match_0"] == (w["prediction_0"] == w["label"])
        else:
            assert w["step_rewards_0"] is None and w["prediction_0"] is None and w["match_0"] is None
        assert w["prediction_1"] == (0 if t >= 0.2 else -1)
    if t == 0.5:  # a reward exactly at the threshold is predicted wrong: gsm8k-1 (label 1) matches, gsm8k-3 not
        by_id = {w["id"]: w for w in written}
        assert (by_id["gsm8k-1"]["prediction_0"], by_id["gsm8k-3"]["prediction_0"]) == (1, 1)
        assert by_id["math-3"]["match_0"] is True  # label 0 at exactly 0.5
    table = (out / "results.md").read_text()
    assert "| **ProcessBench average F1** (mean of the four subsets) |" in table and "1 errors" in table
    assert f"at or below {t:g}" in table
    from PIL import Image

    for png in ("margins.png", "subsets.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_the_layout_is_told_from_the_rows_or_given(tmp_path, fake_models):
    models, _ = fake_models
    rows = read_jsonl(sample_path("sample:processbench"))
    assert {pb.subset_of_id(r["id"]) for r in rows} == set(FOUR)
    assert {r["label"] for r in rows} >= {-1, 0, 1, 2} and "subset" not in rows[0]
    models["m"] = FakeProcessModel({(r["problem"], tuple(r["steps"])): [0.9] * len(r["steps"]) for r in rows})
    model = ["--model", "m", "--preset", "fake-prm"]
    for extra in ([], ["--benchmark", "processbench"]):
        out = tmp_path / f"out{len(extra)}"
        assert main(["eval", "sample:processbench", *model, "--output-dir", str(out), *extra]) == 0
        result = json.loads((out / "results.json").read_text())["models"][0]
        assert list(result["subsets"]) == FOUR and result["average_f1"] == 0.0  # -1 everywhere: error accuracy 0
    # a subset column, when there is one, names the subsets (ids need not be ProcessBench's)
    own = [{**r, "id": f"row{n}", "subset": "mine" if n % 2 else "gsm8k"} for n, r in enumerate(rows)]
    out = tmp_path / "own"
    assert main(["eval", write_jsonl(tmp_path / "own.jsonl", own), *model, "--output-dir", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())["models"][0]
    assert list(result["subsets"]) == ["gsm8k", "mine"] and result["average_f1"] is None
    assert result["missing"] == ["math", "olympiadbench", "omnimath"]
    assert "none without math, olympiadbench, omnimath" in (out / "results.md").read_text()


def test_a_saved_datasetdict_of_the_splits_is_read_whole(tmp_path, fake_models):
    import datasets

    models, _ = fake_models
    rows = read_jsonl(sample_path("sample:processbench"))
    splits = {s: datasets.Dataset.from_list([{**r, "id": f"{n}"} for n, r in enumerate(rows)
                                             if r["id"].startswith(s + "-")]) for s in FOUR}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "pb"))
    models["m"] = FakeProcessModel({(r["problem"], tuple(r["steps"])): SAMPLE_REWARDS[r["id"]] for r in rows})
    out = tmp_path / "out"
    assert main(["eval", str(tmp_path / "pb"), "--model", "m", "--preset", "fake-prm", "--output-dir", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())["models"][0]
    want = oracle([{**r, "subset": r["id"].rsplit("-", 1)[0], "rewards": SAMPLE_REWARDS[r["id"]]} for r in rows], 0.5)
    for subset in FOUR:
        assert 100 * result["subsets"][subset]["f1"] == pytest.approx(want[subset][2])
    assert 100 * result["average_f1"] == pytest.approx(want["average"])
    assert {w["subset"] for w in read_jsonl(out / "rows.jsonl")} == set(FOUR)
    out = tmp_path / "one"
    assert main(["eval", str(tmp_path / "pb"), "--split", "math", "--model", "m", "--preset", "fake-prm",
                 "--output-dir", str(out)]) == 2  # one split, read alone: its ids say no subset


def test_bad_rows_and_non_process_models_are_refused_before_loading(tmp_path, fake_models, capsys):
    models, loaded = fake_models
    good = read_jsonl(sample_path("sample:processbench"))

    def fails(data, *needles, model=("--model", "m", "--preset", "fake-prm"), extra=()):
        assert main(["eval", data, *model, "--output-dir", str(tmp_path / "out"), *extra]) == 2
        message = capsys.readouterr().err
        for needle in needles:
            assert needle in message, message

    def variant(name, index, **change):
        rows = [dict(r) for r in good]
        rows[index].update(change)
        return write_jsonl(tmp_path / f"{name}.jsonl", rows)

    fails("sample:processbench", "preset 'ray2333-mistral-7b' is a scalar reward model",
          "ProcessBench needs a process reward model", "(presets: ", "qwen2.5-math-prm", "rlhflow-prm",
          "fake-prm)",
          model=("--model", "/no/such/model", "--preset", "ray2333-mistral-7b"))
    fails(variant("high", 2, label=3), "row 2 has 'label' 3; expected the index of its earliest wrong step (0 to 2)")
    fails(variant("low", 2, label=-2), "row 2 has 'label' -2")
    fails(variant("empty", 1, steps=[]), "row 1's 'steps' is not a non-empty list of step strings")
    fails(variant("text", 1, steps="one step"), "column 'steps' holds a string")  # refused as the file is read
    fails(variant("noid", 5, id="x-5"), "row 5: no 'subset' column, and its id 'x-5' does not name a ProcessBench "
                                        "subset")
    fails(variant("noproblem", 0, problem=""), "row 0 has 'problem' ''")
    fails("sample:processbench", "no column 'prompt'", extra=["--benchmark", "v1"])
    fails("sample:preferences", "no column 'problem'", extra=["--benchmark", "processbench"])
    fails("sample:preferences", "--threshold is ProcessBench's", extra=["--threshold", "0.4"])
    assert loaded == []
    with pytest.raises(SystemExit):
        main(["eval", "sample:processbench", "--model", "m", "--threshold", "1.5"])
    assert "must be in [0, 1]" in capsys.readouterr().err

"""Process reward models (``kind == "process"``): Qwen2.5-Math-PRM on a tiny checkpoint in its hub layout, against
an oracle written from the model card's code (its messages, chat template, ``encode``, a full forward of a module
built here from the remote code's description, softmax, the ``<extra_0>`` mask and ``make_step_rewards``), one
sample at a time; the step-splitting, control-text, aggregation, TRL, server and command-line paths."""

from __future__ import annotations

import json
import math

import httpx
import pytest
from safetensors.torch import load_file

from benchmarks.cards import QWEN_MATH_SYSTEM, QwenPRMCard
from rlhf_rewards import ProcessRewardModel, RemoteRewardFunction, RewardFunction, load_reward_model
from rlhf_rewards.cli import main
from rlhf_rewards.errors import SampleError, TooLongError
from rlhf_rewards.presets import get_preset, resolve_preset
from rlhf_rewards.serving import RewardEngine, build_app

from serving_helpers import ServerThread

PRESET = "qwen2.5-math-prm"
TOL = 1e-4
SYSTEM = QWEN_MATH_SYSTEM
QUESTION = "Sue has 6 white and 12 pink flamingos. How many more pink than white?"
SOLUTIONS = [
    ["12 - 6 = 6."],  # one step
    ["Pink: 12.", "White: 6.", "12 - 6 = 6. The answer is \\boxed{6}."],  # several
    ["First, note\n\nthat pink is 12.", "So the answer is 6."],  # a step holding the separator text
    ["Pink minus white is 6.", ""],  # an empty final step
]


@pytest.fixture(scope="module")
def card(path):
    """The model card's procedure for one (question, steps), step by step."""
    oracle = QwenPRMCard(path)
    missing, unexpected = oracle.load_result
    assert not missing and not unexpected
    return oracle


# -- the preset and the checkpoint ---------------------------------------------------------------------------------

def test_resolution_layout_and_golden_ids(path, prm):
    assert resolve_preset("Qwen/Qwen2.5-Math-PRM-7B", None).name == PRESET
    assert resolve_preset("qwen/qwen2.5-math-prm-72b", None).name == PRESET
    assert resolve_preset(path, None).name == PRESET  # by config.json's architecture alone
    with open(f"{path}/config.json") as f:
        config = json.load(f)
    assert config["architectures"] == ["Qwen2ForProcessRewardModel"] and config["model_type"] == "qwen2"
    names = set(load_file(f"{path}/model.safetensors"))
    assert {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"} <= names
    assert isinstance(prm, ProcessRewardModel) and prm.kind == "process" and prm.aggregate == "min" and prm.step_separator == "\n\n"
    # the real vocabulary: the preset's golden ids were checked at load (same vocabulary size)
    assert len(prm.tokenizer) == get_preset(PRESET).golden_ids[0].vocab_size
    assert prm.step_tag_id == 151651 == prm.tokenizer.encode("<extra_0>")[0]


# -- parity with the card --------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", SOLUTIONS, ids=["one", "several", "separator-inside", "empty-final"])
def test_step_rewards_equal_the_cards(prm, card, steps):
    got = prm.score_steps([QUESTION], [steps])[0]
    want = card(QUESTION, steps)
    assert len(got) == len(steps) == len(want)
    assert got == pytest.approx(want, abs=TOL)
    assert all(0.0 <= r <= 1.0 for r in got)


def test_text_completions_split_at_blank_lines_as_the_card_splits(prm, card):
    text = "Pink: 12.\n\nWhite: 6.\n\n12 - 6 = 6.\n\n"  # str.split keeps the empty last step
    assert prm.score_steps([QUESTION], [text])[0] == pytest.approx(card(QUESTION, text.split("\n\n")), abs=TOL)
    assert len(prm.score_steps([QUESTION], [text])[0]) == 4
    single = "Pink: 12.\nWhite: 6."
    assert prm.score_steps([QUESTION], [single])[0] == pytest.approx(card(QUESTION, [single]), abs=TOL)


def test_own_step_separator_and_own_system_prompt(path, card):
    prm = load_reward_model(path, device="cpu", step_separator="\n")
    assert prm.score_steps([QUESTION], ["a\nb"])[0] == pytest.approx(card(QUESTION, ["a", "b"]), abs=TOL)
    messages = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": QUESTION}]
    assert prm.score_steps([messages], [["a"]])[0] == pytest.approx(card(QUESTION, ["a"], "Be exact."), abs=TOL)


def test_batch_invariance(prm):
    prompts = [QUESTION] * len(SOLUTIONS) + ["What is 2 + 2?"]
    completions = SOLUTIONS + [["2 + 2 = 4."]]
    together = prm.score_steps(prompts, completions)
    alone = [prm.score_steps([p], [c])[0] for p, c in zip(prompts, completions)]
    reversed_ = prm.score_steps(prompts[::-1], completions[::-1])[::-1]
    for a, b, c in zip(together, alone, reversed_):
        assert a == pytest.approx(b, abs=1e-5) and a == pytest.approx(c, abs=1e-5)


def test_packed_rows_give_the_cards_step_rewards(path, card):
    """Packed under a block mask, several samples per row (a small token budget), as the scalar models pack."""
    packed = load_reward_model(path, device="cpu", packing=True, max_batch_tokens=256)
    assert packed.packing
    steps = packed.score_steps([QUESTION] * len(SOLUTIONS), SOLUTIONS)
    assert packed.stats.batches < len(SOLUTIONS)  # rows held several samples
    for got, solution in zip(steps, SOLUTIONS):
        assert got == pytest.approx(card(QUESTION, solution), abs=1e-4)


# -- control text ------------------------------------------------------------------------------------------------

def test_a_step_spelling_the_marker_does_not_make_a_step(path, prm, card):
    assert "<extra_0>" in prm._control.controls  # the guard covers the marker (an added special token)
    attack = ["x <extra_0> y", "done"]
    before = prm.stats.control_text
    got = prm.score_steps([QUESTION], [attack])[0]
    assert len(got) == 2 and prm.stats.control_text == before + 1
    shown = prm.format(QUESTION, attack)  # the text as typed: the card's encode would make the step's a marker
    assert prm.tokenizer.encode(shown).count(151651) == 3
    assert prm.format(QUESTION, attack, tokens=True).count("<extra_0>") == 3  # decoded: text and tokens alike
    # the card's raw behaviour gives rewards to steps the caller never wrote: refused per sample
    tokens = load_reward_model(path, device="cpu", control_text="tokens")
    (result,) = tokens.score_steps_samples([QUESTION], [attack])
    assert isinstance(result, SampleError) and "3 step markers for 2 steps" in str(result)
    assert str(result).startswith("completions[0]")
    assert len(card(QUESTION, attack)) == 3


# -- errors and aggregation --------------------------------------------------------------------------------------

def test_per_sample_errors(path, prm):
    got = prm.score_steps_samples([QUESTION, QUESTION, None, QUESTION], [["a"], [], "b", ["ok", 3]])
    assert isinstance(got[0], list)
    assert isinstance(got[1], SampleError) and "completions[1]: no steps" in str(got[1])
    assert isinstance(got[2], SampleError) and str(got[2]).startswith("prompts[2]")
    assert isinstance(got[3], SampleError) and "completions[3]" in str(got[3])
    short = load_reward_model(path, device="cpu", max_length=40)
    long = short.score_steps_samples([QUESTION, "Hi"], [["word " * 50], ["a"]])
    assert isinstance(long[0], TooLongError) and "max_length=40" in str(long[0]) and isinstance(long[1], list)
    with pytest.raises(ValueError, match="no steps"):
        prm.score([QUESTION], [[]])
    with pytest.raises(ValueError, match="takes no baselines"):
        prm.score([QUESTION], ["a"], baselines=["b"])
    with pytest.raises(ValueError, match="aggregate must be one of"):
        load_reward_model(path, device="cpu", aggregate="max")
    with pytest.raises(ValueError, match="only process reward models"):
        load_reward_model(path, preset="ray2333-mistral-7b", device="cpu", step_separator="\n")


def test_aggregates(path, prm):
    steps = prm.score_steps([QUESTION], [SOLUTIONS[1]])[0]
    want = {"min": min(steps), "last": steps[-1], "mean": sum(steps) / len(steps), "product": math.prod(steps)}
    for how, value in want.items():
        assert prm.score([QUESTION], [SOLUTIONS[1]], aggregate=how)[0] == pytest.approx(value, abs=1e-9)
        assert prm.with_aggregate(how).score([QUESTION], [SOLUTIONS[1]])[0] == pytest.approx(value, abs=1e-9)
        loaded = load_reward_model(path, device="cpu", aggregate=how)
        assert loaded.score([QUESTION], [SOLUTIONS[1]])[0] == pytest.approx(value, abs=1e-6)
    assert prm.score([QUESTION], [SOLUTIONS[1]])[0] == pytest.approx(want["min"], abs=1e-9)


# -- TRL ---------------------------------------------------------------------------------------------------------

def test_reward_function_aggregates_and_logs_step_metrics(prm):
    seen = []
    fn = RewardFunction(prm, aggregate="mean", on_step_rewards=seen.append)
    metrics = {}
    prompts, completions = [QUESTION, QUESTION, None], ["a\n\nb", ["c"], "d"]
    rewards = fn(prompts=prompts, completions=completions, log_metric=lambda k, v: metrics.__setitem__(k, v))
    steps = prm.score_steps(prompts[:2], completions[:2])
    assert rewards[:2] == pytest.approx([sum(s) / len(s) for s in steps], abs=1e-9) and rewards[2] is None
    assert fn.last_step_rewards[:2] == steps and fn.last_step_rewards[2] is None and seen == [fn.last_step_rewards]
    name = fn.__name__
    assert metrics[f"{name}/steps_per_completion"] == 1.5
    assert metrics[f"{name}/mean_step_reward"] == pytest.approx(sum(map(sum, steps)) / 3, abs=1e-9)
    assert RewardFunction(prm)(prompts=prompts[:2], completions=completions[:2]) == pytest.approx(
        [min(s) for s in steps], abs=1e-9)
    with pytest.raises(ValueError, match="process reward model"):
        RewardFunction(prm, pairing="group")


def test_grpo_step(prm, tmp_path):
    from test_trl_integration import CHAT_DATASET, check_process_grpo_step

    check_process_grpo_step(prm, "prm", CHAT_DATASET, tmp_path)


# -- server and command line ---------------------------------------------------------------------------------------

def test_server_score_steps_score_and_remote(prm):
    prompts, completions = [QUESTION] * 3 + [QUESTION], SOLUTIONS[:3] + [[]]
    steps = prm.score_steps(prompts[:3], completions[:3])
    with ServerThread(build_app(RewardEngine(prm, max_wait_ms=2))) as url:
        def post(route, body):
            return httpx.post(url + route, json=body, timeout=60)

        answer = post("/v1/score_steps", {"prompts": prompts, "completions": completions})
        assert answer.status_code == 200
        body = answer.json()
        for got, want in zip(body["steps"][:3], steps):
            assert got == pytest.approx(want, abs=1e-6)
        assert body["steps"][3] is None and "completions[3]: no steps" in body["errors"][3]
        assert body["errors"][:3] == [None] * 3
        answer = post("/v1/score", {"prompts": prompts[:3], "completions": completions[:3], "aggregate": "last"})
        assert answer.json()["rewards"] == pytest.approx([s[-1] for s in steps], abs=1e-6)
        assert post("/v1/score", {"prompts": prompts[:3], "completions": completions[:3],
                                  "aggregate": "max"}).status_code == 422
        remote = RemoteRewardFunction(url, aggregate="product")
        assert remote(prompts[:3], completions[:3]) == pytest.approx([math.prod(s) for s in steps], abs=1e-6)
        assert RemoteRewardFunction(url)(prompts[:3], completions[:3]) == pytest.approx(
            [min(s) for s in steps], abs=1e-6)


def test_score_steps_refuses_other_kinds(tiny_dir):
    scalar = load_reward_model(tiny_dir("ray2333-mistral-7b"), preset="ray2333-mistral-7b", device="cpu")
    with ServerThread(build_app(RewardEngine(scalar, max_wait_ms=2))) as url:
        answer = httpx.post(url + "/v1/score_steps", json={"prompts": ["q"], "completions": ["a"]}, timeout=60)
        assert answer.status_code == 422 and "needs a process reward model" in answer.text
        answer = httpx.post(url + "/v1/score", json={"prompts": ["q"], "completions": ["a"], "aggregate": "min"},
                            timeout=60)
        assert answer.status_code == 422 and "only process reward models" in answer.text


def test_score_command_writes_reward_steps(path, prm, tmp_path):
    # a column holds one type (datasets would convert): explicit step lists here, text in the in-process tests
    rows = [{"prompt": QUESTION, "completion": ["Pink: 12.", "So 6."]}, {"prompt": QUESTION, "completion": ["a", "b"]},
            {"prompt": QUESTION, "completion": []}]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["score", str(data), "--model", path, "--output", str(out), "--aggregate", "last"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    written = [r for r in written if "prompt" in r]  # the run record first
    steps = prm.score_steps([QUESTION] * 2, ["Pink: 12.\n\nSo 6.", ["a", "b"]])
    for row, want in zip(written[:2], steps):
        assert row["reward_steps"] == pytest.approx(want, abs=1e-6)
        assert row["reward"] == pytest.approx(want[-1], abs=1e-6)
    assert written[2]["reward"] is None and written[2]["reward_steps"] is None
    assert "no steps" in written[2]["reward_error"]
    assert main(["score", str(data), "--model", path, "--output", str(tmp_path / "b.jsonl"),
                 "--baseline-column", "prompt"]) == 2


# -- ProcessBench with the real model --------------------------------------------------------------------------

def test_processbench_eval_with_the_prm(path, prm, tmp_path):
    """``eval`` on ProcessBench's layout predicts, per row, the first step whose reward is at most the threshold
    (or -1), from this model's own step rewards; per subset: accuracy on erroneous and on correct rows, and F1."""
    from rlhf_rewards.cli.data_io import SAMPLE_PROCESSBENCH, sample_path

    rows = [json.loads(line) for line in open(sample_path(SAMPLE_PROCESSBENCH), encoding="utf-8")]
    threshold = 0.5
    rewards = prm.score_steps([r["problem"] for r in rows], [r["steps"] for r in rows])
    hits: dict = {}
    for row, steps in zip(rows, rewards):
        predicted = next((k for k, r in enumerate(steps) if r <= threshold), -1)
        subset = row["id"].rsplit("-", 1)[0]
        kind = "correct" if row["label"] == -1 else "error"
        hits.setdefault(subset, {"correct": [], "error": []})[kind].append(predicted == row["label"])
    out = tmp_path / "eval"
    assert main(["eval", "sample:processbench", "--model", path, "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    subsets = results["models"][0]["subsets"] if "models" in results else results[0]["subsets"]
    for subset, got in hits.items():
        err, cor = sum(got["error"]) / len(got["error"]), sum(got["correct"]) / len(got["correct"])
        f1 = 0.0 if err + cor == 0 else 2 * err * cor / (err + cor)
        assert subsets[subset]["f1"] == pytest.approx(f1, abs=1e-9), subset


def test_a_process_model_on_rewardbench_rows_is_refused_before_loading(path, tmp_path, capsys):
    assert main(["eval", "sample:preferences", "--model", path, "--output-dir", str(tmp_path / "e")]) == 2
    assert "process reward model" in capsys.readouterr().err

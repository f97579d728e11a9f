"""Batching, truncation, bad input and loading behaviour of scalar models."""

from __future__ import annotations

import pytest
import torch

from rlhf_rewards import list_presets, load_reward_model
from rlhf_rewards.batching import plan_batches, run_batched
from rlhf_rewards.stats import RewardStats

from cases import CONVERSATIONS

SCALAR_PRESETS = ["ray2333-mistral-7b", "starling-rm-34b", "starling-rm-7b-alpha", "sequence-classifier"]


@pytest.mark.parametrize("preset", SCALAR_PRESETS)
def test_score_does_not_depend_on_batch_mates(tiny_dir, preset):
    rm = load_reward_model(tiny_dir(preset), preset=preset, device="cpu", max_batch_tokens=400)
    prompts = [p for p, _ in CONVERSATIONS] + ["x " * 150]
    completions = [c for _, c in CONVERSATIONS] + ["y " * 40]
    together = rm.score(prompts, completions)
    alone = [rm.score([p], [c])[0] for p, c in zip(prompts, completions)]
    assert together == pytest.approx(alone, abs=1e-5)
    assert rm.stats.batches > 1  # the budget really split the mixed batch


def test_order_is_restored_and_stats_count_padding(tiny_dir):
    rm = load_reward_model(tiny_dir("starling-rm-34b"), device="cpu")
    prompts = ["short", "a much longer prompt " * 10, "mid length prompt here"]
    forward = rm.score(prompts, ["a", "b", "c"])
    backward = rm.score(prompts[::-1], ["c", "b", "a"])
    assert forward == pytest.approx(backward[::-1], abs=1e-5)
    assert rm.stats.samples == 6
    assert rm.stats.computed_tokens >= rm.stats.real_tokens > 0


def test_truncation_keeps_the_scored_end(tiny_dir):
    path = tiny_dir("ray2333-mistral-7b")
    rm = load_reward_model(path, preset="ray2333-mistral-7b", device="cpu", max_length=40)
    long_prompt = "lorem ipsum " * 100
    text = rm.format(long_prompt, "final answer")
    full = rm.tokenizer(text)["input_ids"]
    cut = rm.tokenize([text])[0]
    assert len(cut) == 40
    assert cut[0] == full[0] == 1  # BOS stays first, as transformers' own truncation keeps it
    assert cut[1:] == full[-39:]  # the prompt's start goes, the completion and </s> stay
    assert rm.stats.truncated == 1 and rm.stats.truncated_tokens == len(full) - 40


def test_truncated_score_equals_scoring_the_kept_tokens(tiny_dir):
    path = tiny_dir("starling-rm-34b")
    rm = load_reward_model(path, device="cpu", max_length=32)
    text = rm.format("one two three four five six seven eight nine ten " * 5, "the reply")
    kept = rm.tokenize([text])[0]
    full = load_reward_model(path, device="cpu").tokenize([text])[0]
    assert kept == full[-32:]
    rm_full = load_reward_model(path, device="cpu")
    # scoring the kept ids without any limit gives the same reward
    index, pos = rm_full._read_position(kept)
    assert rm.score_texts([text])[0] == pytest.approx(rm_full._forward([(kept, index, pos)])[0], abs=1e-5)


@pytest.mark.parametrize("prompts, completions, message", [
    (["a", "b"], ["x"], "length mismatch"),
    ([None], ["x"], r"prompts\[0\]: prompt is None"),
    (["a", "b"], ["x", None], r"completions\[1\]: completion is None"),
    ([[{"role": "user", "content": 3}]], ["x"], r"prompts\[0\]\[0\]: content must be a string"),
    ([[{"role": "robot", "content": "hi"}]], ["x"], r"prompts\[0\]\[0\]: unknown role 'robot'"),
    ([[]], ["x"], r"prompts\[0\]: empty message list"),
    (["a"], [[{"role": "user", "content": "x"}]], r"completions\[0\]\[0\]: a completion's role must be"),
    ([[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]], ["x"], "last message"),
    ("ab", ["x", "y"], "prompts must be a list"),
])
def test_bad_input_names_the_index(tiny_dir, prompts, completions, message):
    rm = load_reward_model(tiny_dir("starling-rm-34b"), device="cpu")
    with pytest.raises(ValueError, match=message):
        rm.score(prompts, completions)


def test_empty_completion_is_scored_and_empty_batch_is_empty(tiny_dir):
    rm = load_reward_model(tiny_dir("starling-rm-34b"), device="cpu")
    (r,) = rm.score(["Hello"], [""])
    assert isinstance(r, float) and r == r
    assert rm.score([], []) == []


def test_nan_reward_raises(tiny_dir):
    rm = load_reward_model(tiny_dir("starling-rm-34b"), device="cpu")
    with torch.no_grad():
        rm.head.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        rm.score(["a"], ["b"])


def test_baselines_give_differences_and_score_each_baseline_once(tiny_dir):
    rm = load_reward_model(tiny_dir("starling-rm-34b"), device="cpu")
    prompts = ["q1", "q1", "q2"]
    completions = ["a", "b", "c"]
    baselines = ["ref1", "ref1", "ref2"]
    plain = rm.score(prompts + ["q1", "q2"], completions + ["ref1", "ref2"])
    rm.stats.reset()
    diffs = rm.score(prompts, completions, baselines=baselines)
    assert diffs == pytest.approx([plain[0] - plain[3], plain[1] - plain[3], plain[2] - plain[4]], abs=1e-5)
    assert rm.stats.samples == 5  # 3 completions + 2 distinct baselines


def test_plan_batches_respects_budget_and_sorts_longest_first():
    lengths = [5, 50, 20, 20, 100, 1]
    batches = plan_batches(lengths, max_batch_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert batches[0] == [4]
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 100 or len(b) == 1


def test_out_of_memory_splits_and_retries():
    stats = RewardStats()
    calls = []

    def forward(batch):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return [x * 2 for x in batch]

    out = run_batched(list(range(8)), [4] * 8, forward, max_batch_tokens=1000, stats=stats)
    assert out == [x * 2 for x in range(8)]
    assert stats.oom_splits == 3  # 8 -> 4 + 4 -> four batches of 2
    assert calls[0] == 8


def test_presets_listed_and_unknown_preset_rejected(tmp_path):
    names = list_presets()
    for name in SCALAR_PRESETS + ["rlhflow-pair-pm-llama3-8b", "pairrm"]:
        assert name in names
    with pytest.raises(ValueError, match="unknown preset"):
        load_reward_model(str(tmp_path), preset="nope")
    with pytest.raises(ValueError, match="is empty: it holds no model files"):
        load_reward_model(str(tmp_path))


def test_missing_weights_are_an_error(tiny_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_dir("starling-rm-34b")
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        state = load_file(f)
        state.pop("v_head.weight", None)
        save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks"):
        load_reward_model(str(dst), device="cpu")


def test_device_strings_follow_local_rank(monkeypatch):
    from rlhf_rewards.backends.weights import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("cuda:{local_rank+4}") == torch.device("cuda", 6)
    assert resolve_device("cuda:{local_rank}") == torch.device("cuda", 2)
    assert resolve_device(["cpu", "cpu", "cuda:7"]) == torch.device("cuda", 7)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="local rank 2"):
        resolve_device(["cuda:0"])


def test_template_rejection_is_a_value_error_naming_the_index(tiny_dir):
    rm = load_reward_model(tiny_dir("ray2333-mistral-7b"), preset="ray2333-mistral-7b", device="cpu")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]  # Mistral v0.2 needs alternation
    with pytest.raises(ValueError, match=r"prompts\[1\]: ray2333-mistral-7b cannot render this conversation: "
                                         r"the reward model's chat template rejects"):
        rm.score(["fine", bad], ["x", "y"])

"""In-process attacks (issue 15): a checkpoint whose rewards are infinite, model files that are missing or damaged,
group sizes that are not whole numbers, a lone surrogate in a text, and what a newcomer meets first (``format``
showing what the model reads, the demo leaving nothing behind in the temporary directory)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import httpx
import pytest
from safetensors.torch import load_file, save_file

from rlhf_rewards import NonFiniteRewardError, RewardFunction, SampleError, group_rewards, load_reward_model
from rlhf_rewards.cli import main
from rlhf_rewards.pairwise import preferences, rank
from rlhf_rewards.presets import resolve_preset
from rlhf_rewards.sources import ModelPathError

PM = "rlhflow-pair-pm-llama3-8b"
INF = float("inf")
CHATML = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there<|im_end|>\n"


# -- checkpoints that return infinities --------------------------------------------------------------------------------

def _edit_weights(source: str, target: str, edit) -> str:
    """A copy of checkpoint ``source`` at ``target`` with ``edit(state_dict)`` applied to its safetensors weights."""
    shutil.copytree(source, target)
    path = os.path.join(target, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})
    return target


def _constant_feature(state: dict) -> None:
    """Make hidden dimension 0 of a Llama-family backbone the same positive value at every position: the embeddings
    put 100 there and no layer writes to it, so the final RMSNorm passes it on positive. A head that reads only that
    dimension then gives every input the same value, of the sign its weight has."""
    embed = next(k for k in state if k.endswith("embed_tokens.weight"))
    state[embed][:, 0] = 100.0
    for key in state:
        if key.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            state[key][0, :] = 0.0


def _infinite_head(head: str, value: float):
    def edit(state: dict) -> None:
        _constant_feature(state)
        state[head].zero_()
        state[head][:, 0] = value
    return edit


@pytest.fixture(scope="module")
def infinite(tiny_dir, tmp_path_factory):
    """``infinite(preset, sign)``: a tiny checkpoint of ``preset`` edited to return ``sign * inf`` for every input
    (scalar presets), or a -inf logit for "A" (the pair-PM: a finite softmax of 0, and 0.5 over both orders), or
    infinite PairRM head weights (NaN or infinite logits)."""
    root = tmp_path_factory.mktemp("infinite")
    loaded = {}

    def get(preset: str, sign: float = 1.0):
        if (preset, sign) in loaded:
            return loaded[preset, sign]
        target = str(root / f"{preset}-{sign:+}")
        if preset == PM:
            from transformers import AutoTokenizer

            a = AutoTokenizer.from_pretrained(tiny_dir(PM)).encode("A", add_special_tokens=False)[0]

            def edit(state):
                _constant_feature(state)
                state["lm_head.weight"][a] = 0.0
                state["lm_head.weight"][a, 0] = -INF
        elif preset == "pairrm":
            def edit(state):
                state["head_layer.4.weight"].fill_(INF)
        else:
            head = {"starling-rm-34b": "v_head.weight"}.get(preset, "score.weight")
            edit = _infinite_head(head, sign * INF)
        path = _edit_weights(tiny_dir(preset), target, edit)
        loaded[preset, sign] = load_reward_model(path, preset=preset, device="cpu")
        return loaded[preset, sign]

    return get


PROMPTS = ["What is 2+2?", [{"role": "user", "content": "Name a colour."}]]
COMPLETIONS = ["4", "Blue."]


@pytest.mark.parametrize("preset", ["ray2333-mistral-7b", "starling-rm-34b"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_an_infinite_scalar_reward_is_a_per_sample_error_counted_in_stats(infinite, preset, sign, caplog):
    rm = infinite(preset, sign)
    what = "inf" if sign > 0 else "-inf"
    before = rm.stats.nonfinite
    with caplog.at_level(logging.WARNING, logger="rlhf_rewards"):
        results = rm.score_samples(PROMPTS, COMPLETIONS)
    assert all(isinstance(r, NonFiniteRewardError) and isinstance(r, SampleError) for r in results)
    assert str(results[1]) == f"completions[1]: {preset} returned {what} for this sample"
    assert rm.stats.nonfinite - before == 2
    assert f"{preset}.score: 2 model outputs were NaN or infinite, and their samples got no reward" in caplog.text
    with pytest.raises(NonFiniteRewardError, match=rf"completions\[0\]: {preset} returned {what} for this sample "
                                                    r"\(and 1 more"):
        rm.score(PROMPTS, COMPLETIONS)
    with pytest.raises(NonFiniteRewardError, match=f"returned {what} for input 0"):
        rm.score_texts([rm.format(PROMPTS[0], COMPLETIONS[0])])
    assert RewardFunction(rm)(prompts=PROMPTS, completions=COMPLETIONS) == [None, None]


def test_an_infinite_baseline_is_named(infinite):
    rm = infinite("ray2333-mistral-7b")
    results = rm.score_samples(PROMPTS, COMPLETIONS, baselines=["5", "Red."])
    # the reason is the infinity itself, not the NaN that inf - inf makes
    assert [str(r) for r in results] == [f"completions[{i}]: ray2333-mistral-7b returned inf for this sample"
                                         for i in range(2)]


def test_only_the_samples_with_infinite_rewards_lose_them(tiny_dir, monkeypatch):
    """The forward pass the server's batcher also replaces (``_forward_texts``) gives inf for texts saying BAD."""
    rm = load_reward_model(tiny_dir("ray2333-mistral-7b"), device="cpu")
    monkeypatch.setattr(rm, "_forward_texts", lambda texts: [INF if "BAD" in t else 1.5 for t in texts])
    results = rm.score_samples(["Q"] * 3, ["good", "BAD", "fine"], baselines=["ok", "ok", "BAD base"])
    assert results[0] == 0.0
    assert str(results[1]) == "completions[1]: ray2333-mistral-7b returned inf for this sample"
    assert str(results[2]) == "completions[2]: ray2333-mistral-7b returned inf for this sample's baseline"
    assert rm.stats.nonfinite == 2  # the completion and the baseline, each scored once
    assert RewardFunction(rm)(prompts=["Q"] * 3, completions=["good", "BAD", "fine"]) == [1.5, None, 1.5]


def test_two_minus_infinite_rewards_are_no_preference(infinite):
    """sigmoid(-inf - -inf) is sigmoid(NaN), which the clamp in the Bradley-Terry probability turned into 1.0."""
    rm = infinite("ray2333-mistral-7b", -1.0)
    with pytest.raises(NonFiniteRewardError, match="returned -inf"):
        preferences(rm, ["Q"], ["a"], ["b"])
    with pytest.raises(NonFiniteRewardError, match="returned -inf"):
        group_rewards(rm, ["Q"] * 2, ["a", "b"], 2)
    assert RewardFunction(rm, pairing="group", group_size=2)(prompts=["Q"] * 2, completions=["a", "b"]) == [None] * 2


def test_a_minus_infinite_pair_pm_logit_is_an_error_not_a_tie(infinite):
    """logit_A = -inf gives P(slot A) = 0 in each order: 0 and 1 for the two orders, averaged to an exact 0.5."""
    pm = infinite(PM)
    before = pm.stats.nonfinite
    results = pm.compare_samples(["Q", "Q"], ["a", "same"], ["b", "same"])
    assert isinstance(results[0], NonFiniteRewardError)
    assert str(results[0]).startswith(f"completions_a[0] and completions_b[0]: {PM} returned a -inf logit")
    assert results[1] == 0.5  # identical texts are a tie without running the model
    assert pm.stats.nonfinite - before == 1
    with pytest.raises(NonFiniteRewardError):
        pm.compare(["Q"], ["a"], ["b"])
    rewards = RewardFunction(pm, baseline_column="ref")(prompts=["Q", "Q"], completions=["a", "b"], ref=["c", "b"])
    assert rewards == [None, 0.0]


def test_infinite_pairrm_logits_are_errors(infinite, tiny_dir):
    pairrm = infinite("pairrm")
    results = pairrm.compare_samples(["Q1", "Q2"], ["a", "c"], ["b", "d"])
    assert all(isinstance(r, NonFiniteRewardError) for r in results)
    assert "pairrm returned a" in str(results[0]) and "logit" in str(results[0])
    with pytest.raises(NonFiniteRewardError, match=r"completions_a\[0\] and completions_b\[0\]"):
        pairrm.compare_logits(["Q1"], ["a"], ["b"])
    with pytest.raises(NonFiniteRewardError):
        rank(pairrm, ["Q1"], [["a", "b", "c"]])


def test_an_infinite_pairrm_logit_is_not_a_certain_preference(tiny_dir, monkeypatch):
    """sigmoid(+inf) is exactly 1.0: an infinite logit (not NaN) would pass for certainty."""
    pairrm = load_reward_model(tiny_dir("pairrm"), device="cpu")
    monkeypatch.setattr(pairrm, "_forward", lambda batch: [[INF, -INF] for _ in batch])
    [result] = pairrm.compare_samples(["Q"], ["a"], ["b"])
    assert isinstance(result, NonFiniteRewardError) and "inf logit" in str(result)


def test_the_server_answers_infinite_rewards_without_a_500(infinite):
    from rlhf_rewards.serving import RewardEngine, build_app

    from serving_helpers import ServerThread

    rm = infinite("ray2333-mistral-7b", -1.0)
    mistral = "<s>[INST] Hi [/INST]Hello there</s>"
    with ServerThread(build_app(RewardEngine(rm, max_wait_ms=2))) as url:
        def post(path, body):
            return httpx.post(url + path, json=body, timeout=60)

        for path, body in (("/v1/score", {"prompts": ["Hi"], "completions": ["Hello"]}),
                           ("/v1/compare", {"prompts": ["Hi"], "completions_a": ["a"], "completions_b": ["b"]}),
                           ("/get_reward", {"query": [mistral]}),
                           ("/classify", {"model": "m", "input": mistral})):
            r = post(path, body)
            assert r.status_code == 422 and "returned -inf" in r.json()["detail"], (path, r.text)
        r = post("/v1/rewards", {"prompts": ["Hi", "Hi"], "completions": ["Hello", "Hey"]})
        assert r.status_code == 200, r.text
        assert r.json()["rewards"] == [None, None] and "returned -inf" in r.json()["errors"][1]
        assert r.json()["stats"]["nonfinite"] == 2


# -- loading: a path that holds no model, damaged files ----------------------------------------------------------------

def test_paths_that_hold_no_model_say_so_with_or_without_a_preset(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text("{}")
    (tmp_path / "file.txt").write_text("x")
    cases = [("", "model path is empty"),
             (str(tmp_path / "missing"), f"model directory '{tmp_path / 'missing'}' does not exist"),
             (str(tmp_path / "file.txt"), "is a file; pass the directory"),
             (str(tmp_path / "empty"), "is empty: it holds no model files"),
             (str(tmp_path / "config-only"), r"holds no weights \(looked for \*.safetensors, .*it holds config.json")]
    for path, message in cases:
        for preset in (None, "sequence-classifier"):
            with pytest.raises(ModelPathError, match=message) as err:
                load_reward_model(path, preset=preset)
            assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
        # what the command line calls before loading: the same words, never the Python spelling alone
        with pytest.raises(ValueError, match=message):
            resolve_preset(path, None)


def test_a_name_no_preset_knows_asks_for_the_preset_in_both_spellings(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match=r"cannot tell which preset 'some-model' needs: it is no local directory.*"
                                         r"pass preset=\.\.\. \(command line: --preset NAME\)"):
        load_reward_model("some-model")
    unknown = shutil.copytree(tiny_dir("sequence-classifier"), str(tmp_path / "unknown"))
    config = os.path.join(unknown, "config.json")
    with open(config) as f:
        text = f.read().replace("LlamaForSequenceClassification", "SomethingElse")
    with open(config, "w") as f:
        f.write(text)
    with pytest.raises(ValueError, match="its config.json names SomethingElse .*--preset NAME"):
        load_reward_model(unknown)


@pytest.mark.parametrize("bad", [None, 3, b"/some/path"])
def test_a_model_argument_that_is_no_path_is_a_type_error(bad):
    with pytest.raises(TypeError, match=f"expected a local directory or a hub id .*got {type(bad).__name__}"):
        load_reward_model(bad)


def _damaged(tiny_dir, tmp_path, preset: str, name: str, how: str) -> str:
    directory = shutil.copytree(tiny_dir(preset), str(tmp_path / preset))
    path = os.path.join(directory, name)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2] if how == "truncated" else b"\xffgarbage" * 64)
    return directory


@pytest.mark.parametrize("preset, name, how, cause", [
    ("sequence-classifier", "model.safetensors", "truncated", "SafetensorError"),
    ("sequence-classifier", "model.safetensors", "garbage", "SafetensorError"),
    ("pairrm", "model.safetensors", "truncated", "SafetensorError"),
    ("starling-rm-7b-alpha", "pytorch_model.bin", "truncated", "BadZipFile"),
    ("sequence-classifier", "config.json", "truncated", "JSONDecodeError"),
    ("pairrm", "config.json", "garbage", "UnicodeDecodeError"),
    ("sequence-classifier", "tokenizer.json", "truncated", "JSONDecodeError"),
    ("pairrm", "tokenizer.json", "garbage", "UnicodeDecodeError"),
    (PM, "tokenizer.json", "truncated", "JSONDecodeError"),
    ("ray2333-mistral-7b", "tokenizer_config.json", "garbage", "UnicodeDecodeError"),
])
def test_a_damaged_file_is_named_before_loading(tiny_dir, tmp_path, monkeypatch, preset, name, how, cause):
    directory = _damaged(tiny_dir, tmp_path, preset, name, how)
    import rlhf_rewards.backends as backends

    monkeypatch.setattr(backends, "LOADERS", {})  # nothing may get as far as loading
    for chosen in (None, preset):
        with pytest.raises(ValueError, match=f"{os.path.join(directory, name)} is not .*{cause}") as err:
            load_reward_model(directory, preset=chosen)
        assert type(err.value.__cause__).__name__ == cause


def test_a_damaged_state_dict_is_named(tiny_dir, tmp_path):
    from transformers import LlamaConfig

    from rlhf_rewards.backends.value_head import ValueHeadRewardModel, load_value_head_state_dict

    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02garbage")  # a legacy pickle's first bytes, nothing the zip check can read
    model = ValueHeadRewardModel(LlamaConfig.from_pretrained(tiny_dir("starling-rm-7b-alpha")))
    with pytest.raises(ValueError, match=f"cannot read the state dict {path}") as err:
        load_value_head_state_dict(model, str(path))
    assert err.value.__cause__ is not None


# -- reward-function arguments and text --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tiny_dir):
    cache = {}

    def get(preset):
        if preset not in cache:
            cache[preset] = load_reward_model(tiny_dir(preset), device="cpu")
        return cache[preset]

    return get


@pytest.mark.parametrize("size, message", [
    (2.5, r"group_size must be a whole number of completions per prompt .*got 2.5 \(float\)"),
    ("2", r"group_size must be a whole number .*got '2' \(str\)"),
    (True, r"group_size must be a whole number .*got True \(bool\)"),
    (1, "group_size must be at least 2, got 1: a group of one has nothing to be compared with"),
    (0, "group_size must be at least 2, got 0"),
])
def test_group_size_must_be_a_whole_number_of_at_least_two(models, size, message):
    pm = models(PM)
    with pytest.raises(ValueError, match=message):
        RewardFunction(pm, pairing="group", group_size=size)
    with pytest.raises(ValueError, match=message):
        group_rewards(pm, ["Q"] * 2, ["a", "b"], size)


@pytest.mark.parametrize("preset", ["ray2333-mistral-7b", PM, "pairrm"])
def test_a_lone_surrogate_costs_one_sample_not_the_batch(models, preset):
    rm = models(preset)
    prompts = ["Q", "Q", [{"role": "user", "content": "bad \ud800 prompt"}], "Q"]
    completions = ["fine", "broken \udfff text", "ok", "also fine"]
    options = {"pairing": "group"} if rm.kind == "pairwise" else {}
    rewards = RewardFunction(rm, **options)(prompts=prompts, completions=completions)
    assert rewards[1] is None and rewards[2] is None
    assert isinstance(rewards[0], float) and isinstance(rewards[3], float)
    if rm.kind == "scalar":
        results = rm.score_samples(prompts, completions)
        assert str(results[1]).startswith("completions[1]: a lone surrogate '\\udfff' at character 7")
        assert str(results[2]).startswith("prompts[2][0]['content']: a lone surrogate '\\ud800' at character 4")
        assert results[0] == pytest.approx(rm.score(["Q"], ["fine"])[0], abs=1e-6)


# -- what a newcomer meets first ---------------------------------------------------------------------------------------

def test_format_with_tokens_shows_the_bos_the_tokenizer_adds(models):
    rm = models("ray2333-mistral-7b")
    assert rm.format("Hi", "Hello").startswith("<s>[INST]")  # the card's template text
    # two BOS, as the model reads them (the space is sentencepiece's word-start mark of "▁[", decoded)
    assert rm.format("Hi", "Hello", tokens=True) == "<s><s> [INST] Hi [/INST]Hello</s>"
    pm = models(PM)
    decoded = pm.format("Hi", "a", "b", tokens=True)
    assert len(decoded) == 2 and decoded[0].startswith("<|start_header_id|>user")
    assert [pm.tokenizer.decode(ids) for ids in pm.encode("Hi", "a", "b")] == decoded


def test_the_demo_leaves_nothing_in_the_temporary_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    assert main(["demo", "--presets", PM]) == 0  # the preset whose tokenizer is converted through tiktoken
    assert "=== rlhflow-pair-pm-llama3-8b" in capsys.readouterr().out
    left = [p.name for p in tmp_path.iterdir()]
    assert "data-gym-cache" not in left and not [n for n in left if n.startswith("rlhf-rewards-demo-")], left
    assert "TIKTOKEN_CACHE_DIR" not in os.environ

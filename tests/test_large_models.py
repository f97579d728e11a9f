"""The 70B presets (INF-ORM, Nemotron) through every entry point (TRL GRPO step, /v1/score, ``rlhf-rewards score``),
and models split over several devices (``device_map=[...]``): the placement accelerate infers within a memory budget
(computed for two GPUs without needing them), and on the CPU, with disk offload standing in for the second device,
scores unchanged by the split."""

from __future__ import annotations

import gc
import glob
import json
import os
import tempfile

import httpx
import pytest
import torch
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes
from transformers import AutoConfig, AutoModelForCausalLM

from rlhf_rewards import RewardFunction, load_reward_model
from rlhf_rewards.backends.inform import INFORMRewardModel
from rlhf_rewards.backends.placement import Split, plan_device_map, resolve_split
from rlhf_rewards.cli import main
from rlhf_rewards.serving import RewardEngine, build_app
from rlhf_rewards.testing.policy import make_tiny_policy

from cases import CONVERSATIONS
from serving_helpers import ServerThread
from test_trl_integration import CHAT_DATASET, Spy, train_one_step

LARGE = ["inf-orm-llama3.1-70b", "nemotron-reward"]
PROMPTS = [p for p, _ in CONVERSATIONS]
COMPLETIONS = [c for _, c in CONVERSATIONS]


@pytest.fixture(scope="module")
def models(tiny_dir):
    loaded = {}

    def get(preset: str):
        if preset not in loaded:
            loaded[preset] = load_reward_model(tiny_dir(preset), device="cpu")
        return loaded[preset]

    return get


# -- every entry point ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", LARGE)
def test_grpo_step_rewards_are_the_models_scores(models, tmp_path, preset):
    rm = models(preset)
    spy = Spy(RewardFunction(rm))
    trainer = train_one_step("grpo", make_tiny_policy(str(tmp_path / "policy")), spy, CHAT_DATASET, tmp_path / "out")
    (call,) = spy.calls
    assert call["rewards"] == pytest.approx(rm.score(call["prompts"], call["completions"]), abs=1e-6)
    assert list(trainer._logs["rewards"][spy.__name__]) == pytest.approx(call["rewards"], abs=1e-6)


@pytest.mark.parametrize("preset", LARGE)
def test_v1_score_and_the_score_command_equal_in_process(models, tiny_dir, tmp_path, preset):
    rm = models(preset)
    expected = rm.score(PROMPTS, COMPLETIONS)
    with ServerThread(build_app(RewardEngine(rm, max_wait_ms=2))) as url:
        r = httpx.post(url + "/v1/score", json={"prompts": PROMPTS, "completions": COMPLETIONS}, timeout=60)
    assert r.status_code == 200 and r.json()["rewards"] == pytest.approx(expected, abs=1e-5)

    # a dataset column holds one type: every prompt as messages, every completion as text
    rows = [{"prompt": [{"role": "user", "content": p}] if isinstance(p, str) else p,
             "completion": c if isinstance(c, str) else c[0]["content"]} for p, c in CONVERSATIONS]
    data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["score", str(data), "--model", tiny_dir(preset), "--output", str(out)]) == 0
    written = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    assert written == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("preset", LARGE)
def test_prompts_rendered_by_a_llama31_template_score_as_their_conversation(models, preset):
    """A Llama-3.1-style template writes a cut-off and date lines into every system header: parsed back from a
    policy's text (or verl's /classify input) they are the template's, not a system prompt of the conversation."""
    rm = models(preset)
    for messages in ([{"role": "user", "content": "Why is the sky blue?"}],
                     [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why?"}]):
        text = rm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        dated = text.replace("Today Date: 26 Jul 2024", "Today Date: 07 Dec 2026")  # Llama-3.2 writes today's date
        expected = rm.score([messages], ["Rayleigh scattering."])[0]
        assert rm.score([text, dated], ["Rayleigh scattering."] * 2) == pytest.approx([expected] * 2, abs=1e-6)


# -- the placement plan (no GPU needed: accelerate plans from sizes and budgets) -----------------------------------

def first_device_budget(sizes: dict, head: str, *, layers: float) -> int:
    """Bytes for the embeddings and ``layers`` decoder layers, plus the room accelerate keeps on a device for the
    largest block still to place (a decoder layer, or Nemotron's output head)."""
    layer = sizes["model.layers.0"]
    return int(sizes["model.embed_tokens"] + max(layer, sizes[head]) + layers * layer)


def device_of(plan: dict, module: str):
    """The device ``plan`` gives ``module``: its own entry, or the block's that holds it."""
    holders = [k for k in plan if k == module or module.startswith(k + ".")]
    return plan[max(holders, key=len)]


def meta_model(cls, tiny_path: str, layers: int):
    config = AutoConfig.from_pretrained(tiny_path, num_hidden_layers=layers)
    with init_empty_weights():
        return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)


@pytest.mark.parametrize("preset, cls, head", [("inf-orm-llama3.1-70b", INFORMRewardModel, "score"),
                                               ("nemotron-reward", AutoModelForCausalLM, "lm_head")])
def test_layers_fill_the_gpus_in_order_within_budget_and_the_head_goes_last(tiny_dir, preset, cls, head):
    model = meta_model(cls, tiny_dir(preset), layers=8)
    sizes = compute_module_sizes(model, dtype=torch.bfloat16)
    budget = {"cuda:0": first_device_budget(sizes, head, layers=3.5), "cuda:1": 10 * sizes["model.embed_tokens"]}
    split = resolve_split(["cuda:0", "cuda:1"], budget)
    plan = plan_device_map(model, split, heads=(head,), dtype=torch.bfloat16)

    assert device_of(plan, "model.embed_tokens") == 0
    assert plan[head] == 1 and plan["model.norm"] == 1  # the read-out on the last device
    assert not any(name.startswith("model.layers.0.") for name in plan)  # layers stay whole
    layer_devices = [device_of(plan, f"model.layers.{i}") for i in range(8)]
    assert layer_devices == sorted(layer_devices) and set(layer_devices) == {0, 1}  # in order, over both GPUs
    for device, key in ((0, "cuda:0"), (1, "cuda:1")):
        used = sum(sizes[name] for name, d in plan.items() if d == device)
        assert used <= split.max_memory[key]


def test_a_model_that_does_not_fit_the_listed_devices_is_refused(tiny_dir):
    model = meta_model(INFORMRewardModel, tiny_dir("inf-orm-llama3.1-70b"), layers=4)
    split = Split(("cuda:0", "cuda:1"), {"cuda:0": 1000, "cuda:1": 1000})
    with pytest.raises(ValueError, match="does not fit the memory budget"):
        plan_device_map(model, split, heads=("score",), dtype=torch.bfloat16)


@pytest.mark.parametrize("device_map, max_memory, message", [
    ("cuda:0", None, "non-empty list"),
    (["cuda:0", "cuda:0"], None, "twice"),
    (["cpu", "cuda:0"], None, "CUDA devices come first"),
    (["cuda:1", "cuda:0"], None, "index order"),
    (["disk"], None, "cannot start with 'disk'"),
    (["mps"], None, "split model goes over CUDA devices"),
    (["cuda:0", "cuda:1"], {"cuda:0": "40GiB"}, "no budget for cuda:1"),
    (["cuda:0"], {"cuda:3": "40GiB"}, "not in device_map"),
    (["cuda:0"], {"cuda:0": "lots"}, "not a size"),
])
def test_split_spelling_errors_name_the_entry(device_map, max_memory, message):
    with pytest.raises(ValueError, match=message):
        resolve_split(device_map, max_memory)


def test_budget_sizes_are_read_and_ints_mean_cuda():
    split = resolve_split([0, "cuda:1", "cpu", "disk"], {0: "1GiB", "cuda:1": 5, "cpu": "2GB"})
    assert split.devices == ("cuda:0", "cuda:1", "cpu", "disk") and split.last == "disk"
    assert split.max_memory == {"cuda:0": 2**30, "cuda:1": 5, "cpu": 2 * 10**9}


def test_load_reward_model_refuses_what_it_cannot_split(tiny_dir):
    path = tiny_dir("inf-orm-llama3.1-70b")
    with pytest.raises(ValueError, match="not both"):
        load_reward_model(path, device="cpu", device_map=["cpu", "disk"])
    with pytest.raises(ValueError, match="pass device_map too"):
        load_reward_model(path, device="cpu", max_memory={"cpu": "1GB"})
    with pytest.raises(ValueError, match="adapter"):
        load_reward_model(path, device_map=["cpu", "disk"], adapter=path)
    with pytest.raises(ValueError, match="cannot be split"):
        load_reward_model(tiny_dir("pairrm"), device_map=["cpu", "disk"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda:0"):
            load_reward_model(path, device_map=["cuda:0", "cuda:1"])


# -- a real split on the CPU: disk offload stands in for the second device -----------------------------------------

@pytest.mark.parametrize("preset", LARGE)
def test_scores_are_unchanged_by_the_split(models, tiny_dir, preset):
    whole = models(preset)
    sizes = compute_module_sizes(whole.model, dtype=torch.float32)
    # the embeddings and the first decoder layer in RAM, the rest (and the head) offloaded to disk
    budget = first_device_budget(sizes, _head(preset), layers=1)
    before = offload_folders()
    split_rm = load_reward_model(tiny_dir(preset), device_map=["cpu", "disk"], max_memory={"cpu": budget})
    placed = split_rm.model.hf_device_map
    assert device_of(placed, "model.embed_tokens") == "cpu" and device_of(placed, "model.layers.0") == "cpu"
    assert device_of(placed, "model.layers.1") == "disk" and placed[_head(preset)] == "disk"
    assert split_rm.device == torch.device("cpu")
    more_prompts = PROMPTS + ["Say it twice!"]
    more = COMPLETIONS + ["Yes! Yes!"]
    assert split_rm.score(more_prompts, more) == pytest.approx(whole.score(more_prompts, more), abs=1e-5)

    (folder,) = offload_folders() - before
    assert os.path.isdir(folder)  # (safetensors weights are read from the checkpoint itself, not copied here)
    del split_rm, placed
    gc.collect()
    assert not os.path.exists(folder)  # the offload folder goes with the model


def _head(preset: str) -> str:
    return {"inf-orm-llama3.1-70b": "score", "nemotron-reward": "lm_head"}[preset]


def offload_folders() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "rlhf-rewards-offload-*")))

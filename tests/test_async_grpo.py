"""TRL's asynchronous GRPO: reward functions pickled into AsyncGRPOTrainer's spawned, CUDA-free rollout process, and
the async HTTP client gathered concurrently by a real GRPO step.

The rollout process is TRL's own: ``trl.experimental.async_grpo.async_rollout_worker._child_main`` is spawned with
the reward functions as its arguments (so they are pickled and unpickled exactly as there, before the child hides
the GPUs with ``CUDA_VISIBLE_DEVICES=""``), and builds TRL's ``_AsyncRolloutLoop``, whose ``_score_group`` calls
them (sync functions through ``asyncio.to_thread``, async ones awaited, all gathered). Only generation is replaced:
it needs a vLLM server, so the loop scores fixed completions instead. Every expected reward is the tiny model's own
``rm.score``, computed in this process.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import os
import pickle
import queue
import time
from contextlib import contextmanager

import pytest
import torch
import torch.serialization
from datasets import Dataset
from trl.chat_template_utils import qwen3_template
from trl.experimental.async_grpo.async_rollout_worker import (
    RolloutGroup,
    TrainingSequence,
    _AsyncRolloutLoop,
    _child_main,
)
from trl.trainer.utils import is_async_callable

from rlhf_rewards import AsyncRemoteRewardFunction, RemoteRewardFunction, RewardFunction, load_reward_model
from rlhf_rewards.backends.base import RewardModel
from rlhf_rewards.serving import RewardEngine, ServerSettings, build_app
from rlhf_rewards.testing.policy import make_tiny_policy
from rlhf_rewards.testing.tokenizers import write_chatml_bpe_tokenizer

from serving_helpers import WAIT, ServerThread
from test_trl_integration import CHAT_DATASET, train_one_step

SCALAR = "starling-rm-34b"
GROUP = 3  # completions per prompt, TRL's num_generations

ROWS = [
    {"prompt": [{"role": "user", "content": "Name a colour."}],
     "reference": [{"role": "assistant", "content": "Green."}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
     "reference": [{"role": "assistant", "content": "Hi!"}]},
]
TOOL_TURNS = [{"role": "assistant", "content": "Let me look that up."}, {"role": "tool", "content": "greeting"},
              {"role": "assistant", "content": "Hello."}]
"""A rollout that called a tool: the worker passes its whole message list; reward models score one assistant turn,
so every reward function returns None for it."""
COMPLETIONS = [[[{"role": "assistant", "content": c}] for c in ("Blue.", "Red, surely.", "Green.")],
               [[{"role": "assistant", "content": "Hi!"}], [{"role": "assistant", "content": "Hello, friend."}],
                TOOL_TURNS]]


class ScoringLoop(_AsyncRolloutLoop):
    """TRL's rollout loop with generation (a vLLM server) replaced by the fixed :data:`COMPLETIONS`; the spawned
    child's set-up, the unpickled reward functions and ``_score_group`` are TRL's own. Reports through the rollout
    queue: each group's scored ``RolloutSample`` list, then what each function of ``failing_funcs`` raised."""

    def __init__(self, *, completions, failing_funcs, **kwargs):
        super().__init__(**kwargs)
        self.completions = completions
        self.failing_funcs = failing_funcs

    def _group(self, group_id: int, row: dict) -> RolloutGroup:
        ids = [self.tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in
               self.completions[group_id]]
        return RolloutGroup(
            prompts=[row["prompt"]] * self.num_generations,
            # as _AsyncRolloutLoop._generate_loop builds a group's reward kwargs from its dataset row
            reward_kwargs={key: [row[key]] * self.num_generations for key in row
                           if key not in {"prompt", "completion", "completion_ids"}},
            completions=self.completions[group_id], completions_ids=ids,
            completions_sequences=[[TrainingSequence(i, [1] * len(i), [0.0] * len(i), f"{group_id}-{k}")]
                                   for k, i in enumerate(ids)],
            tool_call_counts=[0] * self.num_generations, tool_failure_counts=[0] * self.num_generations,
            model_version=0, group_id=group_id, env_rewards=[None] * self.num_generations,
            rollout_rewards=[None] * self.num_generations)

    async def _run_loops(self, stop_event: asyncio.Event) -> None:
        self.rollout_buffer.put(("env", os.environ.get("CUDA_VISIBLE_DEVICES")))
        for group_id, row in enumerate(self.dataset):
            self.rollout_buffer.put(("scored", group_id, await self._score_group(self._group(group_id, row))))
        for func in self.failing_funcs:
            self.reward_funcs, self.reward_func_names = [func], [func.__name__]
            try:
                await self._score_group(self._group(0, self.dataset[0]))
                self.rollout_buffer.put(("failed", func.__name__, None, "scored without an error"))
            except Exception as err:  # noqa: BLE001 - reported to the test, which checks it
                self.rollout_buffer.put(("failed", func.__name__, type(err).__name__, str(err)))


_TAG = {"cuda": False, "registered": False}


@contextmanager
def recorded_on_cuda():
    """Pickling inside this block records the model as having run on ``cuda:0`` (``RewardModel.devices``), and
    writes its tensors as torch writes CUDA tensors (storage location ``cuda:0``): what a reward function built on a
    GPU machine pickles, made on this CPU one."""
    if not _TAG["registered"]:
        # consulted before torch's own CPU tagger; outside this block it tags nothing and so changes nothing
        torch.serialization.register_package(0, lambda storage: "cuda:0" if _TAG["cuda"] else None,
                                             lambda storage, location: None)
        _TAG["registered"] = True
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RewardModel, "devices", property(lambda self: ("cuda:0",)))
        patch.setitem(_TAG, "cuda", True)
        yield


@pytest.fixture(scope="module")
def rm(tiny_dir):
    return load_reward_model(tiny_dir(SCALAR), preset=SCALAR, device="cpu")


@pytest.fixture(scope="module")
def url(rm):
    with ServerThread(build_app(RewardEngine(rm), ServerSettings())) as address:
        yield address


@pytest.fixture(scope="module")
def gpu_functions(tiny_dir, rm):
    """Two reward functions as a GPU machine pickles them, read back here (nothing loads on unpickling): one built
    with ``from_pretrained`` (pickled as its recipe), one from a loaded model (pickled with its weights)."""
    recipe = RewardFunction.from_pretrained(tiny_dir(SCALAR), load_kwargs={"preset": SCALAR}, name="gpu_recipe")
    weights = RewardFunction(rm, name="gpu_weights")
    with recorded_on_cuda():
        blobs = [pickle.dumps(recipe), pickle.dumps(weights)]
    return [pickle.loads(blob) for blob in blobs]


@pytest.fixture(scope="module")
def child(tmp_path_factory, tiny_dir, url, gpu_functions):
    """Run TRL's rollout child once (spawned, as AsyncRolloutWorker.start does) and collect what it reported:
    ``{"env": CUDA_VISIBLE_DEVICES there, "scored": {group id: samples}, "failed": {name: (type, message)}}``."""
    tokenizer = write_chatml_bpe_tokenizer(str(tmp_path_factory.mktemp("policy-tokenizer")))
    tokenizer.response_template = qwen3_template  # a ChatML template; TRL's loop wants one to parse tool calls
    funcs = [RemoteRewardFunction(url, name="remote_sync"),
             AsyncRemoteRewardFunction(url, name="remote_async", baseline_column="reference"),
             RewardFunction.from_pretrained(tiny_dir(SCALAR), load_kwargs={"preset": SCALAR, "device": "cpu"},
                                            name="local_recipe"),
             RewardFunction(load_reward_model(tiny_dir(SCALAR), preset=SCALAR, device="cpu"), name="local_weights",
                            baseline_column="reference")]
    ctx = mp.get_context("spawn")
    # held here until the child has read them: Process.start() drops its own references at once
    rollouts, version, stop, ready = ctx.Queue(), ctx.Value("i", 0), ctx.Event(), ctx.Event()
    heartbeat, failed, info, metrics = ctx.Value("d", 0.0), ctx.Event(), ctx.Queue(maxsize=1), ctx.Queue()
    loop_kwargs = dict(model_name="tiny-policy", dataset=Dataset.from_list(ROWS), reward_funcs=funcs,
                       processing_class=tokenizer, eos_token_ids=[tokenizer.eos_token_id], num_generations=GROUP,
                       completions=COMPLETIONS, failing_funcs=gpu_functions)
    process = ctx.Process(target=_child_main, name="rollout-child", daemon=True,
                          args=(ScoringLoop, loop_kwargs, rollouts, version, stop, ready, heartbeat, failed, info,
                                metrics))
    process.start()
    report = {"scored": {}, "failed": {}}
    try:
        deadline = time.monotonic() + 4 * WAIT  # a spawned child imports torch, transformers and TRL again
        while len(report["scored"]) < len(ROWS) or len(report["failed"]) < len(gpu_functions):
            try:
                item = rollouts.get(timeout=0.2)
            except queue.Empty:
                if failed.is_set():
                    pytest.fail(f"the rollout child failed: {info.get(timeout=WAIT)}")
                assert process.is_alive(), f"the rollout child exited with {process.exitcode}"
                assert time.monotonic() < deadline, "timed out waiting for the rollout child"
                continue
            if item[0] == "env":
                report["env"] = item[1]
            else:
                report[item[0]][item[1]] = item[2:] if item[0] == "failed" else item[2]
        process.join(timeout=WAIT)
        assert process.exitcode == 0
    finally:
        if process.is_alive():
            process.kill()
            process.join(timeout=WAIT)
    return report


def per_function(samples, name: str) -> list[float]:
    """The rewards one function gave a group, as TRL's rollout loop recorded them (None became NaN)."""
    return [s.metrics[f"rewards/{name}"] for s in samples]


def assert_same(actual: list[float], expected: list) -> None:
    assert [math.isnan(a) for a in actual] == [e is None for e in expected]
    assert [a for a in actual if not math.isnan(a)] == pytest.approx([e for e in expected if e is not None],
                                                                      rel=1e-5, abs=1e-5)


# -- 1. a RewardFunction whose model was on a GPU ------------------------------------------------------------------

def test_gpu_reward_function_fails_at_its_first_call_in_the_cuda_free_child(child, tiny_dir):
    assert child["env"] == ""  # TRL's child hid the GPUs before calling
    for name in ("gpu_recipe", "gpu_weights"):
        kind, message = child["failed"][name]
        assert kind == "RuntimeError", message
        assert message.startswith(f"{name}: its reward model ran on cuda:0 in the process that pickled this "
                                  "RewardFunction, and this process cannot use cuda:0: ")
        for part in ("AsyncGRPOTrainer", 'CUDA_VISIBLE_DEVICES=""', "not loaded on the CPU instead",
                     "RemoteRewardFunction(\"http://HOST:8000\")", "RayRewardFunction(handle)", "--device cuda:0"):
            assert part in message, (part, message)
    assert f"rlhf-rewards serve {tiny_dir(SCALAR)} --device cuda:0" in child["failed"]["gpu_recipe"][1]
    # with the weights, the GPU tensors are never read, so torch's own error never comes
    assert "deserialize" not in child["failed"]["gpu_weights"][1]


def test_gpu_weights_would_fail_inside_torch_without_the_check(gpu_functions):
    """The pickled weights really are CUDA tensors: read as they are, torch fails deep inside ``torch.load``."""
    weights = gpu_functions[1].__dict__["_weights"]
    with pytest.raises(RuntimeError, match="Attempting to deserialize object on a CUDA device"):
        pickle.loads(weights)


def test_gpu_reward_function_fails_here_too_and_keeps_its_recipe(gpu_functions):
    """Unpickling loads nothing; the first call raises, in any process without the device, every time."""
    recipe, weights = gpu_functions
    assert "_model" not in vars(recipe) and "_model" not in vars(weights)
    assert repr(recipe) == ("RewardFunction(gpu_recipe, model='loaded at the first call', pairing=None, "
                            "normalize=none (raw rewards))")
    for fn in (recipe, weights):
        for _ in range(2):
            with pytest.raises(RuntimeError, match="cannot use cuda:0"):
                fn(["Hi"], ["Hello."])
    # passed on before its first call, it still says where its model ran
    again = pickle.loads(pickle.dumps(recipe))
    assert again._devices == ("cuda:0",) and again._source == recipe._source


def test_a_gpu_index_past_the_visible_ones_fails_too(gpu_functions, monkeypatch):
    """A process that sees fewer GPUs than the one that pickled (a Ray task on a one-GPU node)."""
    again = pickle.loads(pickle.dumps(gpu_functions[0]))
    again._devices = ("cuda:3",)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    visible = r"cannot use cuda:3: only 1 CUDA device\(s\) are visible \(cuda:0\.\.cuda:0\)"
    with pytest.raises(RuntimeError, match=visible):
        again(["Hi"], ["Hello."])


def test_cpu_reward_functions_load_in_the_child_and_score(child, rm):
    for group_id, row in enumerate(ROWS):
        samples = child["scored"][group_id]
        prompts, completions = [s.prompt for s in samples], [s.completion for s in samples]
        assert prompts == [row["prompt"]] * GROUP and completions == COMPLETIONS[group_id]
        expected = [rm.score([row["prompt"]], [c])[0] if len(c) == 1 else None for c in COMPLETIONS[group_id]]
        reference = rm.score([row["prompt"]], [row["reference"]])[0]
        assert_same(per_function(samples, "local_recipe"), expected)
        assert_same(per_function(samples, "local_weights"), [None if e is None else e - reference for e in expected])


def test_cpu_reward_function_records_where_it_ran_and_loads_there(tiny_dir, rm, monkeypatch):
    import rlhf_rewards.loading

    fn = RewardFunction.from_pretrained(tiny_dir(SCALAR), load_kwargs={"preset": SCALAR}, name="rm")
    assert fn.model.devices == ("cpu",)
    copy = pickle.loads(pickle.dumps(fn))
    assert copy._devices == ("cpu",) and "_model" not in vars(copy)
    asked = []
    real = rlhf_rewards.loading.load_reward_model
    monkeypatch.setattr(rlhf_rewards.loading, "load_reward_model", lambda *a, **kw: asked.append(kw) or real(*a, **kw))
    assert copy(["Hi"], ["Hello."]) == pytest.approx(rm.score(["Hi"], ["Hello."]), abs=1e-6)
    # loaded where it ran, not where this process would resolve the recipe's default device
    assert asked == [{"preset": SCALAR, "device": "cpu"}] and copy.model.device == torch.device("cpu")


# -- 2. the HTTP clients in the child ------------------------------------------------------------------------------

def test_remote_functions_score_in_the_cuda_free_child(child, rm):
    for group_id, row in enumerate(ROWS):
        samples = child["scored"][group_id]
        expected = [rm.score([row["prompt"]], [c])[0] if len(c) == 1 else None for c in COMPLETIONS[group_id]]
        reference = rm.score([row["prompt"]], [row["reference"]])[0]
        against_reference = [None if e is None else e - reference for e in expected]
        sync, not_sync = per_function(samples, "remote_sync"), per_function(samples, "remote_async")
        assert_same(sync, expected)
        assert_same(not_sync, against_reference)
        # what TRL's loop made of them: the four functions' rewards summed (two score plainly, two against the
        # reference); a completion no function scored has no reward and no advantage
        for sample, plain, versus in zip(samples, expected, against_reference):
            if plain is None:
                assert math.isnan(sample.metrics["reward"]) and sample.advantage == 0.0
            else:
                assert sample.metrics["reward"] == pytest.approx(2 * plain + 2 * versus, rel=1e-5, abs=1e-5)


# -- 3. a real GRPO step gathers the async client ------------------------------------------------------------------

class MeetingPoint:
    """ASGI wrapper: each ``POST /v1/rewards`` waits (at most ``WAIT`` seconds) until ``expected`` of them are in
    flight together, which happens only when the trainer sends them concurrently. ``most`` is the peak."""

    def __init__(self, app, expected: int):
        self.app, self.expected = app, expected
        self.inflight = self.most = 0
        self.met: asyncio.Event | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/rewards":
            return await self.app(scope, receive, send)
        self.met = self.met or asyncio.Event()  # made in the server's own event loop
        self.inflight += 1
        self.most = max(self.most, self.inflight)
        if self.inflight >= self.expected:
            self.met.set()
        try:
            try:
                await asyncio.wait_for(self.met.wait(), WAIT)
            except asyncio.TimeoutError:
                pass  # called one after the other: `most` stays 1 and the test fails
            return await self.app(scope, receive, send)
        finally:
            self.inflight -= 1


def test_grpo_detects_the_async_client_and_gathers_it_concurrently(rm, tmp_path):
    meeting = MeetingPoint(build_app(RewardEngine(rm), ServerSettings()), expected=2)
    with ServerThread(meeting) as address:
        plain = AsyncRemoteRewardFunction(address, name="rm")
        against_reference = AsyncRemoteRewardFunction(address, name="rm_vs_reference", baseline_column="reference")
        assert is_async_callable(plain) and is_async_callable(against_reference)  # TRL's own test
        assert not is_async_callable(RemoteRewardFunction(address))
        policy = make_tiny_policy(str(tmp_path / "policy"))
        trainer = train_one_step("grpo", policy, [plain, against_reference], CHAT_DATASET, tmp_path / "out")
    assert trainer._has_async_funcs and meeting.most == 2
    prompts, completions = list(trainer._logs["prompt"]), list(trainer._logs["completion"])
    assert len(prompts) == 4
    references = [next(r for p, r in zip(CHAT_DATASET["prompt"], CHAT_DATASET["reference"]) if p == prompt)
                  for prompt in prompts]
    scores = rm.score(prompts, completions)
    expected = [s - r for s, r in zip(scores, rm.score(prompts, references))]
    assert list(trainer._logs["rewards"]["rm"]) == pytest.approx(scores, rel=1e-5, abs=1e-5)
    assert list(trainer._logs["rewards"]["rm_vs_reference"]) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert trainer.state.log_history[0]["rewards/rm/mean"] == pytest.approx(sum(scores) / 4, abs=1e-5)

"""RemoteRewardFunction / AsyncRemoteRewardFunction: the same rewards and metrics as the in-process RewardFunction,
whole groups per server when sharding over several URLs, pickling as configuration, clear errors for requests no
retry can fix, the lazy export, and a real TRL GRPO step scored through a server."""

from __future__ import annotations

import asyncio
import pickle
import re
import sys

import httpx
import pytest
from trl.trainer.utils import is_async_callable

import rlhf_rewards
from rlhf_rewards import AsyncRemoteRewardFunction, RemoteRewardFunction, RewardFunction, load_reward_model
from rlhf_rewards.serving import RewardEngine, ServerSettings, build_app
from rlhf_rewards.testing.policy import make_tiny_policy

from serving_helpers import ServerThread
from test_serving_contracts import assert_rewards
from test_trl_integration import CHAT_DATASET, MetricSink, train_one_step

SCALAR, PAIRWISE = "starling-rm-34b", "rlhflow-pair-pm-llama3-8b"
KEY = "k3y"

PROMPTS = ["Hello there"] * 3 + [[{"role": "user", "content": "Name a colour."}]] * 3 + ["Why?"] * 3 + ["Hm"] * 3
COMPLETIONS = ["Hi!", "Hello, friend.", "Hey", "Blue.", "Red, surely.", "Green.", "Because.", "No idea", "It is",
               "a", "b", "a"]


@pytest.fixture(scope="module")
def models(tiny_dir):
    return {p: load_reward_model(tiny_dir(p), preset=p, device="cpu") for p in (SCALAR, PAIRWISE)}


@pytest.fixture(scope="module")
def urls(models):
    """Two servers per model (same weights), with an API key."""
    servers = {p: [ServerThread(build_app(RewardEngine(m), ServerSettings(api_key=KEY))) for _ in range(2)]
               for p, m in models.items()}
    out = {p: [s.__enter__() for s in group] for p, group in servers.items()}
    yield out
    for group in servers.values():
        for s in group:
            s.__exit__(None, None, None)


def samples_seen(url: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return sum(float(v) for v in re.findall(r'^rlhf_rewards_samples_total{endpoint="/v1/rewards"} (\S+)$', text, re.M))


CASES = [(SCALAR, {}), (SCALAR, {"pairing": "group", "group_size": 3}), (SCALAR, {"pairing": "halves"}),
         (SCALAR, {"baseline_column": "ref"}), (PAIRWISE, {"pairing": "group"}),
         (PAIRWISE, {"pairing": "group", "group_size": 3, "group_mode": "anchor", "transform": "centered"}),
         (PAIRWISE, {"pairing": "halves"}), (PAIRWISE, {"baseline_column": "ref"})]


@pytest.mark.parametrize("preset, options", CASES)
def test_same_rewards_as_in_process_over_two_servers(models, urls, preset, options):
    prompts, completions = PROMPTS, COMPLETIONS
    if options.get("pairing") == "halves":
        prompts, completions = PROMPTS[:6] + PROMPTS[:6], COMPLETIONS[:6] + COMPLETIONS[6:]
    columns = {"ref": ["Reference answer."] * len(prompts)} if "baseline_column" in options else {}
    expected = RewardFunction(models[preset], **options)(prompts, completions, **columns)
    before = [samples_seen(u) for u in urls[preset]]
    remote = RemoteRewardFunction(urls[preset], api_key=KEY, **options)
    assert_rewards(remote(prompts=prompts, completions=completions, completion_ids=None, **columns), expected)
    seen = [samples_seen(u) - b for u, b in zip(urls[preset], before)]
    assert sum(seen) == len(prompts) and all(seen)  # both servers used, every sample sent once
    if options.get("pairing") == "group":
        assert all(s % 3 == 0 for s in seen)  # whole groups per server
    afn = AsyncRemoteRewardFunction(urls[preset], api_key=KEY, **options)
    assert is_async_callable(afn) and not is_async_callable(remote)
    assert_rewards(asyncio.run(afn(prompts=prompts, completions=completions, **columns)), expected)


def test_unscorable_samples_are_none_with_the_server_reason(models, urls, caplog):
    bad = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "prefilled"}]
    remote = RemoteRewardFunction(urls[SCALAR], api_key=KEY)
    rewards = remote(["Hello", bad, "Hello"], ["a", "b", "c"])
    assert rewards[1] is None and None not in (rewards[0], rewards[2])
    assert re.search(r"sample 1: http://127.0.0.1:\d+, sample 1 of its request: prompts\[1\]: the last message of "
                     "a prompt must be a user turn", caplog.text)


BAD_PROMPTS = ["Hello there", "Hello there", None, "Why?", "Why?", "Why?", [{"role": "user", "content": "Hi"}], "Hm",
               {"role": "user", "content": "a message, not a list"}, "Hm"]
BAD_COMPLETIONS = ["Hi!", None, "Blue.", 7, {"role": "assistant", "content": "not in a list"}, b"bytes", "Red.", "ok",
                   "fine", 2.5]
BAD_REFS = ["Ref."] * 6 + [None, "Ref.", "Ref.", 3]
HALVES_PROMPTS = ["Hello there", None, "Why?", "Hm"] * 2
HALVES_COMPLETIONS = ["Hi!", "Blue.", None, "ok", "Hey", "Red.", "Because.", {"content": "x"}]


@pytest.mark.parametrize("preset, options", CASES)
def test_bad_samples_are_none_remote_as_in_process(models, urls, preset, options):
    """None, numbers, objects and bytes as prompts, completions or baselines: each such sample is None and the
    others are scored, remote exactly as in-process (main's server refused the whole request with a 422)."""
    prompts, completions = BAD_PROMPTS, BAD_COMPLETIONS
    if options.get("pairing") == "halves":
        prompts, completions = HALVES_PROMPTS, HALVES_COMPLETIONS
    elif options.get("group_size"):
        options = {k: v for k, v in options.items() if k != "group_size"}  # runs of equal prompts are the groups
    columns = {"ref": BAD_REFS[:len(prompts)]} if "baseline_column" in options else {}
    expected = RewardFunction(models[preset], **options)(prompts, completions, **columns)
    assert None in expected and any(e is not None for e in expected)
    remote = RemoteRewardFunction(urls[preset], api_key=KEY, **options)
    assert_rewards(remote(prompts, completions, **columns), expected)
    assert remote.stats.unsent == 0 and remote.stats.unscored == expected.count(None)


def test_metrics_are_the_reward_functions(models, urls):
    for preset, options in ((SCALAR, {}), (PAIRWISE, {"pairing": "group", "group_size": 3})):
        local, remote = MetricSink(), MetricSink()
        RewardFunction(models[preset], name="rm", **options)(PROMPTS, COMPLETIONS, log_metric=local)
        RemoteRewardFunction(urls[preset][:1], api_key=KEY, name="rm", **options)(PROMPTS, COMPLETIONS,
                                                                               log_metric=remote)
        assert remote.values.keys() == local.values.keys() | {"rm/unsent"} and remote.values["rm/unsent"] == 0
        for name in local.values:
            if not name.endswith("/seconds"):
                assert remote.values[name] == pytest.approx(local.values[name], abs=1e-9), name


def test_pickles_as_its_configuration(urls):
    remote = RemoteRewardFunction(urls[SCALAR], api_key=KEY, timeout=7.0, pairing="group", name="rm")
    clone = pickle.loads(pickle.dumps(remote))
    assert vars(clone) == vars(remote) and len(pickle.dumps(remote)) < 2000
    assert clone(PROMPTS, COMPLETIONS) == pytest.approx(remote(PROMPTS, COMPLETIONS), abs=1e-9)


def test_requests_no_retry_can_fix_raise(urls):
    with pytest.raises(RuntimeError, match="401"):
        RemoteRewardFunction(urls[SCALAR], api_key="wrong")(["a"], ["b"])
    with pytest.raises(ValueError, match="group_size=2"):  # what RewardFunction raises in-process
        RemoteRewardFunction(urls[PAIRWISE][:1], api_key=KEY, pairing="group", group_size=2)(["a"] * 3, ["b"] * 3)
    with pytest.raises(ValueError, match="http"):
        RemoteRewardFunction("rm-node:8000")
    with pytest.raises(ValueError, match="baseline_column"):
        RemoteRewardFunction(urls[SCALAR], api_key=KEY, baseline_column="ref")(["a"], ["b"])


def test_lazy_export_and_a_clear_error_without_httpx(monkeypatch):
    from rlhf_rewards.serving import client

    assert rlhf_rewards.RemoteRewardFunction is client.RemoteRewardFunction
    monkeypatch.setitem(sys.modules, "httpx", None)
    monkeypatch.delitem(sys.modules, "rlhf_rewards.serving.client")
    with pytest.raises(ImportError, match=r"rlhf-rewards\[serve\]"):
        rlhf_rewards.RemoteRewardFunction


def test_grpo_step_with_remote_rewards_equals_in_process(models, urls, tmp_path):
    policy = make_tiny_policy(str(tmp_path / "policy"))
    remote = RemoteRewardFunction(urls[PAIRWISE], api_key=KEY, pairing="group", group_size=3, name="rm")
    trainer = train_one_step("grpo", policy, remote, CHAT_DATASET, tmp_path / "out", num_generations=3,
                             per_device_train_batch_size=6)
    prompts, completions = list(trainer._logs["prompt"]), list(trainer._logs["completion"])
    assert len(prompts) == 6
    expected = RewardFunction(models[PAIRWISE], pairing="group", group_size=3)(prompts, completions)
    assert list(trainer._logs["rewards"]["rm"]) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert trainer.state.log_history[0]["rewards/rm/mean"] == pytest.approx(sum(expected) / 6, abs=1e-5)
    assert 0 <= trainer.state.log_history[0]["rm/order_disagreement_rate"] <= 1

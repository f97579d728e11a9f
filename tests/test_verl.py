"""rlhf_rewards.integrations.verl: verl's custom reward function scored by a live loopback server, called exactly as
verl's reward loop calls it, its results collated as verl collates them, compared with in-process scores of the
same samples; a pairwise and a process model; missing prompt, URL and key errors; a dead server.

verl itself is not installed (it pulls Ray, vLLM-era pins and GPU packages); :func:`verl_reward_loop` mirrors, line
for line, the call path of volcengine/verl at b178a3cd (2026-01): ``verl/trainer/ppo/reward.py``
(``get_custom_reward_fn``, ``_call_with_kwargs[_async]``), ``verl/utils/import_utils.py`` (``pkg://`` paths),
``verl/experimental/reward_loop/reward_manager/naive.py`` (``run_single``), ``reward_loop.py``
(``RewardLoopWorker.compute_score_batch``, ``RewardLoopManager.compute_rm_score``),
``verl/experimental/agent_loop/agent_loop.py`` (``_postprocess``) and ``verl/trainer/ppo/metric_utils.py``
(``process_validation_metrics``: ``np.mean`` of each extra key whose first value is not a string).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import threading
from functools import partial

import httpx
import numpy as np
import pytest
import torch

from rlhf_rewards import RewardFunction, load_reward_model
from rlhf_rewards.integrations import verl
from rlhf_rewards.serving import RewardEngine, ServerSettings, build_app

from serving_helpers import ServerThread, free_port
from test_serving_contracts import assert_rewards

SCALAR, PAIRWISE, PRM = "starling-rm-34b", "rlhflow-pair-pm-llama3-8b", "qwen2.5-math-prm"
KEY = "v3rl-key"
CHATML = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"

# verl rows: the prompt in extra_info as text, as messages, as messages read back from parquet through pandas (a numpy
# object array), as a conversation rendered with a ChatML policy template; the response as verl decodes it, once with
# an end-of-turn marker a non-special-token decode would leave
PROMPTS = ["Hello there", [{"role": "user", "content": "Name a colour."}],
           np.array([{"role": "user", "content": "Why is the sky blue?"}], dtype=object), CHATML, "Hm", "Hello there"]
RESPONSES = ["Hi!", "Blue.", "Rayleigh scattering.", "Red, surely.<|im_end|>", "a", "Hello, friend."]
REFERENCES = ["Hello.", "Green.", "Because of scattering.", "Yellow.", "b", "Hey"]


def _plain(prompt):
    return prompt.tolist() if isinstance(prompt, np.ndarray) else prompt


def rows(prompts=PROMPTS, responses=RESPONSES, references=None, prompt_key="prompt"):
    """verl's per-sample fields: data_source, the decoded response, reward_model.ground_truth, extra_info."""
    out = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        extra_info = {"split": "train", "index": i, prompt_key: prompt}
        if references is not None:
            extra_info["reference"] = references[i]
        out.append({"data_source": "openai/gsm8k", "solution_str": response, "ground_truth": "42",
                    "extra_info": extra_info})
    return out


# -- verl's reward loop, mirrored --------------------------------------------------------------------------------

def _call_with_kwargs(raw_fn, extra_kwargs, *args, **kwargs):
    return raw_fn(*args, **{**kwargs, **extra_kwargs})  # reward_kwargs take precedence, as in verl


async def _call_with_kwargs_async(raw_fn, extra_kwargs, *args, **kwargs):
    return await raw_fn(*args, **{**kwargs, **extra_kwargs})


def load_custom_reward_fn(name: str, reward_kwargs: dict):
    """``get_custom_reward_fn``: ``load_extern_object("pkg://rlhf_rewards.integrations.verl", name)`` (a ``pkg://``
    path is ``importlib.import_module``), wrapped with ``reward_kwargs`` merged into every call."""
    raw_fn = getattr(importlib.import_module("rlhf_rewards.integrations.verl"), name)
    if not inspect.iscoroutinefunction(raw_fn):
        return partial(_call_with_kwargs, raw_fn, dict(reward_kwargs))
    return partial(_call_with_kwargs_async, raw_fn, dict(reward_kwargs))


async def run_single(compute_score, row: dict, loop, reward_router_address=None) -> dict:
    """``NaiveRewardManager.run_single`` after decoding: the call (awaited if async, else in the default executor),
    then the result read as verl reads it."""
    extra_reward_kwargs = ({"reward_router_address": reward_router_address, "reward_model_tokenizer": None}
                           if reward_router_address is not None else {})
    extra_info = dict(row["extra_info"])
    extra_info["num_turns"] = None  # naive.py adds these two to every sample's extra_info
    extra_info["rollout_reward_scores"] = {}
    call = dict(data_source=row["data_source"], solution_str=row["solution_str"], ground_truth=row["ground_truth"],
                extra_info=extra_info, **extra_reward_kwargs)
    if inspect.iscoroutinefunction(compute_score):
        result = await compute_score(**call)
    else:
        result = await loop.run_in_executor(None, lambda: compute_score(**call))
    reward_extra_info = {}
    if isinstance(result, dict):
        score = result["score"]
        for key, value in result.items():
            reward_extra_info[key] = value
    else:
        score = result
        reward_extra_info["acc"] = score
    return {"reward_score": score, "reward_extra_info": reward_extra_info}


def verl_reward_loop(name: str, reward_kwargs: dict, batch: list[dict], reward_router_address=None):
    """One batch through the reward loop: every sample's ``run_single`` concurrently on one event loop
    (``compute_score_batch``), then collated as ``compute_rm_score`` / ``_postprocess`` do and averaged as the
    validation metrics do. Returns the per-sample outputs and the collated scores and extra info."""
    compute_score = load_custom_reward_fn(name, reward_kwargs)

    async def compute_score_batch():
        loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(run_single(compute_score, row, loop, reward_router_address)) for row in batch]
        return await asyncio.gather(*tasks)

    outputs = asyncio.run(compute_score_batch())
    scores = torch.tensor([item["reward_score"] for item in outputs], dtype=torch.float32)
    infos = [output.get("reward_extra_info", {}) for output in outputs]
    keys = list(infos[0].keys())
    non_tensor_batch = {key: np.array([info[key] for info in infos]) for key in keys}
    for key, values in non_tensor_batch.items():
        if not isinstance(values.tolist()[0], str):
            float(np.mean(values.tolist()))
    return outputs, scores, non_tensor_batch


# -- servers -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tiny_dir):
    return {p: load_reward_model(tiny_dir(p), preset=p, device="cpu") for p in (SCALAR, PAIRWISE, PRM)}


@pytest.fixture(scope="module")
def urls(models):
    """One server per model, with an API key; requests wait up to 100 ms for others to join their model call."""
    servers = {p: ServerThread(build_app(RewardEngine(m, max_wait_ms=100), ServerSettings(api_key=KEY)))
               for p, m in models.items()}
    yield {p: s.__enter__() for p, s in servers.items()}
    for s in servers.values():
        s.__exit__(None, None, None)


def batches_run(url: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(re.search(r"^rlhf_rewards_batches_total (\S+)$", text, re.M).group(1))


@pytest.mark.parametrize("name", ["async_compute_score", "compute_score"])
def test_scalar_rewards_as_in_process_through_the_reward_loop(models, urls, name):
    expected = RewardFunction(models[SCALAR])([_plain(p) for p in PROMPTS], RESPONSES)
    assert None not in expected
    before = batches_run(urls[SCALAR])
    outputs, scores, extra = verl_reward_loop(name, {"url": urls[SCALAR], "api_key": KEY}, rows(),
                                              reward_router_address="127.0.0.1:1")
    assert_rewards([o["reward_score"] for o in outputs], expected)
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert list(extra) == ["score", "scored"] and extra["scored"].tolist() == [True] * len(PROMPTS)
    if name == "async_compute_score":  # the concurrent requests were merged into fewer model calls
        assert batches_run(urls[SCALAR]) - before < len(PROMPTS)


def test_a_templated_prompt_and_an_end_of_turn_marker_read_as_in_process(models, urls):
    # the policy-text rule: the ChatML prompt is parsed into its user turn, "<|im_end|>" is cut from the response
    plain = RewardFunction(models[SCALAR])([[{"role": "user", "content": "Name a colour."}]], ["Red, surely."])
    outputs, _, _ = verl_reward_loop("async_compute_score", {"url": urls[SCALAR], "api_key": KEY},
                                     rows([CHATML], ["Red, surely.<|im_end|>"]))
    assert outputs[0]["reward_score"] == pytest.approx(plain[0], abs=1e-5)


def test_pairwise_model_against_the_reference_in_extra_info(models, urls):
    prompts = [_plain(p) for p in PROMPTS]
    for transform in ("logodds", "centered"):
        expected = RewardFunction(models[PAIRWISE], baseline_column="ref", transform=transform)(
            prompts, RESPONSES, ref=REFERENCES)
        kwargs = {"url": [urls[PAIRWISE]], "api_key": KEY, "reference_key": "reference", "transform": transform}
        for name in ("async_compute_score", "compute_score"):
            outputs, _, extra = verl_reward_loop(name, kwargs, rows(references=REFERENCES))
            assert_rewards([o["reward_score"] for o in outputs], expected)
            assert extra["scored"].all()
    for name in ("async_compute_score", "compute_score"):  # no reference: the server's reason, not a silent 0
        with pytest.raises(ValueError, match="(?s)422.*a pairwise model.*In verl.*reference_key"):
            verl_reward_loop(name, {"url": urls[PAIRWISE], "api_key": KEY}, rows()[:1])
        with pytest.raises(ValueError, match="(?s)needs a process reward model.*In verl.*step_rewards"):
            verl_reward_loop(name, {"url": urls[PAIRWISE], "api_key": KEY, "reference_key": "reference",
                                    "step_rewards": True}, rows(references=REFERENCES)[:1])


def test_process_model_score_and_step_rewards(models, urls):
    question = "Sue has 6 white and 12 pink flamingos. How many more pink than white?"
    responses = ["12 - 6 = 6.", "Pink: 12.\n\nWhite: 6.\n\n12 - 6 = 6. The answer is \\boxed{6}.",
                 "Pink minus white is 6.\n\nSo 6."]
    prm = models[PRM]
    steps = prm.score_steps([question] * 3, responses)
    assert [len(s) for s in steps] == [1, 3, 2]
    kwargs = {"url": urls[PRM], "api_key": KEY, "prompt_key": "question", "aggregate": "mean",
              "step_rewards": True}
    batch = rows([question] * 3, responses, prompt_key="question")
    for name in ("async_compute_score", "compute_score"):
        outputs, _, extra = verl_reward_loop(name, kwargs, batch)
        for output, want in zip(outputs, steps):
            info = output["reward_extra_info"]
            assert output["reward_score"] == pytest.approx(sum(want) / len(want), abs=1e-5)
            assert json.loads(info["step_rewards"]) == pytest.approx(want, abs=1e-5)
            assert info["num_steps"] == len(want) and info["scored"] is True
        assert extra["num_steps"].tolist() == [1, 3, 2]
    outputs, _, _ = verl_reward_loop("compute_score", {"url": urls[PRM], "api_key": KEY, "prompt_key": "question"},
                                     batch)  # the model's own aggregate (min), no step rewards asked
    assert [o["reward_score"] for o in outputs] == pytest.approx([min(s) for s in steps], abs=1e-5)
    assert list(outputs[0]["reward_extra_info"]) == ["score", "scored"]


def test_a_bad_sample_is_flagged_and_logged_and_the_batch_goes_on(models, urls, caplog):
    prompts = ["Hello there", None, "Hm"]  # a row whose prompt is null
    expected = RewardFunction(models[SCALAR])(prompts, RESPONSES[:3])
    assert expected[1] is None and None not in (expected[0], expected[2])
    for name in ("async_compute_score", "compute_score"):
        caplog.clear()
        outputs, scores, extra = verl_reward_loop(name, {"url": urls[SCALAR], "api_key": KEY, "unscored_score": -1.5},
                                                  rows(prompts, RESPONSES[:3]))
        assert scores.tolist() == pytest.approx([expected[0], -1.5, expected[2]], abs=1e-5)
        assert extra["scored"].tolist() == [True, False, True]
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("prompts[0]" in e for e in errors)  # the server's reason, logged by the client
        assert any("not scored" in e and "score=-1.5 with scored=False" in e for e in errors)


def test_a_missing_prompt_or_url_is_a_clear_error(urls, monkeypatch):
    batch = rows(prompt_key="question")
    for name in ("async_compute_score", "compute_score"):
        with pytest.raises(ValueError, match=r"extra_info has no 'prompt' .*'index', 'num_turns', 'question'.*"
                                             r"reward_kwargs.prompt_key"):
            verl_reward_loop(name, {"url": urls[SCALAR], "api_key": KEY}, batch)
        with pytest.raises(ValueError, match="extra_info has no 'reference'.*reward_kwargs.reference_key"):
            verl_reward_loop(name, {"url": urls[PAIRWISE], "api_key": KEY, "reference_key": "reference"}, rows())
    monkeypatch.delenv(verl.URL_ENV, raising=False)
    with pytest.raises(ValueError, match="no reward server URL.*reward_kwargs.url.*RLHF_REWARDS_URL"):
        verl_reward_loop("async_compute_score", {"api_key": KEY}, rows())
    with pytest.raises(ValueError, match=r"unscored_score: expected a finite number"):
        verl_reward_loop("compute_score", {"url": urls[SCALAR], "unscored_score": float("nan")}, rows())


def test_url_and_key_from_the_environment(models, urls, monkeypatch):
    expected = RewardFunction(models[SCALAR])(["Hello there"], ["Hi!"])
    monkeypatch.setenv(verl.URL_ENV, f"{urls[SCALAR]}, {urls[SCALAR]}")  # comma-separated, spaces allowed
    monkeypatch.setenv(verl.API_KEY_ENV, KEY)
    outputs, _, _ = verl_reward_loop("async_compute_score", {}, rows(["Hello there"], ["Hi!"]))
    assert_rewards([outputs[0]["reward_score"]], expected)
    monkeypatch.setenv(verl.API_KEY_ENV, "wrong")
    for name in ("async_compute_score", "compute_score"):
        with pytest.raises(RuntimeError, match="401"):
            verl_reward_loop(name, {}, rows(["Hello there"], ["Hi!"]))


def test_a_dead_server_follows_the_clients_retry_and_none_rules(caplog):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: every connection is refused
    kwargs = {"url": dead, "max_retries": 1, "deadline": 5.0}
    for name in ("async_compute_score", "compute_score"):
        caplog.clear()
        outputs, scores, extra = verl_reward_loop(name, kwargs, rows()[:2])
        assert scores.tolist() == [0.0, 0.0] and extra["scored"].tolist() == [False, False]
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("got no answer from any server" in e for e in errors)
        assert sum("verl gets score=0.0 with scored=False" in e for e in errors) == 2
    with pytest.raises(RuntimeError, match="unscored_score is null"):
        verl_reward_loop("async_compute_score", {**kwargs, "unscored_score": None}, rows()[:1])
    retries = verl._client(verl.RemoteRewardFunction, verl.VerlSettings.resolve(**kwargs)).stats
    assert retries.unsent == 4 and retries.failed_attempts >= 8  # 2 samples x 2 calls, each tried twice


def test_unknown_keyword_arguments_are_named_once(urls, caplog):
    kwargs = {"url": urls[SCALAR], "api_key": KEY, "promt_key": "question"}
    verl_reward_loop("compute_score", kwargs, rows()[:2])
    warnings = [r.getMessage() for r in caplog.records if "ignoring keyword arguments" in r.getMessage()]
    assert len(warnings) == 1 and "promt_key" in warnings[0]


def test_one_client_per_settings_and_pickling_by_reference(urls):
    a = verl.VerlSettings.resolve(url=urls[SCALAR], api_key=KEY)
    assert verl._client(verl.RemoteRewardFunction, a) is verl._client(verl.RemoteRewardFunction,
                                                                       verl.VerlSettings.resolve(url=[urls[SCALAR]],
                                                                                                 api_key=KEY))
    b = verl.VerlSettings.resolve(url=urls[SCALAR], api_key=KEY, transform="centered")
    assert verl._client(verl.RemoteRewardFunction, a) is not verl._client(verl.RemoteRewardFunction, b)
    # verl's "remote" reward manager ships the wrapped function to Ray actors by pickling it
    wrapped = load_custom_reward_fn("compute_score", {"url": urls[SCALAR]})
    assert pickle.loads(pickle.dumps(wrapped)).args[0] is verl.compute_score


def test_importing_the_integration_loads_nothing_but_httpx():
    # all docs/verl.md asks to install beside verl is httpx (and rlhf-rewards with --no-deps)
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")}
    code = ("import sys\n"
            "def third(): return {m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)\n"
            "import httpx\nbase = third()\nimport rlhf_rewards.integrations.verl\n"
            "extra = third() - base - {'rlhf_rewards'}\n"
            "heavy = [m for m in sys.modules if m.startswith(('rlhf_rewards.backends', 'rlhf_rewards.trainers'))]\n"
            "assert not extra and not heavy, (extra, heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_counters_of_a_client_shared_by_threads_add_up():
    # verl's executor threads share one client per settings: its counters must not lose a call's additions
    from rlhf_rewards.serving.dispatch import RemoteStats

    total, one = RemoteStats(), RemoteStats(calls=1, samples=2)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=lambda: [total.add(one) for _ in range(5000)]) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert (total.calls, total.samples) == (40000, 80000)


def test_stats_normalisation_with_the_servers_calibration(models, tmp_path):
    from test_normalization import write_calibration

    model = models[SCALAR]
    path = write_calibration(tmp_path / "stats.json", model, mean=-0.07, std=0.02)
    expected = RewardFunction(model, normalize="stats", calibration=path)([_plain(p) for p in PROMPTS], RESPONSES)
    raw = RewardFunction(model)([_plain(p) for p in PROMPTS], RESPONSES)
    assert expected == pytest.approx([(r + 0.07) / 0.02 for r in raw], abs=1e-4)  # numbers, not the package's own
    with ServerThread(build_app(RewardEngine(model, calibration=path), ServerSettings())) as url:
        for name in ("async_compute_score", "compute_score"):
            outputs, _, _ = verl_reward_loop(name, {"url": url, "normalize": "stats"}, rows())
            assert_rewards([o["reward_score"] for o in outputs], expected)
    with pytest.raises(ValueError, match="reward_kwargs.normalize: expected null or 'stats', got 'group'"):
        verl_reward_loop("async_compute_score", {"url": "http://127.0.0.1:1", "normalize": "group"}, rows()[:1])

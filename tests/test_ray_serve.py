"""Reward-model replicas on Ray Serve, on a local Ray this module starts (loopback only) and stops.

Two replicas of a tiny Starling-34B checkpoint serve every endpoint exactly as in-process scoring (1e-5), spread
over both replicas; a replica killed mid-stream loses no sample; the handle reward function runs a real TRL GRPO
step; ``rlhf-rewards serve --ray`` deploys on the cluster and drains on SIGTERM; a model that cannot load never
serves; stopping Ray leaves none of its processes. Expected values come from the model loaded in this process.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import httpx
import pytest

pytest.importorskip("ray.serve")
psutil = pytest.importorskip("psutil")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from rlhf_rewards import RewardFunction, load_reward_model  # noqa: E402
from rlhf_rewards.serving.ray import REPLICA_HEADER, deploy, shutdown, start_local_ray  # noqa: E402
from rlhf_rewards.testing.tokenizers import write_chatml_bpe_tokenizer  # noqa: E402

SCALAR = "starling-rm-34b"
TOL = dict(rel=1e-5, abs=1e-5)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris is the capital of France."),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}],
     "Rayleigh scattering: short waves scatter more."),
    ([{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
      {"role": "user", "content": "Another one, please."}], "Green, like grass."),
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def cluster():
    """A local Ray on 127.0.0.1 with 2 CPUs; yields ``(address, temp_dir, pids of its processes)``."""
    temp = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    address = start_local_ray(num_cpus=2, temp_dir=temp, log_to_driver=False)
    pids = {p.pid for p in psutil.Process().children(recursive=True)}
    yield address, temp, pids
    shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def rm(tiny_dir):
    return load_reward_model(tiny_dir(SCALAR), preset=SCALAR, device="cpu")


@pytest.fixture(scope="module")
def deployed(cluster, tiny_dir):
    return deploy(tiny_dir(SCALAR), replicas=2, num_cpus_per_replica=0.5, num_gpus_per_replica=0,
                  load_kwargs={"preset": SCALAR, "device": "cpu"}, engine_kwargs={"max_wait_ms": 2},
                  port=free_port(), health_check_period_s=1)


def post(url: str, path: str, body) -> httpx.Response:
    response = httpx.post(url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response


def replica_ids(app: str) -> set[str]:
    prefix = f"SERVE_REPLICA::{app}#"
    return {a["name"].rsplit("#", 1)[1] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


# -- every endpoint, two replicas ---------------------------------------------------------------------------------

def test_every_endpoint_equals_in_process_scoring(deployed, rm, tmp_path):
    url = deployed.url
    assert url.startswith("http://127.0.0.1:")
    messages = [m for m, _ in CONVERSATIONS]
    responses = [c for _, c in CONVERSATIONS]
    scores = rm.score(messages, responses)

    assert httpx.get(url + "/health").json() == {"status": "ok"}
    entry = httpx.get(url + "/v1/models").json()["data"][0]
    assert entry["id"] == entry["preset"] == SCALAR and entry["kind"] == "scalar" and entry["device"] == "cpu"
    assert entry["replicas"] == 2 and entry["replica"] in replica_ids(deployed.name)

    assert post(url, "/v1/score", {"prompts": messages, "completions": responses}).json()["rewards"] == \
        pytest.approx(scores, **TOL)
    # Bradley-Terry of the two scores, for a scalar model
    others = ["I do not know."] * 3
    other_scores = rm.score(messages, others)
    probs = post(url, "/v1/compare", {"prompts": messages, "completions_a": responses,
                                      "completions_b": others}).json()["probabilities"]
    assert probs == pytest.approx([sigmoid(a - b) for a, b in zip(scores, other_scores)], **TOL)
    # /v1/rewards is RewardFunction's call, here against a baseline, with one unscorable sample kept as null
    data = post(url, "/v1/rewards", {"prompts": messages + [[{"role": "assistant", "content": "no user turn"}]],
                                     "completions": responses + ["x"], "baselines": others + ["y"]}).json()
    assert data["rewards"][:3] == pytest.approx([a - b for a, b in zip(scores, other_scores)], **TOL)
    assert data["rewards"][3] is None and "prompts[3]" in data["errors"][3]
    # OpenRLHF: the policy's prompt+response decoded with its special tokens (ChatML, EOS, trailing pads)
    tok = write_chatml_bpe_tokenizer(str(tmp_path / "policy"))
    queries = [tok.apply_chat_template(m + [{"role": "assistant", "content": c}], tokenize=False)
               + tok.pad_token * k for k, (m, c) in enumerate(CONVERSATIONS)]
    assert all(q.count("<|im_end|>") >= 2 for q in queries)
    data = post(url, "/get_reward", {"query": queries}).json()
    assert data["rewards"] == pytest.approx(scores, **TOL) and data["scores"] == data["rewards"]
    # verl: the reward model's own chat template, activation off, the reward read at data[-1].probs[-1]
    for (m, c), value in zip(CONVERSATIONS, scores):
        text = rm.tokenizer.apply_chat_template(m + [{"role": "assistant", "content": c}], tokenize=False)
        data = post(url, "/classify", {"model": "rm", "input": text, "activation": False}).json()
        assert data["data"][-1]["probs"][-1] == pytest.approx(value, **TOL)
    metrics = httpx.get(url + "/metrics")
    assert metrics.status_code == 200 and "rlhf_rewards_requests_total" in metrics.text


def test_requests_are_spread_over_both_replicas(deployed, rm):
    body = {"prompts": [CONVERSATIONS[0][0]], "completions": [CONVERSATIONS[0][1]]}
    expected = rm.score([CONVERSATIONS[0][0]], [CONVERSATIONS[0][1]])
    served: Counter = Counter()
    lock = threading.Lock()

    def send(_):
        with httpx.Client(timeout=60) as client:
            for _ in range(5):
                response = client.post(deployed.url + "/v1/score", json=body)
                assert response.json()["rewards"] == pytest.approx(expected, **TOL)
                with lock:
                    served[response.headers[REPLICA_HEADER]] += 1

    threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sum(served.values()) == 40
    assert set(served) == replica_ids(deployed.name) and len(served) == 2, served

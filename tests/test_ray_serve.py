"""Reward-model replicas on Ray Serve, on a local Ray this module starts (loopback only) and stops.

Two replicas of a tiny Starling-34B checkpoint serve every endpoint exactly as in-process scoring (1e-5), spread
over both replicas; a replica killed mid-stream loses no sample; the handle reward function runs a real TRL GRPO
step; ``rlhf-rewards serve --ray`` deploys on the cluster and drains on SIGTERM; a model that cannot load never
serves; stopping Ray leaves none of its processes. Expected values come from the model loaded in this process.
"""

from __future__ import annotations

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

from serving_helpers import free_port  # noqa: E402
from test_serving_contracts import CONVERSATIONS, openrlhf_query, sigmoid, verl_input  # noqa: E402

SCALAR = "starling-rm-34b"
TOL = dict(rel=1e-5, abs=1e-5)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_BEFORE_RAY: set[int] = set()


def _started_since() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)} - _BEFORE_RAY


@pytest.fixture(scope="module")
def cluster():
    """A local Ray on 127.0.0.1 with 2 CPUs; yields ``(address, temp_dir, pids of its processes)``. Processes this
    one started before (e.g. multiprocessing's resource tracker, left by an earlier test's spawned child) are not
    Ray's, and are left out of the pids now and when the test collects the replicas."""
    temp = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    _BEFORE_RAY.update(p.pid for p in psutil.Process().children(recursive=True))
    address = start_local_ray(num_cpus=2, temp_dir=temp, log_to_driver=False)
    yield address, temp, _started_since()
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
    queries = [openrlhf_query(tok, tok.pad_token_id, m, c, left_pads=k % 2, right_pads=k)
               for k, (m, c) in enumerate(CONVERSATIONS)]
    data = post(url, "/get_reward", {"query": queries}).json()
    assert data["rewards"] == pytest.approx(scores, **TOL) and data["scores"] == data["rewards"]
    # verl: the reward model's own chat template, activation off, the reward read at data[-1].probs[-1]
    for (m, c), value in zip(CONVERSATIONS, scores):
        data = post(url, "/classify", {"model": "rm", "input": verl_input(rm, m, c), "activation": False}).json()
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


# -- a replica killed mid-stream ----------------------------------------------------------------------------------

def batch(k: int) -> tuple[list, list]:
    """Batch ``k`` of the stream: distinct completions, so a result in the wrong place or twice shows."""
    prompts = [m for m, _ in CONVERSATIONS]
    return prompts, [f"{c} (batch {k}, sample {i})" for i, (_, c) in enumerate(CONVERSATIONS)]


def test_a_replica_killed_mid_stream_loses_no_sample(deployed, rm):
    """HTTP clients through the proxy and handle clients keep sending batches while one replica's actor is killed:
    every batch comes back complete, in order, equal to in-process scoring; Ray Serve starts a replacement."""
    from rlhf_rewards.serving import RemoteRewardFunction
    from rlhf_rewards.serving.ray import RayRewardFunction

    n_batches = 20
    expected = {k: rm.score(*batch(k)) for k in range(n_batches)}
    before = replica_ids(deployed.name)
    results: dict[tuple[str, int], list] = {}
    progress = threading.Semaphore(0)

    def stream(kind: str, fn) -> None:
        for k in range(n_batches):
            results[kind, k] = fn(*batch(k))
            progress.release()

    clients = {"http": RemoteRewardFunction(deployed.url, timeout=30, max_retries=8, backoff=0.2),
               "handle": RayRewardFunction(deployed.handle, timeout=30, max_retries=8, backoff=0.2)}
    threads = [threading.Thread(target=stream, args=item) for item in clients.items()]
    for t in threads:
        t.start()
    for _ in range(4):  # both streams are under way
        assert progress.acquire(timeout=120)
    victim = sorted(before)[0]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{deployed.name}#RewardModel#{victim}", namespace="serve"),
             no_restart=True)
    assert len(results) < 2 * n_batches  # the kill came mid-stream
    for t in threads:
        t.join(timeout=240)
        assert not t.is_alive()
    for kind in clients:
        for k in range(n_batches):
            assert results[kind, k] == pytest.approx(expected[k], **TOL), (kind, k)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        after = replica_ids(deployed.name)
        if len(after) == 2 and victim not in after:
            break
        time.sleep(0.5)
    assert len(after) == 2 and victim not in after and before - {victim} <= after


# -- the handle reward function -------------------------------------------------------------------------------------

def test_handle_reward_function_in_a_grpo_step_equals_in_process(deployed, rm, tmp_path_factory):
    from test_trl_integration import CHAT_DATASET, Spy, train_one_step

    from rlhf_rewards.serving.ray import RayRewardFunction
    from rlhf_rewards.testing.policy import make_tiny_policy

    policy = make_tiny_policy(str(tmp_path_factory.mktemp("policy")))
    spy = Spy(RayRewardFunction(deployed.handle, name="rm"))
    trainer = train_one_step("grpo", policy, spy, CHAT_DATASET, tmp_path_factory.mktemp("grpo"))
    call = spy.calls[0]
    in_process = RewardFunction(rm, name="rm")(prompts=call["prompts"], completions=call["completions"])
    logged = list(trainer._logs["rewards"]["rm"])
    assert len(logged) == 4 and logged == pytest.approx(in_process, **TOL)
    assert trainer.state.log_history[0]["rm/unscored_rate"] == 0.0


def test_handle_reward_function_pickles_into_ray_tasks(deployed, rm, caplog):
    from rlhf_rewards.serving.ray import RayRewardFunction

    fn = RayRewardFunction(deployed.handle, pairing="group", group_size=3, shards=2)

    @ray.remote(num_cpus=0)
    def score_in_a_task(function, prompts, completions):
        return function(prompts, completions)

    prompts = [CONVERSATIONS[0][0]] * 3 + [CONVERSATIONS[1][0]] * 3
    completions = [f"Answer {i}." for i in range(6)]
    remote = ray.get(score_in_a_task.remote(fn, prompts, completions), timeout=120)
    assert remote == pytest.approx(RewardFunction(rm, pairing="group", group_size=3)(prompts, completions), **TOL)
    with pytest.raises(ValueError, match="group"):  # the replica's refusal is RewardFunction's ValueError
        fn(prompts[:4], completions[:4])
    # an unscorable sample is None, its reason logged with the replica that found it
    single = RayRewardFunction(deployed.handle)
    assert single([[{"role": "assistant", "content": "no user turn"}], "Hi"], ["a", "b"])[0] is None
    assert "replica" in caplog.text and "prompts[0]" in caplog.text


# -- the command ----------------------------------------------------------------------------------------------------

def test_serve_command_deploys_on_a_cluster_and_drains_on_sigterm(cluster, deployed, rm, tiny_dir):
    """``rlhf-rewards serve --ray --address`` joins this module's Ray, adds an application under its own route
    prefix on the running proxy, with the plain server's API key check, and removes it (exit 0) on SIGTERM; the
    cluster and the other application keep running."""
    address, _, _ = cluster
    cmd = [sys.executable, "-m", "rlhf_rewards", "serve", tiny_dir(SCALAR), "--preset", SCALAR, "--device", "cpu",
           "--ray", "--address", address, "--replicas", "1", "--num-cpus-per-replica", "0.25",
           "--route-prefix", "/cli", "--app-name", "cli", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "RLHF_REWARDS_API_KEY": "s3cret"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once the replica serves
        assert "on Ray Serve at http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        url = line.split(" at ", 1)[1].split()[0]
        assert url.endswith("/cli")
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
        assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok"}  # open, under the prefix too
        key = {"Authorization": "Bearer s3cret"}
        entry = httpx.get(url + "/v1/models", headers=key, timeout=30).json()["data"][0]
        assert entry["replicas"] == 1 and entry["replica"] in replica_ids("cli")
        prompts, completions = batch(0)
        response = httpx.post(url + "/v1/score", json={"prompts": prompts, "completions": completions},
                              headers=key, timeout=60)
        assert response.json()["rewards"] == pytest.approx(rm.score(prompts, completions), **TOL)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert "cli" not in serve.status().applications
    assert httpx.get(deployed.url + "/health").json() == {"status": "ok"}


def test_serve_flags_need_ray(capsys):
    from rlhf_rewards.cli import main

    assert main(["serve", "some/model", "--replicas", "2"]) == 2
    assert "--replicas need --ray" in capsys.readouterr().err
    assert main(["serve", "some/model", "--ray", "--replicas", "2", "--min-replicas", "1", "--max-replicas", "3"]) == 2
    assert "either --replicas or" in capsys.readouterr().err


# -- a model that cannot load, and the end ------------------------------------------------------------------------

def test_a_model_that_cannot_load_never_serves(deployed, tmp_path):
    """The replica's constructor loads the model: a load error fails it before it takes any traffic, and after
    ``start_attempts`` such replicas Ray Serve gives up and ``deploy`` raises."""
    with pytest.raises(RuntimeError, match="broken.*failed"):
        deploy(str(tmp_path / "missing"), replicas=1, num_cpus_per_replica=0.25, num_gpus_per_replica=0,
               load_kwargs={"preset": SCALAR, "device": "cpu"}, name="broken", route_prefix="/broken",
               start_attempts=1)
    status = serve.status().applications["broken"]
    assert status.status == "DEPLOY_FAILED"
    assert "failed to start 1 times" in status.deployments["RewardModel"].message
    assert httpx.get(deployed.url + "/broken/health", timeout=30).status_code != 200
    serve.delete("broken")


def test_autoscaling_and_placement_options_reach_ray_serve(cluster, tiny_dir, monkeypatch):
    """min/max replicas become Ray Serve's autoscaling config, and extra actor options (a node resource) reach each
    replica; inconsistent options are refused before anything is deployed."""
    deployed_apps = []
    monkeypatch.setattr(serve, "run", lambda app, **kw: deployed_apps.append((app, kw)) or "handle")
    result = deploy(tiny_dir(SCALAR), min_replicas=1, max_replicas=3, target_ongoing_requests=8,
                    num_gpus_per_replica=0, ray_actor_options={"resources": {"reward_node": 1}},
                    name="scaled", route_prefix="/scaled")
    (app, kwargs), = deployed_apps
    assert kwargs == {"name": "scaled", "route_prefix": "/scaled"} and result.url.endswith("/scaled")
    deployment = app._bound_deployment
    autoscaling = deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 3, 8)
    assert deployment.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0, "resources": {"reward_node": 1}}
    for bad in [dict(replicas=2, min_replicas=1, max_replicas=2), dict(min_replicas=2), dict(replicas=0),
                dict(min_replicas=3, max_replicas=2), dict(ray_actor_options={"num_gpus": 1}),
                dict(host="0.0.0.0"), dict(route_prefix="rm")]:
        with pytest.raises(ValueError):
            deploy(tiny_dir(SCALAR), **bad)
    assert len(deployed_apps) == 1


def test_shutdown_leaves_no_ray_processes(cluster):
    _, temp, pids = cluster
    assert pids  # the fixture saw Ray's processes (GCS, raylet, workers) start under this one
    pids |= _started_since()  # and the replicas started since
    shutdown()
    assert not ray.is_initialized()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not [pid for pid in pids if _alive(pid)]
    assert not [p.pid for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- without Ray: the proxy's lost-replica answer and the replica's health ---------------------------------------

def test_proxy_answers_503_for_a_request_its_replica_never_answered():
    import asyncio

    from rlhf_rewards.serving.ray import proxy_middlewares

    async def lost(scope, receive, send):  # what Ray Serve's proxy does when the replica dies mid-request
        return None

    async def answered(scope, receive, send):
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"app error"})

    async def call(app):
        middleware = proxy_middlewares()[0]
        wrapped = middleware.cls(app, *middleware.args, **middleware.kwargs)
        sent = []

        async def send(message):
            sent.append(message)

        await wrapped({"type": "http", "path": "/v1/rewards"}, None, send)
        return sent

    sent = asyncio.run(call(lost))
    assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
    assert b"retry" in sent[1]["body"]
    assert asyncio.run(call(answered))[0]["status"] == 500  # the app's own answer passes untouched


def test_replica_health_fails_while_the_model_is_broken(rm, monkeypatch):
    """Ray Serve replaces a replica whose ``check_health`` raises: it does while the model's last call failed for
    a reason other than its input (a lost GPU), and stops once a call succeeds."""
    from types import SimpleNamespace

    from rlhf_rewards.serving.ray import RewardReplica, _ReplicaEngine

    engine = _ReplicaEngine(rm)
    replica = SimpleNamespace(engine=engine, replica_id="r1")
    check_health = RewardReplica.func_or_class.check_health
    texts = [rm.format(*CONVERSATIONS[0])]
    engine._forward(texts)
    check_health(replica)

    def failing(error):
        def forward_texts(self, items):
            raise error
        return forward_texts

    with monkeypatch.context() as patch:
        patch.setattr(type(rm), "_forward_texts", failing(RuntimeError("CUDA error: device lost")))
        with pytest.raises(RuntimeError):
            engine._forward(texts)
        with pytest.raises(RuntimeError, match="r1.*CUDA error: device lost"):
            check_health(replica)
        patch.setattr(type(rm), "_forward_texts", failing(ValueError("bad input")))
        with pytest.raises(ValueError):
            engine._forward(texts)
        with pytest.raises(RuntimeError):  # an input's fault neither breaks nor mends the model
            check_health(replica)
    engine._forward(texts)
    check_health(replica)

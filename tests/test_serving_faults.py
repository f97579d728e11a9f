"""Faults: a server killed mid-run while the client holds two URLs, a server restarted, a server that stalls, a
client that disconnects mid-request, SIGTERM draining in-flight requests with exit code 0, a deadline with no
server left. Every case is bounded in time."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time

import httpx
import pytest

from rlhf_rewards import RemoteRewardFunction, RewardFunction, load_reward_model
from rlhf_rewards.serving import RewardEngine, build_app

from serving_helpers import ServerProcess, ServerThread, StalledServer

PRESET = "starling-rm-34b"
TOL = dict(rel=1e-5, abs=1e-5)
PROMPTS = [f"Question {i}?" for i in range(8)]
COMPLETIONS = [f"Answer number {i}." for i in range(8)]
FAST_RETRY = dict(timeout=10.0, max_retries=8, backoff=0.05, max_backoff=0.5)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_reward_model(tiny_dir(PRESET), preset=PRESET, device="cpu")


@pytest.fixture(scope="module")
def expected(model):
    return RewardFunction(model)(PROMPTS, COMPLETIONS)


@pytest.fixture(scope="module")
def processes(tiny_dir):
    """Three ``rlhf-rewards serve`` subprocesses, started together (their start-up dominates this module's time):
    one to SIGKILL, one to SIGTERM while it scores a long request, one to SIGTERM while a client stalls its
    upload."""
    victim = ServerProcess(tiny_dir(PRESET), PRESET).start()
    drained = ServerProcess(tiny_dir(PRESET), PRESET).start()
    stalled = ServerProcess(tiny_dir(PRESET), PRESET, "--shutdown-timeout", "1", "--body-timeout", "600").start()
    try:
        yield victim.wait_ready(), drained.wait_ready(), stalled.wait_ready()
    finally:
        victim.__exit__()
        drained.__exit__()
        stalled.__exit__()


def test_server_killed_mid_run_the_other_url_scores_everything(model, expected, processes):
    victim, _, _ = processes
    with ServerThread(build_app(RewardEngine(model))) as survivor:
        remote = RemoteRewardFunction([victim.url, survivor], **FAST_RETRY)
        results = [remote(PROMPTS, COMPLETIONS)]  # both servers answer
        killer = threading.Timer(0.2, victim.kill)  # SIGKILL while the calls below run
        killer.start()
        deadline = time.monotonic() + 60
        while victim.proc.poll() is None and time.monotonic() < deadline:
            results.append(remote(PROMPTS, COMPLETIONS))
        killer.join()
        results += [remote(PROMPTS, COMPLETIONS) for _ in range(2)]
    assert victim.proc.returncode == -9 and len(results) >= 3
    for rewards in results:
        assert rewards == pytest.approx(expected, **TOL)


def test_sigterm_finishes_in_flight_requests_and_exits_0(model, processes):
    _, drained, _ = processes
    words = " ".join(["every token of a long answer costs the reward model time"] * 20)
    prompts, completions = [f"Question {i}?" for i in range(150)], [f"{i}: {words}" for i in range(150)]
    answer: dict = {}

    def send():
        answer["r"] = httpx.post(drained.url + "/v1/score", json={"prompts": prompts, "completions": completions},
                                 timeout=300)

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # SIGTERM once the server has parsed the request and is scoring it
        text = httpx.get(drained.url + "/metrics", timeout=10).text
        if re.search(r"^rlhf_rewards_(queued|running)_items [1-9]", text, re.M):
            break
        time.sleep(0.05)
    assert drained.terminate(timeout=300) == 0
    sender.join(timeout=300)
    assert answer["r"].status_code == 200
    assert answer["r"].json()["rewards"] == pytest.approx(model.score(prompts, completions), **TOL)
    with pytest.raises(httpx.TransportError):
        httpx.get(drained.url + "/health", timeout=2)


def test_sigterm_does_not_wait_for_a_stalled_upload_past_the_grace_period(processes):
    """A client that sent 11 of 100 bytes and stalls held the server's shutdown (61 s, until the client gave up);
    the grace period (--shutdown-timeout 1 here; the body timeout set far beyond it) bounds the wait."""
    _, _, stalled = processes
    with socket.create_connection(("127.0.0.1", stalled.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompts\":")
        deadline = time.monotonic() + 60
        in_flight = 'rlhf_rewards_requests_in_progress{endpoint="/v1/score"} 1.0'
        while in_flight not in httpx.get(stalled.url + "/metrics", timeout=10).text:
            assert time.monotonic() < deadline, "the server never received the stalled request"
            time.sleep(0.05)
        assert stalled.terminate(timeout=60) == 0


def test_client_recovers_when_a_server_restarts(model, expected):
    engine = RewardEngine(model)
    first = ServerThread(build_app(engine))
    with first as url:
        remote = RemoteRewardFunction(url, **FAST_RETRY)
        assert remote(PROMPTS, COMPLETIONS) == pytest.approx(expected, **TOL)
    restarted = ServerThread(build_app(engine), port=first.port)
    timer = threading.Timer(1.0, restarted.__enter__)  # down for a second, then back on the same port
    timer.start()
    try:
        assert remote(PROMPTS, COMPLETIONS) == pytest.approx(expected, **TOL)
    finally:
        timer.join()
        restarted.__exit__()


def test_stalled_server_times_out_and_fails_over(model, expected):
    with StalledServer() as stalled, ServerThread(build_app(RewardEngine(model))) as healthy:
        remote = RemoteRewardFunction([stalled, healthy], timeout=1.0, max_retries=3, backoff=0.05)
        start = time.monotonic()
        assert remote(PROMPTS, COMPLETIONS) == pytest.approx(expected, **TOL)
        assert time.monotonic() - start < 15  # the stalled server gets no work once its probe times out


def test_no_server_left_gives_none_by_the_deadline_without_raising(caplog):
    with StalledServer() as stalled:
        remote = RemoteRewardFunction(stalled, timeout=0.5, max_retries=50, deadline=2.0)
        start = time.monotonic()
        with caplog.at_level(logging.WARNING):
            rewards = remote(PROMPTS, COMPLETIONS)
        assert rewards == [None] * len(PROMPTS) and time.monotonic() - start < 5
    assert "8 of 8 samples not scored" in caplog.text and "no server scored it before the deadline" in caplog.text


def test_server_carries_on_after_a_client_disconnects(model, expected):
    engine = RewardEngine(model)
    forward = engine.batcher._run

    def slow_forward(items):  # a model busy long enough for the client to give up mid-request
        time.sleep(1.0)
        return forward(items)

    engine.batcher._run = slow_forward
    with ServerThread(build_app(engine)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/score", json={"prompts": PROMPTS, "completions": COMPLETIONS}, timeout=0.3)
        r = httpx.post(url + "/v1/score", json={"prompts": PROMPTS, "completions": COMPLETIONS}, timeout=30)
        assert r.status_code == 200 and r.json()["rewards"] == pytest.approx(expected, **TOL)
        assert 'status="500"' not in httpx.get(url + "/metrics").text

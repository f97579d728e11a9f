"""Faults: a server killed mid-run while the client holds two URLs, a server restarted, a server that stalls, a
client that disconnects mid-request, SIGTERM draining in-flight requests with exit code 0, a deadline with no
server left. Every case is bounded in time, and decided by the order of events (observed through metrics, logs
and counted connections), never by how long something took."""

from __future__ import annotations

import logging
import re
import socket
import threading

import httpx
import pytest

from rlhf_rewards import RemoteRewardFunction, RewardFunction, load_reward_model
from rlhf_rewards.serving import RewardEngine, build_app, dispatch

from serving_helpers import WAIT, GatedModel, ServerProcess, ServerThread, StalledServer, post_unread, until

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
        stop, errors = threading.Event(), []

        def calls() -> None:
            try:
                while not stop.is_set():
                    results.append(remote(PROMPTS, COMPLETIONS))
            except BaseException as err:  # noqa: BLE001 - reported by the main thread
                errors.append(err)

        caller = threading.Thread(target=calls, daemon=True)
        caller.start()
        scoring = 'rlhf_rewards_requests_in_progress{endpoint="/v1/rewards"} 1.0'
        until(lambda: scoring in httpx.get(victim.url + "/metrics", timeout=10).text, "the victim scores a request")
        victim.kill()  # SIGKILL while the calls run, one of them likely in the victim's hands
        stop.set()
        caller.join(WAIT)
        assert not caller.is_alive() and not errors, errors
        results += [remote(PROMPTS, COMPLETIONS) for _ in range(2)]  # the first of these is sent to the victim
    assert victim.proc.returncode == -9 and remote.stats.failed_attempts >= 1
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
    # SIGTERM once the server has parsed the request and is scoring it
    until(lambda: re.search(r"^rlhf_rewards_(queued|running)_items [1-9]",
                            httpx.get(drained.url + "/metrics", timeout=10).text, re.M), "the server scores it")
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
        in_flight = 'rlhf_rewards_requests_in_progress{endpoint="/v1/score"} 1.0'
        until(lambda: in_flight in httpx.get(stalled.url + "/metrics", timeout=10).text,
              "the server receives the stalled request")
        assert stalled.terminate(timeout=60) == 0


def test_client_recovers_when_a_server_restarts(model, expected, caplog):
    """The server stops, the client's call is refused (seen in its log), then the server comes back on the same
    port: the call, whose retry budget and deadline outlast the restart, scores everything."""
    engine = RewardEngine(model)
    first = ServerThread(build_app(engine))
    with first as url:
        remote = RemoteRewardFunction(url, timeout=10.0, max_retries=1000, backoff=0.05, max_backoff=0.2,
                                      deadline=WAIT)
        assert remote(PROMPTS, COMPLETIONS) == pytest.approx(expected, **TOL)
    answer: dict = {}
    caller = threading.Thread(target=lambda: answer.update(rewards=remote(PROMPTS, COMPLETIONS)), daemon=True)
    with caplog.at_level(logging.INFO, logger="rlhf_rewards"):
        caller.start()
        until(lambda: "ConnectError" in caplog.text, "the client is refused by the stopped server")
        with ServerThread(build_app(engine), port=first.port):
            caller.join(WAIT)
    assert answer["rewards"] == pytest.approx(expected, **TOL)
    assert remote.stats.failed_attempts >= 1 and remote.stats.unsent == 0


def test_stalled_server_times_out_and_fails_over(model, expected, caplog, monkeypatch):
    """The healthy server's model is held (so a request waits for a free server) until the client has seen three
    probes of the stalled server time out (probes get 0.5 s here, requests 30 s): the stalled server is only ever
    probed (``GET /v1/models``), never handed that request, at most ``max_retries + 1`` times besides the first
    probe; the healthy one scores everything."""
    monkeypatch.setattr(dispatch, "PROBE_TIMEOUT", 0.5)
    engine = RewardEngine(model)
    gated = GatedModel(engine)
    stalled, answer = StalledServer(), {}
    with stalled as stalled_url, ServerThread(build_app(engine)) as healthy:
        remote = RemoteRewardFunction([stalled_url, healthy], timeout=30.0, max_retries=3, backoff=0.05)
        caller = threading.Thread(target=lambda: answer.update(rewards=remote(PROMPTS, COMPLETIONS)), daemon=True)
        with caplog.at_level(logging.INFO, logger="rlhf_rewards"):
            caller.start()
            until(lambda: caplog.text.count(f"{stalled_url} does not answer") >= 3,
                  "three probes of the stalled server time out")
            gated.release()
            caller.join(WAIT)
    asked = stalled.requests()
    assert answer["rewards"] == pytest.approx(expected, **TOL)
    assert 3 <= len(asked) <= 1 + remote.max_retries + 1, asked
    assert all(line in ("", "GET /v1/models HTTP/1.1") for line in asked), asked
    assert remote.stats.failed_attempts >= 1 and remote.stats.requests == 2


def test_no_server_left_gives_none_by_the_deadline_without_raising(caplog):
    """Each probe of the stalled server waits its whole timeout (or what is left of the deadline): the deadline of
    2 s allows at most 2 / 0.5 + 1 of them, where ``max_retries`` alone would allow 51."""
    stalled = StalledServer()
    with stalled as url:
        remote = RemoteRewardFunction(url, timeout=0.5, max_retries=50, deadline=2.0, backoff=0.01, max_backoff=0.05)
        with caplog.at_level(logging.WARNING):
            rewards = remote(PROMPTS, COMPLETIONS)
    asked = stalled.requests()
    assert rewards == [None] * len(PROMPTS)
    assert 1 <= len(asked) <= 5 and remote.stats.failed_attempts <= len(asked), asked
    assert "8 of 8 samples not scored" in caplog.text and "no server scored it before the deadline" in caplog.text


def test_server_carries_on_after_a_client_disconnects(model, expected):
    """The client goes away while the model computes its samples: the server records it (499), finishes the
    model call, and answers the next request."""
    engine = RewardEngine(model)
    gated = GatedModel(engine)
    with ServerThread(build_app(engine)) as url:
        with post_unread(url, "/v1/score", {"prompts": PROMPTS, "completions": COMPLETIONS}):
            assert gated.started.wait(WAIT), "the request never reached the model"
        # the client closed its connection mid-request
        gone_status = 'rlhf_rewards_requests_total{endpoint="/v1/score",status="499"} 1.0'
        until(lambda: gone_status in httpx.get(url + "/metrics", timeout=10).text, "the server sees the client go")
        gated.release()
        r = httpx.post(url + "/v1/score", json={"prompts": PROMPTS, "completions": COMPLETIONS}, timeout=WAIT)
        assert r.status_code == 200 and r.json()["rewards"] == pytest.approx(expected, **TOL)
        assert 'status="500"' not in httpx.get(url + "/metrics", timeout=10).text
    assert len(gated.calls) == 2  # the abandoned request's call ran to its end, then the next request's

"""Faults under attack, client side: one of two servers stalls (accepts, never answers) before or during a call,
the healthy one is briefly busy, every server hangs. Each request has its own timeout and fails over to a free
server; a stalled server holds at most the one request it was given; with default settings a call ends by a
deadline derived from ``timeout`` and says, at error level and in a counter, what it could not score. Bounds are
asserted as numbers of attempts, not wall-clock times."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from fastapi.responses import JSONResponse

from rlhf_rewards import RemoteRewardFunction, RewardFunction, load_reward_model
from rlhf_rewards.serving import RewardEngine, build_app

from serving_helpers import ServerThread, StalledServer
from test_serving_contracts import assert_rewards
from test_trl_integration import MetricSink

PRESET = "starling-rm-34b"
PROMPTS = [f"Question {i}?" for i in range(16)]
COMPLETIONS = [f"Answer number {i}." for i in range(16)]


class Faulty:
    """ASGI wrapper around a real server: counts ``/v1/rewards`` requests; ``busy`` first ones answer 503; while
    ``frozen`` is set every request (probes too) hangs as in a SIGSTOPped process, until ``thawed`` is set."""

    def __init__(self, app, busy: int = 0):
        self.app = app
        self.busy = busy
        self.posts = 0
        self.frozen = threading.Event()
        self.thawed = threading.Event()

    async def __call__(self, scope, receive, send):
        posting = scope["type"] == "http" and scope["path"] == "/v1/rewards"
        self.posts += posting
        if scope["type"] == "http" and self.frozen.is_set():
            await asyncio.to_thread(self.thawed.wait, 60)
            return
        if posting:
            if self.posts <= self.busy:
                return await JSONResponse({"detail": "busy"}, status_code=503,
                                          headers={"Retry-After": "0"})(scope, receive, send)
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_reward_model(tiny_dir(PRESET), preset=PRESET, device="cpu")


@pytest.fixture(scope="module")
def expected(model):
    return RewardFunction(model)(PROMPTS, COMPLETIONS)


def test_a_stalled_server_costs_no_attempt_when_the_healthy_one_is_busy(model, expected):
    """Main sent the healthy server's request, after a 503, to the stalled server for its one retry: half the
    batch was None. Now the stalled server fails its /v1/models probe and gets no work; the busy one retries."""
    healthy = Faulty(build_app(RewardEngine(model)), busy=1)
    with StalledServer() as stalled, ServerThread(healthy) as url:
        remote = RemoteRewardFunction([stalled, url], timeout=1.0, max_retries=1, backoff=0.05)
        assert_rewards(remote(PROMPTS, COMPLETIONS), expected)
    assert healthy.posts == 3 and remote.stats.unsent == 0  # 503, then both requests


def test_a_server_stalling_mid_run_holds_one_request_which_fails_over(model, expected):
    """Both servers answered the first call (their limits are known); then one hangs. Of the second call's eight
    requests it holds the one it was given until the timeout, which then goes to the other; main gave it four."""
    victim = Faulty(build_app(RewardEngine(model)))
    with ServerThread(victim) as hung, ServerThread(build_app(RewardEngine(model))) as healthy:
        remote = RemoteRewardFunction([hung, healthy], timeout=1.0, max_retries=1, backoff=0.05, max_shard_size=2)
        assert_rewards(remote(PROMPTS, COMPLETIONS), expected)
        victim.frozen.set()
        posts = victim.posts
        try:
            assert_rewards(remote(PROMPTS, COMPLETIONS), expected)
        finally:
            victim.thawed.set()
    assert victim.posts - posts == 1 and remote.stats.unsent == 0


def test_default_deadline_is_derived_from_the_timeout():
    defaults = RemoteRewardFunction("http://127.0.0.1:1")
    assert defaults.deadline_for(1) == 2 * 120 + 10  # was (120 + 10) * 6 = 780 s
    assert defaults.deadline_for(3) == 4 * 120 + 10  # three requests in turn for the one server
    assert RemoteRewardFunction(["http://a:1", "http://b:1"]).deadline_for(4) == 3 * 120 + 10
    assert RemoteRewardFunction("http://127.0.0.1:1", deadline=30).deadline_for(9) == 30


def test_every_server_hanging_ends_by_the_default_deadline_with_an_error(caplog):
    """With 50 retries allowed, main made 51 attempts of a full timeout each (its default deadline allowed
    (timeout + max_backoff) * 51). The default deadline is 2 * 0.3 + 0.05 s: a few probes, and an error."""
    sink, stalled = MetricSink(), StalledServer()
    with stalled as url, caplog.at_level(logging.WARNING, logger="rlhf_rewards"):
        remote = RemoteRewardFunction(url, timeout=0.3, max_retries=50, backoff=0.01, max_backoff=0.05,
                                      name="rm")
        rewards = remote(PROMPTS, COMPLETIONS, log_metric=sink)
        connections = len(stalled.held)
    assert rewards == [None] * 16 and 1 <= connections <= 4
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "16 of 16 samples not scored" in errors[0].message
    assert "samples 0-15: no server scored it before the deadline (0.65 s)" in errors[0].message
    assert remote.stats.unsent == remote.stats.unscored == 16 and sink.values["rm/unsent"] == 16
    assert sink.values["rm/unscored_rate"] == 1.0

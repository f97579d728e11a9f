"""Attacks through load: a large request beside a small one (the small one must not wait for all of it), a client
that disconnects while its 400 samples wait (they must be dropped, not computed), a queue full of other requests
(503, retry). The model call is gated so each case is decided by the order of events, never by timing."""

from __future__ import annotations

import re
import threading

import httpx
import pytest

from rlhf_rewards import load_reward_model
from rlhf_rewards.serving import RewardEngine, build_app

from serving_helpers import WAIT, GatedModel, ServerThread, post_unread, until

PRESET = "starling-rm-34b"


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_reward_model(tiny_dir(PRESET), preset=PRESET, device="cpu")


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def body(tag: str, n: int, words: int = 3) -> dict[str, list[str]]:
    return {"prompts": [f"{tag} question {i}" for i in range(n)],
            "completions": [f"{tag} answer {i} " + "word " * words for i in range(n)]}


class Sender(threading.Thread):
    """POSTs one request on a thread; ``finished`` lists the tags of the requests answered, in order."""

    def __init__(self, url: str, tag: str, payload: dict, finished: list[str]):
        super().__init__(daemon=True)
        self.url, self.tag, self.payload, self.finished = url, tag, payload, finished
        self.response: httpx.Response | None = None

    def run(self) -> None:
        self.response = httpx.post(self.url + "/v1/score", json=self.payload, timeout=WAIT)
        self.finished.append(self.tag)


def test_a_small_request_is_not_stuck_behind_a_large_one(model):
    """The large request runs in chunks of max_call_chars, taking turns: the small one, arriving while the
    large one's first chunk runs, is answered long before the large one (which took the model for 16 s at 10 MB)."""
    engine = RewardEngine(model, max_call_chars=192, max_wait_ms=0)
    gated = GatedModel(engine)
    finished: list[str] = []
    with ServerThread(build_app(engine)) as url:
        large = Sender(url, "LARGE", body("LARGE", 40, words=20), finished)
        large.start()
        assert gated.started.wait(WAIT)
        queued = engine.batcher.queued_items  # what of the large request still waits
        small = Sender(url, "SMALL", body("SMALL", 1), finished)
        small.start()
        until(lambda: engine.batcher.queued_items == queued + 1, "the small request waits for the model")
        gated.release()
        small.join(WAIT)
        large.join(WAIT)
    assert large.response.status_code == 200 and small.response.status_code == 200
    assert finished == ["SMALL", "LARGE"]
    assert gated.calls_with("SMALL") == [1]  # the very next call after the chunk that was running
    assert len(gated.calls_with("LARGE")) > 5  # chunked
    assert max(len(texts) for texts in gated.calls) < 40
    assert large.response.json()["rewards"] == pytest.approx(model.score(**body("LARGE", 40, words=20)),
                                                             rel=1e-5, abs=1e-5)


def test_the_queued_work_of_a_disconnected_client_is_dropped(model):
    engine = RewardEngine(model, max_wait_ms=0)
    gated = GatedModel(engine)
    finished: list[str] = []
    with ServerThread(build_app(engine)) as url:
        first = Sender(url, "FIRST", body("FIRST", 1), finished)
        first.start()
        assert gated.started.wait(WAIT)  # the model is busy with FIRST
        with post_unread(url, "/v1/score", body("GONE", 400)):
            until(lambda: engine.batcher.queued_items == 400, "the 400 samples wait for the model")
        # the client closed its connection
        until(lambda: metric(url, "rlhf_rewards_abandoned_items_total") == 400, "the server drops them")
        assert engine.batcher.queued_items == 0
        after = Sender(url, "AFTER", body("AFTER", 1), finished)
        after.start()
        until(lambda: engine.batcher.queued_items == 1, "the next request waits for the model")
        gated.release()
        first.join(WAIT)
        after.join(WAIT)
        assert metric(url, "rlhf_rewards_requests_total", '{endpoint="/v1/score",status="499"}') == 1
    assert first.response.status_code == 200 and after.response.status_code == 200
    assert gated.calls_with("GONE") == []  # never computed
    assert gated.calls_with("AFTER") == [1]


def test_a_queue_full_of_other_requests_gets_503_with_retry_after(model):
    engine = RewardEngine(model, max_wait_ms=0, max_queue=8)
    gated = GatedModel(engine)
    finished: list[str] = []
    with ServerThread(build_app(engine)) as url:
        first = Sender(url, "FIRST", body("FIRST", 1), finished)
        first.start()
        assert gated.started.wait(WAIT)
        waiting = Sender(url, "WAITING", body("WAITING", 8), finished)
        waiting.start()
        until(lambda: engine.batcher.queued_items == 8, "the queue is full")
        r = httpx.post(url + "/v1/score", json=body("REFUSED", 1), timeout=WAIT)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "limit 8" in r.json()["detail"]
        gated.release()
        first.join(WAIT)
        waiting.join(WAIT)
        assert httpx.post(url + "/v1/score", json=body("LATER", 1), timeout=WAIT).status_code == 200
    assert finished == ["FIRST", "WAITING"]

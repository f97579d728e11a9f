"""Limits under attack, client side: a batch larger than the server's queue, a PairRM-style group whose comparisons
outnumber it, a 413 from the server, a body over its byte limit. The client learns each server's limits from
``GET /v1/models``, shards to fit them counting items as the server's queue does, splits what the server refuses
as too large, and never loses a sample silently: a group no server can take is ``None`` with its reason, logged as
an error and counted."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from fastapi.responses import JSONResponse

from rlhf_rewards import RemoteRewardFunction, RewardFunction, load_reward_model
from rlhf_rewards.serving import RewardEngine, ServerSettings, build_app

from serving_helpers import ServerThread
from test_serving_contracts import assert_rewards
from test_trl_integration import MetricSink

SCALAR, PAIRWISE = "starling-rm-34b", "rlhflow-pair-pm-llama3-8b"


class Gate:
    """ASGI wrapper: records every ``/v1/rewards`` body it forwards; answers 413 instead when a body holds more
    than ``max_prompts`` samples (a server or proxy whose limit the client cannot see in ``/v1/models``)."""

    def __init__(self, app, max_prompts: int | None = None):
        self.app = app
        self.max_prompts = max_prompts
        self.bodies: list[dict] = []
        self.refused = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/rewards":
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        body = json.loads(raw)
        if self.max_prompts is not None and len(body["prompts"]) > self.max_prompts:
            self.refused += 1
            detail = f"{len(body['prompts'])} samples; this server takes at most {self.max_prompts} per request"
            return await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
        self.bodies.append(body)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


@pytest.fixture(scope="module")
def models(tiny_dir):
    return {p: load_reward_model(tiny_dir(p), preset=p, device="cpu") for p in (SCALAR, PAIRWISE)}


def serve(model, max_queue: int = 4096, max_prompts: int | None = None, **settings):
    gate = Gate(build_app(RewardEngine(model, max_queue=max_queue), ServerSettings(**settings)), max_prompts)
    return gate, ServerThread(gate)


def groups(sizes: list[int]) -> tuple[list[str], list[str]]:
    prompts = [f"Question {g}?" for g, n in enumerate(sizes) for _ in range(n)]
    completions = [f"Answer {k} to {g}." for g, n in enumerate(sizes) for k in range(n)]
    return prompts, completions


def test_models_route_says_what_a_request_may_carry(models):
    _, server = serve(models[SCALAR], max_queue=8, max_request_mb=1)
    with server as url:
        entry = httpx.get(url + "/v1/models").json()["data"][0]
    assert entry["kind"] == "scalar"
    assert entry["limits"] == {"max_queue": 8, "max_request_items": 8, "max_request_bytes": 1024 * 1024,
                               "max_sample_chars": 1_000_000}


@pytest.mark.parametrize("options, per_sample", [({}, 1), ({"baseline_column": "ref"}, 2)])
def test_a_batch_larger_than_the_queue_is_sharded_not_lost(models, options, per_sample):
    """Main returned 20 x None here: the server refused the whole request (8 items at most) and the client retried
    it until it gave up."""
    prompts, completions = groups([20])
    columns = {"ref": ["A reference answer."] * 20} if options else {}
    expected = RewardFunction(models[SCALAR], **options)(prompts, completions, **columns)
    gate, server = serve(models[SCALAR], max_queue=8)
    with server as url:
        remote = RemoteRewardFunction(url, **options)
        assert_rewards(remote(prompts, completions, **columns), expected)
    assert all(len(b["prompts"]) * per_sample <= 8 for b in gate.bodies)
    assert sorted(p for b in gate.bodies for p in b["completions"]) == sorted(completions)  # each sample once
    assert remote.stats.unscored == 0 and remote.stats.requests == len(gate.bodies) >= 20 * per_sample / 8


def test_pairwise_groups_count_comparisons_and_stay_whole(models):
    """Groups of 4 are 6 comparisons each (round robin): a queue of 13 takes two groups per request."""
    prompts, completions = groups([4] * 5)
    expected = RewardFunction(models[PAIRWISE], pairing="group", group_size=4)(prompts, completions)
    gate, server = serve(models[PAIRWISE], max_queue=13)
    with server as url:
        remote = RemoteRewardFunction(url, pairing="group", group_size=4)
        assert_rewards(remote(prompts, completions), expected)
    assert [len(b["prompts"]) for b in gate.bodies] == [8, 8, 4]


def test_online_dpo_pairs_stay_together_when_split(models):
    prompts = [f"Question {i}?" for i in range(10)] * 2
    completions = [f"First answer {i}." for i in range(10)] + [f"Second answer {i}." for i in range(10)]
    expected = RewardFunction(models[SCALAR], pairing="halves")(prompts, completions)
    gate, server = serve(models[SCALAR], max_queue=6)  # a scalar model reads both candidates: 2 items per pair
    with server as url:
        assert_rewards(RemoteRewardFunction(url, pairing="halves")(prompts, completions), expected)
    for body in gate.bodies:
        half = len(body["prompts"]) // 2
        assert len(body["prompts"]) <= 6 and body["prompts"][:half] == body["prompts"][half:]
        assert [c.replace("First", "Second") for c in body["completions"][:half]] == body["completions"][half:]


def test_a_group_no_server_can_take_is_none_with_its_reason(models, caplog):
    """A group of 6 is 15 comparisons, more than the queue of 13: its samples are None, logged as an error,
    counted; the groups around it are scored."""
    prompts, completions = groups([4, 6, 4])
    expected = RewardFunction(models[PAIRWISE], pairing="group")(prompts, completions)
    gate, server = serve(models[PAIRWISE], max_queue=13)
    sink = MetricSink()
    with server as url, caplog.at_level(logging.WARNING, logger="rlhf_rewards"):
        remote = RemoteRewardFunction(url, pairing="group", name="rm")
        rewards = remote(prompts, completions, log_metric=sink)
    assert rewards[4:10] == [None] * 6
    assert_rewards(rewards[:4] + rewards[10:], expected[:4] + expected[10:])
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "6 of 14 samples not scored" in errors[0].message
    assert ("samples 4-9: its group of 6 completions (round-robin: 15 comparisons in one request) is more than the "
            "13 the server takes in one request") in errors[0].message
    assert remote.stats.unsent == remote.stats.unscored == 6 and sink.values["rm/unsent"] == 6
    assert [len(b["prompts"]) for b in gate.bodies] == [8]  # the two small groups; the big one was never sent


def test_a_413_splits_the_request_down_to_what_the_server_takes(models, caplog):
    """A server (or a proxy in front of it) that refuses more than 3 samples per request, which its /v1/models does
    not say: the client halves what is refused, whole groups only; a group of 4 cannot be split and is None with
    the server's reason."""
    prompts, completions = groups([2, 2, 1, 3, 2, 4, 1])
    expected = RewardFunction(models[SCALAR], pairing="group")(prompts, completions)
    gate, server = serve(models[SCALAR], max_prompts=3)
    with server as url, caplog.at_level(logging.WARNING, logger="rlhf_rewards"):
        remote = RemoteRewardFunction(url, pairing="group")
        rewards = remote(prompts, completions)
    assert rewards[10:14] == [None] * 4
    assert_rewards(rewards[:10] + rewards[14:], expected[:10] + expected[14:])
    assert all(len(b["prompts"]) <= 3 for b in gate.bodies) and gate.refused >= 2
    assert sorted(c for b in gate.bodies for c in b["completions"]) == sorted(completions[:10] + completions[14:])
    assert "answered 413" in caplog.text and "takes at most 3 per request" in caplog.text
    assert remote.stats.splits >= 2 and remote.stats.unsent == 4


def test_a_body_over_the_byte_limit_is_split_and_an_oversized_sample_is_none(models, caplog):
    completions = [f"Answer {i}: " + "word " * 60 for i in range(12)] + ["x" * 5000]
    prompts = [f"Question {i}?" for i in range(13)]
    expected = RewardFunction(models[SCALAR])(prompts, completions)
    gate, server = serve(models[SCALAR], max_request_mb=2 ** -9)  # 2048 bytes: about 5 samples
    with server as url, caplog.at_level(logging.WARNING, logger="rlhf_rewards"):
        remote = RemoteRewardFunction(url)
        rewards = remote(prompts, completions)
    assert rewards[12] is None
    assert_rewards(rewards[:12], expected[:12])
    assert len(gate.bodies) >= 3 and "more than the 2048 " in caplog.text

"""Bad input and security: every status code the server promises (400, 401, 413, 422, 503 + Retry-After), oversized,
deeply nested and non-UTF-8 bodies, the API key, the loopback-only default, no request bodies in the logs, and
never a 500."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from rlhf_rewards import load_reward_model
from rlhf_rewards.cli import main
from rlhf_rewards.serving import RewardEngine, ServerSettings, build_app
from rlhf_rewards.serving.server import is_loopback, serve

from serving_helpers import ServerThread

KEY = "s3cret-key"
PRESET = "starling-rm-34b"


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_reward_model(tiny_dir(PRESET), preset=PRESET, device="cpu")


@pytest.fixture(scope="module")
def url(model):
    app = build_app(RewardEngine(model, max_queue=8), ServerSettings(api_key=KEY, max_request_mb=0.01))
    with ServerThread(app) as base:
        yield base


AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"prompts": ["Hello"], "completions": ["Hi!"]}


def post(url, path="/v1/score", *, headers=AUTH, **kwargs) -> httpx.Response:
    return httpx.post(url + path, headers=headers, timeout=30, **kwargs)


def test_api_key(url):
    assert httpx.get(url + "/health").status_code == 200  # open for load balancers
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"bearer {KEY}x"}):
        r = post(url, json=GOOD, headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/v1/models").status_code == 401
    assert post(url, json=GOOD).status_code == 200
    assert httpx.get(url + "/metrics", headers=AUTH).status_code == 200


def test_oversized_bodies_get_413_before_parsing(url):
    big = json.dumps({"prompts": ["x" * 20000], "completions": ["y"]}).encode()
    assert post(url, content=big).status_code == 413  # Content-Length over the limit

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(40):
            yield b" " * 1024

    assert post(url, content=chunks()).status_code == 413


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe\x00bad", "[" * 9000, b"", b'{"prompts": ["\\ud800"]}'])
def test_malformed_bodies_get_400(url, body):
    r = post(url, content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["detail"]


@pytest.mark.parametrize("body, loc", [
    ({"prompts": ["a", 5], "completions": ["b", "c"]}, ["prompts", 1]),
    ({"prompts": ["a"]}, ["completions"]),
    ({"prompts": ["a"], "completions": ["b"], "typo": 1}, ["typo"]),
    ({"prompts": ["a"], "completions": ["b"], "transform": "square"}, ["transform"]),
    ({"prompts": "a", "completions": ["b"]}, ["prompts"]),
    ({"prompts": [[[[["deep"]]]]], "completions": ["b"]}, ["prompts", 0]),
    ([1, 2], []),
])
def test_wrong_shapes_get_422_naming_field_and_index(url, body, loc):
    r = post(url, json=body)
    assert r.status_code == 422
    assert any(e["loc"][:len(loc)] == loc for e in r.json()["detail"]), r.json()


def test_content_errors_get_422_naming_the_index(url):
    r = post(url, json={"prompts": ["a", "b"], "completions": ["x"]})
    assert r.status_code == 422 and "len(completions)=1" in r.text
    r = post(url, json={"prompts": ["a", [{"role": "wizard", "content": "hi"}]], "completions": ["x", "y"]})
    assert r.status_code == 422 and "prompts[1]" in r.json()["detail"] and "wizard" in r.json()["detail"]
    r = post(url, "/get_reward", json={"query": ["<|im_start|>user\nunclosed"]})
    assert r.status_code == 422 and "query[0]" in r.json()["detail"]


def test_a_request_larger_than_the_queue_gets_413_naming_the_limit(url):
    """Retrying it could never help (503 made clients retry until they gave up, all None): 413 says so."""
    r = post(url, json={"prompts": ["a"] * 9, "completions": ["b"] * 9})  # max_queue=8: 9 samples
    assert r.status_code == 413 and "Retry-After" not in r.headers
    assert {k: r.json()[k] for k in ("limit", "max", "count")} == {"limit": "max_request_items", "max": 8, "count": 9}
    # 5 samples fit, but with their baselines they need 10 model inputs
    r = post(url, json={"prompts": ["a"] * 5, "completions": [f"b{i}" for i in range(5)],
                        "baselines": [f"c{i}" for i in range(5)]})
    assert r.status_code == 413 and (r.json()["limit"], r.json()["count"]) == ("max_request_items", 10)
    assert "max_request_items" in r.json()["detail"]
    assert post(url, json=GOOD).status_code == 200


def test_no_input_ever_gets_a_500_and_the_worker_survives(url):
    bodies = [None, 0, "x", [], {}, {"prompts": None, "completions": None},
              {"prompts": [{"role": "user"}], "completions": ["x"]}, {"prompts": [[]], "completions": ["x"]},
              {"prompts": ["a"], "completions": [[{"role": "assistant", "content": None}]]},
              {"prompts": ["a"], "completions": ["b"], "baselines": [7]}, {"prompts": ["\ud800"], "completions": ["b"]},
              {"query": ["\ud800"]}, {"input": "\udfff"}]
    for path in ("/v1/score", "/v1/compare", "/v1/rewards", "/get_reward", "/classify"):
        for body in bodies:
            r = post(url, path, content=json.dumps(body).encode(), headers={**AUTH, "Content-Type": "x"})
            if r.status_code == 200 and path == "/v1/rewards":  # per-sample errors, as RewardFunction gives them
                assert r.json()["rewards"] == [None] and r.json()["errors"][0]
            else:
                assert r.status_code in (400, 422), (path, body, r.status_code, r.text)
    assert post(url, json={"prompts": [], "completions": []}).json() == {"rewards": []}
    assert post(url, json=GOOD).status_code == 200
    metrics = httpx.get(url + "/metrics", headers=AUTH).text
    assert 'status="500"' not in metrics and 'rlhf_rewards_requests_total{endpoint="/v1/score",status="422"}' in metrics


def test_request_bodies_are_not_logged(url, caplog):
    secret = "do-not-log-this-prompt"
    with caplog.at_level(logging.INFO):
        post(url, "/v1/rewards", json={"prompts": [[{"role": "user", "content": secret},
                                                    {"role": "assistant", "content": secret}]],
                                       "completions": [secret]})
        post(url, json={"prompts": [secret, 1], "completions": [secret]})
    assert secret not in caplog.text


@pytest.mark.parametrize("host, ok", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.2", True),
                                      ("0.0.0.0", False), ("10.0.0.5", False), ("rm-node", False)])
def test_only_loopback_without_a_key(host, ok):
    assert is_loopback(host) is ok
    if not ok:
        with pytest.raises(ValueError, match="API key"):
            serve(lambda: None, host=host, settings=ServerSettings())


def test_cli_refuses_a_public_bind_without_a_key(tiny_dir, capsys, monkeypatch):
    monkeypatch.delenv("RLHF_REWARDS_API_KEY", raising=False)
    assert main(["serve", tiny_dir(PRESET), "--host", "0.0.0.0"]) == 2
    assert "API key" in capsys.readouterr().err

"""Attacks on the HTTP surface and its limits: slow and stalled uploads, idle connections, huge pad runs, oversized
samples, auth header spellings, secrets in query strings, HEAD probes, wrong prompt types, metrics of rejected
requests, JSON types of counters, and ``rlhf-rewards serve`` options that must fail (exit code 2) before the model
loads. Servers bind 127.0.0.1; every socket read is bounded by a timeout."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import subprocess
import sys

import httpx
import pytest

from rlhf_rewards import load_reward_model
from rlhf_rewards.cli import main
from rlhf_rewards.serving import RewardEngine, ServerSettings, build_app
from rlhf_rewards.serving.batcher import Batcher

from serving_helpers import REPO, ServerThread

PRESET = "starling-rm-34b"
KEY = "k3y-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHATML = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
SOCKET_TIMEOUT = 20  # bounds every read below: a server that never answers fails the test instead of hanging it
FAST = ServerSettings(api_key=KEY, max_sample_chars=5000, body_timeout_s=0.5, header_timeout_s=0.5)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_reward_model(tiny_dir(PRESET), preset=PRESET, device="cpu")


@pytest.fixture(scope="module")
def server(model):
    """A server as ``rlhf-rewards serve`` configures uvicorn, with short timeouts; its access log captured."""
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    access = logging.getLogger("uvicorn.access")
    thread = ServerThread(build_app(RewardEngine(model, max_queue=64), FAST), settings=FAST, log_level="info")
    access.addHandler(handler)
    try:
        with thread as url:
            yield url, log
    finally:
        access.removeHandler(handler)


def raw(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    sock.sendall(data)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# -- slow bodies and idle connections ---------------------------------------------------------------------------------

def test_a_stalled_upload_gets_408_and_its_connection_is_closed(server):
    url, _ = server
    head = (f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
    with raw(port_of(url), head + b'{"prompts":') as sock:  # 11 of the 100 bytes, then nothing
        answer = read_all(sock)
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 408")
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["limit"] == "body_timeout_s" and "0.5 s" in body["detail"]


@pytest.mark.parametrize("sent", [b"", b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Le"])
def test_a_connection_that_never_completes_a_request_is_closed(server, sent):
    url, _ = server
    with raw(port_of(url), sent) as sock:
        assert read_all(sock) == b""  # closed by the server, nothing answered


def test_a_connection_is_closed_when_the_next_request_stalls_after_an_answer(server):
    url, _ = server
    with raw(port_of(url), b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /hea") as sock:
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1


# -- limits ----------------------------------------------------------------------------------------------------------

def test_a_sample_over_max_sample_chars_gets_413_naming_limit_and_index(server):
    url, _ = server
    ok = "x" * 1000
    body = {"prompts": [ok, [{"role": "user", "content": "y" * 3000}]], "completions": [ok, "z" * 2001]}
    r = httpx.post(url + "/v1/score", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 413
    assert {k: r.json()[k] for k in ("limit", "max", "count", "index")} == {
        "limit": "max_sample_chars", "max": 5000, "count": 3000 + 2001 + len("role") + len("user") + len("content"),
        "index": 1}
    assert "prompts[1], completions[1]" in r.json()["detail"]
    r = httpx.post(url + "/classify", json={"input": [CHATML, CHATML + "w" * 5000]}, headers=AUTH, timeout=30)
    assert r.status_code == 413 and r.json()["index"] == 1 and "input[1]" in r.json()["detail"]


def test_pad_and_end_token_runs_are_stripped_in_linear_time():
    """2 MB of leading <pad> took 22 s and 5 MB of trailing <|endoftext|> 73 s (each stripped token copied the
    text). 6 MB and 8 MB here: quadratic stripping would take several minutes, linear takes seconds; the bound is
    far above the linear time, in a subprocess so a regression cannot hang the suite."""
    code = (
        "from rlhf_rewards.policy_text import split_policy_text\n"
        f"core = {CHATML.removesuffix(chr(10))!r}\n"
        "assert split_policy_text('<pad>' * 1_200_000 + core, 'q') == ([{'role': 'user', 'content': 'Hi'}], 'Hello')\n"
        "assert split_policy_text(core + '<|endoftext|>' * 615_000, 'q')[1] == 'Hello'\n"
        "assert split_policy_text('[PAD]' * 9 + core + '<|endoftext|>[PAD]' * 300_000, 'q')[1] "
        "== 'Hello'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_get_reward_with_huge_pad_runs_is_scored(server, model):
    url, _ = server
    # under the server's max_sample_chars of 5000, mostly pads around the conversation
    query = "<pad>" * 500 + CHATML.removesuffix("\n") + "<|endoftext|>" * 170
    r = httpx.post(url + "/get_reward", json={"query": [query]}, headers=AUTH, timeout=60)
    assert r.status_code == 200
    assert r.json()["rewards"] == pytest.approx(model.score([[{"role": "user", "content": "Hi"}]], ["Hello"]),
                                                rel=1e-5, abs=1e-5)


# -- HTTP details ----------------------------------------------------------------------------------------------------

def test_head_health_is_answered(server):
    url, _ = server
    r = httpx.head(url + "/health", timeout=10)
    assert r.status_code == 200 and r.content == b""


@pytest.mark.parametrize("header, status", [(f"bearer {KEY}", 200), (f"BEARER {KEY}", 200), (f"Bearer  {KEY}", 200),
                                            (f"bearer {KEY}x", 401), (f"Basic {KEY}", 401), (KEY, 401)])
def test_the_auth_scheme_is_case_insensitive(server, header, status):
    url, _ = server
    r = httpx.post(url + "/v1/score", json={"prompts": ["a"], "completions": ["b"]},
                   headers={"Authorization": header}, timeout=30)
    assert r.status_code == status


def test_a_key_in_the_query_string_is_not_logged(server):
    url, log = server
    secret = "sk-query-secret-0123"
    assert httpx.get(f"{url}/health?api_key={secret}", timeout=10).status_code == 200
    httpx.post(f"{url}/v1/score?api_key={secret}&x=1", json={}, timeout=10)
    text = log.getvalue()
    assert secret not in text
    assert "/health?<query hidden>" in text  # the request is still logged


def test_a_non_string_prompt_of_an_untemplated_query_is_named(server):
    url, _ = server
    r = httpx.post(url + "/get_reward", json={"query": ["What is 2+2? 4"], "prompts": [5]}, headers=AUTH, timeout=30)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("prompts[0]: expected the prompt as text (a string), got int"), detail


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_metrics_count_only_samples_of_answered_requests(server):
    url, _ = server
    samples = 'rlhf_rewards_samples_total'
    before = metric(httpx.get(url + "/metrics", headers=AUTH).text, samples, '{endpoint="/v1/score"}')
    r = httpx.post(url + "/v1/score", json={"prompts": ["a", "b", [{"role": "wizard", "content": "c"}]],
                                            "completions": ["x", "y", "z"]}, headers=AUTH, timeout=30)
    assert r.status_code == 422
    text = httpx.get(url + "/metrics", headers=AUTH).text
    assert metric(text, samples, '{endpoint="/v1/score"}') == before
    assert httpx.post(url + "/v1/score", json={"prompts": ["a", "b"], "completions": ["x", "y"]}, headers=AUTH,
                      timeout=30).status_code == 200
    text = httpx.get(url + "/metrics", headers=AUTH).text
    assert metric(text, samples, '{endpoint="/v1/score"}') == before + 2


def test_counters_are_json_integers_and_seconds_a_float(server):
    url, _ = server
    r = httpx.post(url + "/v1/rewards", json={"prompts": ["a", "b", "c"], "completions": ["x", "y", "z"]},
                   headers=AUTH, timeout=30)
    stats = r.json()["stats"]
    assert isinstance(stats.pop("seconds"), float)
    assert stats and all(type(v) is int for v in stats.values()), stats
    r = httpx.post(url + "/classify", json={"input": CHATML}, headers=AUTH, timeout=30)
    assert type(r.json()["usage"]["prompt_tokens"]) is int


# -- `rlhf-rewards serve` options: exit code 2 and a message before the model loads ----------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a model, or to start serving, fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded (or the server started) despite a wrong option")

    monkeypatch.setattr("rlhf_rewards.serving.engine.RewardEngine.from_pretrained", refuse)
    monkeypatch.setattr("rlhf_rewards.loading.load_reward_model", refuse)
    monkeypatch.setattr("uvicorn.Server.run", refuse)


@pytest.mark.parametrize("option, message", [
    (["--max-request-mb", "-1"], "--max-request-mb: expected a number > 0, got '-1'"),
    (["--max-request-mb", "0"], "--max-request-mb: expected a number > 0"),
    (["--max-wait-ms", "nan"], "--max-wait-ms: expected a number >= 0, got 'nan'"),
    (["--max-wait-ms", "inf"], "--max-wait-ms: expected a number >= 0, got 'inf'"),
    (["--port", "70000"], "--port: expected an integer >= 0 and <= 65535, got '70000'"),
    (["--max-queue", "0"], "--max-queue: expected an integer >= 1, got '0'"),
    (["--max-batch-tokens", "-1"], "--max-batch-tokens: expected an integer >= 1"),
    (["--max-length", "0"], "--max-length: expected an integer >= 1"),
    (["--body-timeout", "0"], "--body-timeout: expected a number > 0"),
    (["--shutdown-timeout", "inf"], "--shutdown-timeout: expected a number > 0"),
    (["--ray", "--replicas", "0"], "--replicas: expected an integer >= 1"),
    (["--ray", "--ray-actor-options", "[1]"], "--ray-actor-options: expected a JSON object"),
])
def test_serve_refuses_bad_numbers_before_loading(tiny_dir, capsys, no_loading, option, message):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", tiny_dir(PRESET), "--preset", PRESET, *option])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [
    (["--device", "cuda:0"], "device 'cuda:0'"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--max-queue", "8", "--max-request-items", "9"], "--max-request-items 9 is more than --max-queue 8"),
    (["--api-key-file", "/nonexistent/key"], "--api-key-file /nonexistent/key"),
    (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 is more than --max-replicas 2"),
])
def test_serve_refuses_what_would_fail_after_loading(tiny_dir, capsys, no_loading, option, message):
    assert main(["serve", tiny_dir(PRESET), "--preset", PRESET, "--device", "cpu", *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-rewards serve: error: ") and message in err, err


def test_serve_refuses_a_port_in_use_before_loading(tiny_dir, capsys, no_loading):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", tiny_dir(PRESET), "--preset", PRESET, "--device", "cpu", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "in use" in err


def test_settings_refuse_bad_values():
    for kwargs in ({"max_request_mb": -1}, {"max_request_mb": float("nan")}, {"body_timeout_s": float("inf")},
                   {"max_sample_chars": 0}, {"api_key": ""}, {"shutdown_timeout_s": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            ServerSettings(**kwargs)
    with pytest.raises(ValueError, match="max_request_items"):
        Batcher(lambda items: (items, {}), max_call_cost=8, max_wait_ms=0, max_queue=4, max_request_items=5)
    with pytest.raises(ValueError, match="max_wait_ms"):
        Batcher(lambda items: (items, {}), max_call_cost=8, max_wait_ms=float("nan"), max_queue=4)

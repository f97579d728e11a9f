"""Cross-request batching under load: 16 concurrent clients x 20 requests of mixed sizes get exactly their own
results, in order, equal to scoring each request alone in-process (1e-5), while the server runs fewer forward
batches than requests. Latency percentiles are recorded (``-rP`` or the junit properties show them), never
asserted. That requests are merged is made certain, not left to timing: the first model call is held until the
others wait behind it."""

from __future__ import annotations

import re
import statistics
import threading
import time

import httpx
import pytest

from rlhf_rewards import RewardFunction, load_reward_model
from rlhf_rewards.serving import RewardEngine, build_app

from serving_helpers import WAIT, GatedModel, ServerThread, until

TOL = dict(rel=1e-5, abs=1e-5)
CLIENTS, REQUESTS = 16, 20


def metric(text: str, name: str) -> float:
    """Sum of a Prometheus sample over its labels."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def scalar(tiny_dir):
    return load_reward_model(tiny_dir("starling-rm-34b"), preset="starling-rm-34b", device="cpu")


def test_concurrent_requests_get_their_own_results_in_order(scalar, record_property):
    requests = []
    for c in range(CLIENTS):
        for r in range(REQUESTS):
            n = 1 + (c + r) % 6  # mixed sizes, 1 to 6 samples
            prompts = [f"Client {c} asks question {r}." if k % 2 else
                       [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Q{c}-{r}?"}]
                       for k in range(n)]
            completions = [f"Answer {k} of request {r} from client {c}" + "!" * k for k in range(n)]
            requests.append((c, prompts, completions))
    # in-process, all requests in one call: a request's results must not depend on what it is batched with
    flat = scalar.score([p for _, ps, _ in requests for p in ps], [c for _, _, cs in requests for c in cs])
    expected, offset = [], 0
    for _, prompts, _ in requests:
        expected.append(flat[offset:offset + len(prompts)])
        offset += len(prompts)
    results: dict[int, list[float]] = {}
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    engine = RewardEngine(scalar, max_wait_ms=10)
    gated = GatedModel(engine)
    first_items = sum(len(prompts) for _, prompts, _ in requests[::REQUESTS])  # each client's first request
    with ServerThread(build_app(engine)) as url:
        def client(c: int) -> None:
            try:
                with httpx.Client(base_url=url, timeout=60) as http:
                    for index, (owner, prompts, completions) in enumerate(requests):
                        if owner != c:
                            continue
                        start = time.perf_counter()
                        r = http.post("/v1/score", json={"prompts": prompts, "completions": completions})
                        elapsed = time.perf_counter() - start
                        assert r.status_code == 200, r.text
                        with lock:
                            assert index not in results
                            results[index] = r.json()["rewards"]
                            latencies.append(elapsed)
            except BaseException as err:  # noqa: BLE001 - reported by the main thread
                errors.append(err)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        until(lambda: engine.batcher.queued_items + engine.batcher.running_items == first_items,
              "every client's first request waits for the model")
        gated.release()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors[0]
        text = httpx.get(url + "/metrics").text

    assert sorted(results) == list(range(len(requests)))  # nothing lost, nothing duplicated
    for index, values in results.items():
        assert values == pytest.approx(expected[index], **TOL), index  # own results, own order
    batches = metric(text, "rlhf_rewards_batches_total")
    merged_calls = metric(text, "rlhf_rewards_batch_samples_count")
    assert 0 < batches < len(requests) and merged_calls < len(requests)
    assert metric(text, "rlhf_rewards_samples_total") == sum(len(p) for _, p, _ in requests)
    latencies.sort()
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    record_property("p50_ms", round(p50 * 1000, 1))
    record_property("p99_ms", round(p99 * 1000, 1))
    record_property("forward_batches", batches)
    print(f"{len(requests)} requests: {batches:.0f} forward batches, {merged_calls:.0f} merged calls, "
          f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")


def test_groups_of_concurrent_requests_never_mix(tiny_dir):
    pair_pm = load_reward_model(tiny_dir("rlhflow-pair-pm-llama3-8b"), preset="rlhflow-pair-pm-llama3-8b",
                                device="cpu")
    fn = RewardFunction(pair_pm, pairing="group")
    # every request holds groups whose prompt is also used by the others: merged, they would be one group
    bodies = [{"prompts": ["Same prompt"] * 3 + ["Other prompt"] * 2,
               "completions": [f"r{r} a", f"r{r} b", f"r{r} c", f"r{r} d", f"r{r} e"], "pairing": "group"}
              for r in range(8)]
    expected = [fn(b["prompts"], b["completions"]) for b in bodies]
    out: dict[int, list[float]] = {}
    engine = RewardEngine(pair_pm, max_wait_ms=50)
    gated = GatedModel(engine)
    with ServerThread(build_app(engine)) as url:
        def send(r: int) -> None:
            out[r] = httpx.post(url + "/v1/rewards", json=bodies[r], timeout=WAIT).json()["rewards"]

        threads = [threading.Thread(target=send, args=(r,)) for r in range(len(bodies))]
        for t in threads:
            t.start()
        # a request is 4 comparisons (3 in the round-robin group of 3, 1 in the pair): the first model call holds
        # some requests, every other one waits behind it, so the next call merges them
        until(lambda: engine.batcher.queued_items + engine.batcher.running_items == 4 * len(bodies),
              "every request waits for the model")
        gated.release()
        for t in threads:
            t.join(timeout=WAIT)
        calls = metric(httpx.get(url + "/metrics").text, "rlhf_rewards_batch_samples_count")
    for r in range(len(bodies)):
        assert out[r] == pytest.approx(expected[r], **TOL)
    assert calls == len(gated.calls) <= 2  # they did share model calls


def test_a_lone_request_does_not_wait_for_company(scalar):
    """The merge window is for requests already received; with none in flight a request runs at once. The window
    here (10 minutes) is far longer than the request's own timeout: had it waited for company, it would fail."""
    with ServerThread(build_app(RewardEngine(scalar, max_wait_ms=600_000))) as url:
        r = httpx.post(url + "/v1/score", json={"prompts": ["Hi"], "completions": ["Hello"]}, timeout=WAIT)
        assert r.status_code == 200 and r.json()["rewards"] == pytest.approx(scalar.score(["Hi"], ["Hello"]), **TOL)

"""Prometheus metrics of one server (one registry per engine, so several servers, or Ray replicas, in one process
never share counters)."""

from __future__ import annotations

from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "rlhf_rewards_"

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0)
_SAMPLES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class ServerMetrics:
    """The server's counters, gauges and histograms (names prefixed ``rlhf_rewards_``):

    - ``requests_total{endpoint,status}``: HTTP requests answered, by route and status code (``499``: the client
      disconnected before the answer).
    - ``samples_total{endpoint}``: completions (or queries/inputs) of requests answered 200; a rejected request's
      (4xx/5xx) samples are not counted, so this is what was scored.
    - ``unscored_total{endpoint}``: of those, answered with null (``/v1/rewards``' per-sample errors).
    - ``abandoned_items_total``: model inputs dropped from the queue, never computed, because their request's
      client disconnected.
    - ``batches_total``: forward batches the model ran; ``real_tokens_total`` / ``computed_tokens_total``: tokens of
      the inputs / tokens computed including padding; ``truncations_total``: inputs cut to the model's max length.
    - ``requests_in_progress{endpoint}`` (gauge): requests received (headers read) and not yet answered.
    - ``queued_items`` / ``running_items`` (gauges): model inputs waiting for the model / in the call in progress.
    - ``request_seconds{endpoint}``: request latency; ``queue_wait_seconds``: time a submission waited for the
      model (to its first chunk); ``batch_samples``: model inputs per merged model call.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.samples = Counter(PREFIX + "samples", "Samples of requests answered 200", ["endpoint"], registry=r)
        self.unscored = Counter(PREFIX + "unscored", "Samples answered with null", ["endpoint"], registry=r)
        self.abandoned_items = Counter(PREFIX + "abandoned_items",
                                       "Model inputs dropped because their client disconnected", registry=r)
        self.batches = Counter(PREFIX + "batches", "Forward batches run by the model", registry=r)
        self.real_tokens = Counter(PREFIX + "real_tokens", "Tokens of the model's inputs", registry=r)
        self.computed_tokens = Counter(PREFIX + "computed_tokens", "Tokens computed, padding included", registry=r)
        self.truncations = Counter(PREFIX + "truncations", "Inputs truncated to the max length", registry=r)
        self.in_progress = Gauge(PREFIX + "requests_in_progress", "Requests received and not yet answered",
                                 ["endpoint"], registry=r)
        self.queued_items = Gauge(PREFIX + "queued_items", "Model inputs waiting for the model", registry=r)
        self.running_items = Gauge(PREFIX + "running_items", "Model inputs in the model call in progress",
                                   registry=r)
        self.request_seconds = Histogram(PREFIX + "request_seconds", "Request latency", ["endpoint"],
                                         buckets=_SECONDS, registry=r)
        self.queue_wait = Histogram(PREFIX + "queue_wait_seconds", "Time a submission waited for the model",
                                    buckets=_SECONDS, registry=r)
        self.batch_samples = Histogram(PREFIX + "batch_samples", "Model inputs per merged model call",
                                       buckets=_SAMPLES, registry=r)

    def observe_batch(self, items: int, waits: Sequence[float], counters: dict[str, int]) -> None:
        """One merged model call of ``items`` inputs; ``waits``: the queueing time of each submission it started."""
        self.batch_samples.observe(items)
        for wait in waits:
            self.queue_wait.observe(wait)
        self.batches.inc(counters.get("batches", 0))
        self.real_tokens.inc(counters.get("real_tokens", 0))
        self.computed_tokens.inc(counters.get("computed_tokens", 0))
        self.truncations.inc(counters.get("truncated", 0))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

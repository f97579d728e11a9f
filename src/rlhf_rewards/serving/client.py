""":class:`RemoteRewardFunction` / :class:`AsyncRemoteRewardFunction`: TRL reward functions that score through one
or more ``rlhf-rewards serve`` servers (``POST /v1/rewards``), so a trainer holds no reward model in GPU memory.

Needs only ``httpx`` (the ``serve`` extra); nothing here imports the server side.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import random
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import httpx

from ..conversation import normalize_completion, normalize_prompt
from ..reward_options import call_baselines, check_aggregate, log_call_metrics, set_options
from .dispatch import Dispatch, Failure, Fatal, RemoteStats
from .sharding import Layout, ServerLimits, Shard, pack

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 502, 503, 504})
"""Answers that mean "try again, maybe elsewhere": overloaded, starting, or a proxy that lost the server."""

_OPTIONS = ("pairing", "group_size", "group_mode", "transform", "parse_templates", "objectives", "aggregate",
            "normalize")
_STAT_KEYS = ("samples", "truncated", "real_tokens", "computed_tokens", "comparisons", "order_disagreements",
              "control_text")


class AsyncRemoteRewardFunction:
    """An async TRL reward function scored by ``rlhf-rewards serve`` servers; TRL awaits async reward functions
    concurrently with the others. Same arguments and results as :class:`RemoteRewardFunction`."""

    def __init__(self, urls: Union[str, Sequence[str]], *, api_key: Optional[str] = None, timeout: float = 120.0,
                 max_retries: int = 5, deadline: Optional[float] = None, backoff: float = 0.5,
                 max_backoff: float = 10.0, max_shard_size: Optional[int] = None, name: Optional[str] = None,
                 baseline_column: Optional[str] = None, pairing: Optional[str] = None,
                 group_size: Optional[int] = None, group_mode: str = "round-robin", transform: str = "logodds",
                 parse_templates: bool = True, objectives: Optional[Mapping[str, float]] = None,
                 aggregate: Optional[str] = None, normalize: Optional[str] = None):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("give at least one server URL, e.g. 'http://rm-node:8000'")
        self.urls = [u.rstrip("/") for u in self.urls]
        for u in self.urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"server URL {u!r} must start with http:// or https://")
        set_options(self, baseline_column=baseline_column, pairing=pairing, group_size=group_size,
                    group_mode=group_mode, transform=transform, parse_templates=parse_templates, normalize=normalize)
        if objectives is not None and (not isinstance(objectives, Mapping) or not objectives):
            raise ValueError(f"objectives must be a non-empty mapping of objective name to weight, got {objectives!r}")
        # the server's model checks the names and weights (a 422 naming its objectives)
        self.objectives = None if objectives is None else dict(objectives)
        self.aggregate = None if aggregate is None else check_aggregate(aggregate)
        if timeout <= 0 or max_retries < 0 or backoff < 0 or (deadline is not None and deadline <= 0):
            raise ValueError("timeout and deadline must be positive, max_retries and backoff non-negative")
        if max_shard_size is not None and max_shard_size < 1:
            raise ValueError(f"max_shard_size must be at least 1, got {max_shard_size}")
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.deadline = deadline
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_shard_size = max_shard_size
        self.__name__ = name or "reward_remote"
        if normalize is not None:
            logger.info("%s: normalize=%r, computed by the server with its own statistics (GET /v1/models states "
                        "them)", self.__name__, normalize)
        self.stats = RemoteStats()
        self._limits: dict[str, ServerLimits] = {}  # per URL, from its /v1/models; dropped when it fails

    def __repr__(self) -> str:
        how = "" if self.normalize is None else f", normalize={self.normalize!r} (computed by the server)"
        return f"{type(self).__name__}({self.__name__}, urls={self.urls!r}{how})"

    def __getstate__(self) -> dict[str, Any]:
        # what a server said of its limits may be stale where the copy runs; the copy asks again
        return {**self.__dict__, "_limits": {}}

    def deadline_for(self, requests: int) -> float:
        """Seconds a call sending ``requests`` requests may take: ``deadline`` when given, else ``timeout`` for each
        request a server must answer in turn, one more ``timeout`` for a failover, and ``max_backoff``."""
        if self.deadline is not None:
            return self.deadline
        return self.timeout * (math.ceil(requests / len(self.urls)) + 1) + self.max_backoff

    # -- HTTP -----------------------------------------------------------------------------------------------------
    route = "/v1/rewards"
    """The endpoint each request goes to; a subclass for another endpoint also overrides :meth:`_request_options`
    and :meth:`_read_answer`."""

    def _request_options(self) -> dict[str, Any]:
        """What each request carries beside its samples: this reward function's options."""
        options = {option: getattr(self, option) for option in _OPTIONS}
        if self.normalize is None:  # servers from before normalize= refuse a field they do not know, even null
            del options["normalize"]
        return options

    @staticmethod
    def _read_answer(data: Any, shard: Shard) -> None:
        """Fill ``shard`` from the route's 200 answer; ``ValueError``, ``KeyError`` or ``TypeError`` for an answer
        that is not one (the attempt then failed)."""
        rewards, errors = data["rewards"], data.get("errors") or [None] * len(data["rewards"])
        if len(rewards) != len(shard.indices) or len(errors) != len(rewards):
            raise ValueError(f"{len(rewards)} rewards for {len(shard.indices)} samples")
        if not all(r is None or (isinstance(r, (int, float)) and not isinstance(r, bool)) for r in rewards):
            raise ValueError("rewards that are not numbers")
        shard.rewards, shard.errors = [None if r is None else float(r) for r in rewards], errors
        shard.stats = data.get("stats") or {}

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _wait(self, failures: int, retry_after: Optional[float]) -> float:
        """Seconds to wait after ``failures + 1`` failures in a row: exponential, with jitter so that ranks that
        failed together retry apart, at least the server's ``Retry-After`` (up to ``max_backoff``)."""
        ceiling = min(self.max_backoff, self.backoff * 2 ** failures)
        wait = ceiling / 2 + random.uniform(0, ceiling / 2)
        return max(wait, min(retry_after or 0.0, self.max_backoff))

    async def _probe(self, client: httpx.AsyncClient, url: str, timeout: float) -> Union[ServerLimits, Failure]:
        """What ``url`` takes per request (``GET /v1/models``), or why it did not say. A server without that route
        takes requests with no limit known; a wrong key raises :class:`Fatal`."""
        try:
            response = await client.get(f"{url}/v1/models", headers=self._headers(), timeout=timeout)
        except httpx.TransportError as err:
            return Failure(f"{url}: {type(err).__name__}: {err}")
        if response.status_code in (401, 403):
            raise Fatal(response.status_code, f"{url} answered {response.status_code}: {response.text[:2000]}")
        if response.status_code in RETRY_STATUS:
            return Failure(f"{url} answered {response.status_code} to GET /v1/models",
                           _seconds(response.headers.get("retry-after")))
        try:
            return ServerLimits.parse(response.json() if response.status_code == 200 else None)
        except ValueError:
            return ServerLimits()

    async def _attempt(self, client: httpx.AsyncClient, shard: Shard, url: str, body: dict[str, Any],
                       timeout: float, limits: ServerLimits) -> Optional[Failure]:
        """One try at ``shard`` on ``url``: ``None`` once the shard is filled, else why not. Raises :class:`Fatal`
        for an answer no retry can change."""
        content = json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
        if limits.max_request_bytes is not None and len(content) > limits.max_request_bytes:
            return Failure(f"its request body is {len(content)} bytes, more than the {limits.max_request_bytes} "
                           f"{url} reads (its --max-request-mb)", too_large=True)
        headers = {**self._headers(), "Content-Type": "application/json"}
        try:
            response = await client.post(f"{url}{self.route}", content=content, headers=headers, timeout=timeout)
            if response.status_code == 200:
                self._read_answer(response.json(), shard)
                shard.url = url
                return None
            if response.status_code == 413:
                return Failure(f"{url} answered 413: {response.text[:500]}", too_large=True, refresh=True)
            if response.status_code not in RETRY_STATUS:
                raise Fatal(response.status_code, f"{url} answered {response.status_code}: {response.text[:2000]}")
            return Failure(f"{url} answered {response.status_code}: {response.text[:200]}",
                           _seconds(response.headers.get("retry-after")), alive=True)
        except (httpx.TransportError, ValueError, KeyError, TypeError) as err:
            # connection refused/reset, timeouts, a server that died mid-answer or answered garbage
            return Failure(f"{url}: {type(err).__name__}: {err}")

    # -- the call -------------------------------------------------------------------------------------------------
    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                       **kwargs: Any) -> list[Optional[float]]:
        """Rewards for TRL: one float (or ``None``) per completion, in order, as the in-process
        :class:`~rlhf_rewards.RewardFunction` with the same options gives them. ``None`` marks a sample the server
        could not score (reason logged as a warning) or one no server scored (reason logged as an error)."""
        baselines = call_baselines(prompts, completions, self.baseline_column, kwargs)
        start = time.monotonic()
        sent = {"prompts": _sendable(prompts, "prompts", normalize_prompt),
                "completions": _sendable(completions, "completions", normalize_completion)}
        if baselines is not None:
            sent["baselines"] = _sendable(baselines, self.baseline_column, normalize_completion)
        unsendable: dict[int, str] = {}
        for _, bad in sent.values():
            for i, why in bad.items():
                unsendable.setdefault(i, why)
        layout = Layout(self.pairing, self.group_size, self.group_mode, baselines is not None, self.normalize)
        units, whole = layout.units(prompts)
        options = self._request_options()

        def payload(shard: Shard) -> dict[str, Any]:
            indices = shard.indices
            return {**{key: [values[i] for i in indices] for key, (values, _) in sent.items()}, **options}

        async with httpx.AsyncClient(verify=_ssl_context()) as client:
            dispatch = Dispatch(self, client, layout, payload)
            shards: list[Shard] = []
            if units:
                down = await dispatch.probe(None if self.deadline is None else start + self.deadline)
                # a batch without its pairing's layout goes whole, for the server to say what is wrong
                limits = dispatch.limits() if whole else ServerLimits()
                shards, dispatch.refused = pack(units, layout, self.pairing == "halves" and whole,
                                                shards=len(self.urls), max_samples=self.max_shard_size,
                                                limits=limits)
                deadline = self.deadline_for(len(shards))
                await dispatch.run(shards, down, start + deadline, deadline)
        rewards, reasons, unsent, totals = _collect(len(prompts), dispatch, unsendable)
        stats = dispatch.stats
        stats.calls, stats.samples, stats.unscored, stats.unsent = 1, len(prompts), len(reasons), len(unsent)
        self.stats.add(stats)
        if reasons:
            _log_unscored(self.__name__, len(rewards), reasons, unsent)
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            log_call_metrics(log_metric, self.__name__, totals, time.monotonic() - start,
                             len(reasons) / max(len(rewards), 1))
            log_metric(f"{self.__name__}/unsent", float(len(unsent)))
        return rewards


class RemoteRewardFunction(AsyncRemoteRewardFunction):
    """A TRL reward function (``reward_funcs=[...]``) scored by ``rlhf-rewards serve`` servers' ``/v1/rewards``.

    Each call sends the batch as a few large requests, about one per server, and returns exactly what
    :class:`~rlhf_rewards.RewardFunction` with the same options returns in-process: one float per completion,
    ``None`` for a sample that could not be scored. ``pairing="group"`` groups and online-DPO pairs are never split
    across requests. Each server says in ``GET /v1/models`` (asked once per URL, again after a failure or a 413)
    how many items it takes per request (an item is one model input of a scalar model, one comparison of a
    pairwise model: a round-robin group of ``G`` is ``G(G-1)/2``) and how many bytes; larger batches go in more
    requests, one at a time per server. A group or pair larger than that is ``None``, its reason logged.

    Args:
        urls: one base URL (``"http://rm-node:8000"``) or several; the batch is sharded across them. Each URL has
            one request in flight at a time; a request that fails goes to whichever server is free next, and a
            server that does not answer is asked ``GET /v1/models`` (a cheap probe) until it does, rather than given
            more work.
        api_key: sent as ``Authorization: Bearer <api_key>``.
        timeout: seconds one HTTP request may take (a probe: at most 10 s).
        max_retries: further attempts per request after a connection error, a timeout or a 429/502/503/504, on the
            next free server, after an exponential backoff (``backoff * 2**failures`` seconds, at most
            ``max_backoff``, with jitter; a ``Retry-After`` is honoured); a server that failed ``max_retries + 1``
            times in a row (probes included) gets no more work in this call. Other answers (a 401, a 422 for
            options the model cannot use) raise ``RuntimeError`` / ``ValueError``: retrying cannot fix them.
        deadline: seconds a call may take in all; samples not scored by then are ``None`` (logged as an error),
            so the training step goes on. Default: ``(k + 1) * timeout + max_backoff``, where ``k`` is how many
            requests each server must answer in turn (1 unless the batch is more than the servers take per
            request): the time for every request to take its full timeout plus one failover that does too. With
            the defaults and one request per server: 250 s.
        max_shard_size: at most this many samples per request (default: the batch split evenly over the URLs).
        name: the function's ``__name__``, TRL's logging key (default ``"reward_remote"``).
        baseline_column, pairing, group_size, group_mode, transform, parse_templates, objectives, aggregate: as
            for :class:`~rlhf_rewards.RewardFunction` (``aggregate``: a process reward model server's step rewards
            become one reward per completion by it).
        normalize: as for :class:`~rlhf_rewards.RewardFunction`, computed by the server: ``"stats"`` with the
            statistics its ``GET /v1/models`` states (``serve --calibration``, else the checkpoint config's OpenRLHF
            ``mean``/``std``; a server without any answers 422, raised here as ``ValueError``); ``"group"`` sends
            each group whole in one request (``group_size``, else runs of equal consecutive prompts). Every server
            behind one function must be started with the same calibration.

    ``stats`` (:class:`~rlhf_rewards.serving.dispatch.RemoteStats`) counts, over all calls, the samples returned
    as ``None`` and those no server scored, requests, failed attempts and splits. ``log_metric``, when the trainer
    passes it, receives the same metrics as :class:`~rlhf_rewards.RewardFunction`'s, from the servers' counters,
    plus ``<name>/unsent``: samples of the call no server scored. It pickles as its configuration (no connection
    is held between calls).
    """

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                 **kwargs: Any) -> list[Optional[float]]:
        call = AsyncRemoteRewardFunction.__call__(self, prompts, completions, completion_ids, **kwargs)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return _run(call)
        # called from inside an event loop (a notebook, an async trainer): run on a thread with its own loop
        result: dict[str, Any] = {}

        def target():
            try:
                result["value"] = _run(call)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                result["error"] = err

        thread = threading.Thread(target=target, name="rlhf-rewards-remote")
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"]


def _run(call):
    try:
        return asyncio.run(call)
    except Fatal as err:
        # a 422 is what RewardFunction raises ValueError for in-process (e.g. a batch not made of whole groups)
        raise (ValueError if err.status == 422 else RuntimeError)(str(err)) from None


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    # httpx's default verifying context, built once per process: loading the CA bundle takes ~50 ms a call
    return httpx.create_ssl_context()


def _seconds(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _sendable(values: Sequence[Any], name: str, normalize: Callable[[Any, str], Any]
              ) -> tuple[list[Any], dict[int, str]]:
    """``values`` as they can go into a JSON body: one that cannot (bytes, an object, a lone surrogate, NaN) goes
    as ``null``, which the server reports per sample, and its reason is the one scoring in-process gives (else
    why it cannot be sent)."""
    out, bad = list(values), {}
    for i, value in enumerate(values):
        try:
            if isinstance(value, str):
                value.encode("utf-8")
            else:
                json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
            continue
        except (TypeError, ValueError, RecursionError) as err:  # UnicodeEncodeError is a ValueError
            problem = f"{name}[{i}]: cannot be sent to the server as JSON ({type(err).__name__}: {err})"
        try:
            normalize(value, f"{name}[{i}]")
        except (ValueError, TypeError) as err:
            problem = str(err)
        out[i], bad[i] = None, problem
    return out, bad


def _collect(n: int, dispatch: Dispatch, unsendable: dict[int, str]
             ) -> tuple[list[Optional[float]], dict[int, str], set[int], dict[str, float]]:
    """The call's rewards in order, the reason of each ``None``, the samples no server scored, and the servers'
    counters summed."""
    rewards: list[Optional[float]] = [None] * n
    reasons: dict[int, str] = {}
    unsent: set[int] = set()
    totals = dict.fromkeys(_STAT_KEYS, 0.0)
    for shard in dispatch.done:
        if shard.rewards is None:
            for i in shard.indices:
                reasons[i] = shard.failure or "no server scored it"
                unsent.add(i)
            continue
        for local, (i, r, e) in enumerate(zip(shard.indices, shard.rewards, shard.errors)):
            rewards[i] = r
            if r is None:  # the server's reason names the sample's index in the request it was sent in
                reasons[i] = f"{shard.url}, sample {local} of its request: {e or 'no reward returned'}"
        for key in _STAT_KEYS:
            totals[key] += float(shard.stats.get(key, 0.0))
    for unit, why in dispatch.refused:
        for i in unit:
            reasons[i] = why
            unsent.add(i)
    for i, why in unsendable.items():
        if rewards[i] is None:
            reasons[i] = why
    return rewards, reasons, unsent, totals


def _log_unscored(name: str, n: int, reasons: dict[int, str], unsent: set[int]) -> None:
    """One record for the call: an error when some samples reached no server or none was scored (the training step
    runs without those rewards), a warning when the server found samples it cannot score, as in-process."""
    level = logging.ERROR if unsent or len(reasons) == n else logging.WARNING
    lost = f" ({len(unsent)} got no answer from any server)" if unsent else ""
    by_reason: dict[str, list[int]] = {}
    for i in sorted(reasons):
        by_reason.setdefault(reasons[i], []).append(i)
    lines = [f"  {_ranges(indices)}: {why}" for why, indices in by_reason.items()]
    logger.log(level, "%s: %d of %d samples not scored, returned as None%s:\n%s", name, len(reasons), n, lost,
               "\n".join(lines))


def _ranges(indices: list[int]) -> str:
    """``sample 3`` or ``samples 0-7, 9`` for sorted indices."""
    if len(indices) == 1:
        return f"sample {indices[0]}"
    spans: list[str] = []
    start = prev = indices[0]
    for i in indices[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return "samples " + ", ".join(spans)

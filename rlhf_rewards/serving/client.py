""":class:`RemoteRewardFunction` / :class:`AsyncRemoteRewardFunction`: TRL reward functions that score through one
or more ``rlhf-rewards serve`` servers (``POST /v1/rewards``), so a trainer holds no reward model in GPU memory.

Needs only ``httpx`` (the ``serve`` extra); nothing here imports the server side.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any, Optional, Union

import httpx

from ..trainers.inputs import call_baselines, set_options
from ..trainers.reward_function import log_call_metrics

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 502, 503, 504})
"""Answers that mean "try again, maybe elsewhere": overloaded, starting, or a proxy that lost the server."""

_OPTIONS = ("pairing", "group_size", "group_mode", "transform", "parse_templates")
_STAT_KEYS = ("samples", "truncated", "real_tokens", "computed_tokens", "comparisons", "order_disagreements",
              "control_text")


class _Fatal(Exception):
    """A server refused the request itself (wrong options, wrong key): retrying cannot help."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Shard:
    """Sample indices sent together to one server: whole groups, and both halves of online-DPO pairs."""

    def __init__(self, indices: list[int]):
        self.indices = indices
        self.rewards: Optional[list[Optional[float]]] = None
        self.errors: list[Optional[str]] = []
        self.stats: dict[str, float] = {}
        self.failure: Optional[str] = None
        self.url: Optional[str] = None


class AsyncRemoteRewardFunction:
    """An async TRL reward function scored by ``rlhf-rewards serve`` servers; TRL awaits async reward functions
    concurrently with the others. Same arguments and results as :class:`RemoteRewardFunction`."""

    def __init__(self, urls: Union[str, Sequence[str]], *, api_key: Optional[str] = None, timeout: float = 120.0,
                 max_retries: int = 5, deadline: Optional[float] = None, backoff: float = 0.5,
                 max_backoff: float = 10.0, max_shard_size: Optional[int] = None, name: Optional[str] = None,
                 baseline_column: Optional[str] = None, pairing: Optional[str] = None,
                 group_size: Optional[int] = None, group_mode: str = "round-robin", transform: str = "logodds",
                 parse_templates: bool = True):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("give at least one server URL, e.g. 'http://rm-node:8000'")
        self.urls = [u.rstrip("/") for u in self.urls]
        for u in self.urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"server URL {u!r} must start with http:// or https://")
        set_options(self, baseline_column=baseline_column, pairing=pairing, group_size=group_size,
                    group_mode=group_mode, transform=transform, parse_templates=parse_templates)
        if timeout <= 0 or max_retries < 0 or backoff < 0 or (deadline is not None and deadline <= 0):
            raise ValueError("timeout and deadline must be positive, max_retries and backoff non-negative")
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.deadline = deadline
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_shard_size = max_shard_size
        self.__name__ = name or "reward_remote"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__name__}, urls={self.urls!r})"

    # -- sharding -------------------------------------------------------------------------------------------------
    def _units(self, prompts: Sequence[Any]) -> list[list[int]]:
        """The smallest sets of samples that must be scored together, in order."""
        n = len(prompts)
        if self.pairing == "halves" and n % 2 == 0:
            half = n // 2
            return [[i, i + half] for i in range(half)]
        if self.pairing == "group":
            if self.group_size is not None:
                if n % self.group_size:
                    return [list(range(n))]  # the server explains what is wrong with the layout
                return [list(range(s, s + self.group_size)) for s in range(0, n, self.group_size)]
            units: list[list[int]] = []
            for i in range(n):
                if units and prompts[i] == prompts[units[-1][0]]:
                    units[-1].append(i)
                else:
                    units.append([i])
            return units
        if self.pairing == "halves":
            return [list(range(n))]
        return [[i] for i in range(n)]

    def _shards(self, prompts: Sequence[Any]) -> list[_Shard]:
        units = self._units(prompts)
        count = max(1, min(len(self.urls), len(units)))
        size = -(-len(prompts) // count)
        if self.max_shard_size:
            size = min(size, self.max_shard_size)
        shards: list[list[int]] = [[]]
        for unit in units:
            if shards[-1] and len(shards[-1]) + len(unit) > size:
                shards.append([])
            shards[-1].extend(unit)
        if self.pairing == "halves" and len(prompts) % 2 == 0:
            # units are (i, i + n/2) pairs; each shard keeps online DPO's layout: first candidates, then second ones
            shards = [s[0::2] + s[1::2] for s in shards]
        return [_Shard(s) for s in shards if s]

    # -- HTTP -----------------------------------------------------------------------------------------------------
    def _payload(self, shard: _Shard, prompts, completions, baselines) -> dict[str, Any]:
        body: dict[str, Any] = {"prompts": [prompts[i] for i in shard.indices],
                                "completions": [completions[i] for i in shard.indices]}
        if baselines is not None:
            body["baselines"] = [baselines[i] for i in shard.indices]
        for option in _OPTIONS:
            body[option] = getattr(self, option)
        return body

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _wait(self, attempt: int, retry_after: Optional[float]) -> float:
        ceiling = min(self.max_backoff, self.backoff * 2 ** attempt)
        wait = ceiling / 2 + random.uniform(0, ceiling / 2)  # jitter: ranks that failed together retry apart
        return max(wait, min(retry_after or 0.0, self.max_backoff))

    async def _send(self, client: Any, shard: _Shard, start_url: int, body: dict[str, Any],
                    stop_at: float) -> None:
        """Score one shard: attempts (:meth:`_attempt`, each on the next URL) with backoff until one fills the shard,
        the retries run out or ``stop_at`` passes; then ``shard.failure`` says why."""
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            remaining = stop_at - time.monotonic()
            if remaining <= 0:
                break
            failure, retry_after = await self._attempt(client, shard, start_url + attempt, body, remaining)
            if failure is None:
                return
            last = failure
            logger.info("%s: attempt %d for %d samples failed (%s)", self.__name__, attempt + 1,
                        len(shard.indices), last)
            if attempt < self.max_retries:
                await asyncio.sleep(min(self._wait(attempt, retry_after), max(0.0, stop_at - time.monotonic())))
        shard.failure = last

    async def _attempt(self, client: httpx.AsyncClient, shard: _Shard, url_index: int, body: dict[str, Any],
                       remaining: float) -> tuple[Optional[str], Optional[float]]:
        """One try at ``shard`` on URL ``url_index`` (modulo their number): ``(None, None)`` once the shard is
        filled, else why it failed and the server's ``Retry-After`` in seconds. Raises :class:`_Fatal` for an answer
        no retry can change."""
        url = self.urls[url_index % len(self.urls)]
        try:
            response = await client.post(f"{url}/v1/rewards", json=body, headers=self._headers(),
                                         timeout=min(self.timeout, remaining))
            if response.status_code == 200:
                data = response.json()
                rewards = data["rewards"]
                if len(rewards) != len(shard.indices):
                    raise ValueError(f"{len(rewards)} rewards for {len(shard.indices)} samples")
                shard.rewards, shard.errors = rewards, data.get("errors") or [None] * len(rewards)
                shard.stats = data.get("stats") or {}
                shard.url = url
                return None, None
            if response.status_code not in RETRY_STATUS:
                raise _Fatal(response.status_code, f"{url} answered {response.status_code}: "
                                                   f"{response.text[:2000]}")
            return f"{url} answered {response.status_code}", _seconds(response.headers.get("retry-after"))
        except (httpx.TransportError, ValueError, KeyError, TypeError) as err:
            # connection refused/reset, timeouts, a server that died mid-answer or answered garbage
            return f"{url}: {type(err).__name__}: {err}", None

    # -- the call -------------------------------------------------------------------------------------------------
    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                       **kwargs: Any) -> list[Optional[float]]:
        """Rewards for TRL: one float (or ``None``) per completion, in order, as the in-process
        :class:`~rlhf_rewards.RewardFunction` with the same options gives them. ``None`` marks a sample the server
        could not score (reason logged) or one no server scored before the deadline."""
        baselines = call_baselines(prompts, completions, self.baseline_column, kwargs)
        start = time.monotonic()
        stop_at = start + (self.deadline if self.deadline is not None
                           else (self.timeout + self.max_backoff) * (self.max_retries + 1))
        shards = self._shards(prompts)
        async with httpx.AsyncClient(verify=_ssl_context()) as client:
            await asyncio.gather(*(self._send(client, shard, k, self._payload(shard, prompts, completions, baselines),
                                              stop_at) for k, shard in enumerate(shards)))
        rewards: list[Optional[float]] = [None] * len(prompts)
        reasons: dict[int, str] = {}
        totals = dict.fromkeys(_STAT_KEYS, 0.0)
        for shard in shards:
            if shard.rewards is None:
                for i in shard.indices:
                    reasons[i] = f"no server scored it before the deadline: {shard.failure}"
                continue
            for local, (i, r, e) in enumerate(zip(shard.indices, shard.rewards, shard.errors)):
                rewards[i] = r
                if r is None:  # the server's reason names the sample's index in the request it was sent in
                    reasons[i] = f"{shard.url}, sample {local} of its request: {e or 'no reward returned'}"
            for key in _STAT_KEYS:
                totals[key] += float(shard.stats.get(key, 0.0))
        if reasons:
            logger.warning("%s: %d of %d samples not scored:\n%s", self.__name__, len(reasons), len(rewards),
                           "\n".join(f"  sample {i}: {reasons[i]}" for i in sorted(reasons)))
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            log_call_metrics(log_metric, self.__name__, totals, time.monotonic() - start,
                             len(reasons) / max(len(rewards), 1))
        return rewards


class RemoteRewardFunction(AsyncRemoteRewardFunction):
    """A TRL reward function (``reward_funcs=[...]``) scored by ``rlhf-rewards serve`` servers' ``/v1/rewards``.

    Each call sends the batch as a few large requests, one per server (``pairing="group"`` groups and online-DPO
    pairs are never split), and returns exactly what :class:`~rlhf_rewards.RewardFunction` with the same options
    returns in-process: one float per completion, ``None`` for a sample that could not be scored.

    Args:
        urls: one base URL (``"http://rm-node:8000"``) or several; the batch is sharded across them.
        api_key: sent as ``Authorization: Bearer <api_key>``.
        timeout: seconds one HTTP attempt may take.
        max_retries: further attempts per shard after a connection error, a timeout or a 429/502/503/504, each on
            the next URL, after an exponential backoff (``backoff * 2**attempt`` seconds, at most ``max_backoff``,
            with jitter; a ``Retry-After`` is honoured). Other answers (a 401, a 422 for options the model cannot
            use) raise ``RuntimeError``: retrying cannot fix them.
        deadline: seconds a call may take in all; samples not scored by then are ``None`` (reason logged), so the
            training step goes on. Default: enough for every retry to time out.
        max_shard_size: at most this many samples per request (default: the batch split evenly over the URLs).
        name: the function's ``__name__``, TRL's logging key (default ``"reward_remote"``).
        baseline_column, pairing, group_size, group_mode, transform, parse_templates: as for
            :class:`~rlhf_rewards.RewardFunction`.

    It pickles as its configuration (no connection is held between calls). ``log_metric``, when the trainer passes
    it, receives the same metrics as :class:`~rlhf_rewards.RewardFunction`'s, from the servers' counters.
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
    except _Fatal as err:
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

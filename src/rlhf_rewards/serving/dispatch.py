"""Sending one remote reward-function call's requests: one worker per server URL takes requests from a shared
queue, so a server that stalls holds at most the one request it was given, which then fails over to whichever
server is free; a server that stops answering is probed (``GET /v1/models``) until it answers again instead of
being handed work; a request the server finds too large is split.

The transport (HTTP in :mod:`~rlhf_rewards.serving.client`, a Ray Serve handle in
:mod:`~rlhf_rewards.serving.ray_client`) supplies ``_probe`` and ``_attempt``; everything else is shared.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from .sharding import Layout, ServerLimits, Shard, split

if TYPE_CHECKING:
    from .client import AsyncRemoteRewardFunction

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 10.0
"""Seconds a ``GET /v1/models`` probe may take (at most ``timeout``): it does no model work, so a live server
answers it in milliseconds even while busy."""

_MIN_TIMEOUT = 0.001  # a timeout of 0 would mean "none" to some transports
_stats_lock = threading.Lock()  # module-level: the counters pickle with their function, a lock would not


class Fatal(Exception):
    """A server refused the request itself (wrong options, wrong key): retrying cannot help."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Failure:
    """Why one attempt got no rewards.

    Attributes:
        reason: what happened, naming the server.
        retry_after: the server's ``Retry-After`` in seconds.
        alive: the server answered (busy, loading); otherwise it did not (refused, reset, timed out) and is probed
            before it gets more work.
        too_large: the request is more than the server takes (HTTP 413, or a body over its byte limit): it is
            split rather than retried.
        refresh: the server's answer may mean its limits changed (a 413 it sent): ask for them again.
    """

    reason: str
    retry_after: Optional[float] = None
    alive: bool = False
    too_large: bool = False
    refresh: bool = False


@dataclass
class _Worker:
    url: str
    failures: int = 0  # in a row, probes included; past max_retries the worker gives up on its server
    down: Optional[str] = None  # why its server is thought unreachable: probe it before handing it work
    resume_at: float = 0.0
    gave_up: bool = False


@dataclass
class RemoteStats:
    """Counters of a remote reward function's calls: per call, and summed over calls in the function's ``stats``.

    Attributes:
        calls: calls made.
        samples: samples asked for.
        unscored: samples returned as ``None``, for any reason (their reasons are logged).
        unsent: of those, samples no server scored: every attempt failed, the deadline passed, or their group or
            pair is more than any server takes in one request.
        requests: requests answered with rewards.
        failed_attempts: requests and ``/v1/models`` probes that failed (each retried, or given up on).
        splits: requests refused as too large and sent again in smaller pieces.
    """

    calls: int = 0
    samples: int = 0
    unscored: int = 0
    unsent: int = 0
    requests: int = 0
    failed_attempts: int = 0
    splits: int = 0

    def add(self, other: RemoteStats) -> None:
        with _stats_lock:  # one function may be called from several threads at once (verl's executor)
            for name in vars(other):
                setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Dispatch:
    """One call's requests: :meth:`probe` the servers whose limits are not known, then :meth:`run` the shards."""

    fn: AsyncRemoteRewardFunction
    client: Any
    layout: Layout
    payload: Callable[[Shard], dict[str, Any]]
    stats: RemoteStats = field(default_factory=RemoteStats)
    refused: list[tuple[list[int], str]] = field(default_factory=list)
    done: list[Shard] = field(default_factory=list)
    last_failure: Optional[str] = None

    async def probe(self, stop_at: Optional[float]) -> dict[str, Optional[str]]:
        """The servers whose limits are not known, each with why it is thought unreachable (``None``: not asked
        yet); their workers ask them before giving them work. When no server's limits are known, all are asked at
        once and this waits for the first answer (or for every one to fail): sharding needs one. A wrong key
        raises :class:`Fatal`."""
        urls = [u for u in dict.fromkeys(self.fn.urls) if u not in self.fn._limits]
        down: dict[str, Optional[str]] = {}
        if len(urls) == len(set(self.fn.urls)):
            tasks = {asyncio.ensure_future(self._probe(u, stop_at)): u for u in urls}
            waiting = set(tasks)
            try:
                while waiting and not any(u in self.fn._limits for u in urls):
                    finished, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    for task in finished:
                        failure = task.result()
                        if failure is not None:
                            down[tasks[task]] = failure.reason
            finally:
                for task in waiting:
                    task.cancel()
                await asyncio.gather(*waiting, return_exceptions=True)
            self.stats.failed_attempts += len(down)
        return {u: down.get(u) for u in urls if u not in self.fn._limits}

    async def _probe(self, url: str, stop_at: Optional[float]) -> Optional[Failure]:
        timeout = min(self.fn.timeout, PROBE_TIMEOUT)
        if stop_at is not None:
            timeout = min(timeout, max(_MIN_TIMEOUT, stop_at - time.monotonic()))
        answer = await self.fn._probe(self.client, url, timeout)
        if isinstance(answer, ServerLimits):
            self.fn._limits[url] = answer
            return None
        self.fn._limits.pop(url, None)
        self.last_failure = answer.reason
        logger.info("%s: %s does not answer: %s", self.fn.__name__, url, answer.reason)
        return answer

    def limits(self) -> ServerLimits:
        """What every server known to answer takes (a request may fail over to any of them)."""
        return ServerLimits.tightest(self.fn._limits[u] for u in self.fn.urls if u in self.fn._limits)

    async def run(self, shards: list[Shard], down: dict[str, Optional[str]], stop_at: float, deadline: float
                  ) -> None:
        """Send ``shards`` until each is scored, has used its attempts, or ``stop_at`` (``deadline`` seconds after
        the call began) passes; every shard ends in ``done``, a failed one saying why in ``failure``. Requests are
        split when too large; units no server takes go to ``refused``."""
        self.pending: collections.deque[Shard] = collections.deque(shards)
        self.sending: list[Shard] = []
        self.stop_at = stop_at
        self.fatal: Optional[Fatal] = None
        self._changed = asyncio.Event()
        self._finished = asyncio.Event()
        now = time.monotonic()
        self.workers = [_Worker(u) for u in self.fn.urls]
        for w in self.workers:
            if w.url not in down:
                continue
            w.down = down[w.url] or "not asked yet"
            if down[w.url] is not None:  # it failed the probe just made: wait a backoff before probing it again
                w.failures = 1
                w.resume_at = now + self.fn._wait(0, None)
        tasks = [asyncio.ensure_future(self._work(w)) for w in self.workers]
        self._check_finished()
        try:
            await asyncio.wait_for(self._finished.wait(), max(0.0, stop_at - time.monotonic()))
        except asyncio.TimeoutError:
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.fatal is not None:
            raise self.fatal
        if time.monotonic() >= stop_at:
            why = f"no server scored it before the deadline ({deadline:g} s)"
        else:
            why = f"no server scored it: each failed {self.fn.max_retries + 1} times in a row"
        for shard in [*self.sending, *self.pending]:
            shard.failure = f"{why}; {shard.failure or self.last_failure or 'no server was free'}"
            self.done.append(shard)

    # -- one worker per URL -----------------------------------------------------------------------------------------
    async def _work(self, w: _Worker) -> None:
        try:
            while not self._finished.is_set():
                now = time.monotonic()
                if now >= self.stop_at or w.failures > self.fn.max_retries:
                    w.gave_up = True
                    break
                if w.resume_at > now:
                    await asyncio.sleep(min(w.resume_at, self.stop_at) - now)
                elif w.down is not None:
                    failure = await self._probe(w.url, self.stop_at)
                    if failure is None:
                        w.down = None
                    else:
                        self._failed(w, failure)
                    self._notify()
                else:
                    shard = self._take(w)
                    if shard is None:
                        changed = self._changed
                        try:
                            await asyncio.wait_for(changed.wait(), max(0.0, self.stop_at - now))
                        except asyncio.TimeoutError:
                            pass
                        continue
                    self.sending.append(shard)
                    await self._send(w, shard)  # cancelled at the deadline, the shard stays in sending: run reports it
                    self.sending.remove(shard)
                    self._notify()
        except Fatal as err:
            self.fatal = err
            self._finished.set()
        finally:
            self._notify()

    def _take(self, w: _Worker) -> Optional[Shard]:
        """The next request for ``w``: not one that just failed on its server while another server can take it."""
        others = any(v.url != w.url and not v.gave_up and v.down is None for v in self.workers)
        for shard in self.pending:
            if shard.last_url != w.url or not others:
                self.pending.remove(shard)
                return shard
        return None

    async def _send(self, w: _Worker, shard: Shard) -> None:
        limits = self.fn._limits.get(w.url, ServerLimits())
        if limits.max_request_items is not None and shard.items(self.layout, limits.kind) > limits.max_request_items:
            self._split(shard, limits, f"more than the {limits.max_request_items} items {w.url} takes in one request")
            return
        timeout = min(self.fn.timeout, max(_MIN_TIMEOUT, self.stop_at - time.monotonic()))
        failure = await self.fn._attempt(self.client, shard, w.url, self.payload(shard), timeout, limits)
        if failure is None:
            w.failures = 0
            self.stats.requests += 1
            self.done.append(shard)
        elif failure.too_large:
            if failure.refresh:  # the server may have been restarted with other limits
                await self._probe(w.url, self.stop_at)
            self._split(shard, self.fn._limits.get(w.url, limits), failure.reason)
        else:
            shard.attempts += 1
            shard.last_url = w.url
            shard.failure = failure.reason
            logger.info("%s: attempt %d for %d samples failed (%s)", self.fn.__name__, shard.attempts,
                        len(shard.indices), failure.reason)
            if shard.attempts > self.fn.max_retries:
                shard.failure = f"no server scored it: {shard.attempts} attempts failed, the last: {failure.reason}"
                self.done.append(shard)
            else:
                self.pending.appendleft(shard)
            self._failed(w, failure)

    def _split(self, shard: Shard, limits: ServerLimits, why: str) -> None:
        pieces, refused = split(shard, self.layout, limits, why)
        self.stats.splits += 1
        self.refused += refused
        self.pending.extendleft(reversed(pieces))

    def _failed(self, w: _Worker, failure: Failure) -> None:
        self.stats.failed_attempts += 1
        self.last_failure = failure.reason
        w.failures += 1
        if not failure.alive:
            w.down = failure.reason
        w.resume_at = time.monotonic() + self.fn._wait(w.failures - 1, failure.retry_after)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        self._check_finished()

    def _check_finished(self) -> None:
        if (not self.pending and not self.sending) or all(w.gave_up for w in self.workers):
            self._finished.set()

"""Cross-request batching: concurrent submissions merged into one model call, run one at a time on one thread.

The reward model is not thread-safe and a GPU runs one forward at a time anyway, so every model call goes through
one worker thread. Requests that arrive while it is busy, or within ``max_wait`` of the oldest waiting one, are
concatenated (up to a token budget) into the next call; each submitter gets back exactly its own slice, in order.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence


class QueueFull(RuntimeError):
    """The batcher already holds ``max_queue`` waiting items; the caller should retry later (HTTP 503)."""


Counters = dict[str, float]
RunFn = Callable[[list[Any]], tuple[list[Any], Counters]]
"""Runs the model on a merged list of items; returns one result per item and counters describing the call
(e.g. forward batches and tokens), which each submitter receives its share of."""


class BatchObserver(Protocol):
    def observe_batch(self, items: int, waits: Sequence[float], counters: Counters) -> None: ...


@dataclass
class _Job:
    items: list[Any]
    cost: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    """Merges concurrent :meth:`submit` calls into calls of ``run`` on a single worker thread.

    Args:
        run: the model call (see :data:`RunFn`); it runs only on the batcher's thread, never two at once.
        max_batch_tokens: a merged call stops taking submissions once their summed ``cost`` would pass this (a
            single submission larger than it still runs, alone).
        max_wait_ms: how long the oldest waiting submission may wait for others to join it. ``0`` turns merging
            off: one submission per call.
        max_queue: items (summed ``len(items)``) allowed to wait; beyond it :meth:`submit` raises
            :class:`QueueFull`.
        observer: told of every merged call (for metrics).
        company: how many submitters may submit soon (e.g. requests being parsed); when it says none, a
            submission runs at once instead of waiting ``max_wait_ms`` for company that cannot come.

    The batcher binds to the event loop of its first :meth:`submit` (it starts lazily, so it works under uvicorn,
    inside a Ray Serve replica, or in tests that bring their own loop).
    """

    def __init__(self, run: RunFn, *, max_batch_tokens: int, max_wait_ms: float, max_queue: int,
                 observer: Optional[BatchObserver] = None, company: Optional[Callable[[], int]] = None):
        if max_batch_tokens < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError(f"need max_batch_tokens >= 1, max_wait_ms >= 0, max_queue >= 1; got "
                             f"{max_batch_tokens}, {max_wait_ms}, {max_queue}")
        self._run = run
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._observer = observer
        self._company = company
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlhf-rewards-model")
        self._pending: collections.deque[_Job] = collections.deque()
        self._queued_items = 0
        self._wakeup: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    @property
    def queued_items(self) -> int:
        """Items waiting for the model (not counting the call in progress)."""
        return self._queued_items

    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._loop is loop:
            return
        self._loop = loop
        self._wakeup = asyncio.Event()
        self._task = loop.create_task(self._serve(), name="rlhf-rewards-batcher")
        if self._pending:
            self._wakeup.set()

    async def submit(self, items: list[Any], cost: int) -> tuple[list[Any], Counters]:
        """Run ``items`` in a coming merged call; return their results and their share of its counters (split by
        item count). Exceptions from ``run`` for these items are raised here; another submission's failure never
        is (a failed merged call is rerun one submission at a time)."""
        if not items:
            return [], {}
        self._ensure_started()
        if self._queued_items + len(items) > self.max_queue:
            raise QueueFull(f"{self._queued_items} items already wait for the model (limit {self.max_queue})")
        job = _Job(items, cost, self._loop.create_future())
        self._pending.append(job)
        self._queued_items += len(items)
        self._wakeup.set()
        return await job.future

    def submit_from_thread(self, loop: asyncio.AbstractEventLoop, items: list[Any], cost: int
                           ) -> tuple[list[Any], Counters]:
        """:meth:`submit` from a worker thread (not the loop's): blocks until the results are back."""
        return asyncio.run_coroutine_threadsafe(self.submit(items, cost), loop).result()

    async def close(self) -> None:
        """Stop the batcher after the call in progress; waiting submissions fail with :class:`QueueFull`."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(QueueFull("the server is shutting down"))
        self._executor.shutdown(wait=False)

    async def _collect(self) -> list[_Job]:
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        jobs = [self._pending.popleft()]
        if self.max_wait <= 0:
            return jobs
        cost = jobs[0].cost
        deadline = jobs[0].enqueued + self.max_wait
        while cost < self.max_batch_tokens:
            if not self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._company is not None and self._company() <= 0):
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                continue
            if cost + self._pending[0].cost > self.max_batch_tokens:
                break
            job = self._pending.popleft()
            jobs.append(job)
            cost += job.cost
        return jobs

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            self._queued_items -= sum(len(j.items) for j in jobs)
            # a submitter that went away (client disconnect) no longer needs its items computed
            jobs = [j for j in jobs if not j.future.done()]
            if not jobs:
                continue
            started = time.monotonic()
            items = [item for job in jobs for item in job.items]
            try:
                results, counters = await loop.run_in_executor(self._executor, self._run, items)
            except Exception:
                if len(jobs) == 1:
                    await self._run_alone(loop, jobs[0])
                else:  # find the submission that broke the call; the others still get their results
                    for job in jobs:
                        await self._run_alone(loop, job)
                continue
            if self._observer is not None:
                self._observer.observe_batch(len(items), [started - j.enqueued for j in jobs], counters)
            offset = 0
            for job in jobs:
                n = len(job.items)
                _resolve(job, results[offset:offset + n], _share(counters, n, len(items)))
                offset += n

    async def _run_alone(self, loop: asyncio.AbstractEventLoop, job: _Job) -> None:
        started = time.monotonic()
        try:
            results, counters = await loop.run_in_executor(self._executor, self._run, job.items)
        except Exception as err:  # noqa: BLE001 - the submitter decides what the error means
            if not job.future.done():
                job.future.set_exception(err)
            return
        if self._observer is not None:
            self._observer.observe_batch(len(job.items), [started - job.enqueued], counters)
        _resolve(job, results, counters)


def _share(counters: Counters, part: int, whole: int) -> Counters:
    return {k: v * part / whole for k, v in counters.items()}


def _resolve(job: _Job, results: list[Any], counters: Counters) -> None:
    if not job.future.done():
        job.future.set_result((results, counters))

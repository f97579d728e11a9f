"""Cross-request batching: concurrent submissions merged into model calls, run one at a time on one thread.

The reward model is not thread-safe and a GPU runs one forward at a time anyway, so every model call goes through
one worker thread. Requests that arrive while it is busy, or within ``max_wait`` of the oldest waiting one, are
concatenated (up to a budget of work) into the next call; each submitter gets back exactly its own results, in
order.

Fairness: a call takes at most ``max_call_cost`` of work (each item's cost is the submitter's; the engine counts
characters), and a submission larger than that runs in chunks, going to the back of the queue after each chunk. So
a small request arriving beside a large one waits for one chunk, not for the whole large request. A request whose
client went away is :meth:`Batcher.abandon`-ed: its items still waiting are dropped, never computed.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

Counters = dict[str, int]
RunFn = Callable[[list[Any]], tuple[list[Any], Counters]]
"""Runs the model on a merged list of items; returns one result per item and integer counters describing the call
(e.g. forward batches and tokens), which each submitter receives its share of."""


class QueueFull(RuntimeError):
    """The batcher already holds ``max_queue`` waiting items, or is shutting down; retry later (HTTP 503)."""


class RequestTooLarge(RuntimeError):
    """One submission holds more items than the batcher ever queues for one request (HTTP 413): no retry can
    help, the caller must send fewer samples per request. (Not a ``ValueError``: it must never be mistaken for one
    bad sample.)

    Attributes:
        limit: the name of the limit (``"max_request_items"``); maximum: its value; count: the submission's items.
    """

    def __init__(self, maximum: int, count: int):
        super().__init__(f"this request needs {count} model inputs; the server takes at most {maximum} per request "
                         "(max_request_items): send fewer samples per request")
        self.limit, self.maximum, self.count = "max_request_items", maximum, count


class Abandoned(RuntimeError):
    """The request was abandoned (its client disconnected): its work was dropped."""


class BatchObserver(Protocol):
    def observe_batch(self, items: int, waits: Sequence[float], counters: Counters) -> None: ...


@dataclass(eq=False)
class Ticket:
    """One request's submissions, so they can be dropped together (:meth:`Batcher.abandon`)."""

    abandoned: bool = False
    jobs: set = field(default_factory=set)


@dataclass(eq=False)
class _Job:
    items: list[Any]
    costs: list[int]
    future: concurrent.futures.Future
    ticket: Optional[Ticket]
    enqueued: float = field(default_factory=time.monotonic)
    next: int = 0  # the first item not yet handed to the model
    results: list[Any] = field(default_factory=list)
    counters: Counters = field(default_factory=dict)
    waited: bool = False  # its queueing time has been observed (on its first chunk)

    @property
    def remaining(self) -> int:
        return len(self.items) - self.next


@dataclass(eq=False)
class _Slice:
    job: _Job
    start: int
    stop: int


class Batcher:
    """Merges concurrent :meth:`submit_from_thread` calls into calls of ``run`` on a single worker thread.

    Args:
        run: the model call (see :data:`RunFn`); it runs only on the batcher's thread, never two at once.
        max_call_cost: the summed ``costs`` one call takes; a submission larger than this runs in chunks of at
            most this much (a single item larger than it runs alone).
        max_wait_ms: how long the oldest waiting submission may wait for others to join it. ``0`` turns merging
            off: each call takes items of one submission only.
        max_queue: items allowed to wait; beyond it a submission fails with :class:`QueueFull` (retry later).
        max_request_items: items one submission may hold (at most ``max_queue``, the default); beyond it the
            submission fails with :class:`RequestTooLarge` (it could never be queued).
        observer: told of every merged call (for metrics).
        company: how many submitters may submit soon (e.g. requests being parsed); when it says none, a
            submission runs at once instead of waiting ``max_wait_ms`` for company that cannot come.

    The batcher binds to the event loop its submissions are scheduled on (it starts lazily, so it works under
    uvicorn, inside a Ray Serve replica, or in tests that bring their own loop). Every method but
    :meth:`submit_from_thread` runs on that loop.
    """

    def __init__(self, run: RunFn, *, max_call_cost: int, max_wait_ms: float, max_queue: int,
                 max_request_items: Optional[int] = None, observer: Optional[BatchObserver] = None,
                 company: Optional[Callable[[], int]] = None):
        max_request_items = max_queue if max_request_items is None else max_request_items
        if not (max_call_cost >= 1 and 0 <= max_wait_ms < float("inf") and max_queue >= 1
                and 1 <= max_request_items <= max_queue):
            raise ValueError(f"need max_call_cost >= 1, 0 <= max_wait_ms < inf, max_queue >= 1 and "
                             f"1 <= max_request_items <= max_queue; got max_call_cost={max_call_cost}, "
                             f"max_wait_ms={max_wait_ms}, max_queue={max_queue}, "
                             f"max_request_items={max_request_items}")
        self._run = run
        self.max_call_cost = max_call_cost
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_request_items = max_request_items
        self._observer = observer
        self._company = company
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlhf-rewards-model")
        self._pending: collections.deque[_Job] = collections.deque()
        self._active: set[_Job] = set()  # every unresolved job, queued or in the model
        self._queued_items = 0
        self._running_items = 0
        self._closed = False
        self._wakeup: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    @property
    def queued_items(self) -> int:
        """Items waiting for the model (not counting the call in progress)."""
        return self._queued_items

    @property
    def running_items(self) -> int:
        """Items in the model call in progress."""
        return self._running_items

    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._loop is loop:
            return
        self._loop = loop
        self._wakeup = asyncio.Event()
        self._task = loop.create_task(self._serve(), name="rlhf-rewards-batcher")
        if self._pending:
            self._wakeup.set()

    def submit_from_thread(self, loop: asyncio.AbstractEventLoop, items: list[Any], costs: Sequence[int],
                           ticket: Optional[Ticket] = None) -> tuple[list[Any], Counters]:
        """Run ``items`` (each with its ``cost``) in coming model calls and return their results and
        their share of those calls' counters. Call it from a thread other than ``loop``'s: it blocks until the
        results are back. Raises :class:`RequestTooLarge`, :class:`QueueFull`, :class:`Abandoned`, or what ``run``
        raised for these items (another submission's failure never reaches this one)."""
        if len(costs) != len(items):
            raise ValueError(f"{len(items)} items but {len(costs)} costs")
        if not items:
            return [], {}
        future: concurrent.futures.Future = concurrent.futures.Future()
        loop.call_soon_threadsafe(self._enqueue, _Job(list(items), list(costs), future, ticket))
        return future.result()

    def _enqueue(self, job: _Job) -> None:
        if len(job.items) > self.max_request_items:
            job.future.set_exception(RequestTooLarge(self.max_request_items, len(job.items)))
        elif self._closed:
            job.future.set_exception(QueueFull("the server is shutting down"))
        elif job.ticket is not None and job.ticket.abandoned:
            job.future.set_exception(Abandoned("the request was abandoned"))
        elif self._queued_items + len(job.items) > self.max_queue:
            job.future.set_exception(QueueFull(f"{self._queued_items} items already wait for the model (limit "
                                               f"{self.max_queue}); retry later"))
        else:
            self._ensure_started()
            self._pending.append(job)
            self._active.add(job)
            if job.ticket is not None:
                job.ticket.jobs.add(job)
            self._queued_items += len(job.items)
            self._wakeup.set()

    def abandon(self, ticket: Ticket) -> int:
        """Drop the waiting items of ``ticket``'s submissions (their submitters get :class:`Abandoned`) and refuse
        its later ones; a chunk already in the model finishes. Returns how many items were dropped."""
        ticket.abandoned = True
        dropped = 0
        for job in list(ticket.jobs):
            if job.future.done():
                continue
            dropped += job.remaining
            self._fail(job, Abandoned("the request was abandoned: its client disconnected"))
        return dropped

    def _fail(self, job: _Job, err: BaseException) -> None:
        """Resolve ``job`` with ``err`` and forget its items not yet in the model."""
        self._queued_items -= job.remaining
        job.next = len(job.items)
        try:
            self._pending.remove(job)
        except ValueError:  # in the model call in progress, or never queued
            pass
        self._forget(job)
        if not job.future.done():
            job.future.set_exception(err)

    def _forget(self, job: _Job) -> None:
        self._active.discard(job)
        if job.ticket is not None:
            job.ticket.jobs.discard(job)

    async def close(self) -> None:
        """Stop the batcher after the call in progress; waiting and running submissions fail with
        :class:`QueueFull` at once (their threads must not wait for a loop that is going away)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in list(self._active):
            self._fail(job, QueueFull("the server is shutting down"))
        self._executor.shutdown(wait=False)

    async def _collect(self) -> list[_Slice]:
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        # a job coming back for its next chunk has waited long ago: it never holds a merge window open
        deadline = self._pending[0].enqueued + self.max_wait
        slices: list[_Slice] = []
        cost = 0
        while cost < self.max_call_cost:
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
            job = self._pending[0]
            stop = job.next
            while stop < len(job.items) and (cost + job.costs[stop] <= self.max_call_cost or not slices
                                             and stop == job.next):
                cost += job.costs[stop]
                stop += 1
            if stop == job.next:  # its next item does not fit this call
                break
            self._pending.popleft()
            slices.append(_Slice(job, job.next, stop))
            job.next = stop
            if job.remaining or self.max_wait <= 0:
                break
        return slices

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            slices = await self._collect()
            for s in slices:
                self._queued_items -= s.stop - s.start
            # an abandoned request's chunk may have been taken while the call was still collecting
            slices = [s for s in slices if not s.job.future.done()]
            if not slices:
                continue
            started = time.monotonic()
            items = [item for s in slices for item in s.job.items[s.start:s.stop]]
            self._running_items = len(items)
            try:
                try:
                    results, counters = await loop.run_in_executor(self._executor, self._run, items)
                except Exception:  # find the submission that broke the call; the others still get their results
                    for s in slices:
                        await self._run_alone(loop, s)
                    continue
            finally:
                self._running_items = 0
            if self._observer is not None:
                self._observer.observe_batch(len(items), self._waits(slices, started), counters)
            offset = 0
            for s, share in zip(slices, apportion(counters, [s.stop - s.start for s in slices])):
                n = s.stop - s.start
                self._deliver(s, results[offset:offset + n], share)
                offset += n

    async def _run_alone(self, loop: asyncio.AbstractEventLoop, s: _Slice) -> None:
        started = time.monotonic()
        items = s.job.items[s.start:s.stop]
        try:
            results, counters = await loop.run_in_executor(self._executor, self._run, items)
        except Exception as err:  # noqa: BLE001 - the submitter decides what the error means
            self._fail(s.job, err)
            return
        if self._observer is not None:
            self._observer.observe_batch(len(items), self._waits([s], started), counters)
        self._deliver(s, results, counters)

    @staticmethod
    def _waits(slices: list[_Slice], started: float) -> list[float]:
        waits = [started - s.job.enqueued for s in slices if not s.job.waited]
        for s in slices:
            s.job.waited = True
        return waits

    def _deliver(self, s: _Slice, results: list[Any], counters: Counters) -> None:
        job = s.job
        if job.future.done():  # abandoned while its chunk ran
            return
        job.results.extend(results)
        for name, value in counters.items():
            job.counters[name] = job.counters.get(name, 0) + value
        if job.remaining:
            self._pending.append(job)  # behind everything that arrived meanwhile: round-robin
            self._wakeup.set()
        else:
            self._forget(job)
            job.future.set_result((job.results, job.counters))


def apportion(counters: Counters, parts: Sequence[int]) -> list[Counters]:
    """Split integer ``counters`` into one share per part, proportional to ``parts`` (item counts), as whole
    numbers that add up to the totals (largest remainder first; ties go to the earlier part)."""
    whole = sum(parts)
    shares: list[Counters] = [{} for _ in parts]
    for name, total in counters.items():
        exact = [total * p / whole for p in parts]
        floors = [int(x) for x in exact]
        order = sorted(range(len(parts)), key=lambda i: floors[i] - exact[i])
        for i in order[:total - sum(floors)]:
            floors[i] += 1
        for share, value in zip(shares, floors):
            share[name] = value
    return shares

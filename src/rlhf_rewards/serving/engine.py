""":class:`RewardEngine`: one loaded reward model plus the cross-request batcher in front of it.

Everything a request does besides the forward pass (parsing, validation, rendering in the model's format, the
pairing logic of :class:`~rlhf_rewards.RewardFunction`) runs in the request's own thread on a *view* of the model:
a shallow copy (:meth:`~rlhf_rewards.RewardModel.view`) whose forward entry point
(:meth:`~rlhf_rewards.RewardModel.forward`) hands its inputs to the batcher. So each request is scored by exactly
the code that scores in-process, and only the forward passes of concurrent requests are merged. Each view has its
own ``stats``: a request's metrics are its own (forward counters of a merged call are split by input count).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, TypeVar

from ..backends.base import RewardModel
from ..normalization import Calibration, RewardScale, check_same_model, checkpoint_scale, read_calibration
from .batcher import Batcher, Counters, Ticket
from .metrics import ServerMetrics

T = TypeVar("T")

CHARS_PER_TOKEN = 3
"""Characters per token the engine's default ``max_call_chars`` assumes of the model's ``max_batch_tokens``: merged
calls are sized in characters because tokens cannot be counted outside the model thread (fast tokenizers are not
safe to share between threads). Conservative for English text; the model still packs its forward passes exactly
under its own ``max_batch_tokens``."""

REQUEST_THREAD_PREFIX = "rlhf-rewards-request"


class _NoRequestContent(logging.Filter):
    """RewardFunction logs why a sample was skipped, quoting the input; on a server those reasons go back to the
    client in ``errors`` instead, and request content stays out of the server's logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.threadName.startswith(REQUEST_THREAD_PREFIX)


_NO_REQUEST_CONTENT = _NoRequestContent()
logging.getLogger("rlhf_rewards.trainers.reward_function").addFilter(_NO_REQUEST_CONTENT)

_FORWARD_COUNTERS = ("samples", "truncated", "truncated_tokens", "batches", "real_tokens", "computed_tokens",
                     "oom_splits")


class RewardEngine:
    """A loaded reward model served to concurrent requests, one forward call at a time, merging requests.

    Build it once per process (per Ray Serve replica) and hand it to :func:`rlhf_rewards.serving.build_app`.

    Args:
        model: a model from :func:`rlhf_rewards.load_reward_model`.
        model_id: the name clients see in ``/v1/models`` and ``/classify`` answers (default: the preset's name).
        max_call_chars: how many characters of model inputs (as :meth:`~rlhf_rewards.RewardModel.forward_chars`
            counts them) of concurrent requests one merged model call takes; a larger request runs in chunks of
            this size, taking turns with the others. The model itself still splits a call into forward passes under
            its own ``max_batch_tokens``. Default: :data:`CHARS_PER_TOKEN` times the model's ``max_batch_tokens``.
        max_wait_ms: how long the oldest waiting request may wait for others to join its model call; ``0``: no
            merging, one request per model call.
        max_queue: model inputs allowed to wait for the model before requests are refused (HTTP 503, retry).
        max_request_items: model inputs one request may need (default and maximum: ``max_queue``); a request
            needing more gets HTTP 413, as it could never be queued. A scalar model's input is one text (a
            completion, or a baseline); a pairwise model's is one comparison (run in both orders).
        max_concurrency: requests prepared (parsed, rendered) at once, each on its own thread.
        calibration: the reward statistics requests with ``normalize="stats"`` use (a file from ``rlhf-rewards
            calibrate``, its JSON, or a :class:`~rlhf_rewards.normalization.RewardScale`), taking precedence over the
            checkpoint config's OpenRLHF ``mean``/``std``; ``ValueError`` when it describes another model or preset.
            ``/v1/models`` states what ``"stats"`` uses.
    """

    def __init__(self, model: RewardModel, *, model_id: Optional[str] = None,
                 max_call_chars: Optional[int] = None, max_wait_ms: float = 5.0, max_queue: int = 4096,
                 max_request_items: Optional[int] = None, max_concurrency: int = 64,
                 calibration: Optional[Calibration] = None):
        self.model = model
        self.calibration: Optional[RewardScale] = None if calibration is None else read_calibration(calibration)
        if self.calibration is not None:
            check_same_model(self.calibration, model.name_or_path, model.preset.name)
        self.model_id = model_id or model.preset.name
        self.metrics = ServerMetrics()
        # requests being prepared (parsed, rendered) rather than waiting for the model: the batcher's possible company
        self._preparing = 0
        self._preparing_lock = threading.Lock()
        self.batcher = Batcher(self._forward,
                               max_call_cost=max_call_chars or CHARS_PER_TOKEN * model.max_batch_tokens,
                               max_wait_ms=max_wait_ms, max_queue=max_queue,
                               max_request_items=max_request_items, observer=self.metrics,
                               company=lambda: self._preparing)
        self.metrics.queued_items.set_function(lambda: self.batcher.queued_items)
        self.metrics.running_items.set_function(lambda: self.batcher.running_items)
        self._threads = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix=REQUEST_THREAD_PREFIX)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, load_kwargs: Optional[dict[str, Any]] = None,
                        **engine_kwargs: Any) -> RewardEngine:
        """Load with :func:`rlhf_rewards.load_reward_model(name_or_path, **load_kwargs)` and wrap the model."""
        from ..loading import load_reward_model

        return cls(load_reward_model(name_or_path, **(load_kwargs or {})), **engine_kwargs)

    @property
    def kind(self) -> str:
        """``"scalar"`` or ``"pairwise"``."""
        return self.model.kind

    @property
    def max_queue(self) -> int:
        """Model inputs allowed to wait for the model (beyond: HTTP 503, retry later)."""
        return self.batcher.max_queue

    @property
    def max_request_items(self) -> int:
        """Model inputs (and samples) one request may hold (beyond: HTTP 413, never queued)."""
        return self.batcher.max_request_items

    def describe(self) -> dict[str, Any]:
        """The ``/v1/models`` entry: id, preset, kind, device, dtype, attention implementation, the per-input token
        limit, and the reward statistics ``normalize="stats"`` uses (``None``: none, such requests get a 422)."""
        dtype = getattr(getattr(self.model, "model", None), "dtype", None)
        return {"id": self.model_id, "object": "model", "preset": self.model.preset.name, "kind": self.kind,
                "device": str(self.model.device), "dtype": str(dtype).removeprefix("torch.") if dtype else None,
                "attn_implementation": self.model.attn_implementation, "max_length": self.model.max_length,
                "normalization": self.normalization()}

    def normalization(self) -> dict[str, Any]:
        """What ``normalize=`` can use here: the modes, and the statistics of ``"stats"`` (the calibration, which
        takes precedence, else the checkpoint config's; ``None`` without either)."""
        try:
            scale = self.calibration or checkpoint_scale(self.model)
        except ValueError:  # a config mean/std that cannot be used: a "stats" request gets the 422 saying why
            scale = None
        return {"modes": ["stats", "group"] if scale is not None else ["group"],
                "stats": None if scale is None else scale.describe()}

    def label(self) -> str:
        """The class label ``/classify`` reports, as vLLM does: the model config's ``id2label[0]``."""
        config = getattr(getattr(self.model, "model", None), "config", None)
        return str((getattr(config, "id2label", None) or {}).get(0, "LABEL_0"))

    # -- the model thread -----------------------------------------------------------------------------------------
    def _forward(self, items: list[Any]) -> tuple[list[Any], Counters]:
        model = self.model
        with model.lock:  # in-process RewardFunctions on the same model take turns with the server
            before = model.stats.as_dict()
            results = model.forward(items)
            after = model.stats.as_dict()
        return results, {k: after[k] - before[k] for k in _FORWARD_COUNTERS}

    # -- request threads ------------------------------------------------------------------------------------------
    def view(self, loop: asyncio.AbstractEventLoop, ticket: Optional[Ticket] = None) -> RewardModel:
        """A copy of the model for one request, used from a thread other than ``loop``'s: its forward passes go
        through the batcher running on ``loop`` (under ``ticket``, to drop them if the request is abandoned); its
        ``stats`` count this request's work only."""
        def submit(items: list[Any]) -> list[Any]:
            self._count_preparing(-1)
            try:
                costs = [max(1, chars) for chars in self.model.forward_chars(items)]
                results, counters = self.batcher.submit_from_thread(loop, list(items), costs, ticket)
            finally:
                self._count_preparing(+1)
            for name, value in counters.items():
                setattr(view.stats, name, getattr(view.stats, name) + value)
            return results

        view = self.model.view(submit)
        return view

    async def run(self, work: Callable[[RewardModel], T]) -> T:
        """Run ``work(view)`` on a request thread and return its result; the view's forward passes are merged with
        those of concurrent requests. Cancelling this coroutine (the client went away) abandons the request: its
        inputs still waiting for the model are dropped (counted in ``abandoned_items_total``)."""
        loop = asyncio.get_running_loop()
        ticket = Ticket()
        try:
            return await loop.run_in_executor(self._threads, work, self.view(loop, ticket))
        except asyncio.CancelledError:
            self.metrics.abandoned_items.inc(self.batcher.abandon(ticket))
            raise

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Mark a scoring request as received (wrap its whole handling, from before its body is read): while it
        is not waiting for the model, the batcher holds its merge window open for it."""
        self._count_preparing(+1)
        try:
            yield
        finally:
            self._count_preparing(-1)

    def _count_preparing(self, change: int) -> None:
        with self._preparing_lock:
            self._preparing += change

    async def close(self) -> None:
        """Stop the batcher and the request threads (after the work in progress)."""
        await self.batcher.close()
        self._threads.shutdown(wait=False)

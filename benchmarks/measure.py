"""Timing and memory: what a method ran through the model (:class:`Probe`), its peak heap (:class:`HeapPeak`), and
running each method in a forked child or in this process (:class:`Runner`)."""

from __future__ import annotations

import ctypes
import os
import pickle
import resource
import select
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from rlhf_rewards.backends.base import RewardModel

# -- measurement ---------------------------------------------------------------------------------------------------


@dataclass
class Counts:
    """What a method ran through the model: ``calls`` forward passes, ``computed`` token positions (rows x width,
    padding included), ``real`` of them non-padding (by the attention mask; ``unmasked``: some call of several rows
    had none, so its padding is unknown here), ``model_seconds`` inside the probed modules."""

    calls: int = 0
    computed: int = 0
    real: int = 0
    unmasked: bool = False
    model_seconds: float = 0.0
    head_seconds: float = 0.0


class Probe:
    """Counts forward passes, token positions and time inside a model's modules while in a ``with`` block.

    ``backbone``: the module whose calls are counted (its input ids and attention mask give the positions);
    ``heads``: modules run outside the backbone whose time counts as model time too (e.g. the card's LM head)."""

    def __init__(self, backbone: nn.Module, heads: Sequence[nn.Module] = ()):
        self.backbone, self.heads = backbone, list(heads)
        self.counts = Counts()
        self._started: dict[int, float] = {}
        self._handles: list[Any] = []

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module is self.backbone:
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            rows, width = ids.shape[:2]
            self.counts.calls += 1
            self.counts.computed += rows * width
            self.counts.real += self._real(rows, width, mask, kwargs.get("position_ids"))
            self.counts.unmasked |= mask is None and rows > 1
        self._started[id(module)] = time.perf_counter()

    @staticmethod
    def _real(rows: int, width: int, mask: Any, position_ids: Any) -> int:
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            # a 2-D mask covers cached positions too; the last `width` columns are this call's tokens
            return int(mask[:, -width:].sum())
        if isinstance(mask, torch.Tensor) and isinstance(position_ids, torch.Tensor):
            # a packed row (block mask): its short tail sits at position id 0 after the last sample
            tail = (position_ids.flip(-1) != 0).int().cumsum(-1) == 0
            return rows * width - int(tail.sum())
        return rows * width

    def _exit(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        elapsed = time.perf_counter() - self._started.pop(id(module))
        self.counts.model_seconds += elapsed
        if module is not self.backbone:
            self.counts.head_seconds += elapsed

    def __enter__(self) -> "Probe":
        for module in [self.backbone, *self.heads]:
            self._handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._exit, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass
class Method:
    """One way of scoring a model's workload: ``run`` returns one number per input (a reward, or P(A better)).

    ``card_exact``: whether its input text is the card's, so its results must equal the card's; ``prepare`` runs
    before timing, in the measuring process, to set the model attributes the method needs (every method that
    depends on one sets it: without isolation the setting outlives the method); ``probe``: what counts its forward
    passes when they run through modules of its own (a card's own copy of the model; default: the section's)."""

    name: str
    run: Callable[[], list[float]]
    card_exact: bool = True
    prepare: Optional[Callable[[], None]] = None
    probe: Optional["Probe"] = None


@dataclass
class Measurement:
    """One method's run: see the module docstring for what each number means."""

    name: str
    card_exact: bool = True
    seconds: float = float("nan")
    counts: Counts = field(default_factory=Counts)
    peak_mb: Optional[float] = None
    results: list[float] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None
    out_of_memory: bool = False


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text \
        or "can't allocate memory" in text


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


class HeapPeak:
    """The peak of the bytes malloc has handed out and not yet taken back (glibc's ``mallinfo2``), sampled from a
    thread every ``interval`` seconds while in a ``with`` block. Memory the allocator keeps for reuse is left out, as
    ``torch.cuda.max_memory_allocated`` leaves out the caching allocator's reserve. ``peak_mb``: above the bytes in
    use on entry."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = _Mallinfo2
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._base = self._peak = 0

    def _in_use(self) -> int:
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd  # heap chunks in use + mapped chunks

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._in_use())

    def __enter__(self) -> "HeapPeak":
        self._base = self._peak = self._in_use()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._in_use())

    @property
    def peak_mb(self) -> float:
        return (self._peak - self._base) / 2 ** 20


def measure(method: Method, rm: Optional[RewardModel], probe: Probe, warmup: Callable[[], None]) -> Measurement:
    if method.prepare is not None:
        method.prepare()
    warmup()  # first-call costs (kernel selection, lazy initialisation) are nobody's throughput
    if rm is not None:
        rm.stats.reset()
    out = Measurement(method.name, method.card_exact)
    try:
        with HeapPeak() as heap, probe:
            start = time.perf_counter()
            out.results = [float(x) for x in method.run()]
            out.seconds = time.perf_counter() - start
        out.counts, out.peak_mb = probe.counts, heap.peak_mb
        if rm is not None:
            out.stats = rm.stats.as_dict()
    except (RuntimeError, MemoryError) as err:
        if not _is_oom(err):
            raise
        out.error, out.out_of_memory = f"{type(err).__name__}: {str(err)[:200]}", True
    return out


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)


def _child_setup(threads: int, memory_cap_gb: float, warm_heap_gb: float) -> None:
    """In a forked child, before measuring: make malloc keep freed memory for reuse, as a GPU's caching allocator
    does, and fault in ``warm_heap_gb`` of it up front, as a scoring process that has run before holds it (glibc's
    default maps and unmaps every large tensor, and first touches of fresh pages made batched forwards three to
    five times slower per token on the benchmark machine); cap the address space, so that an out-of-memory shows as
    an error instead of taking the machine down."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_MAX, 0)  # every allocation from the heap...
    libc.mallopt(_M_TRIM_THRESHOLD, -1)  # ...which never shrinks
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = int(_status_mb("VmSize") * 2 ** 20 + memory_cap_gb * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = int(warm_heap_gb * 2 ** 30)
    block = libc.malloc(size) if size else None
    if block:
        libc.memset(block, 0, size)
        libc.free(block)
    torch.set_num_threads(threads)


def run_isolated(method: Method, rm: Optional[RewardModel], probe: Probe, warmup: Callable[[], None], *,
                 threads: int, memory_cap_gb: float, warm_heap_gb: float, timeout: float) -> Measurement:
    """:func:`measure` in a forked child (see :func:`_child_setup`): every method starts from the same state,
    and one running out of memory takes only its child down. The parent must not have run multi-threaded torch
    work before (OpenMP's thread pool does not survive a fork); :func:`run` keeps it at one thread."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, send, leave without running the parent's exit handlers
        os.close(read_end)
        try:
            _child_setup(threads, memory_cap_gb, warm_heap_gb)
            result = measure(method, rm, probe, warmup)
        except BaseException as err:  # reported to the parent, which raises it
            result = Measurement(method.name, method.card_exact, error=f"{type(err).__name__}: {err}")
        with os.fdopen(write_end, "wb") as f:
            pickle.dump(result, f)
        os._exit(0)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return Measurement(method.name, method.card_exact, error=f"timed out after {timeout:.0f} s")
            chunk = os.read(read_end, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return Measurement(method.name, method.card_exact, error=f"the child process died (status {status})")
    result = pickle.loads(b"".join(chunks))
    if result.error and not result.out_of_memory:
        raise RuntimeError(f"{method.name}: {result.error}")
    return result


@dataclass
class Runner:
    """Runs methods one after another, forked (``isolate``) or in this process."""

    isolate: bool
    threads: int
    memory_cap_gb: float
    warm_heap_gb: float
    timeout: float
    log: Callable[[str], None]
    only: tuple[str, ...] = ()

    def run(self, rm: RewardModel, methods: Sequence[Method], probe: Probe, warmup: Callable[[], None]
            ) -> list[Measurement]:
        """Each method (only those named in ``only``, if any) measured in turn."""
        out = []
        for method in methods:
            if self.only and method.name not in self.only:
                continue
            self.log(f"  {method.name} ...")
            counter = method.probe or probe
            if self.isolate:
                m = run_isolated(method, rm, counter, warmup, threads=self.threads, memory_cap_gb=self.memory_cap_gb,
                                 warm_heap_gb=self.warm_heap_gb, timeout=self.timeout)
            else:
                m = measure(method, rm, Probe(counter.backbone, counter.heads), warmup)
            out.append(m)
            self.log(f"    {m.seconds:.2f} s" + (f" ({m.error})" if m.error else ""))
        return out


def warmup_for(backbone: nn.Module) -> Callable[[], None]:
    @torch.inference_mode()
    def run() -> None:
        backbone(input_ids=torch.ones(1, 8, dtype=torch.long, device=next(backbone.parameters()).device))
    return run



"""Throughput benchmark: our scoring against each model card's own procedure, TRL's built-in reward-model path and
a padding-free floor, on the same inputs, in one run (``rlhf-rewards bench``, ``python benchmarks/run.py``).

What runs:

* Workload: ``conversations`` seeded conversations, single- and multi-turn (some with a system prompt), whose prompt
  and response lengths are log-normal in tokens (medians ~150 and ~300, a tail to 1,500). Pairwise models get
  GRPO-like groups: one conversation's prompt, ``group_size`` completions, each compared with one baseline
  completion ("against baseline") or with each other ("round robin"). Texts are drawn word by word from a fixed
  English word list; each tokenizer gets as many words as make the target length in *its* tokens.
* Models: randomly initialised models of each preset's real architecture and vocabulary size, scaled down so a run
  ends in minutes on two CPU cores (:data:`FULL`). The pair-preference model keeps Llama-3-8B's depth (32 -> 40
  layers), MLP width and vocabulary with a tiny hidden size, so the LM head's share of the FLOPs per token is
  Llama-3-8B's (~7%): that share is what the card's full-vocabulary logits waste.
* Methods, per model: the card's procedure as written (padding to ``max_length``, batch size 1, one order at a time
  with full logits, llm-blender's fixed batches of 4 in input order); TRL 1.16's reward-model path (the whole batch
  right-padded to its longest, one forward); ours (``rm.score`` / ``rm.compare``); the floor (the same token ids as
  ours, each input alone at its exact length, shared prefixes computed once). Each method runs in a child process
  forked from one parent: all start from the same model, inputs and warm allocator (see :func:`_child_setup`).

Numbers in the report, per method:

* ``time``: wall seconds of the whole call, formatting and tokenization included (the floor starts from token ids).
* ``x ours``: that time divided by ours (above 1: slower than ours).
* ``computed/real``: token positions run through the model (padding included, shared prefixes counted once)
  divided by the tokens of the inputs themselves. This one carries over to GPUs.
* ``padded``: padding tokens as a share of the computed positions.
* ``overhead``: share of the time spent outside the model's modules (formatting, tokenization, collation).
* ``peak MB``: the most memory the method had allocated at once (malloc's bytes in use, sampled every 5 ms),
  weights and inputs left out.
* ``max abs diff``: the largest difference from the card's results (float32; for the generic sequence classifier,
  which has no card, from TRL's path); ``-`` where the input text is not the card's (TRL's path renders Ray2333's
  input without the card's double BOS).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import importlib
import json
import math
import os
import pickle
import platform
import random
import re
import resource
import select
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .backends.base import RewardModel
from .batching import DEFAULT_MAX_BATCH_TOKENS
from .conversation import Message
from .rendering import fold_system

# -- sizes and scales ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSize:
    """A benchmark model's dimensions: the preset's architecture at this size (``vocab`` the real vocabulary)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Scale:
    """How much one run does.

    Attributes:
        conversations: scalar workload size (and the pool the pairwise groups' prompts come from).
        prompt_median, response_median, max_tokens: the log-normal lengths in tokens, each cut at ``max_tokens``.
        group_size: completions per prompt in pairwise groups.
        pair_pm_groups, pairrm_groups: groups (against baseline, round robin) for each pairwise model. The
            pair-preference model is the slow one (about a millisecond per token: Llama-3's vocabulary and MLP
            width): its round robin runs ours only; the other methods would add minutes.
        sizes: per preset, its model's dimensions.
        budgets: ``max_batch_tokens`` values besides the default for the peak-memory sweep (first scalar preset).
        warm_heap_gb: memory each measuring process faults in before timing (see :func:`_child_setup`).
    """

    conversations: int
    prompt_median: int
    response_median: int
    max_tokens: int
    group_size: int
    pair_pm_groups: tuple[int, int]
    pairrm_groups: tuple[int, int]
    sizes: dict[str, ModelSize]
    budgets: tuple[int, ...]
    warm_heap_gb: float


FULL = Scale(
    conversations=256, prompt_median=150, response_median=300, max_tokens=1500, group_size=8,
    pair_pm_groups=(2, 1), pairrm_groups=(8, 2),
    sizes={
        # GQA and MLP ratios of the real models: Mistral-7B 32/8 heads, MLP 3.5x; Yi-34B 56/8, 2.86x; Llama-2-7B
        # 32/32, 2.69x. Vocabularies: Ray2333's 32001 (Mistral + [PAD]), Yi's 64000, Llama-2's 32000.
        "ray2333-mistral-7b": ModelSize(128, 2, 4, 1, 448, 32001),
        "starling-rm-34b": ModelSize(128, 2, 4, 1, 368, 64000),
        "starling-rm-7b-alpha": ModelSize(128, 2, 4, 4, 344, 32000),
        "sequence-classifier": ModelSize(128, 2, 4, 1, 448, 32000),
        # Llama-3-8B's vocabulary, MLP width and (a bit more than) its depth, hidden size 16: the LM head is 6.9% of
        # the FLOPs per token (Llama-3-8B: 7.0%), attention at 800 tokens ~4% (Llama-3-8B: ~3%)
        "rlhflow-pair-pm-llama3-8b": ModelSize(16, 40, 2, 1, 14336, 128256),
        # DeBERTa-v3-large's head size (64) and MLP ratio (4x), its vocabulary (128100)
        "pairrm": ModelSize(128, 2, 2, 2, 512, 128100),
    },
    budgets=(4096, 65536),
    warm_heap_gb=1.0,
)
"""The full benchmark: minutes on two CPU cores."""

SMOKE = Scale(
    conversations=8, prompt_median=15, response_median=30, max_tokens=150, group_size=3,
    pair_pm_groups=(1, 1), pairrm_groups=(2, 1),
    sizes={
        "ray2333-mistral-7b": ModelSize(16, 1, 2, 1, 32, 32001),
        "starling-rm-34b": ModelSize(16, 1, 2, 1, 32, 64000),
        "starling-rm-7b-alpha": ModelSize(16, 1, 2, 2, 32, 32000),
        "sequence-classifier": ModelSize(16, 1, 2, 1, 32, 32000),
        "rlhflow-pair-pm-llama3-8b": ModelSize(16, 1, 2, 1, 32, 128256),
        "pairrm": ModelSize(16, 1, 2, 2, 32, 128100),
    },
    budgets=(256, 1024),
    warm_heap_gb=0.0,
)
"""The smoke benchmark: every method on a few tiny inputs, seconds."""

SCALAR_PRESETS = ("ray2333-mistral-7b", "starling-rm-34b", "starling-rm-7b-alpha", "sequence-classifier")
FAMILIES = ("scalar", "pair-pm", "pairrm")
LLAMA3_8B = ModelSize(4096, 32, 32, 8, 14336, 128256)


def lm_head_share(size: ModelSize) -> float:
    """The LM head's share of a Llama model's matmul FLOPs per token (attention scores left out): the head is
    ``vocab x hidden``, each layer ``2 h^2`` (q, o) ``+ 2 h kv`` (k, v) ``+ 3 h ff`` (MLP) weights."""
    head_dim = size.hidden // size.heads
    layer = 2 * size.hidden ** 2 + 2 * size.hidden * size.kv_heads * head_dim + 3 * size.hidden * size.intermediate
    head = size.vocab * size.hidden
    return head / (head + size.layers * layer)


# -- workload ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """A text of about ``tokens`` tokens whose words come from the random stream ``seed``."""

    tokens: int
    seed: int


@dataclass(frozen=True)
class Conversation:
    """A prompt (optional system text, then user/assistant/.../user turns) and a response."""

    system: Optional[Text]
    turns: tuple[Text, ...]
    response: Text


@dataclass(frozen=True)
class Group:
    """A GRPO-like group: one conversation's prompt, its completions and a baseline completion."""

    prompt: Conversation
    completions: tuple[Text, ...]
    baseline: Text


def _length(rng: random.Random, median: int, cap: int) -> int:
    # sigma puts the largest of a few hundred draws near ten times the median for prompts, five times for responses
    sigma = math.log(cap / median) / 2.9
    return max(4, min(cap, round(rng.lognormvariate(math.log(median), sigma))))


def make_workload(scale: Scale, seed: int) -> tuple[list[Conversation], list[Group]]:
    """The seeded conversations and pairwise groups (group ``g`` uses conversation ``g``'s prompt)."""
    rng = random.Random(seed)

    def text(tokens: int) -> Text:
        return Text(tokens, rng.getrandbits(32))

    def response() -> Text:
        return text(_length(rng, scale.response_median, scale.max_tokens))

    conversations = []
    for _ in range(scale.conversations):
        prompt_tokens = _length(rng, scale.prompt_median, scale.max_tokens)
        n_turns = 1 if rng.random() < 0.7 else rng.choice((3, 5))  # one exchange, or two or three user turns
        weights = [rng.random() + 0.2 for _ in range(n_turns)]
        turns = tuple(text(max(2, round(prompt_tokens * w / sum(weights)))) for w in weights)
        system = text(rng.randint(10, 40)) if rng.random() < 0.1 else None
        conversations.append(Conversation(system, turns, response()))
    n_groups = max(max(scale.pair_pm_groups), max(scale.pairrm_groups))
    groups = [Group(conversations[g % len(conversations)], tuple(response() for _ in range(scale.group_size)),
                    response()) for g in range(n_groups)]
    return conversations, groups


def _corpus_words() -> list[str]:
    from .testing.tokenizers import CORPUS

    return re.findall(r"\S+", CORPUS)


class Writer:
    """Writes workload texts for one tokenizer: words from the tiny tokenizers' training corpus, as many as make
    the target length in this tokenizer's tokens (its tokens per word measured once on a long sample)."""

    def __init__(self, tokenizer: Any, words: Sequence[str]):
        self.words = list(words)
        sample = self._words(Text(0, 12345), 3000)
        self.tokens_per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 3000

    def _words(self, text: Text, n: int) -> str:
        rng = random.Random(text.seed)
        out = []
        for k in range(n):
            out.append(rng.choice(self.words))
            if k % 17 == 16:
                out.append("\n")
        return " ".join(out).replace(" \n ", "\n")

    def text(self, text: Text) -> str:
        return self._words(text, max(1, round(text.tokens / self.tokens_per_word)))

    def prompt(self, conversation: Conversation) -> list[Message]:
        messages = [{"role": "system", "content": self.text(conversation.system)}] if conversation.system else []
        for k, turn in enumerate(conversation.turns):
            messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": self.text(turn)})
        return messages


def comparisons(writer: Writer, groups: Sequence[Group], mode: str) -> list[tuple[list[Message], str, str]]:
    """``(prompt, a, b)`` per comparison: each completion against the baseline, or every pair of completions
    (``i < j``) of each group, in GRPO's order."""
    out = []
    for group in groups:
        prompt = writer.prompt(group.prompt)
        texts = [writer.text(c) for c in group.completions]
        if mode == "baseline":
            base = writer.text(group.baseline)
            out += [(prompt, t, base) for t in texts]
        else:
            out += [(prompt, texts[i], texts[j]) for i in range(len(texts)) for j in range(i + 1, len(texts))]
    return out


# -- models --------------------------------------------------------------------------------------------------------


def build_model(preset: str, size: ModelSize, directory: str, seed: int) -> RewardModel:
    """A randomly initialised model of ``preset``'s architecture at ``size``, saved in the preset's file layout
    (tokenizer files from :func:`~rlhf_rewards.testing.make_tiny_checkpoint`) and loaded with
    :func:`~rlhf_rewards.load_reward_model`, as users load the real one."""
    from transformers import AutoConfig

    from . import load_reward_model
    from .backends.pairrm import DebertaV2PairRM
    from .testing import TINY_CHECKPOINTS, make_tiny_checkpoint

    make_tiny_checkpoint(preset, directory, seed=seed)
    config = AutoConfig.from_pretrained(directory)
    dims = dict(hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                intermediate_size=size.intermediate, vocab_size=size.vocab)
    if preset == "pairrm":
        model_class: type[nn.Module] = DebertaV2PairRM
    else:
        model_class = TINY_CHECKPOINTS[preset].model_class
        dims.update(num_key_value_heads=size.kv_heads, head_dim=size.hidden // size.heads)
    for key, value in dims.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).eval()
    for name in os.listdir(directory):  # the tiny weights, in whichever layout the preset ships
        if name.endswith((".safetensors", ".bin")):
            os.remove(os.path.join(directory, name))
    model.save_pretrained(directory)
    return load_reward_model(directory, preset=preset, device="cpu", dtype=torch.float32)


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
            # a 2-D mask covers cached positions too; the last `width` columns are this call's tokens
            self.counts.real += int(mask[:, -width:].sum()) if isinstance(mask, torch.Tensor) else rows * width
            self.counts.unmasked |= mask is None and rows > 1
        self._started[id(module)] = time.perf_counter()

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
    depends on one sets it: without isolation the setting outlives the method)."""

    name: str
    run: Callable[[], list[float]]
    card_exact: bool = True
    prepare: Optional[Callable[[], None]] = None


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


def _measure(method: Method, rm: Optional[RewardModel], probe: Probe, warmup: Callable[[], None]) -> Measurement:
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
    """:func:`_measure` in a forked child (see :func:`_child_setup`): every method starts from the same state,
    and one running out of memory takes only its child down. The parent must not have run multi-threaded torch
    work before (OpenMP's thread pool does not survive a fork); :func:`run` keeps it at one thread."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, send, leave without running the parent's exit handlers
        os.close(read_end)
        try:
            _child_setup(threads, memory_cap_gb, warm_heap_gb)
            result = _measure(method, rm, probe, warmup)
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


# -- methods: scalar models ----------------------------------------------------------------------------------------


def _messages(writer: Writer, conversation: Conversation) -> tuple[list[Message], str]:
    return writer.prompt(conversation), writer.text(conversation.response)


def scalar_methods(rm: Any, writer: Writer, conversations: Sequence[Conversation]) -> list[Method]:
    """Card (Ray2333: chat template, ``padding="max_length"`` with no length limit, batch size 1; Starling: padded
    to 2048, batch size 1, reward before the first pad id), TRL's path (sequence classifiers only: TRL cannot load a
    value-head model), ours and the floor (our token ids, one input at a time, exact length)."""
    pairs = [_messages(writer, c) for c in conversations]
    prompts = [p for p, _ in pairs]
    completions = [c for _, c in pairs]
    texts = [rm.format(p, c) for p, c in pairs]
    ids = rm.tokenize(texts)
    items = [(x, *rm._read_position(x)) for x in ids]
    methods = []
    if rm.preset.name == "ray2333-mistral-7b":
        methods.append(Method("card", lambda: _card_ray2333(rm, pairs)))
    elif rm.preset.backend == "value-head":
        methods.append(Method("card", lambda: _card_starling(rm, texts)))
    if rm.preset.backend == "sequence-classification":
        methods.append(Method("TRL", lambda: _trl_reward_model(rm, pairs),
                              card_exact=rm.preset.name == "sequence-classifier"))
    methods.append(Method("ours", lambda: rm.score(prompts, completions)))
    methods.append(Method("floor", lambda: [rm._forward([item])[0] for item in items]))
    return methods


def _conversation(prompt: list[Message], completion: str) -> list[Message]:
    return prompt + [{"role": "assistant", "content": completion}]


@torch.inference_mode()
def _card_ray2333(rm: Any, pairs: Sequence[tuple[list[Message], str]]) -> list[float]:
    """Card 001: ``apply_chat_template(message, tokenize=False)``, then the tokenizer with
    ``padding="max_length", truncation=True`` (Mistral's tokenizer has no length limit, so nothing is padded) and
    one forward per conversation. Mistral v0.2's template has no system role: system text goes into the first user
    turn, as ours does (the card's code would raise)."""
    rewards = []
    for prompt, completion in pairs:
        text = rm.tokenizer.apply_chat_template(fold_system(_conversation(prompt, completion)), tokenize=False)
        tokens = rm.tokenizer(text, padding="max_length", truncation=True, return_tensors="pt")
        rewards.append(rm.model(tokens["input_ids"], attention_mask=tokens["attention_mask"]).logits.reshape(-1)
                       .item())
    return rewards


@torch.inference_mode()
def _card_starling(rm: Any, texts: Sequence[str]) -> list[float]:
    """The Starling cards' ``get_reward``: every sample tokenized with ``truncation=True, max_length=2048,
    padding="max_length"`` (truncation side left), then batch size 1 through the card's forward: the transformer
    with ``output_hidden_states=True``, the value head at every position, the reward one before the first
    ``PAD_ID`` (Starling-RM-34B: 0; 7B-alpha: the first id of ``tokenizer(pad_token)``, BOS)."""
    tokenizer = copy.copy(rm.tokenizer)
    tokenizer.truncation_side = "left"
    encodings = tokenizer(list(texts), truncation=True, max_length=2048, padding="max_length", return_tensors="pt")
    rewards = []
    for i in range(len(texts)):
        input_ids = encodings["input_ids"][i:i + 1]
        out = rm.model.transformer(input_ids, attention_mask=encodings["attention_mask"][i:i + 1],
                                   output_hidden_states=True)
        values = rm.model.v_head(out.hidden_states[-1]).squeeze(-1)
        c_inds = (input_ids[0] == rm.card_pad_id).nonzero()
        c_ind = c_inds[0].item() if len(c_inds) > 0 else input_ids.shape[1]
        rewards.append(values[0, c_ind - 1].item())
    return rewards


@torch.inference_mode()
def _trl_reward_model(rm: Any, pairs: Sequence[tuple[list[Message], str]]) -> list[float]:
    """TRL 1.16's ``_calculate_rewards`` for a ``PreTrainedModel`` reward function: ``apply_chat_template`` of
    prompt + completion, the tokenizer with ``padding=True, padding_side="right", add_special_tokens=False``, the
    whole batch in one forward, ``logits[:, 0]``. TRL raises where the template rejects a system role (Mistral
    v0.2's); those prompts get their system text folded into the first user turn, as ours does, so it can run."""
    from jinja2.exceptions import TemplateError
    from trl.data_utils import apply_chat_template

    texts = []
    for prompt, completion in pairs:
        try:
            texts.append(apply_chat_template({"messages": _conversation(prompt, completion)}, rm.tokenizer)["text"])
        except TemplateError:
            texts.append(apply_chat_template({"messages": fold_system(_conversation(prompt, completion))},
                                             rm.tokenizer)["text"])
    inputs = rm.tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right",
                          add_special_tokens=False)
    return rm.model(**inputs).logits[:, 0].tolist()


# -- methods: the pair-preference model (card 003) ---------------------------------------------------------------


PLAIN_TEMPLATE = (
    "\n{% for message in messages %}{% if loop.index0 % 2 == 0 %}\n\n<turn> user\n {{ message['content'] }}"
    "{% else %}\n\n<turn> assistant\n {{ message['content'] }}{% endif %}{% endfor %}\n\n\n"
)
PAIR_TEMPLATE = "[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \n"


def pair_pm_methods(rm: Any, items: Sequence[tuple[list[Message], str, str]], *, ours_only: bool = False
                    ) -> list[Method]:
    """Card 003's loop, ours without and with prefix reuse, and the floor: the same token ids, shared prefixes once,
    every other token at batch size 1 (``ours_only``: ours alone)."""
    prompts, a, b = ([x[k] for x in items] for k in range(3))
    sequences = [ids for p, x, y in items for ids in
                 (rm.tokenizer.encode(text, add_special_tokens=False) for text in rm.format(p, x, y))]

    def floor() -> list[float]:
        logits = rm.logits_ab(sequences)
        return [(rm._slot_probs(*logits[2 * i])[0] + rm._slot_probs(*logits[2 * i + 1])[1]) / 2
                for i in range(len(items))]

    def setting(reuse: bool, batch: Optional[int]) -> Callable[[], None]:
        def prepare() -> None:
            rm.prefix_reuse, rm.max_batch_size = reuse, batch
        return prepare

    ours = Method("ours", lambda: rm.compare(prompts, a, b), prepare=setting(True, None))
    if ours_only:
        return [ours]
    return [Method("card", lambda: _card_pair_pm(rm, items)),
            Method("ours, no prefix reuse", lambda: rm.compare(prompts, a, b), prepare=setting(False, None)),
            ours, Method("floor", floor, prepare=setting(True, 1))]


@torch.inference_mode()
def _card_pair_pm(rm: Any, items: Sequence[tuple[list[Message], str, str]]) -> list[float]:
    """Card 003's loop per comparison: the plain-template context, then for each order the Llama-3 chat template
    with the BOS string removed, ``tokenizer.encode``, the full causal LM (logits at every position) and the
    softmax of the "A"/"B" logits at the last position; the mean of both orders. System text is folded into the
    first user turn, as ours does (the plain template reads roles by position)."""
    import numpy as np

    tokenizer, plain = rm.tokenizer, copy.copy(rm.tokenizer)
    plain.chat_template = PLAIN_TEMPLATE
    id_a, id_b = rm.token_ids
    out = []
    for instruction, chosen, rejected in items:
        context = plain.apply_chat_template(fold_system(instruction), tokenize=False)
        responses = [chosen, rejected]
        probs = []
        for position in (0, 1):
            prompt = PAIR_TEMPLATE.format(context=context, response_A=responses[position],
                                          response_B=responses[1 - position])
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)
            input_ids = tokenizer.encode(text.replace(tokenizer.bos_token, ""), return_tensors="pt",
                                         add_special_tokens=False)
            logits = rm.model(input_ids).logits
            logit_a, logit_b = logits[0, -1, id_a].item(), logits[0, -1, id_b].item()
            z = np.exp(logit_a) + np.exp(logit_b)
            probs.append(np.exp([logit_a, logit_b][position]) / z)
        out.append(float(np.mean(probs)))
    return out


# -- methods: PairRM (card 004) ------------------------------------------------------------------------------------


def pairrm_methods(rm: Any, items: Sequence[tuple[list[Message], str, str]]) -> list[Method]:
    """llm-blender's ``compare`` (batches of 4 in input order, each padded to its longest, one forward per order),
    ours, and the floor (each row alone)."""
    prompts, a, b = ([x[k] for x in items] for k in range(3))
    rows = [rm.encode(p, x, y) for p, x, y in items]

    @torch.inference_mode()
    def floor() -> list[float]:
        out = []
        for pair in rows:
            logits = [rm.model(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)).item() for r in pair]
            out.append(_sigmoid((logits[0] - logits[-1]) / 2))  # a lone row (identical candidates) serves both
        return out

    return [Method("llm-blender", lambda: _llm_blender_compare(rm, items)),
            Method("ours", lambda: rm.compare(prompts, a, b)),
            Method("floor", floor)]


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@torch.inference_mode()
def _llm_blender_compare(rm: Any, items: Sequence[tuple[list[Message], str, str]], batch_size: int = 4
                         ) -> list[float]:
    """llm-blender 0.0.2's ``Blender.compare`` (mode "[A,B]+[B,A]", ``batch_size=4``): its collator tokenizes
    each batch's sources padded to 1224 and candidates to ``412 + unused source budget // 2``, trims columns that
    are padding in every row; ``_full_predict`` then runs the order (A, B) and the order (B, A) as two forwards,
    each row the three parts' tokens followed by all their padding, trimmed to the batch's longest row. Returned
    as ``sigmoid((logit_AB - logit_BA) / 2)``, the same probability ours gives."""
    from .backends.pairrm import CANDIDATE_PREFIX, SOURCE_PREFIX, source_and_candidate

    tokenizer, config = rm.tokenizer, rm.model.config
    sep = tokenizer.sep_token
    candidate_budget = (rm.max_length - rm.source_max_length) // 2
    out = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        texts = [(*source_and_candidate(m, x), source_and_candidate(m, y)[1]) for m, x, y in batch]
        src = tokenizer([SOURCE_PREFIX + s.replace(sep, " ") for s, _, _ in texts], max_length=rm.source_max_length,
                        padding="max_length", truncation=True, return_tensors="pt")
        keep = src["attention_mask"].any(dim=0)
        src_ids, src_mask = src["input_ids"][:, keep], src["attention_mask"][:, keep]
        cand = tokenizer([CANDIDATE_PREFIX + c.replace(sep, " ") for _, x, y in texts for c in (x, y)],
                         max_length=candidate_budget + (rm.source_max_length - int(keep.sum())) // 2,
                         padding="max_length", truncation=True, return_tensors="pt")
        keep = cand["attention_mask"].any(dim=0)
        cand_ids = cand["input_ids"][:, keep].reshape(len(batch), 2, -1)
        cand_mask = cand["attention_mask"][:, keep].reshape(len(batch), 2, -1)
        logits = {}
        for first, second in ((0, 1), (1, 0)):
            rows = []
            for i in range(len(batch)):
                one = cand_ids[i, first][cand_mask[i, first].bool()].clone()
                two = cand_ids[i, second][cand_mask[i, second].bool()].clone()
                one[one == config.cand_prefix_id] = config.cand1_prefix_id
                two[two == config.cand_prefix_id] = config.cand2_prefix_id
                rows.append(torch.cat([src_ids[i][src_mask[i].bool()], one, two]))
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)], mask[i, :len(r)] = r, 1
            logits[first] = rm.model(ids, mask).tolist()
        out += [_sigmoid((ab - ba) / 2) for ab, ba in zip(logits[0], logits[1])]
    return out


# -- running and reporting -----------------------------------------------------------------------------------------


@dataclass
class Section:
    """One model and workload: its methods' measurements and the tokens of its inputs (``real_tokens``)."""

    title: str
    preset: str
    workload: str
    real_tokens: int
    inputs: int
    measurements: list[Measurement]

    def get(self, name: str) -> Optional[Measurement]:
        return next((m for m in self.measurements if m.name == name and not m.error), None)


@dataclass
class Runner:
    """Runs methods one after another, forked (``isolate``) or in this process."""

    isolate: bool
    threads: int
    memory_cap_gb: float
    warm_heap_gb: float
    timeout: float
    log: Callable[[str], None]

    def run(self, rm: RewardModel, methods: Sequence[Method], probe: Probe, warmup: Callable[[], None]
            ) -> list[Measurement]:
        out = []
        for method in methods:
            self.log(f"  {method.name} ...")
            if self.isolate:
                m = run_isolated(method, rm, probe, warmup, threads=self.threads, memory_cap_gb=self.memory_cap_gb,
                                 warm_heap_gb=self.warm_heap_gb, timeout=self.timeout)
            else:
                m = _measure(method, rm, Probe(probe.backbone, probe.heads), warmup)
            out.append(m)
            self.log(f"    {m.seconds:.2f} s" + (f" ({m.error})" if m.error else ""))
        return out


def _warmup(backbone: nn.Module) -> Callable[[], None]:
    @torch.inference_mode()
    def run() -> None:
        backbone(input_ids=torch.ones(1, 8, dtype=torch.long))
    return run


def _scalar_sections(scale: Scale, runner: Runner, root: str, seed: int, presets: Sequence[str],
                     conversations: Sequence[Conversation], words: Sequence[str]) -> list[Section]:
    sections = []
    for k, preset in enumerate(presets):
        runner.log(f"{preset}: building")
        rm = build_model(preset, scale.sizes[preset], os.path.join(root, preset), seed)
        writer = Writer(rm.tokenizer, words)
        methods = scalar_methods(rm, writer, conversations)
        real = sum(len(ids) for ids in rm.tokenize([rm.format(*_messages(writer, c)) for c in conversations]))
        probe = Probe(rm.backbone, [rm.head])
        section = Section(preset, preset, "mixed", real, len(conversations),
                          runner.run(rm, methods, probe, _warmup(rm.backbone)))
        if k == 0:  # peak memory against the token budget, on the first preset
            ours = next(m for m in methods if m.name == "ours")
            for budget in scale.budgets:
                def prepare(budget: int = budget) -> None:
                    rm.max_batch_tokens = budget
                sweep = Method(f"ours, max_batch_tokens={budget}", ours.run, prepare=prepare)
                section.measurements += runner.run(rm, [sweep], probe, _warmup(rm.backbone))
        sections.append(section)
    return sections


def _pairwise_sections(scale: Scale, runner: Runner, root: str, seed: int, family: str, groups: Sequence[Group],
                       words: Sequence[str]) -> list[Section]:
    preset = "rlhflow-pair-pm-llama3-8b" if family == "pair-pm" else "pairrm"
    runner.log(f"{preset}: building")
    rm: Any = build_model(preset, scale.sizes[preset], os.path.join(root, preset), seed)
    writer = Writer(rm.tokenizer, words)
    counts = scale.pair_pm_groups if family == "pair-pm" else scale.pairrm_groups
    sections = []
    for mode, n_groups in zip(("baseline", "round-robin"), counts):
        items = comparisons(writer, groups[:n_groups], mode)
        if family == "pair-pm":
            methods = pair_pm_methods(rm, items, ours_only=mode == "round-robin")
            real = sum(len(rm.tokenizer.encode(t, add_special_tokens=False)) for p, x, y in items
                       for t in rm.format(p, x, y))
            probe, warmup = Probe(rm.backbone, [rm.model.get_output_embeddings()]), _warmup(rm.backbone)
        else:
            methods = pairrm_methods(rm, items)
            real = sum(len(r) for p, x, y in items for r in rm.encode(p, x, y))
            probe, warmup = Probe(rm.model), _warmup(rm.model.pretrained_model)
        title = f"{preset}, {n_groups} group(s) of {scale.group_size}, " + (
            "each completion against one baseline" if mode == "baseline" else "round robin")
        runner.log(title)
        sections.append(Section(title, preset, mode, real, 2 * len(items), runner.run(rm, methods, probe, warmup)))
    return sections


def _max_diff(m: Measurement, ref: Optional[Measurement]) -> Optional[float]:
    if ref is None or not m.results or len(m.results) != len(ref.results):
        return None
    return max(abs(x - y) for x, y in zip(m.results, ref.results))


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def reference(section: Section) -> Optional[Measurement]:
    """What results are checked against: the card's procedure (llm-blender's for PairRM); for the generic
    sequence classifier, which has no card, TRL's path (the same text)."""
    for name in ("card", "llm-blender", "TRL"):
        m = section.get(name)
        if m is not None and m.card_exact:
            return m
    return None


def section_rows(section: Section) -> list[dict[str, Any]]:
    """One row per method with the report's numbers (``None`` where not applicable)."""
    ours, floor = section.get("ours"), section.get("floor")
    ref = reference(section)
    rows = []
    for m in section.measurements:
        c = m.counts
        # without masks (right padding needs none in a causal model) padding shows against the floor: the same
        # token ids, none of them padding
        real = floor.counts.computed if c.unmasked and floor is not None else None if c.unmasked else c.real
        rows.append(dict(
            method=m.name, seconds=None if m.error else m.seconds,
            vs_ours=None if m.error or ours is None else m.seconds / ours.seconds,
            computed_per_real=None if m.error else c.computed / section.real_tokens,
            padded=None if m.error or not c.computed or real is None else (c.computed - real) / c.computed,
            overhead=None if m.error or not m.seconds else (m.seconds - c.model_seconds) / m.seconds,
            peak_mb=m.peak_mb, calls=None if m.error else c.calls,
            max_diff=_max_diff(m, ref) if m.card_exact and m is not ref else None,
            error=m.error,
        ))
    return rows


def section_notes(section: Section) -> list[str]:
    """What the table alone does not say: the results' reference, the card's LM-head share, the prefix-reuse gain,
    methods left out, out-of-memory events."""
    ref = reference(section)
    notes = [f"max abs diff: against {ref.name}'s results" + (" (no card: TRL's path reads the same text)"
                                                              if ref.name == "TRL" else "")] if ref else []
    card, ours = section.get("card"), section.get("ours")
    if card is not None and card.counts.head_seconds:
        share = card.counts.head_seconds / card.counts.model_seconds
        if section.preset == "rlhflow-pair-pm-llama3-8b":
            notes.append(f"card: the full-vocabulary LM head took {share:.1%} of its model time")
    plain = section.get("ours, no prefix reuse")
    if plain is not None and ours is not None:
        notes.append(f"prefix reuse alone: {plain.seconds / ours.seconds:.2f}x faster; computed tokens "
                     f"{plain.counts.computed} -> {ours.counts.computed}")
    if len(section.measurements) == 1 and ours is not None:
        notes.append("only ours runs on this workload (the other methods would add minutes): without prefix reuse "
                     "every input is computed whole (computed / real tokens >= 1.000), as the card does")
    if any(m.name.startswith("ours, max_batch_tokens=") for m in section.measurements):
        notes.append(f"ours runs with the default max_batch_tokens={DEFAULT_MAX_BATCH_TOKENS}; the rows named after "
                     "a budget differ only in it: peak memory follows the budget")
    if section.preset in ("ray2333-mistral-7b", "sequence-classifier"):
        notes.append("TRL's path is one forward of every input right-padded to the longest")
    if section.preset in ("starling-rm-34b", "starling-rm-7b-alpha"):
        notes.append("TRL's path does not apply: TRL loads reward models with AutoModelForSequenceClassification, "
                     "which has no Starling value head")
    if section.preset == "ray2333-mistral-7b":
        notes.append("the card pads to max_length, but Mistral's tokenizer has no length limit, so it pads "
                     "nothing: batch size 1 at the exact length, the floor's work plus its formatting")
    for m in section.measurements:
        if m.out_of_memory:
            notes.append(f"{m.name}: out of memory under the per-method cap ({m.error})")
        if m.stats.get("oom_splits"):
            notes.append(f"{m.name}: {m.stats['oom_splits']:.0f} batches split after running out of memory")
    return notes


def markdown(sections: Sequence[Section]) -> str:
    """The report's tables, one per model and workload."""
    lines = []
    for s in sections:
        lines += [f"### {s.title}", "",
                  f"{s.inputs} model inputs, {s.real_tokens} real tokens "
                  f"({s.real_tokens / max(1, s.inputs):.0f} per input).", "",
                  "| method | time (s) | x ours | computed / real tokens | padded | overhead | peak MB | calls "
                  "| max abs diff |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in section_rows(s):
            if r["error"]:
                lines.append(f"| {r['method']} | {r['error']} |  |  |  |  |  |  |  |")
                continue
            lines.append(
                f"| {r['method']} | {_fmt(r['seconds'], '.2f')} | {_fmt(r['vs_ours'], '.2f')} "
                f"| {_fmt(r['computed_per_real'], '.3f')} | {_fmt(r['padded'], '.1%')} | {_fmt(r['overhead'], '.1%')} "
                f"| {_fmt(r['peak_mb'], '.0f')} | {_fmt(r['calls'], 'd')} | {_fmt(r['max_diff'], '.1e')} |")
        lines += [*(f"- {n}" for n in section_notes(s)), ""]
    return "\n".join(lines)


def targets(sections: Sequence[Section]) -> list[tuple[str, bool, str]]:
    """``(target, met, measured)`` for each of the issue's targets this run can check."""
    out = []
    for s in sections:
        rows = {r["method"]: r for r in section_rows(s)}
        ours = rows.get("ours")
        if ours is None or ours["error"]:
            continue

        def ratio(name: str) -> Optional[float]:
            r = rows.get(name)
            return None if r is None or r["error"] else r["vs_ours"]

        if s.preset in SCALAR_PRESETS:
            if ratio("floor"):
                out.append((f"{s.preset}: ours within 1.15x of the floor", 1 / ratio("floor") <= 1.15,
                            f"ours / floor = {1 / ratio('floor'):.2f}"))
            if ratio("card"):
                out.append((f"{s.preset}: ours >= 5x faster than the card", ratio("card") >= 5,
                            f"card / ours = {ratio('card'):.2f}"))
            if "TRL" in rows:
                trl = rows["TRL"]
                out.append((f"{s.preset}: ours faster than TRL's path", trl["error"] is not None or trl["vs_ours"] > 1,
                            "TRL out of memory" if trl["error"] else f"TRL / ours = {trl['vs_ours']:.2f}"))
            if ours["padded"] is not None:
                out.append((f"{s.preset}: padding <= 10% of computed tokens", ours["padded"] <= 0.10,
                            f"{ours['padded']:.1%}"))
            out.append((f"{s.preset}: wrapper overhead <= 10%", ours["overhead"] <= 0.10, f"{ours['overhead']:.1%}"))
        elif s.preset == "pairrm" and ratio("llm-blender"):
            out.append((f"pairrm ({s.workload}): >= 1.5x faster than llm-blender", ratio("llm-blender") >= 1.5,
                        f"llm-blender / ours = {ratio('llm-blender'):.2f}"))
        elif ratio("card"):
            out.append((f"pair-PM ({s.workload}): >= 1.5x faster than the card's loop", ratio("card") >= 1.5,
                        f"card / ours = {ratio('card'):.2f}"))
        diffs = [r["max_diff"] for r in rows.values() if r["max_diff"] is not None]
        if diffs:
            out.append((f"{s.title}: every method's results within 1e-4 of {reference(s).name}'s",
                        max(diffs) <= 1e-4, f"max {max(diffs):.1e}"))
    return out


def machine() -> dict[str, Any]:
    """The CPU, core count and library versions the run used."""
    import transformers

    model_name = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model_name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    return dict(cpu=model_name, cores=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, trl=trl_version, load_before=os.getloadavg()[0])


@dataclass
class Report:
    """Everything one run measured."""

    scale: str
    seed: int
    threads: int
    machine: dict[str, Any]
    seconds: float
    sections: list[Section]
    notes: list[str]

    def markdown(self) -> str:
        m = self.machine
        lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {self.threads} torch threads; Python {m['python']}, "
                 f"torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}. Scale {self.scale}, seed "
                 f"{self.seed}; whole run {self.seconds:.0f} s; load average (1 min) {m['load_before']:.2f} before, "
                 f"{m['load_after']:.2f} after (above 0 means other work shared the cores).", "",
                 *(f"- {n}" for n in self.notes), "",
                 markdown(self.sections), "### Targets", ""]
        for target, met, measured in targets(self.sections):
            lines.append(f"- {'met' if met else 'MISSED'}: {target} ({measured})")
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, Any]:
        return dict(scale=self.scale, seed=self.seed, threads=self.threads, machine=self.machine,
                    seconds=self.seconds, notes=self.notes,
                    sections=[dict(title=s.title, preset=s.preset, workload=s.workload, real_tokens=s.real_tokens,
                                   inputs=s.inputs, rows=section_rows(s), notes=section_notes(s),
                                   stats={m.name: m.stats for m in s.measurements})
                              for s in self.sections],
                    targets=[dict(target=t, met=ok, measured=v) for t, ok, v in targets(self.sections)])


def run(scale: Scale, *, scale_name: str = "custom", seed: int = 0, families: Sequence[str] = FAMILIES,
        presets: Sequence[str] = SCALAR_PRESETS, isolate: bool = True, threads: Optional[int] = None,
        memory_cap_gb: float = 12.0, timeout: float = 900.0, log: Callable[[str], None] = lambda s: None
        ) -> Report:
    """Build the workload and models, run every method, return the :class:`Report`.

    ``isolate``: each method in a forked child with a warm, caching heap (``scale.warm_heap_gb``) and at most
    ``memory_cap_gb`` of memory (see :func:`run_isolated`); only from a process that has not run multi-threaded
    torch work. ``threads``: torch threads for the methods (default: the CPU count)."""
    start, host = time.perf_counter(), machine()
    threads = threads or os.cpu_count() or 1
    if isolate:
        torch.set_num_threads(1)  # the parent only builds; children get `threads`
    else:
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # a tokenizer thread pool would not survive a fork
    runner = Runner(isolate, threads, memory_cap_gb, scale.warm_heap_gb, timeout, log)
    conversations, groups = make_workload(scale, seed)
    words = _corpus_words()
    sections: list[Section] = []
    with tempfile.TemporaryDirectory(prefix="rlhf-rewards-bench-") as root:
        if "scalar" in families:
            if any(p in presets for p in ("ray2333-mistral-7b", "sequence-classifier")):
                importlib.import_module("trl.data_utils")  # seconds to import: once here, not in every child
            sections += _scalar_sections(scale, runner, root, seed, presets, conversations, words)
        for family in ("pair-pm", "pairrm"):
            if family in families:
                sections += _pairwise_sections(scale, runner, root, seed, family, groups, words)
    notes = [f"{name}: hidden {size.hidden}, {size.layers} layers, {size.heads} heads ({size.kv_heads} key/value), "
             f"MLP {size.intermediate}, vocabulary {size.vocab}" for name, size in scale.sizes.items()
             if name in {s.preset for s in sections}]
    if "pair-pm" in families:
        pm = scale.sizes["rlhflow-pair-pm-llama3-8b"]
        notes.append(f"pair-PM: the LM head is {lm_head_share(pm):.1%} of the model's FLOPs per token "
                     f"(Llama-3-8B: {lm_head_share(LLAMA3_8B):.1%})")
    host["load_after"] = os.getloadavg()[0]
    return Report(scale_name, seed, threads, host, time.perf_counter() - start, sections, notes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``rlhf-rewards bench``: run the benchmark, print the markdown report, optionally write it and a JSON."""
    parser = argparse.ArgumentParser(prog="rlhf-rewards bench", description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("--smoke", action="store_true", help="tiny models and inputs: seconds, for tests")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {FAMILIES}")
    parser.add_argument("--presets", default=",".join(SCALAR_PRESETS), help="scalar presets to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    parser.add_argument("--memory-cap-gb", type=float, default=12.0,
                        help="per-method memory cap; a method above it is reported as out of memory")
    parser.add_argument("--no-isolate", action="store_true",
                        help="run methods one after another in this process (no fork; allocator state and "
                             "model settings carry over between methods)")
    parser.add_argument("--markdown", help="also write the report to this file")
    parser.add_argument("--json", help="write the numbers as JSON to this file")
    argv = list(sys.argv[1:] if argv is None else argv)
    # `rlhf-rewards bench -- --smoke`: the command line hands over everything after "bench", separator included
    args = parser.parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    families, presets = [f for f in args.families.split(",") if f], [p for p in args.presets.split(",") if p]
    unknown = sorted(set(families) - set(FAMILIES)) + sorted(set(presets) - set(SCALAR_PRESETS))
    if unknown:
        parser.error(f"unknown families or presets: {', '.join(unknown)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    report = run(SMOKE if args.smoke else FULL, scale_name="smoke" if args.smoke else "full", seed=args.seed,
                 families=families, presets=presets,
                 isolate=not args.no_isolate, threads=args.threads, memory_cap_gb=args.memory_cap_gb,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    text = report.markdown()
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.as_json(), f, indent=2)
    return 0

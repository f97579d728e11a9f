"""The exactness checks: every preset against its card's procedure on the device in float32 and bfloat16, batch
invariance in bfloat16, packed against padded rows under each attention implementation, and a row-mate leak test.
Each check is a :class:`Check`; a failed one makes the run's exit code non-zero."""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from rlhf_rewards import load_reward_model
from rlhf_rewards.packing_check import PackingMismatchError
from rlhf_rewards.presets import PRESETS

from ..cards import card_scorer
from ..methods import _card_pair_pm, _card_ray2333, _card_starling, _llm_blender_compare, _trl_reward_model, \
    family_samples
from ..workload import ModelSize, Scale, Writer, comparisons, corpus_words, make_workload, write_model
from . import FP32_TOL, bf16_tolerance

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PACKING_PRESETS = ("ray2333-mistral-7b", "starling-rm-7b-alpha", "nemotron-reward", "qwen2.5-math-prm")
"""One preset per way of packing: a sequence classifier, the card's appended pad (Starling-7B-alpha, which flash
attention cannot pack), a causal-LM score, a process model read at many positions."""
LEAK_PRESET = "starling-rm-34b"


@dataclass
class Check:
    """One comparison: ``compared`` numbers, their ``max_diff`` against ``tolerance``; ``skipped`` says why a check
    compared nothing (not a failure); ``detail``: what else it saw (computed / real tokens, rows)."""

    check: str
    preset: str
    setting: str
    compared: int = 0
    max_diff: Optional[float] = None
    tolerance: Optional[float] = None
    skipped: Optional[str] = None
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.skipped is not None or (self.compared > 0 and self.max_diff is not None
                                              and self.max_diff <= self.tolerance)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def max_diff(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} results against {len(b)}: the two procedures scored different numbers of things")
    return max(abs(x - y) for x, y in zip(a, b))


def flat(results: Sequence[Any]) -> list[float]:
    """Results as one list of floats (a process model's step rewards one after another)."""
    return [float(x) for r in results for x in (r if isinstance(r, list) else [r])]


@dataclass
class Model:
    """A preset's random model on disk, the samples it is checked on, and its tokenizer as the package loaded it
    from the directory the first time (later loads get it as ``tokenizer=``, which the package uses as it is: parsing
    a 128k-152k vocabulary again costs about a second a load and checks nothing new)."""

    preset: str
    directory: str
    samples: list[tuple]
    tokenizer: Any = None
    card_tokenizer: Any = None  # the card's own, as its first card procedure loaded it (:func:`card`)

    def load(self, device: torch.device, dtype: Optional[torch.dtype] = None, **options: Any) -> Any:
        """:func:`~rlhf_rewards.load_reward_model` on this model's directory with its preset (``dtype`` ``None``:
        the device's default)."""
        return load_reward_model(self.directory, preset=self.preset, device=device, dtype=dtype,
                                 tokenizer=self.tokenizer, **options)


def written_models(presets: Sequence[str], size: ModelSize, root: str, seed: int, stack: contextlib.ExitStack
                   ) -> Iterator[tuple[str, str]]:
    """``(preset, directory)`` of each preset's random model at ``size``, written in ``root/preset``, in the order
    of ``presets``: the first by this process, the rest one after another by a second one (spawned: a forked child
    of a process whose torch threads ran can hang), which writes while this process checks the models before
    (writing is CPU work for one core; this process mostly parses tokenizers on another). The second process stops
    when ``stack`` closes, its unstarted writes cancelled."""
    rest = []
    if len(presets) > 1:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        stack.callback(pool.shutdown, cancel_futures=True)
        rest = [pool.submit(write_model, p, size, os.path.join(root, p), seed) for p in presets[1:]]
    yield presets[0], write_model(presets[0], size, os.path.join(root, presets[0]), seed)
    for preset, written in zip(presets[1:], rest):
        yield preset, written.result()


def build(preset: str, directory: str, scale: Scale, samples: int, seed: int, device: torch.device
          ) -> tuple[Model, Any]:
    """``preset``'s model written in ``directory`` and ``samples`` samples of the benchmark's workload written for
    its tokenizer (comparisons against a baseline for a pairwise model); with the model loaded on ``device`` in
    float32 (tokenizer from the directory, as users load it), for :func:`exactness` to use."""
    rm = load_reward_model(directory, preset=preset, device=device, dtype=torch.float32)
    writer = Writer(rm.tokenizer, corpus_words())
    conversations, groups = make_workload(scale, seed)
    if rm.kind == "pairwise":
        chosen = comparisons(writer, groups[:1], "baseline")[:samples]
    else:
        chosen = family_samples(rm, writer, conversations[:samples])
    return Model(preset, directory, chosen, rm.tokenizer), rm


def ours(rm: Any, samples: Sequence[tuple]) -> list[float]:
    """The package's results for ``samples``: rewards, P(A better), or step rewards one after another."""
    columns = [list(c) for c in zip(*samples)]
    if rm.kind == "pairwise":
        return flat(rm.compare(*columns))
    return flat(rm.score_steps(*columns) if rm.kind == "process" else rm.score(*columns))


def card(rm: Any, model: Model, dtype: torch.dtype) -> list[float]:
    """The card's procedure for ``model``'s samples on ``rm``'s device in ``dtype``: the seeds' from
    :mod:`benchmarks.methods` (run on ``rm``'s module, which holds the checkpoint's weights), the later families'
    from :mod:`benchmarks.cards` (their own copy of the weights). The generic sequence classifier has no card: TRL's
    path reads the same text."""
    preset, samples = model.preset, model.samples
    if preset == "ray2333-mistral-7b":
        return _card_ray2333(rm, samples)
    if preset in ("starling-rm-34b", "starling-rm-7b-alpha"):
        return _card_starling(rm, [rm.format(p, c) for p, c in samples])
    if preset == "sequence-classifier":
        return _trl_reward_model(rm, samples)
    if preset == "rlhflow-pair-pm-llama3-8b":
        return _card_pair_pm(rm, samples)
    if preset == "pairrm":
        return _llm_blender_compare(rm, samples)
    scorer = card_scorer(preset, model.directory, rm.device, dtype, model.card_tokenizer)
    model.card_tokenizer = scorer.tokenizer
    return flat([scorer.score(p, c) for p, c in samples])


def exactness(model: Model, float32: Any, inject: Callable[[list[float]], list[float]] = list) -> list[Check]:
    """Ours against the card in float32 (on ``float32``, the model :func:`build` loaded) and bfloat16 (loaded here
    on the same device), and ours batched against each sample alone in bfloat16. ``inject``: applied to our results
    before comparing (tests give it a wrong reward to see the check fail)."""
    checks = []
    for name, dtype in DTYPES.items():
        rm = float32 if dtype == torch.float32 else model.load(float32.device, dtype)
        reference = card(rm, model, dtype)
        got = inject(ours(rm, model.samples))
        tol = FP32_TOL if dtype == torch.float32 else bf16_tolerance(reference)
        checks.append(Check("card", model.preset, name, len(got), max_diff(got, reference), tol))
        if dtype == torch.bfloat16:
            alone = flat([x for s in model.samples for x in ours(rm, [s])])
            checks.append(Check("batch invariance", model.preset, name, len(got), max_diff(got, alone), tol,
                                detail="batched vs each sample alone"))
        del rm
    return checks


def attention_implementations(device: torch.device) -> tuple[list[str], list[str]]:
    """``(implementations to check, reasons others are skipped)``: sdpa always; flash-attention's variable-length
    kernels when ``flash_attn`` is importable on a CUDA device."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return ["sdpa", "flash_attention_2"], []
    why = "flash_attn is not installed" if device.type == "cuda" else f"flash-attention needs CUDA, not {device.type}"
    return ["sdpa"], [f"flash_attention_2: skipped: {why}"]


def packing(model: Model, device: torch.device, implementations: Sequence[str]) -> list[Check]:
    """``packing=True`` against ``packing=False`` per attention implementation and dtype, with each one's computed /
    real tokens (``rm.stats``)."""
    checks = []
    for implementation in implementations:
        for name, dtype in DTYPES.items():
            setting = f"{implementation}, {name}"
            padded = model.load(device, dtype, packing=False, attn_implementation=implementation)
            try:
                packed = model.load(device, dtype, packing=True, attn_implementation=implementation)
            except PackingMismatchError as err:  # its load-time check found packed and padded disagree: a failure
                found = err.check
                checks.append(Check("packing", model.preset, setting, found.compared, found.difference,
                                    found.tolerance, detail=f"packing=True refused at load: {err}"))
                continue
            except ValueError as err:  # a model that cannot pack here says why
                checks.append(Check("packing", model.preset, setting, skipped=str(err)))
                continue
            expected, got = ours(padded, model.samples), ours(packed, model.samples)
            tol = FP32_TOL if dtype == torch.float32 else bf16_tolerance(expected)
            ratios = ", ".join(f"{what} {m.stats.computed_tokens / max(1, m.stats.real_tokens):.3f}"
                               for what, m in (("padded", padded), ("packed", packed)))
            checks.append(Check("packing", model.preset, setting, len(got), max_diff(got, expected), tol,
                                detail=f"computed / real tokens: {ratios}"))
    return checks


def row_mate_leak(model: Model, device: torch.device, implementations: Sequence[str]) -> list[Check]:
    """A short sample packed with a longer row-mate (a third, long sample sets the rows' width): changing the
    row-mate must not change the short sample's score, which must equal its score alone (float32)."""
    checks = []
    long_answer = "A much longer answer that sets the width of every row, " * 8
    for implementation in implementations:
        rm = model.load(device, torch.float32, packing=True, max_batch_tokens=4096, attn_implementation=implementation)
        rows: list[int] = []
        handle = rm.backbone.register_forward_pre_hook(lambda m, a, k: rows.append(k["input_ids"].shape[0]),
                                                       with_kwargs=True)
        try:
            scores = [rm.score(["Hello!", mate, "Write a lot."], ["Hi there.", "Sure, here it is: " * 3,
                                                                 long_answer])[0]
                      for mate in ("What is the capital of France?", "Tell me a joke about ducks, please.")]
        finally:
            handle.remove()
        alone = rm.score(["Hello!"], ["Hi there."])[0]
        checks.append(Check("row-mate leak", model.preset, f"{implementation}, float32", 3,
                            max(abs(scores[0] - scores[1]), abs(scores[0] - alone)), FP32_TOL,
                            detail=f"3 samples x 2 row-mates in {sum(rows)} rows"))
    return checks


def every_preset() -> list[str]:
    """The presets registry's names: every preset the package ships."""
    return list(PRESETS)

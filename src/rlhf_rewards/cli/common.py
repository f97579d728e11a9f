"""What the dataset commands (score, label, eval, format) share: usage errors (exit code 2), the model options of
``load_reward_model`` checked as they are parsed, the optional ``data`` extra and a progress bar on stderr."""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, Optional

from ..presets import Preset, resolve_preset

USAGE_ERROR = 2
"""Exit code of bad input: a missing column, a malformed or unreadable file, an unwritable or existing output..."""


class UsageError(Exception):
    """Bad input the user can fix; reported as ``rlhf-rewards COMMAND: error: ...`` with exit code 2."""


BROKEN_PIPE = 128 + signal.SIGPIPE
"""Exit code when stdout's reader went away (``... | head``): the status a shell reports for a tool SIGPIPE ended."""


def reports_usage_errors(command: str) -> Callable:
    """Decorate a command's ``run`` so a :class:`UsageError` prints its message and returns exit code 2, and a
    reader of stdout that stops early (``| head``) ends the command quietly, as it ends standard Unix tools."""
    def wrap(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def guarded(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except UsageError as err:
                print(f"rlhf-rewards {command}: error: {err}", file=sys.stderr)
                return USAGE_ERROR
            except BrokenPipeError:
                # Python would report the pipe again when it flushes stdout at exit: point stdout at /dev/null
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
                return BROKEN_PIPE
        return guarded
    return wrap


def warn(command: str, message: str) -> None:
    """A warning of a dataset command on stderr, in the form its errors have."""
    print(f"rlhf-rewards {command}: warning: {message}", file=sys.stderr)


# argparse types: a bad value exits 2 naming the option while the command line is parsed, before any file is read
# or any model loaded. ``serve`` can use them for the same options.
def positive_int(text: str) -> int:
    """A count that must be at least 1 (token limits, chunk sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def field_name(text: str) -> str:
    """The name of a field the command adds to its rows: not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a field, got {text!r}")
    return text


def available_devices() -> list[str]:
    """The devices a model can be put on here, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def device_arg(text: str) -> str:
    """A device that exists on this machine (``cuda:7`` on a machine with two GPUs, or none, is refused)."""
    from ..backends.weights import check_device, resolve_device

    try:
        dev = resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err}; the devices here are: {', '.join(available_devices())}") from None
    try:
        check_device(dev, text)
    except ValueError:
        import torch

        why = (" (this torch build has no CUDA support)" if dev.type == "cuda" and not torch.cuda.is_available()
               and torch.version.cuda is None else "")
        raise argparse.ArgumentTypeError(f"{text!r} is not a device of this machine{why}; the devices here are: "
                                         f"{', '.join(available_devices())}") from None
    return text


def dtype_arg(text: str) -> str:
    """A weights' dtype name the loader accepts."""
    from ..backends.weights import DTYPE_NAMES, resolve_dtype

    try:
        resolve_dtype(text, None, None)  # a name given resolves without the preset's default or the device
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose one of: {', '.join(DTYPE_NAMES)}"
                                         ) from None
    return text


def attn_implementation_arg(text: str) -> str:
    """An attention implementation transformers knows here (flash-attention only with its package installed);
    whether it suits the device is checked when the model loads."""
    from ..backends.weights import check_attn_implementation

    try:
        check_attn_implementation(text, devices=[])
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def require(module: str) -> Any:
    """Import an optional dependency of the dataset commands, naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"this command needs {module!r}: pip install -e '.[data]' in a checkout") from None


def add_model_arguments(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    """``--model`` and the options of :func:`rlhf_rewards.load_reward_model`. With ``several``, ``--model``,
    ``--preset`` and ``--tokenizer`` may be repeated, the n-th ``--preset``/``--tokenizer`` going with the n-th
    ``--model``."""
    action = "append" if several else "store"
    per = " (repeat once per --model, in order)" if several else ""
    parser.add_argument("--model", required=True, action=action,
                        help="hub id or local directory of the reward model" + (" (repeatable)" if several else ""))
    parser.add_argument("--preset", action=action, help="preset name (see `rlhf-rewards presets`)" + per)
    parser.add_argument("--tokenizer", action=action, help="tokenizer path or hub id (default: the model's)" + per)
    parser.add_argument("--device", type=device_arg,
                        help="e.g. cuda:1 or cpu (default: the current GPU, else the CPU)")
    parser.add_argument("--dtype", type=dtype_arg,
                        help="weights' dtype, e.g. bfloat16 (default: the card's on GPU, float32 on CPU)")
    parser.add_argument("--max-length", type=positive_int, help="token limit per input (default: the card's)")
    parser.add_argument("--max-batch-tokens", type=positive_int,
                        help="token budget per forward pass (bounds peak memory)")
    parser.add_argument("--attn-implementation", type=attn_implementation_arg, metavar="NAME",
                        help="attention implementation: sdpa, eager, flash_attention_2 (CUDA with flash_attn "
                             "installed; packs samples padding-free) ... (default: transformers' choice)")


def model_specs(args: argparse.Namespace) -> list[tuple[str, Optional[str], Optional[str]]]:
    """``(model, preset, tokenizer)`` for each ``--model``; repeated ``--preset``/``--tokenizer`` must come once
    per model."""
    if not isinstance(args.model, list):
        return [(args.model, args.preset, args.tokenizer)]
    n = len(args.model)
    for flag, values in (("--preset", args.preset), ("--tokenizer", args.tokenizer)):
        if values is not None and len(values) != n:
            raise UsageError(f"{flag} was given {len(values)} times for {n} --model; give it once per --model, "
                             "in the same order, or not at all")
    return list(zip(args.model, args.preset or [None] * n, args.tokenizer or [None] * n))


def check_preset(model: str, preset: Optional[str]) -> Preset:
    """The preset ``model`` will load with, found before any weights are read (a bad name fails fast)."""
    try:
        return resolve_preset(model, preset)
    except ValueError as err:
        raise UsageError(str(err)) from None


def load_model(args: argparse.Namespace, model: str, preset: Optional[str], tokenizer: Optional[str]):
    """Load one reward model with the command's shared options."""
    from transformers.utils import logging as hf_logging

    from ..loading import load_reward_model

    hf_logging.disable_progress_bar()  # stderr carries this command's own progress bar
    try:
        return load_reward_model(model, preset=preset, device=args.device, dtype=args.dtype, tokenizer=tokenizer,
                                 max_length=args.max_length, max_batch_tokens=args.max_batch_tokens,
                                 attn_implementation=args.attn_implementation)
    except ValueError as err:
        if args.attn_implementation is None or "attn_implementation" not in str(err):
            raise
        raise UsageError(f"--attn-implementation: {err}") from None


class Progress:
    """A tqdm bar on stderr: rows done, rows/s, elapsed and remaining, and the model's tokens/s in the postfix."""

    def __init__(self, total: int, desc: str, model=None, initial: int = 0):
        tqdm = require("tqdm").tqdm
        self.model = model
        self._tokens0 = model.stats.real_tokens if model is not None else 0
        self._start = time.perf_counter()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="row", file=sys.stderr, dynamic_ncols=True)

    def update(self, rows: int) -> None:
        if self.model is not None:
            elapsed = max(time.perf_counter() - self._start, 1e-9)
            tokens = self.model.stats.real_tokens - self._tokens0
            self.bar.set_postfix_str(f"{tokens / elapsed:,.0f} tok/s", refresh=False)
        self.bar.update(rows)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

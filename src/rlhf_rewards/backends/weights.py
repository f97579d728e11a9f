"""What every backend needs to put weights on a device: device and dtype resolution, quantization, the
missing-weights check and PEFT adapters. Backends import this; ``loading`` sits above the backends."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import nn

from ..presets import Preset

DeviceSpec = Union[str, torch.device, int, Sequence[Union[str, torch.device, int]], None]


def local_rank() -> int:
    """This process's local rank under ``accelerate launch`` / ``torchrun`` (0 when not distributed)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: DeviceSpec) -> torch.device:
    """Where the reward model goes (see :func:`check_device` for whether it exists here).

    ``None``: the current CUDA device if there is one, else the CPU. A string may name the local rank, e.g.
    ``"cuda:{local_rank}"`` or ``"cuda:{local_rank+4}"`` to give each training process its own reward GPU; a list
    is indexed by local rank (``["cuda:4", "cuda:5"]``); several ranks may name the same device to share it.
    """
    rank = local_rank()
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, (list, tuple)):
        if rank >= len(device):
            raise ValueError(f"device list {list(device)} has no entry for local rank {rank}")
        return resolve_device(device[rank])
    if isinstance(device, bool) or not isinstance(device, (int, str, torch.device)):
        raise ValueError(f"device must be a string, an int, a torch.device or a list of them, got {device!r}")
    if isinstance(device, int):
        dev = torch.device("cuda", device)
    elif isinstance(device, str) and "{" in device:
        match = re.fullmatch(r"(\w+):\{local_rank\s*(?:\+\s*(\d+))?\}", device.strip())
        if not match:
            raise ValueError(f"cannot read device {device!r}; expected e.g. 'cuda:{{local_rank}}' or "
                             "'cuda:{local_rank+4}'")
        dev = torch.device(match.group(1), rank + int(match.group(2) or 0))
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"cannot read device {device!r}: {err}") from None
    return dev


def device_problem(dev: torch.device) -> Optional[str]:
    """Why ``dev`` cannot be used in this process (no CUDA, an index past the visible devices, no MPS), or ``None``
    when it can."""
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return ("this torch build has no CUDA support" if torch.version.cuda is None
                    else "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            return f"only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})"
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine"
    return None


def check_device(dev: torch.device, asked: object) -> None:
    """Raise ``ValueError`` naming ``asked`` unless ``dev`` exists here (checked before a model is loaded)."""
    problem = device_problem(dev)
    if problem is None:
        return
    no_cuda = dev.type == "cuda" and not torch.cuda.is_available()
    hint = "; use device='cpu' (or None for the default)" if no_cuda else ""
    raise ValueError(f"device {asked!r}: {problem}{hint}")


DTYPE_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
"""The dtype names ``dtype=`` accepts (case-insensitive, with or without ``torch.``)."""


def resolve_dtype(dtype: Union[str, torch.dtype, None], preset: Preset, device: torch.device) -> torch.dtype:
    """The weights' dtype: as given (a ``torch.dtype`` or a name in :data:`DTYPE_NAMES`); else the card's dtype on
    an accelerator and float32 on the CPU (CPU half precision is slow and less exact)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None and not isinstance(dtype, str):
        raise ValueError(f"dtype must be a torch.dtype or a name, got {type(dtype).__name__}")
    name = dtype if dtype is not None else (preset.accelerator_dtype if device.type != "cpu" else "float32")
    key = name.strip().lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPE_NAMES)} (or a torch.dtype)")
    return DTYPE_NAMES[key]


class _EachMessageOnce(logging.Filter):
    """Lets each distinct message through once. bitsandbytes logs the same dtype-cast notice on every 8-bit matrix
    product, thousands of times per scoring call; the first one still says it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _log_8bit_notices_once() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _EachMessageOnce) for f in logger.filters):
        logger.addFilter(_EachMessageOnce())


def quantization_config(quantization: Optional[str], dtype: torch.dtype, skip_modules: Sequence[str]):
    """A ``BitsAndBytesConfig`` for ``"8bit"`` / ``"4bit"`` (NF4, computing in ``dtype``), leaving the reward head
    in full precision; ``None`` for no quantization."""
    if quantization is None:
        return None
    if quantization not in ("8bit", "4bit"):
        raise ValueError(f"quantization must be None, '8bit' or '4bit', got {quantization!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError("quantization needs bitsandbytes: pip install -e '.[quant]' in a checkout") from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        _log_8bit_notices_once()
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=list(skip_modules))


def check_attn_implementation(value: Optional[str], devices: Sequence[torch.device]) -> None:
    """Refuse, before any weights load, an ``attn_implementation`` transformers does not know here (its own names
    and any registered with ``AttentionInterface``), or one of transformers' flash-attention kernels when its package
    does not import or one of ``devices`` (where the model will run; empty when not known yet) is not CUDA
    (transformers would fall back to downloading a hub kernel, or fail after building the model)."""
    if value is None:
        return
    from transformers import utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # paged attention reads a generation cache that scoring never builds
    known = ["eager"] + [k for k in ALL_ATTENTION_FUNCTIONS.valid_keys() if not k.startswith("paged|")]
    if not isinstance(value, str) or value not in known:
        raise ValueError(f"attn_implementation={value!r} is not an attention implementation transformers knows here; "
                         f"choose one of {', '.join(known)} (or None for transformers' default)")
    flash = re.fullmatch(r"flash_attention_(\d)", value)
    if flash is None:
        return
    available = getattr(utils, f"is_flash_attn_{flash.group(1)}_available", None)
    package = "flash_attn" if flash.group(1) == "2" else f"flash-attention {flash.group(1)}"
    if available is None or not available():
        raise ValueError(f"attn_implementation={value!r} needs the {package} package, which does not import here "
                         "(pip install flash-attn on a CUDA machine); leave attn_implementation unset or use 'sdpa'")
    not_cuda = [str(d) for d in devices if d.type != "cuda"]
    if not_cuda:
        raise ValueError(f"attn_implementation={value!r} runs on CUDA devices only, not {', '.join(not_cuda)}; "
                         "put the model on a GPU or use 'sdpa'")


def check_loading_info(name_or_path: str, info: dict) -> None:
    """Refuse a checkpoint that leaves weights randomly initialised: its rewards would look plausible and mean
    nothing."""
    missing = [k for k in info.get("missing_keys", []) if "rotary_emb" not in k]
    if missing:
        raise ValueError(f"{name_or_path}: the checkpoint lacks {len(missing)} weights of the reward model "
                         f"(e.g. {', '.join(sorted(missing)[:5])}); check the preset")


def from_pretrained_checked(cls, name_or_path: str, *, dtype: torch.dtype, device: torch.device,
                            quantization: Optional[str], skip_modules: Sequence[str], split=None,
                            attn_implementation: Optional[str] = None, **kwargs) -> nn.Module:
    """``cls.from_pretrained`` in ``dtype`` on ``device`` (quantized if asked), failing on missing weights.

    ``split`` (a :class:`~rlhf_rewards.backends.placement.Split`) spreads the layers over several devices instead,
    the reward head (``skip_modules``, also kept out of quantization) on the last one. ``attn_implementation``
    (checked by :func:`check_attn_implementation`) is passed on only when given: ``None`` keeps transformers' choice
    (the checkpoint config's, else sdpa where the model supports it)."""
    qconfig = quantization_config(quantization, dtype, skip_modules)
    placed = {}
    if split is not None:
        from .placement import split_loading_kwargs

        placed = split_loading_kwargs(cls, name_or_path, split, heads=skip_modules, dtype=dtype, config_kwargs=kwargs)
    elif qconfig is not None:
        placed = {"device_map": {"": str(device)}}
    if qconfig is not None:
        kwargs.update(quantization_config=qconfig)
    if attn_implementation is not None:
        kwargs.update(attn_implementation=attn_implementation)
    try:
        model, info = cls.from_pretrained(name_or_path, dtype=dtype, output_loading_info=True, **placed, **kwargs)
    except (ValueError, ImportError) as err:
        # transformers names its own class and argument; say which option of ours to change, and how
        if attn_implementation is None or "attention" not in str(err).lower():
            raise
        raise ValueError(f"attn_implementation={attn_implementation!r}: {name_or_path} ({cls.__name__}) cannot run "
                         f"it: {err} Leave attn_implementation unset for the model's default.") from err
    check_loading_info(name_or_path, info)
    if split is not None:
        from .placement import remove_with

        remove_with(model, placed.get("offload_folder"))
    elif qconfig is None:
        model.to(device)
    return model.eval().requires_grad_(False)


def apply_adapter(model: nn.Module, adapter: Optional[str], quantized: bool) -> nn.Module:
    """Put a PEFT adapter on ``model``: merged into the weights when they are not quantized (no per-call cost),
    kept as separate LoRA layers otherwise. The returned module has the same submodule names as ``model``."""
    if adapter is None:
        return model
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapter)
    if not quantized:
        return peft_model.merge_and_unload().eval().requires_grad_(False)
    return peft_model.base_model.model.eval().requires_grad_(False)

"""``load_reward_model``: from a hub id or local directory to a ready reward model on its own device."""

from __future__ import annotations

import os
from typing import Literal, Optional, Union

import torch

from .backends import LOADERS, SPLITTABLE
from .backends.placement import DeviceList, MemoryBudget, resolve_split
from .backends.base import RewardModel
from .control_text import ControlTextMode, check_mode
from .packing_check import verify_packing
from .backends.weights import DeviceSpec, check_attn_implementation, check_device, resolve_device, resolve_dtype
from .presets import Preset, canonical_hub_id, check_directory_matches, resolve_preset
from .sources import check_local, locate


def _positive(name: str, value: Optional[int]) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive number of tokens (or None for the default), got {value!r}")
    return value


def model_identity(name_or_path: Union[str, "os.PathLike[str]"]) -> str:
    """Which model ``name_or_path`` names, as :attr:`RewardModel.name_or_path` records it: a local directory's real
    path (however it is spelt), else the hub id as the presets spell it."""
    path = os.path.expanduser(os.fspath(name_or_path))
    return os.path.realpath(path) if os.path.isdir(path) else canonical_hub_id(path)


def load_reward_model(
    name_or_path: str,
    *,
    preset: Union[str, Preset, None] = None,
    device: DeviceSpec = None,
    dtype: Union[str, torch.dtype, None] = None,
    tokenizer=None,
    max_length: Optional[int] = None,
    max_batch_tokens: Optional[int] = None,
    quantization: Optional[Literal["8bit", "4bit"]] = None,
    adapter: Optional[str] = None,
    parse_templates: bool = True,
    packing: Union[bool, Literal["auto"]] = "auto",
    control_text: ControlTextMode = "text",
    aggregate: Optional[str] = None,
    step_separator: Optional[str] = None,
    device_map: Optional[DeviceList] = None,
    max_memory: Optional[MemoryBudget] = None,
    attn_implementation: Optional[str] = None,
) -> RewardModel:
    """Load a reward model exactly as its model card does, on its own device.

    Args:
        name_or_path: a hub id (e.g. ``"Nexusflow/Starling-RM-34B"``, case-insensitive for the presets' own ids) or
            a local directory with the same files. Checked before anything loads (see :func:`rlhf_rewards.sources.
            check_local` and ``locate``): an empty name, a missing path, a file, an empty directory or one without
            weights (``ModelPathError``, a ``FileNotFoundError``); a damaged ``config.json``, ``tokenizer.json`` or
            other JSON file, safetensors header or torch checkpoint (``ValueError`` naming the file); a directory of
            another model type than the preset's; a hub repository not cached while offline: all fail at once,
            naming it.
        preset: a preset name from :func:`rlhf_rewards.list_presets`; chosen from the hub id when it is a known
            model, or from a local directory's ``config.json`` when that is unambiguous.
        device: where the reward model lives, independent of the policy (``"cuda:1"``, ``"cuda:{local_rank+4}"``,
            a list indexed by local rank); default: the current GPU, or the CPU without one.
        dtype: weights' dtype: a ``torch.dtype`` or a name (``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``/
            ``"half"``, ``"float32"``/``"fp32"``/``"float"``); default: the card's on GPU, float32 on CPU.
        tokenizer: a tokenizer object or path; default: the model directory's, else the card's tokenizer source.
        max_length: token limit per input, a positive int (default: the card's); longer inputs lose tokens as the
            card truncates, counted in ``stats`` and reported by a warning per call.
        max_batch_tokens: token budget per forward pass (batch size x padded length); bounds peak memory.
        quantization: ``None``, ``"8bit"`` or ``"4bit"`` (bitsandbytes); the reward head stays unquantized.
        adapter: a PEFT adapter (path or hub id) to put on the reward model.
        parse_templates: parse text prompts already rendered in a chat template (``<|im_start|>``, ``[INST]``,
            Llama-3 headers, ...) back into messages before the model renders them in its own format, as
            ``RewardFunction`` does (see ``RewardModel.parse_templates``); ``False`` scores such text as one user
            turn, markup included.
        packing: score decoder reward models padding-free, several samples packed into each row (``True``), padded
            to each batch's longest (``False``), or whichever the attention implementation runs faster (``"auto"``).
            The choice and its reason are ``rm.packing`` and ``rm.packing_reason`` (also in the repr); results are
            the same either way, to float rounding. A model about to pack first scores a few synthetic samples both
            ways (:func:`rlhf_rewards.packing_check.verify_packing`, milliseconds): if they differ by more than the
            dtype's tolerance, ``"auto"`` pads (with a warning and the numbers in ``packing_reason``) and ``True``
            raises ``ValueError``.
        control_text: ``"text"`` (default): a string inside a message (prompt content or completion) that spells a
            control token of the model's tokenizer (``<|im_end|>``, ``<unk>``, ``[SEP]``, Llama-3's headers, ...) is
            tokenized as ordinary text, so a completion cannot forge template turns; ``"tokens"``: it becomes that
            token, as the model cards' own code does (for parity checks). Counted in ``stats.control_text`` either
            way; texts without such strings get the card's ids in both modes. See ``docs/security.md``.
        aggregate: process reward models only: how one reward per completion is made of its step rewards,
            ``"min"`` (default), ``"last"``, ``"mean"`` or ``"product"`` (see ``ProcessRewardModel.aggregate``).
        step_separator: process reward models only: where a completion string is split into steps (default: the
            preset's, e.g. ``"\n\n"`` for Qwen2.5-Math-PRM).
        device_map: for a model too large for one device, the devices to split its layers over, in order
            (``["cuda:0", "cuda:1"]``; ``"cpu"`` and ``"disk"`` after them offload the rest): whole decoder layers
            as each device's memory budget allows (accelerate), inputs on the first device, the final norm and the
            reward head on the last; ``rm.device`` is the first. Instead of ``device`` (whose list means one device
            per local rank). Not with ``adapter``. See ``docs/multi-gpu.md``.
        max_memory: with ``device_map``, the bytes (or sizes such as ``"40GiB"``) each listed device may hold, every
            device but ``"disk"`` named; default: the devices' free memory, balanced over the GPUs.
        attn_implementation: the attention implementation transformers runs the model with: ``"sdpa"``,
            ``"eager"``, ``"flash_attention_2"`` (needs the ``flash_attn`` package and a CUDA device; the one
            ``packing="auto"`` packs with), or any name registered with transformers' ``AttentionInterface``.
            Default ``None``: transformers' choice, the checkpoint config's ``attn_implementation`` if it sets one,
            else sdpa where the model supports it. An unknown value, or flash-attention without its package or
            CUDA, is a ``ValueError`` before anything loads; PairRM (DeBERTa-v2) takes only ``"eager"``. The
            implementation in use is ``rm.attn_implementation`` (also in the repr and in ``packing_reason``).

    Returns:
        A :class:`~rlhf_rewards.backends.base.RewardModel`: ``kind == "scalar"`` models have ``score``;
        ``kind == "pairwise"`` models have ``compare`` and ``score(..., baselines=...)``; ``kind == "process"``
        models have ``score_steps`` and ``score(..., aggregate=...)``.
    """
    # everything the caller can get wrong is checked here, before any weights load
    chosen = resolve_preset(name_or_path, preset) if preset is not None else None  # a bad name fails first
    max_length = _positive("max_length", max_length)
    max_batch_tokens = _positive("max_batch_tokens", max_batch_tokens)
    check_mode(control_text)
    if quantization not in (None, "8bit", "4bit"):
        raise ValueError(f"quantization must be None, '8bit' or '4bit', got {quantization!r}")
    local = check_local(name_or_path, "model")
    name_or_path = os.fspath(name_or_path)
    if local is None:
        name_or_path = canonical_hub_id(name_or_path)
    chosen = chosen or resolve_preset(local or name_or_path, None)
    process = {k: v for k, v in (("aggregate", aggregate), ("step_separator", step_separator)) if v is not None}
    if process and chosen.kind != "process":
        raise ValueError(f"{', '.join(process)}: only process reward models take it; {chosen.name} is a "
                         f"{chosen.kind} model")
    if aggregate is not None:
        from .reward_options import check_aggregate

        check_aggregate(aggregate)
    split = None
    if device_map is not None:
        if device is not None:
            raise ValueError("give device (one device, or one per local rank) or device_map (one model split over "
                             "several devices), not both")
        split = resolve_split(device_map, max_memory)
        if adapter is not None:
            raise ValueError("adapter cannot be combined with device_map: merging an adapter into a model split "
                             "over devices is not supported; merge it into the checkpoint first")
        if chosen.backend not in SPLITTABLE:
            raise ValueError(f"preset {chosen.name!r} cannot be split over devices (device_map); load it on one")
        for entry in split.devices:
            if entry != "disk":
                check_device(torch.device(entry), entry)
        dev = split.first
    elif max_memory is not None:
        raise ValueError("max_memory is the budget of a device_map split; pass device_map too")
    else:
        dev = resolve_device(device)
        check_device(dev, device)
    weights_dtype = resolve_dtype(dtype, chosen, dev)
    # a split's offloaded layers run on its accelerators, so those are the devices the kernels must suit
    check_attn_implementation(attn_implementation, [dev] if split is None else
                              [torch.device(d) for d in split.devices if d not in ("cpu", "disk")] or [dev])
    try:
        loader = LOADERS[chosen.backend]
    except KeyError:
        raise ValueError(f"preset {chosen.name!r} names unknown backend {chosen.backend!r}") from None
    source = local or locate(name_or_path, "model")
    if os.path.isdir(source):
        check_directory_matches(source, chosen)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = locate(tokenizer, "tokenizer")
    if isinstance(adapter, (str, os.PathLike)):
        adapter = locate(adapter, "adapter")
    model = loader(source, preset=chosen, tokenizer=tokenizer, device=dev, dtype=weights_dtype,
                   max_length=max_length, max_batch_tokens=max_batch_tokens, quantization=quantization,
                   adapter=adapter, packing=packing, attn_implementation=attn_implementation,
                   **({"device_map": split} if split is not None else {}))
    model.parse_templates = parse_templates
    model.name_or_path = model_identity(local or name_or_path)
    for option, value in process.items():
        setattr(model, option, value)
    model.control_text = control_text  # "text" first checks the tokenizer reads control text exactly as text
    verify_packing(model, packing, weights_dtype)  # last: the samples are read as every setting above says
    return model

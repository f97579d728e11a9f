"""``load_reward_model``: from a hub id or local directory to a ready reward model on its own device."""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch

from .backends import LOADERS
from .backends.base import RewardModel
from .backends.weights import DeviceSpec, resolve_device, resolve_dtype
from .presets import Preset, resolve_preset

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
    packing: Union[bool, Literal["auto"]] = "auto",
) -> RewardModel:
    """Load a reward model exactly as its model card does, on its own device.

    Args:
        name_or_path: a hub id (e.g. ``"Nexusflow/Starling-RM-34B"``) or a local directory with the same files.
        preset: a preset name from :func:`rlhf_rewards.list_presets`; chosen from the hub id when it is a known
            model, or from a local directory's ``config.json`` when that is unambiguous.
        device: where the reward model lives, independent of the policy (``"cuda:1"``, ``"cuda:{local_rank+4}"``,
            a list indexed by local rank); default: the current GPU, or the CPU without one.
        dtype: weights' dtype; default: the card's on GPU, float32 on CPU.
        tokenizer: a tokenizer object or path; default: the model directory's, else the card's tokenizer source.
        max_length: token limit per input (default: the card's); longer inputs lose tokens on the left.
        max_batch_tokens: token budget per forward pass (batch size x padded length); bounds peak memory.
        quantization: ``None``, ``"8bit"`` or ``"4bit"`` (bitsandbytes); the reward head stays unquantized.
        adapter: a PEFT adapter (path or hub id) to put on the reward model.
        packing: score decoder reward models padding-free, several samples packed into each row (``True``), padded
            to each batch's longest (``False``), or whichever the attention implementation runs faster (``"auto"``).
            The choice and its reason are ``rm.packing`` and ``rm.packing_reason`` (also in the repr); results are
            the same either way, to float rounding.

    Returns:
        A :class:`~rlhf_rewards.backends.base.RewardModel`: ``kind == "scalar"`` models have ``score``;
        ``kind == "pairwise"`` models have ``compare`` and ``score(..., baselines=...)``.
    """
    chosen = resolve_preset(name_or_path, preset)
    dev = resolve_device(device)
    try:
        loader = LOADERS[chosen.backend]
    except KeyError:
        raise ValueError(f"preset {chosen.name!r} names unknown backend {chosen.backend!r}") from None
    return loader(name_or_path, preset=chosen, tokenizer=tokenizer, device=dev, dtype=resolve_dtype(dtype, chosen, dev),
                  max_length=max_length, max_batch_tokens=max_batch_tokens, quantization=quantization,
                  adapter=adapter, packing=packing)

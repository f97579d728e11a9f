"""Models too large for one device: their layers split over several, in order (``load_reward_model(...,
device_map=[...])``).

accelerate infers which whole decoder layers fit each device's memory budget (``infer_auto_device_map``, never
splitting a layer), the model's final norm and reward head are then put on the last device of the list, and
transformers loads every weight straight onto its device and dispatches the model (accelerate's hooks move the
activations from device to device). ``"cpu"`` and ``"disk"`` entries after the accelerators are accelerate's offload:
those weights stay in RAM or on disk and run on the first device, slower. Inputs go to the first device; the reward is
read on the last. See docs/multi-gpu.md for what is tested without GPUs.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

DeviceList = Sequence[Union[str, int, torch.device]]
MemoryBudget = Mapping[Union[str, int, torch.device], Union[int, str]]

_OFFLOAD = ("cpu", "disk")


@dataclass(frozen=True)
class Split:
    """Where a split model goes.

    Attributes:
        devices: the devices in layer order, spelled ``"cuda:0"``, ``"cpu"``, ``"disk"``; accelerators first, then
            the offload entries.
        max_memory: bytes each device may hold (``None``: accelerate's balanced split of the devices' free memory).
    """

    devices: tuple[str, ...]
    max_memory: Optional[dict[str, int]] = None

    @property
    def first(self) -> torch.device:
        """Where inputs go and offloaded layers run: the first device."""
        return torch.device(self.devices[0])

    @property
    def last(self) -> str:
        """Where the final norm and the reward head go: the last device of the list."""
        return self.devices[-1]


def _spelled(device: Union[str, int, torch.device], where: str) -> str:
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ValueError(f"{where}: expected a device such as 'cuda:0', 'cpu' or 'disk', got {device!r}")
    if isinstance(device, int):
        return f"cuda:{device}"
    if device == "disk":
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{where}: cannot read device {device!r}: {err}") from None
    if dev.type == "cuda":
        return f"cuda:{dev.index if dev.index is not None else 0}"
    if dev.type == "cpu":
        return "cpu"
    raise ValueError(f"{where}: {device!r}: a split model goes over CUDA devices, with 'cpu' and 'disk' as offload")


def resolve_split(device_map: DeviceList, max_memory: Optional[MemoryBudget] = None) -> Split:
    """Check a ``device_map`` list (and its ``max_memory`` budget) and spell it out; raises ``ValueError`` naming the
    entry at fault."""
    if isinstance(device_map, (str, bytes, torch.device)) or not isinstance(device_map, Sequence) or not device_map:
        raise ValueError(f"device_map must be a non-empty list of devices in layer order, e.g. ['cuda:0', "
                         f"'cuda:1'], got {device_map!r}")
    devices = tuple(_spelled(d, f"device_map[{i}]") for i, d in enumerate(device_map))
    if len(set(devices)) != len(devices):
        raise ValueError(f"device_map {list(device_map)} names a device twice")
    cuda = [d for d in devices if d.startswith("cuda")]
    if list(devices[:len(cuda)]) != cuda or [d for d in devices if d in _OFFLOAD] != list(devices[len(cuda):]):
        raise ValueError(f"device_map {list(device_map)}: the CUDA devices come first, then 'cpu', then 'disk'")
    if cuda != sorted(cuda, key=lambda d: int(d.split(":")[1])):
        # accelerate lays layers over GPUs in index order, whatever the order given
        raise ValueError(f"device_map {list(device_map)}: list the CUDA devices in index order")
    if devices[0] == "disk":
        raise ValueError("device_map cannot start with 'disk': the first device runs the model")
    budget = None
    if max_memory is not None:
        if not isinstance(max_memory, Mapping):
            raise ValueError(f"max_memory must map devices to bytes or sizes such as '40GiB', got {max_memory!r}")
        from accelerate.utils import convert_file_size_to_int

        budget = {}
        for key, size in max_memory.items():
            name = _spelled(key, f"max_memory key {key!r}")
            if name not in devices:
                raise ValueError(f"max_memory names {key!r}, which is not in device_map {list(devices)}")
            try:
                budget[name] = size if isinstance(size, int) and not isinstance(size, bool) \
                    else convert_file_size_to_int(size)
            except (ValueError, TypeError):
                raise ValueError(f"max_memory[{key!r}] = {size!r} is not a size (bytes, or e.g. '40GiB')") from None
        missing = [d for d in devices if d != "disk" and d not in budget]
        if missing:
            raise ValueError(f"max_memory gives no budget for {', '.join(missing)}; give one for every device but "
                             "'disk', or none at all")
    return Split(devices, budget)


def _accelerate_key(device: str) -> Union[int, str]:
    return int(device.split(":")[1]) if device.startswith("cuda") else device


def plan_device_map(model: nn.Module, split: Split, *, heads: Sequence[str], dtype: torch.dtype
                    ) -> dict[str, Union[int, str]]:
    """Which device each top-level block of ``model`` (typically on the meta device) goes to: accelerate's inference
    within the budget, whole decoder layers only, then the model's final norm and its reward ``heads`` (module
    names; those the model lacks are ignored) moved to the last device. Raises ``ValueError`` when the model does not
    fit the budget of the listed devices."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    keys = [_accelerate_key(d) for d in split.devices]
    if split.max_memory is not None:
        budget = {_accelerate_key(d): size for d, size in split.max_memory.items()}
    else:
        free = get_max_memory()
        budget = {k: free[k] for k in keys if k != "disk"}
        budget = get_balanced_memory(model, max_memory=budget, no_split_module_classes=_no_split(model), dtype=dtype)
    plan = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=_no_split(model), dtype=dtype,
                                 clean_result=False)
    outside = sorted({str(d) for d in plan.values() if d not in keys})
    if outside:
        raise ValueError(f"the model does not fit the memory budget of {list(split.devices)} (accelerate would put "
                         f"part of it on {', '.join(outside)}); add devices, raise max_memory, or add 'disk'")
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    tail = [h for h in heads if h in modules] + [n for n in (f"{prefix}.norm",) if n in modules]
    for name in tail:
        plan = _expanded(plan, modules, name)
    last = _accelerate_key(split.last)
    return {name: (last if any(name == t or name.startswith(t + ".") for t in tail) else dev)
            for name, dev in plan.items()}


def _expanded(plan: dict, modules: dict[str, nn.Module], name: str) -> dict:
    """``plan`` with the entry that holds module ``name`` inside a larger block (``model`` holding ``model.norm``)
    replaced by that block's children, level by level, until ``name`` has its own entry."""
    while name not in plan:
        parent = next((k for k in plan if k == "" or name.startswith(k + ".")), None)
        if parent is None:
            return plan
        device = plan.pop(parent)
        for child, _ in modules[parent].named_children():
            plan[f"{parent}.{child}" if parent else child] = device
    return plan


def _no_split(model: nn.Module) -> list[str]:
    return sorted(getattr(model, "_no_split_modules", None) or ())


def split_loading_kwargs(cls, name_or_path: str, split: Split, *, heads: Sequence[str], dtype: torch.dtype,
                         config_kwargs: Mapping) -> dict:
    """The ``from_pretrained`` keywords that load ``cls`` from ``name_or_path`` split as ``split`` says: the planned
    ``device_map`` (the model built on the meta device to plan it), and an offload folder when ``"disk"`` is listed
    (removed with the model: see :func:`remove_with`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, **config_kwargs)
    tied = getattr(config, "tie_word_embeddings", False) and "lm_head" in heads
    if tied:
        raise ValueError(f"{name_or_path}: its output head shares its weights with the input embeddings, so it "
                         "cannot sit on another device than the first; load it on one device")
    with init_empty_weights():
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    kwargs: dict = {"device_map": plan_device_map(model, split, heads=heads, dtype=dtype)}
    if "disk" in split.devices:
        kwargs["offload_folder"] = tempfile.mkdtemp(prefix="rlhf-rewards-offload-")
    return kwargs


def remove_with(model: nn.Module, offload_folder: Optional[str]) -> None:
    """Delete ``offload_folder`` (a split model's disk offload) when ``model`` is garbage collected."""
    if offload_folder is not None:
        weakref.finalize(model, shutil.rmtree, offload_folder, ignore_errors=True)

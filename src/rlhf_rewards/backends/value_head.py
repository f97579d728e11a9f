"""The Starling reward models' architecture: a Llama backbone (attribute ``transformer``) and a bias-free linear
``v_head`` giving one value per position, as defined in the Starling model cards."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel


class ValueHeadRewardModel(LlamaPreTrainedModel):
    """Llama backbone + ``v_head``; parameter names match the published checkpoints (``transformer.*``,
    ``v_head.weight``), so ``from_pretrained`` loads Starling-RM-34B's files as they are."""

    base_model_prefix = "transformer"

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.transformer = LlamaModel(config)
        self.v_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Return the value at every position, shape ``(batch, length)``; the cards read one of them."""
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state
        return self.v_head(hidden).squeeze(-1)


STATE_DICT_FILES = ("pytorch_model.bin", "model.pt", "reward_model.pt")


def find_state_dict_file(directory: str) -> str | None:
    """The plain ``torch.save`` state dict a Starling-RM-7B-alpha style repository ships, if any. The card takes
    the first file ending in ``.pt`` or ``model.bin``; so do we, preferring the usual names."""
    if not os.path.isdir(directory):
        return None
    names = sorted(os.listdir(directory))
    for name in STATE_DICT_FILES:
        if name in names:
            return os.path.join(directory, name)
    for name in names:
        if name.endswith(".pt") or name.endswith("model.bin"):
            return os.path.join(directory, name)
    return None


def load_value_head_state_dict(model: ValueHeadRewardModel, path: str) -> None:
    """Load a plain state dict holding ``transformer.*`` (or the causal LM's ``model.model.*``) and
    ``v_head.weight`` into ``model``. Unlike the card's ``strict=False``, a missing weight is an error: a
    randomly initialised layer would give plausible-looking but meaningless rewards."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError... none naming the file
        raise ValueError(f"cannot read the state dict {path} ({type(err).__name__}: {err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a {type(raw).__name__}, not a state dict of named weights")
    wanted = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if key in wanted:
            state[key] = value
        elif key.startswith("model.model."):
            state.setdefault("transformer." + key[len("model.model."):], value)
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} weights of the reward model, e.g. "
                         f"{', '.join(missing[:5])}")
    model.load_state_dict(state, strict=True)

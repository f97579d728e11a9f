"""What every tiny-checkpoint builder writes beside the weights."""

from __future__ import annotations

import json
import os
from typing import Any


def update_config(path: str, **updates: Any) -> None:
    """Set ``updates`` in the checkpoint directory ``path``'s ``config.json`` (the keys a hub repository's config has
    that ``save_pretrained`` does not write: its architecture name, ``auto_map``, a preset hint), written sorted so the
    same build gives the same bytes."""
    config_path = os.path.join(path, "config.json")
    with open(config_path, encoding="utf-8") as f:
        data = json.load(f)
    data.update(updates)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")

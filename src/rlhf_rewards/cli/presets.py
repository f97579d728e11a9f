"""``rlhf-rewards presets``: the model presets this package knows."""

from __future__ import annotations

import argparse

HELP = "list the known presets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from .. import list_presets

    for name, doc in list_presets().items():
        print(f"{name:28s} {doc}")
    return 0

"""The ``rlhf-rewards`` command. One module per subcommand; each defines ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code). Building the parser imports every command module, so a module imports its heavy
dependencies (torch, transformers, the server, datasets) inside ``run`` only: ``--help`` stays fast and free of
third-party start-up noise (tests/test_architecture.py checks that it loads no torch)."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "presets", "score", "calibrate", "label", "eval", "format", "serve")
"""Subcommand names, each the module ``rlhf_rewards.cli.<name>`` (in the order ``--help`` lists them)."""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="rlhf-rewards",
                                     description="Open reward models, scored exactly as their model cards do.")
    parser.add_argument("--version", action="version", version=f"rlhf-rewards {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

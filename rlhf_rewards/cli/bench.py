"""``rlhf-rewards bench``: the throughput benchmark (docs/benchmarks.md); its own flags follow the command."""

from __future__ import annotations

import argparse

HELP = "run the throughput benchmark (see docs/benchmarks.md)"
PASSTHROUGH = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-h", "--help", action="store_true", help="the benchmark's own help")


def run(args: argparse.Namespace) -> int:
    from ..bench import main as bench_main

    return bench_main(args.rest + (["--help"] if args.help else []))

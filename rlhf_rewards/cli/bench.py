"""``rlhf-rewards bench``: the throughput benchmark (docs/benchmarks.md). The benchmark is not part of the installed
package: this entry point runs ``benchmarks/`` from a source checkout (the current directory), passing its flags on."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

HELP = "run the throughput benchmark from a source checkout (python -m benchmarks; see docs/benchmarks.md)"
PASSTHROUGH = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-h", "--help", action="store_true", help="the benchmark's own help")


def run(args: argparse.Namespace) -> int:
    if os.path.isfile(os.path.join("benchmarks", "run.py")) and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the installed console script does not look in the current directory
    try:
        bench = importlib.import_module("benchmarks.run")
    except ModuleNotFoundError as err:
        if err.name not in ("benchmarks", "benchmarks.run"):
            raise
        print("rlhf-rewards bench: the benchmark lives in the source checkout's benchmarks/ folder, which is not "
              "installed with the package; run it from the checkout's root (python -m benchmarks).", file=sys.stderr)
        return 2
    return bench.main(args.rest + (["--help"] if args.help else []), prog="rlhf-rewards bench")

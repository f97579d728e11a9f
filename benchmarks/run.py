"""Run the throughput benchmark: ``python benchmarks/run.py [--smoke] ...`` (the same as ``rlhf-rewards bench``).
See docs/benchmarks.md for what it measures and the last full run's table."""

import sys

from rlhf_rewards.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

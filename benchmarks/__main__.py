"""``python -m benchmarks [--smoke] ...``: run the throughput benchmark from a source checkout."""

import sys

from benchmarks.run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``python -m benchmarks.gpu_check --out DIR``: see :mod:`benchmarks.gpu_check`."""

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

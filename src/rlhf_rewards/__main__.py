"""``python -m rlhf_rewards``: the ``rlhf-rewards`` command."""

import sys

from .cli import main

sys.exit(main())

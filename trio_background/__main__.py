"""Run the live demo: ``python -m trio_background [--duration SECONDS] [--jobs N] [--seed S]``."""

import sys

from ._demo import main

if __name__ == "__main__":
    sys.exit(main())

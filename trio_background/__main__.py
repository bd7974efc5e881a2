"""Run the live demo, ``python -m trio_background`` (``--help`` lists its options)."""

import sys

from ._demo import main

if __name__ == "__main__":
    sys.exit(main())

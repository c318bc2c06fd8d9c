"""`just bench`: see steer_heal/bench/ (python -m steer_heal.bench)."""

import sys

from steer_heal.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main())

"""`just barrier-sweep`: see steer_heal/diag/barrier.py."""

import sys

from steer_heal.diag.barrier import cli

if __name__ == "__main__":
    sys.exit(cli())

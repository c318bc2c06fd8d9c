"""`just stages`: see steer_heal/diag/stages.py."""

import sys

from steer_heal.diag.stages import cli

if __name__ == "__main__":
    sys.exit(cli())

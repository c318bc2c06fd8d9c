"""`just plot`: see steer_heal/diag/plot_run.py."""

import sys

from steer_heal.diag.plot_run import cli

if __name__ == "__main__":
    sys.exit(cli())

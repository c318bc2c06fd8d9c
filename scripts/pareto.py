"""`just pareto`: see steer_heal/diag/pareto.py."""

import sys

from steer_heal.diag.pareto import cli

if __name__ == "__main__":
    sys.exit(cli())

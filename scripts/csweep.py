"""`just csweep`: see steer_heal/diag/csweep.py."""

import sys

from steer_heal.diag.csweep import cli

if __name__ == "__main__":
    sys.exit(cli())

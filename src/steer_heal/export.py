"""`python -m steer_heal.export RUN_ID DIR [--out out]`: merge a run's baked adapters into a plain HF model dir."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError
from .student import open_student


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m steer_heal.export", description=__doc__)
    p.add_argument("run_id")
    p.add_argument("dir")
    p.add_argument("--out", default="out", help="store root")
    a = p.parse_args(argv)
    try:
        st = open_student(a.out, a.run_id)
    except (ConfigError, RuntimeError) as e:
        print(f"steer-heal export: {e}", file=sys.stderr)
        return 2
    print(st.stack.export(a.dir, st.tok))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m steer_heal.export RUN_ID DIR [--out out] [--trust-remote-code]`: merge a run's baked adapters
into a plain HF model dir. DIR must be new or empty, so an export never mixes with other files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .console import Parser, script
from .errors import UserError
from .student import open_student, run_log, stored_config

PROG = "just export"


def target(d: str) -> Path:
    """DIR as an empty directory to write into, refused (before any model work) when it cannot be one."""
    p = Path(d)
    if p.exists() and not p.is_dir():
        raise UserError(f"export target {d} is a file: pass a new or empty directory")
    if p.is_dir() and any(p.iterdir()):
        raise UserError(f"export target {d} is not empty: pass a new or empty directory, so the export does "
                          "not mix with other files")
    parent = next(q for q in [p, *p.parents] if q.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"export target {d}: {parent} is not a writable directory")
    return p


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog=PROG, description=__doc__)
    p.add_argument("run_id")
    p.add_argument("dir")
    p.add_argument("--out", "--root", dest="out", default="out", help="store root")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="needed for a run started with it: lets its model's own Python code run")
    a = p.parse_args(argv)
    out_dir = target(a.dir)
    stored_config(run_log(a.out, a.run_id))  # an unknown or damaged run fails here, before DIR exists
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        st = open_student(a.out, a.run_id, trust_remote_code=a.trust_remote_code,
                          fix=f"just export {a.run_id} {a.dir} --trust-remote-code")
        st.stack.export(out_dir, st.tok)
    except BaseException:
        if made and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    for f in out_dir.iterdir():  # safetensors writes 0600; the export is as readable as the rest of the store
        f.chmod(0o644)
    print(out_dir)
    return 0


def cli() -> int:
    return script(PROG, main, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(cli())

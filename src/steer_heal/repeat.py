"""`just seeds N RECIPE [FLAGS]`: one config over seeds 0..N-1, then `just stages` on the group.

Each seed runs as `just RECIPE --seed s --run-id GROUP-s<s> FLAGS` in its own process (a run owns its
Prefect home and its model). GROUP is --run-id when given, else made from the time and reg. A seed whose
run has ended (done, stopped, starved) is skipped and one that did not end (a crash, Ctrl-C, failed) is
resumed, so the same command picks a study up where it stopped. The runs differ only in seed, so
`just stages` prints each cell's mean and 95% interval over them. A control arm given --yoke-group TREAT
(the treatment's GROUP) yokes each seed to the treatment's run of the same seed: --yoke TREAT-s<s> (yoke.py).
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time

from loguru import logger

from .console import script
from .store import RunLog

RECIPES = ("run", "small-run", "fast-dev-run")
ENDED = ("done", "stopped", "starved")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="just seeds", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("n", type=int, help="seeds 0..N-1")
    p.add_argument("recipe", choices=RECIPES, help="the run recipe each seed runs")
    p.add_argument("--run-id", default="", help="group name: the runs are GROUP-s0 .. GROUP-s<N-1>")
    p.add_argument("--out", default="out", help="store root (passed on to every run)")
    p.add_argument("--yoke-group", default="", metavar="TREAT", help="a control arm: yoke seed s to the treatment "
                   "run TREAT-s<s> (--yoke), which must have run first")
    a, rest = p.parse_known_args(argv)
    if a.n < 1:
        p.error("N must be >= 1")
    for flag in ("--seed", "--yoke"):
        if any(x == flag or x.startswith(flag + "=") for x in rest):
            p.error(f"{flag} is what this sets{' (--yoke-group)' if flag == '--yoke' else ''}: leave it out")
    return a, rest


def status(out: str, run_id: str) -> str | None:
    """The run's latest status, None when it never started."""
    log = RunLog(out, run_id)
    if not log.read("run_info"):
        return None
    return ((log.read("status") or [{}])[-1]).get("status") or "running"


def main(argv: list[str] | None = None) -> int:
    a, rest = parse(sys.argv[1:] if argv is None else argv)
    group = a.run_id or f"seeds-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    just = os.environ.get("JUST", "just")
    control = next((v for k, v in zip(rest, rest[1:]) if k == "--control"), "none")
    if control != "none" and not a.yoke_group:
        logger.warning(f"--control {control} without --yoke-group: each seed runs its own walk, unmatched to any "
                       "treatment, and `just stages`/`just beyond` refuse it as a control unless --unyoked")
    ids, bad = [], []
    for s in range(a.n):
        run_id = f"{group}-s{s}"
        st = status(a.out, run_id)
        if st in ENDED:
            logger.info(f"seed {s}: {run_id} already {st}, skipped")
        else:
            cmd = ([just, "resume", run_id, "--out", a.out] if st else
                   [just, a.recipe, "--seed", str(s), "--run-id", run_id, "--out", a.out, *rest,
                    *(["--yoke", f"{a.yoke_group}-s{s}"] if a.yoke_group else [])])
            logger.info(f"seed {s}: {' '.join(cmd)}")
            rc = subprocess.run(cmd).returncode
            if rc != 0:
                bad.append(f"{run_id} (exit {rc})")
        if status(a.out, run_id) is not None:
            ids.append(run_id)
    if ids:
        from .diag.stages import main as stages

        script("just stages", stages, [*ids, "--out", a.out])
    if bad:
        logger.error(f"{len(bad)} of {a.n} seeds did not finish: {', '.join(bad)}; rerun the same command to "
                     "resume them")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(script("just seeds", main, sys.argv[1:]))

"""`just seeds N RECIPE [FLAGS]` and `just study [ARMS]`: grids of seeds (sweep/grid.py), launched as a sweep is
(sweep/launch.py), then `just stages` on them.

seeds: one config over seeds 0..N-1, the runs GROUP-s0 .. GROUP-s<N-1> (GROUP is --run-id when given, else
made from the time). It is the grid `just sweep --name GROUP --prefix '' --recipe RECIPE --seeds 0 .. N-1 --
FLAGS`. study: the SmolLM2 question (spec.md "Controls"), --seeds N (5) seeds x each arm over `small-run` with
STUDY_FLAGS and any flags after `--`, the runs NAME-ARM-s<s> (--name, "study"), then `just stages` and
`just pareto --by config`.

By default each run goes through its `just` recipe in a process of its own (--on procs); --on inline runs
them in this process, --on pool submits them to the work pool (`just server`, `just worker`). A run that
has ended (done, stopped, starved) is skipped and one that did not end (a crash, Ctrl-C, failed) is resumed,
so the same command picks a study up where it stopped. The runs differ only in seed (and arm), so
`just stages` prints each cell's mean and 95% interval over them.
A control arm given --yoke-group TREAT (the treatment's GROUP) yokes each seed to the treatment's run of the
same seed, --yoke TREAT-s<s> (yoke.py); the study yokes c0 and random to kl_rev, c0-nll to nll.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path

from loguru import logger

from .console import script
from .status import finished
from .sweep.grid import RECIPES, Cell, Grid
from .sweep.launch import ON, launch
from .sweep.state import StoreState

# The arms of `just study`: flags on top of `small-run`.
ARMS = {"kl_rev": ["--reg", "kl_rev"], "nll": ["--reg", "nll"], "c0": ["--reg", "kl_rev", "--control", "c0"],
        "random": ["--reg", "kl_rev", "--control", "random"], "c0-nll": ["--reg", "nll", "--control", "c0"]}
STUDY_SEEDS = 5
STUDY_ARMS = ["kl_rev", "nll", "c0", "random"]
# SmolLM2 is at chance on the seven-way probe (docs/results.md): the study skips it, ~70% of each eval's time
STUDY_FLAGS = ["--probes", "contrast", "freetext"]
YOKED_TO = {"c0": "kl_rev", "random": "kl_rev", "c0-nll": "nll"}  # a control arm replays its treatment's slots


def ended(st: StoreState, cell: Cell) -> bool:
    """A seed is left alone once its run ended (status.finished), whatever its round count: a seed's run has
    no other target to meet, where a sweep cell's n_rounds may ask for more."""
    return finished(st.status)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out", help="store root (passed on to every run)")
    p.add_argument("--on", choices=ON, default="procs", help="where the runs execute: a process each (default), "
                   "this process, or the work pool")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="just seeds", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("n", type=int, help="seeds 0..N-1")
    p.add_argument("recipe", choices=tuple(RECIPES), help="the run recipe each seed runs")
    p.add_argument("--run-id", default="", help="group name: the runs are GROUP-s0 .. GROUP-s<N-1>")
    _common(p)
    p.add_argument("--yoke-group", default="", metavar="TREAT", help="a control arm: yoke seed s to the treatment "
                   "run TREAT-s<s> (--yoke), which must have run first")
    a, rest = p.parse_known_args(argv)
    if a.n < 1:
        p.error("N must be >= 1")
    _refuse_what_we_set(p, rest, "--yoke-group")
    return a, rest


def _refuse_what_we_set(p: argparse.ArgumentParser, flags: list[str], yoke_by: str) -> None:
    for flag in ("--seed", "--yoke"):
        if any(x == flag or x.startswith(flag + "=") for x in flags):
            p.error(f"{flag} is what this sets{f' ({yoke_by})' if flag == '--yoke' else ''}: leave it out")


def seeds_grid(a: argparse.Namespace, rest: list[str]) -> Grid:
    group = a.run_id or f"seeds-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    control = next((v for k, v in zip(rest, rest[1:]) if k == "--control"), "none")
    if control != "none" and not a.yoke_group:
        logger.warning(f"--control {control} without --yoke-group: each seed runs its own walk, unmatched to any "
                       "treatment, and `just stages`/`just beyond` refuse it as a control unless --unyoked")
    return Grid(name=group, seeds=list(range(a.n)), base=list(rest), prefix="", recipe=a.recipe, yoke=a.yoke_group)


def study_grids(arms: list[str], seeds: int = STUDY_SEEDS, flags: list[str] | None = None,
                name: str = "study") -> list[Grid]:
    """One seeds grid per arm, the runs NAME-ARM-s<s>, treatments first: a yoked control needs its treatment's
    rounds. `flags` go to every arm (after STUDY_FLAGS, so they win)."""
    arms = sorted(arms, key=lambda x: x in YOKED_TO)
    base = [*STUDY_FLAGS, *(flags or [])]
    return [Grid(name=f"{name}-{arm}", seeds=list(range(seeds)), base=[*ARMS[arm], *base], prefix="",
                 recipe="small-run", yoke=f"{name}-{YOKED_TO[arm]}" if arm in YOKED_TO else "") for arm in arms]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["study"]:
        return study(argv[1:])
    a, rest = parse(argv)
    g = seeds_grid(a, rest)
    return run_grids(g.name, [g], a.out, a.on, stages_after=True)


def study(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="just study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("arms", nargs="*", default=STUDY_ARMS, help=f"of {', '.join(ARMS)} (default: "
                   f"{' '.join(STUDY_ARMS)})")
    p.add_argument("--seeds", type=int, default=STUDY_SEEDS, metavar="N", help="seeds 0..N-1 of each arm")
    p.add_argument("--name", default="study", help="the runs NAME-ARM-s<s>: another name for a study that "
                   "changes its flags (after --), so its runs do not resume the default study's")
    _common(p)
    argv, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    a = p.parse_args(argv)
    unknown = [x for x in a.arms if x not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {' '.join(unknown)}: one of {', '.join(ARMS)}")
    if a.seeds < 1:
        p.error("--seeds must be >= 1")
    _refuse_what_we_set(p, flags, "the control arms are yoked to their treatment")
    rc = run_grids(a.name, study_grids(a.arms, a.seeds, flags, a.name), a.out, a.on, stages_after=True)
    if a.on != "pool":
        from .diag.pareto import main as pareto

        script("just pareto", pareto, ["--by", "config", "--out", a.out])
    return rc


def run_grids(name: str, grids: list[Grid], out: str, on: str, stages_after: bool) -> int:
    """Launch the grids' cells; locally, then `just stages` over the runs that exist."""
    cells = [c for g in grids for c in g.cells()]
    rows = launch(name, cells, out, on, finished=ended, just=os.environ.get("JUST", "just"))
    if on == "pool":
        from .sweep.pool import workers_note

        logger.info(f"{name}: {sum(act == 'submitted' for _, act, _ in rows)} of {len(cells)} runs submitted "
                    f"({workers_note()}); `just stages` once they are done")
        return 0
    ids = [c.run_id for c in cells if (Path(out) / "runs" / c.run_id / "run_info.jsonl").is_file()]
    if ids and stages_after:
        from .diag.stages import main as stages

        script("just stages", stages, [*ids, "--out", out])
    bad = [f"{rid} ({why})" for rid, act, why in rows if act == "failed"]
    if bad:
        logger.error(f"{len(bad)} of {len(cells)} runs did not finish: {', '.join(bad)}; rerun the same command to "
                     "resume them")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(script("just seeds", main, sys.argv[1:]))

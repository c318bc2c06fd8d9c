"""Launch a grid's cells: the one mechanism under `just sweep`, `just seeds` and `just study`.

on="pool": submitted to the Prefect work pool; workers run them (pool.submit, docs/scaling.md).
on="procs": here, one after another, each in a process of its own (a run owns its Prefect home and its model).
on="inline": here, one after another, in this process, each as a pool worker runs a cell (cell.run_cell).
Locally each cell is decided from the store first: a finished run is skipped, one that started and did not
finish is resumed, the rest are started. A run still being written elsewhere refuses the resume itself (its
writer lock), so the local faces need no liveness guess.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from ..errors import UserError
from .grid import Cell
from .state import STALE_AFTER, StoreState, store_states

ON = ("pool", "procs", "inline")
# The sweep's rule: status.finished with the cell's round count (StoreState.finished).
Finished = Callable[[StoreState, Cell], bool]


def sweep_finished(st: StoreState, cell: Cell) -> bool:
    return st.finished(cell.cfg.n_rounds)


def launch(name: str, cells: list[Cell], root: str | Path, on: str = "procs", finished: Finished = sweep_finished,
           just: str = "just", pool: str | None = None, stale_after: float = STALE_AFTER,
           dry_run: bool = False) -> list[tuple[str, str, str]]:
    """Run or submit the cells that need it; (run_id, what was done, why) per cell."""
    if on not in ON:
        raise UserError(f"--on {on!r}: one of {', '.join(ON)}")
    root = Path(root).resolve()  # absolute: a flow run starts in a throwaway temp dir
    if on == "pool":
        from .pool import POOL, connect_server, submit

        connect_server()
        return submit(name, cells, root, pool or POOL, stale_after, dry_run)
    from .cell import OUTCOMES

    states = store_states(root, [c.run_id for c in cells])
    out = []
    for cell in cells:
        st = states[cell.run_id]
        if finished(st, cell):
            logger.info(f"{cell.run_id} already {st.status}, skipped")
            out.append((cell.run_id, "skip", str(st.status)))
            continue
        mode = "resume" if st.status else "start"
        if dry_run:
            out.append((cell.run_id, f"would {mode}", ""))
            continue
        rc = run_inline(cell, root) if on == "inline" else run_process(command(cell, root, mode, just))
        out.append((cell.run_id, mode if rc in OUTCOMES else "failed", f"exit {rc}"))
    return out


def command(cell: Cell, root: Path, mode: str, just: str = "just") -> list[str]:
    """The process that runs a cell: `just RECIPE` for a recipe's cell (the recipe adds its own flags), else
    `python -m steer_heal`; a resume passes the cell's flags, so the run checks it is the same experiment."""
    out = ["--out", str(root)]
    if cell.recipe:
        if mode == "resume":
            return [just, "resume", cell.run_id, *out]
        seed = ["--seed", str(cell.seed)] if cell.seed is not None else []
        return [just, cell.recipe, *seed, "--run-id", cell.run_id, *out, *cell.args]
    who = ["--resume" if mode == "resume" else "--run-id", cell.run_id]
    return [sys.executable, "-m", "steer_heal", *who, *cell.flags, *out]


def run_process(cmd: list[str]) -> int:
    logger.info(" ".join(cmd))
    return subprocess.run(cmd).returncode


def run_inline(cell: Cell, root: Path) -> int:
    """The cell in this process; a bad value is the cell's failure (exit 2), not the launcher's."""
    from .cell import run_cell

    logger.info(f"{cell.run_id}: in this process")
    try:
        return run_cell(cell.run_id, list(cell.flags), str(root))[0]
    except UserError as e:
        logger.error(f"{cell.run_id}: {e}")
        return 2
    finally:
        _forget_events_client()


def _forget_events_client() -> None:
    """Prefect keeps one events client per process, bound to the first run's server: the next run's events
    would go to a server that is gone, and the process would wait on them at exit for minutes. Stopping it
    (its run's events are sent or lost with its server) lets the next run make one for its own server."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=5)

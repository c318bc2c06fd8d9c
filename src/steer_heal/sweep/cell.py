"""The two flows a work pool runs: a sweep cell (one run) and a queued command (`just csweep ...`).

Both are deployed by module path (pool.deploy), so a worker needs only an installed steer_heal, no
code storage. This module imports nothing heavy at load time: a worker's flow-run process imports
it before the first state change, and the run's own imports belong to the run.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from prefect import flow

# run.run's exit codes that are outcomes, not errors: done or stopped (0) and starved (3)
OUTCOMES = (0, 3)


@flow(name="steer-heal-cell", log_prints=False)
def cell(run_id: str, flags: list[str], out: str) -> str:
    """One sweep cell = one run: start it, or resume it when the store has it already, so a re-submit
    continues from the last baked round. The run executes in this process, as a subflow of the cell,
    and `out` is absolute (a flow run starts in a throwaway temp dir)."""
    rc, last = run_cell(run_id, flags, out)
    if rc not in OUTCOMES:
        raise RuntimeError(f"run {run_id} ended {last.get('status')} (exit {rc}): {last.get('reason', '')}")
    return str(last.get("status"))


def run_cell(run_id: str, flags: list[str], out: str) -> tuple[int, dict]:
    """Start or resume the cell's run in this process (a worker's cell, or `--on inline`): its exit code and
    its last status row."""
    from ..cli import parse
    from ..console import setup_logging
    from ..run import run
    from ..store import RunLog

    started = (Path(out) / "runs" / run_id / "run_info.jsonl").is_file()
    argv = ["--resume", run_id] if started else ["--run-id", run_id]
    cfg, explicit, preset = parse([*argv, *flags, "--out", out], with_preset=True)
    setup_logging(cfg.log_level)
    rc = run(cfg, explicit, preset=preset)  # fast-dev sizes its max_len in a cell as on the command line
    return rc, (RunLog(out, run_id).read("status") or [{}])[-1]


@flow(name="steer-heal-command", log_prints=False)
def command(argv: list[str], cwd: str) -> int:
    """A queued command (what pueue would run), in `cwd` on whichever worker picks it up."""
    if not Path(cwd).is_dir():
        raise RuntimeError(f"`{shlex.join(argv)}`: folder {cwd} does not exist on this worker")
    rc = subprocess.run(argv, cwd=cwd).returncode
    if rc:
        raise RuntimeError(f"`{shlex.join(argv)}` exited {rc}")
    return rc

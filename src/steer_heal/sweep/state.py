"""What the store says about a sweep's cells: status, rounds done, last sign of life, and whether a
`running` run is still alive.

Liveness is inferred until the run has its own lock and heartbeat (issue 12): a run is alive while
its status is `running` and its newest sign of life (the newest `status`/`stages` row, or a time the
caller adds, such as Prefect's flow-run heartbeat) is younger than `stale_after` seconds. Stages can
take minutes on a GPU, so the default leans long: a dead cell waits a little, a live one is never
started twice.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..status import finished
from ..store import RunLog, query

STALE_AFTER = float(os.environ.get("STEER_HEAL_STALE_AFTER", 600))


@dataclass
class StoreState:
    status: str | None = None  # None: the run has not started (no run_info)
    reason: str = ""
    rounds_done: int = 0
    last_ts: float | None = None  # epoch seconds of the newest status/stages row

    def finished(self, n_rounds: int) -> bool:
        """A re-submit has nothing to do (status.finished: done with its rounds, stopped, starved)."""
        return finished(self.status, self.rounds_done, n_rounds)


def _epoch(ts: dt.datetime | str | None) -> float | None:
    if ts is None:
        return None
    if isinstance(ts, str):
        ts = dt.datetime.fromisoformat(ts)
    return ts.replace(tzinfo=dt.UTC).timestamp()  # the store holds naive UTC


def store_states(root: str | Path, run_ids: Iterable[str]) -> dict[str, StoreState]:
    """One query over the `runs` view for all the cells; a cell with no run gets an empty state."""
    ids = list(run_ids)
    out = {r: StoreState() for r in ids}
    if not ids or not (Path(root) / "runs").is_dir():
        return out
    _, rows = query(root, "SELECT run_id, status, reason, rounds_done, last_ts FROM runs WHERE run_id IN "
                          "(SELECT unnest(?))", [ids])
    for run_id, status, reason, rounds_done, last_ts in rows:
        out[run_id] = StoreState(status or "running", reason or "", int(rounds_done or 0), _epoch(last_ts))
    return out


def last_sign(root: str | Path, run_id: str) -> float | None:
    """Epoch seconds of the run's newest `status` or `stages` row (None: no run)."""
    if not (Path(root) / "runs" / run_id / "run_info.jsonl").is_file():
        return None
    log = RunLog(root, run_id)
    return max((_epoch(r["ts"]) for t in ("status", "stages") for r in log.read(t)), default=None)


def run_alive(root: str | Path, run_id: str, stale_after: float = STALE_AFTER, signs: Iterable[float] = (),
              now: float | None = None) -> bool:
    """Whether a run is still being written: its status is `running` and its newest sign of life (store
    rows, plus the caller's `signs`) is under `stale_after` s old. A run with no store rows yet counts
    on `signs` alone (a cell still loading). Issue 12's run lock replaces the guess here."""
    path = Path(root) / "runs" / run_id
    if (path / "status.jsonl").is_file():
        last = RunLog(root, run_id).read("status")
        if last and last[-1]["status"] != "running":
            return False
    newest = max([t for t in (last_sign(root, run_id), *signs) if t is not None], default=None)
    return newest is not None and (now or time.time()) - newest < stale_after

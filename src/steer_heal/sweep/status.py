"""`just sweep-status`: one line per cell (run id, Prefect state, worker, store status, rounds, last_ts,
alive or stale) and, with --timing, where each cell's time went between submission and its end."""

from __future__ import annotations

import datetime as dt
import statistics
import time
from pathlib import Path

from ..store import query
from .pool import by_cell, client, flow_runs, is_alive
from .state import STALE_AFTER, StoreState, _epoch

COLS = ["run_id", "prefect", "runs", "worker", "status", "rounds", "last_ts", "alive"]
# seconds from submission to the flow run's end, split at: picked up (Pending), process started
# (Running), the run's `running` status row, its final status row, the flow run's end
TIMING = ["pickup_s", "spawn_s", "setup_s", "run_s", "finish_s"]


def _store(root: Path, prefix: str) -> dict[str, tuple]:
    if not (root / "runs").is_dir():
        return {}
    _, rows = query(root, "SELECT run_id, status, reason, rounds_done, n_rounds, last_ts FROM runs "
                          "WHERE starts_with(run_id, ?)", [prefix])
    return {r[0]: r[1:] for r in rows}


def _hms(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%H:%M:%S") if t else ""


def _age(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def timing(c, root: Path, run_id: str, fr) -> list[float | None]:
    """The TIMING split of one flow run, from its state history and the run's status rows."""
    from ..store import RunLog

    states = sorted(c.read_flow_run_states(fr.id), key=lambda s: s.timestamp)
    first = {}
    for s in states:
        first.setdefault(s.type.value, s.timestamp.timestamp())
    end = fr.end_time.timestamp() if fr.end_time else None
    t_run = first.get("RUNNING")
    rows = RunLog(root, run_id).read("status") if (root / "runs" / run_id / "status.jsonl").is_file() else []
    ts = [(r["status"], _epoch(r["ts"])) for r in rows]
    started = next((t for s, t in ts if s == "running" and t_run and t >= t_run - 1), None)
    ended = next((t for s, t in ts if s != "running" and started and t >= started), None)
    marks = [fr.created.timestamp(), first.get("PENDING"), t_run, started, ended, end]
    return [round(b - a, 2) if a is not None and b is not None else None for a, b in zip(marks, marks[1:])]


def status_rows(root: str | Path, name: str | None = None, stale_after: float = STALE_AFTER,
                with_timing: bool = False) -> tuple[list[str], list[tuple], str]:
    """Columns, one row per cell (cells of sweep `name`, or of every sweep), and a summary line."""
    root = Path(root).resolve()
    prefix = f"sw-{name}-" if name else "sw-"
    store = _store(root, prefix)
    now = time.time()
    rows, spans, own = [], [], []
    with client() as c:
        runs = by_cell(flow_runs(c, f"sweep:{name}" if name else "sweep"))
        for rid in sorted(set(store) | {r for r in runs if r.startswith(prefix)}):
            status, reason, done, n, last = store.get(rid, (None, "", 0, None, None))
            mine = runs.get(rid, [])
            latest = mine[-1] if mine else None
            st = StoreState(status, reason or "", int(done or 0), _epoch(last))
            alive = ""
            if status == "running":
                alive = "alive" if is_alive(c, root, rid, st, latest, stale_after) else \
                    f"stale {_age(now - st.last_ts)}" if st.last_ts else "stale"
            row = [rid, latest.state.name if latest else "", len(mine),
                   (latest.labels or {}).get("prefect.worker.name", "") if latest else "",
                   (status or "") + (f": {reason[:40]}" if reason and status != "done" else ""),
                   f"{done or 0}/{n}" if n else "", _hms(st.last_ts), alive]
            if with_timing:
                split = timing(c, root, rid, latest) if latest else [None] * len(TIMING)
                row += split
                if latest and latest.end_time:
                    spans.append((latest.created.timestamp(), latest.end_time.timestamp()))
                if split[3] is not None:
                    own.append(split[3])
            rows.append(tuple(row))
    return COLS + (TIMING if with_timing else []), rows, _summary(rows, spans, own)


def _summary(rows: list[tuple], spans: list[tuple[float, float]], own: list[float]) -> str:
    n_done = sum(1 for r in rows if r[4] == "done")
    line = f"{len(rows)} cells, {n_done} done"
    if spans:
        wall = max(e for _, e in spans) - min(s for s, _ in spans)
        # what a worker pays per cell besides the run; pickup is mostly waiting for a free worker
        over = [r[-4] + r[-3] + r[-1] for r in rows if None not in r[-4:-2] and r[-1] is not None]
        line += (f"; latest attempts: {wall:.1f} s from first submission to last end, the runs' own time "
                 f"{sum(own):.1f} s in all")
        if over:
            line += f", per-cell overhead median {statistics.median(over):.1f} s (spawn+setup+finish)"
    return line

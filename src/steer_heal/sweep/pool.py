"""The sweep's side of Prefect: the work pool and its two deployments, submitting a grid (start, skip or
resume each cell), queueing a command, and reading back what each cell's flow runs did.

A cell's flow runs carry the tags `sweep:<name>` and `cell:<run_id>`; the store, not Prefect, says whether
a cell is finished. Idempotency keys are `<run_id>#<n>`: two people submitting the same grid at once
get one flow run per cell, and a re-submit after a crash gets a fresh key (Prefect keeps a key, per
flow, for good, even on a crashed run).
"""

from __future__ import annotations

import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .grid import Cell
from .state import STALE_AFTER, StoreState, run_alive, store_states

POOL = os.environ.get("STEER_HEAL_POOL", "steer-heal")
LOCAL_API = "http://127.0.0.1:4200/api"
WAITING = ("SCHEDULED", "PENDING", "PAUSED", "CANCELLING")  # queued or about to start: leave alone


def connect_server() -> str:
    """Point this process's Prefect client at the sweep server: PREFECT_API_URL, else the local
    `just server`. Must run before Prefect reads its settings. A dead server is a one-line error."""
    url = os.environ.setdefault("PREFECT_API_URL", LOCAL_API)
    try:
        urllib.request.urlopen(url.rstrip("/") + "/health", timeout=10).close()
    except OSError as e:
        raise UserError(f"no Prefect server answers at {url} ({getattr(e, 'reason', e)}): start one with "
                          "`just server` (and workers with `just worker`), or export PREFECT_API_URL="
                          "http://HOST:4200/api") from None
    return url


def client():
    from prefect import get_client

    return get_client(sync_client=True)


def deploy(pool: str = POOL) -> dict[str, Any]:
    """Create the process pool if missing and (re)apply the cell and command deployments to it, by module
    path. Both are upserts, so every submission may call this. Returns flow name -> deployment id."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.types.entrypoint import EntrypointType
    from prefect.workers.process import ProcessWorker

    from .cell import cell, command

    with client() as c:
        try:
            c.read_work_pool(pool)
        except ObjectNotFound:
            try:
                c.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                  base_job_template=ProcessWorker.get_default_base_job_template()))
            except ObjectAlreadyExists:  # a worker or another submitter made it meanwhile
                pass
    return {f.name: f.to_deployment(name=pool, work_pool_name=pool, entrypoint_type=EntrypointType.MODULE_PATH).apply()
            for f in (cell, command)}


def flow_runs(c, tag: str | None = None, flow: str = "steer-heal-cell", deployment_id: Any = None) -> list:
    """The flow's runs (with `tag`, of one deployment), oldest first; paged, the API caps a page at 200.
    A sweep's cells are looked up across every pool: a run id is one run, whichever pool queued it."""
    from prefect.client.schemas import filters as f

    got, off = [], 0
    frf = f.FlowRunFilter(tags=f.FlowRunFilterTags(all_=[tag])) if tag else None
    df = f.DeploymentFilter(id=f.DeploymentFilterId(any_=[deployment_id])) if deployment_id else None
    while True:
        page = c.read_flow_runs(flow_filter=f.FlowFilter(name=f.FlowFilterName(any_=[flow])), flow_run_filter=frf,
                                deployment_filter=df, limit=200, offset=off)
        got += page
        if len(page) < 200:
            return sorted(got, key=lambda r: r.created)
        off += 200


def by_cell(runs: list) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in runs:
        for t in r.tags:
            if t.startswith("cell:"):
                out.setdefault(t[5:], []).append(r)
    return out


def heartbeat(c, run) -> float | None:
    """Epoch seconds of the flow run's newest Prefect heartbeat (sent every PREFECT_FLOWS_HEARTBEAT_FREQUENCY
    s, 180 by default, by the flow-run process)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    page = c.read_events(EventFilter(event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                                     resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"])), limit=1)
    return page.events[0].occurred.timestamp() if page.events else None


@dataclass
class Decision:
    action: str  # skip | submit | revive (mark the flow run that died silently Crashed, then submit)
    why: str


def decide(st: StoreState, n_rounds: int, latest: Any, alive: bool) -> Decision:
    """What a (re-)submission does with one cell, given its store state, its newest flow run and whether
    its run is alive (state.run_alive). The store decides finished; Prefect decides queued."""
    if st.finished(n_rounds):
        return Decision("skip", f"{st.status}, {st.rounds_done} rounds")
    state = latest.state.type.value if latest is not None else None
    if state in WAITING:
        return Decision("skip", f"queued ({latest.state.name})")
    if alive:
        return Decision("skip", "running")
    mode = "resume" if st.status else "start"
    if state == "RUNNING":
        return Decision("revive", f"{mode}: its flow run shows no sign of life")
    return Decision("submit", mode + (f" after {latest.state.name}" if latest is not None else ""))


def is_alive(c, root: Path, run_id: str, st: StoreState, latest: Any, stale_after: float) -> bool:
    """state.run_alive with what Prefect knows: a running flow run's start and heartbeat are signs of life,
    a flow run that ended after the store's newest row means nobody writes the run any more."""
    if latest is None or latest.state.type.value != "RUNNING":
        final_end = latest.end_time.timestamp() if latest is not None and latest.end_time else None
        if final_end and st.last_ts and st.last_ts <= final_end:
            return False  # the store's newest row came from a flow run that has ended since
        return st.status == "running" and run_alive(root, run_id, stale_after)
    signs = [latest.start_time.timestamp() if latest.start_time else latest.created.timestamp(), heartbeat(c, latest)]
    return run_alive(root, run_id, stale_after, [s for s in signs if s is not None])


def check_existing(name: str, cells: list[Cell], root: Path, states: dict[str, StoreState]) -> None:
    """A cell whose run exists must be that run: the same experiment (resume's own check), else the grid
    is refused before anything is queued, instead of skipping or resuming a run it does not describe."""
    from ..cli import parse
    from ..run import resume_config

    bad = []
    for cell in cells:
        if states[cell.run_id].status is not None:
            try:
                resume_config(*parse(["--resume", cell.run_id, *cell.flags, "--out", str(root)]))
            except UserError as e:
                bad.append(str(e))
    if bad:
        raise UserError(f"sweep {name}: {len(bad)} cell(s) name runs that exist with another config, e.g. "
                          f"{bad[0]} Give this grid another --name (or resubmit the grid that made them).")


def next_key(run_id: str, runs: list) -> str:
    used = [int(k.rpartition("#")[2]) for r in runs if (k := r.idempotency_key or "").startswith(run_id + "#")
            and k.rpartition("#")[2].isdigit()]
    return f"{run_id}#{max(used, default=-1) + 1}"


def submit(name: str, cells: list[Cell], root: Path, pool: str = POOL, stale_after: float = STALE_AFTER,
           dry_run: bool = False) -> list[tuple[str, str, str]]:
    """Submit the cells that need a run; (run_id, what was done, why) per cell."""
    from prefect.states import Crashed

    states = store_states(root, [x.run_id for x in cells])
    check_existing(name, cells, root, states)
    dep_id = None if dry_run else deploy(pool)["steer-heal-cell"]
    out = []
    with client() as c:
        runs = by_cell(flow_runs(c, f"sweep:{name}"))
        for cell in cells:
            mine, st = runs.get(cell.run_id, []), states[cell.run_id]
            latest = mine[-1] if mine else None
            d = decide(st, cell.cfg.n_rounds, latest, is_alive(c, root, cell.run_id, st, latest, stale_after))
            if d.action == "skip" or dry_run:
                out.append((cell.run_id, "skip" if d.action == "skip" else f"would {d.action}", d.why))
                continue
            if d.action == "revive":
                c.set_flow_run_state(latest.id, Crashed(message=f"no sign of life for {stale_after:.0f} s: "
                                                                "re-submitted by `just sweep`"), force=True)
            fr = c.create_flow_run_from_deployment(
                dep_id, name=cell.run_id, tags=["sweep", f"sweep:{name}", f"cell:{cell.run_id}"],
                idempotency_key=next_key(cell.run_id, mine),
                parameters=dict(run_id=cell.run_id, flags=list(cell.flags), out=str(root)))
            done = "submitted" if fr.id not in {r.id for r in mine} else "skip"
            out.append((cell.run_id, done, d.why if done == "submitted" else "submitted meanwhile by someone else"))
    return out


def workers_note(pool: str = POOL) -> str:
    """How many workers poll the pool: a grid queued on a pool nobody polls waits forever, silently."""
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    with client() as c:
        try:
            n = sum(w.status.value == "ONLINE" for w in c.read_workers_for_work_pool(pool))
        except (ObjectNotFound, PrefectHTTPStatusError):
            n = 0
    return f"{n} worker(s) online" if n else f"no worker polls pool {pool!r} yet: start `just worker` (on each machine)"


def enqueue(argv: list[str], cwd: str, label: str, pool: str = POOL):
    """Queue a command on the pool (what `pueue add` would do); returns its flow run."""
    dep_id = deploy(pool)["steer-heal-command"]
    with client() as c:
        return c.create_flow_run_from_deployment(
            dep_id, name=f"{label}-{time.strftime('%H%M%S')}", tags=["queue", f"queue:{label}"],
            parameters=dict(argv=list(argv), cwd=str(Path(cwd).resolve())))

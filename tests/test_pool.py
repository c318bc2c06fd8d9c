"""Sweeps and the queue on a real local Prefect server and process workers (the recipes' own code paths):
a grid over two workers into one store, a worker killed mid-round, a drained worker, re-submission, the
queue without pueue, and the grid again with Prefect on Postgres.

Every server, worker supervisor, flow-run process and Postgres cluster is torn down after the test, even
on failure (tests/pool_procs.py).
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from pool_procs import REPO, PgCluster, Pool, kill_group, path_without_pueue, store_runs, wait_for
from test_flow import ARGS, assert_same_rounds, rounds

from steer_heal.store import RunLog, query

CELLS = ["lam=0.3-s0", "lam=0.3-s1", "lam=1-s0", "lam=1-s1"]


def run_grid(pool: Pool, name: str) -> dict:
    """Two workers (already polling), the 4-cell grid, until every cell is done; the caller stops the workers."""
    workers = pool.workers(2, f"{name}w")
    wait_for(pool, lambda: pool.online(f"{name}w-") == 2, 300, f"workers-{name}w.log")  # time the grid, not them
    t0 = time.time()
    pool.sweep(name)
    def finished():
        runs = [r for r in pool.flow_runs() if f"sweep:{name}" in r.tags]
        return runs if len(runs) == 4 and all(r.state.is_final() for r in runs) or workers.poll() is not None else []

    runs = wait_for(pool, finished, 900, f"workers-{name}w.log")
    wall = max(r.end_time.timestamp() for r in runs if r.end_time) - t0
    return dict(wall=wall, runs=runs, workers=workers, t0=t0)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def sqlite_pool(tmp_path_factory):
    pool = Pool(tmp_path_factory.mktemp("pool"))
    try:
        pool.start()
        yield pool
    finally:
        pool.stop()


@pytest.fixture(scope="module")
def grid(sqlite_pool):
    got = run_grid(sqlite_pool, "g")
    yield got
    kill_group(got["workers"])


# ---------------------------------------------------------------- default suite: no worker, nothing runs

def test_queue_and_sweep_land_on_the_pool_without_pueue(sqlite_pool):
    p, pool = sqlite_pool, "smoke"  # a pool no worker polls: what is queued stays queued
    env = p.env(STEER_HEAL_POOL=pool, PATH=path_without_pueue())
    calls = [subprocess.Popen(["just", recipe, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for recipe, args in [("queue-stages", ["a", "b", "--out", str(p.out)]), ("queue-csweep", ["a", "1"]),
                                  ("queue-barrier", ["a", "0", "--lam", "0.5", "1"]),
                                  ("queue-run", ["--preset", "fast-dev"])]]
    for call in calls:
        so, se = call.communicate(timeout=180)
        assert call.returncode == 0 and f"on pool '{pool}'" in so, se[-2000:]
    queued = {t[6:]: r for r in p.flow_runs("steer-heal-command", pool) for t in r.tags if t.startswith("queue:")}
    assert {k: r.parameters["argv"] for k, r in queued.items()} == {
        "stages": ["just", "stages", "a", "b", "--out", str(p.out)], "csweep": ["just", "csweep", "a", "1"],
        "barrier-sweep": ["just", "barrier-sweep", "a", "0", "--lam", "0.5", "1"],
        "run": ["just", "run", "--preset", "fast-dev"]}
    assert all(r.parameters["cwd"] == str(REPO) and r.state.type.value == "SCHEDULED" for r in queued.values())

    first = p.cli("submit", "--name", "smoke", "--pool", pool, "--lam", "0.3", "1", "--", *ARGS, "--out", str(p.out))
    assert first.returncode == 0 and first.stdout.count(" submitted  start") == 2, first.stderr[-2000:]
    again = p.cli("submit", "--name", "smoke", "--pool", pool, "--lam", "1", "0.3", "--", *ARGS, "--out", str(p.out))
    assert again.returncode == 0 and again.stdout.count("queued (Scheduled)") == 2 and "0 submitted" in again.stdout
    assert "no worker polls pool 'smoke' yet: start `just worker`" in again.stdout
    cells = p.flow_runs("steer-heal-cell", pool)
    assert sorted(r.name for r in cells) == ["sw-smoke-lam=0.3-s3", "sw-smoke-lam=1-s3"]
    assert all(r.parameters["out"] == str(p.out) and r.idempotency_key == r.name + "#0" for r in cells)
    status = p.cli("status", "smoke", "--out", str(p.out))
    assert status.returncode == 0 and status.stdout.count("Scheduled") == 2 and "2 cells, 0 done" in status.stdout


# ---------------------------------------------------------------- slow: workers run the cells

@pytest.mark.slow
def test_grid_on_two_workers_into_one_store(sqlite_pool, grid):
    p, runs = sqlite_pool, grid["runs"]
    assert {k: v for k, v in store_runs(p.out, "g").items()} == {f"sw-g-{c}": ("done", 2) for c in CELLS}
    for c in CELLS:  # each cell started once, ran once: one run_info row, one flow run
        log = RunLog(p.out, f"sw-g-{c}")
        assert len(log.read("run_info")) == 1 and [r["status"] for r in log.read("status")] == ["running", "done"]
    assert sorted(r.name for r in runs) == [f"sw-g-{c}" for c in CELLS]
    assert all(r.state.type.value == "COMPLETED" for r in runs)
    assert {r.labels["prefect.worker.name"] for r in runs} == {"gw-w0", "gw-w1"}
    spans = sorted((r.start_time.timestamp(), r.end_time.timestamp()) for r in runs)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "no two cells ran at the same time"
    # one after another, the four cells would take at least the sum of their times from a worker taking
    # each (Pending: process start, imports, the run) to its end
    with p.client() as c:
        taken = [min(s.timestamp.timestamp() for s in c.read_flow_run_states(r.id) if s.type.value == "PENDING")
                 for r in runs]
    seq = sum(r.end_time.timestamp() - t for r, t in zip(runs, taken))
    print(f"\ngrid wall {grid['wall']:.1f} s from submission, the cells one after another {seq:.1f} s "
          f"({grid['wall'] / seq:.2f}x), of which running {sum(e - s for s, e in spans):.1f} s; load "
          f"{os.getloadavg()[0]:.1f}; runs " + ", ".join(f"{s - grid['t0']:.0f}-{e - grid['t0']:.0f}" for s, e in spans))
    assert grid["wall"] < 0.8 * seq

    # re-submitting the finished grid starts nothing
    again = p.sweep("g")
    assert again == {f"sw-g-{c}": ("skip", "done, 2 rounds") for c in CELLS}
    assert len(p.flow_runs()) == len(runs)

    # the queue runs on the pool too: `just stages` over the sweep's cells, behind the grid
    got = subprocess.run(["just", "queue-stages", *[f"sw-g-{c}" for c in CELLS], "--out", str(p.out)], cwd=REPO,
                         env=p.env(PATH=path_without_pueue()), capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr[-2000:]
    done = wait_for(p, lambda: [r for r in p.flow_runs("steer-heal-command") if r.state.is_final()], 600,
                    "workers-gw.log")
    assert done[0].state.type.value == "COMPLETED", p.tail("workers-gw.log")
    _, diags = query(p.out, "SELECT kind, source_run FROM diagnostics")
    assert [k for k, _ in diags] == ["stages"]


@pytest.mark.slow
def test_a_worker_killed_mid_round_resumes_on_resubmit(sqlite_pool, grid):
    p = sqlite_pool
    doomed = p.workers(1, "doomed", "kill", STEER_HEAL_KILL_AT="heal:r1:step1")
    p.sweep("k", pool="kill")
    wait_for(p, lambda: doomed.poll() is not None, 600, "workers-doomed.log")  # its one worker died
    assert "exited: {'doomed-w0': -9}" in p.tail("workers-doomed.log"), p.tail("workers-doomed.log")
    ok = p.workers(1, "ok", "kill")
    try:
        wait_for(p, lambda: list(store_runs(p.out, "k").values()).count(("done", 2)) == 3, 900, "workers-ok.log")
        (killed,) = [r for r, (s, n) in store_runs(p.out, "k").items() if s != "done"]
        assert store_runs(p.out, "k")[killed] == ("running", 1)  # round 0 baked, round 1 lost mid-heal
        (stuck,) = [r for r in p.flow_runs(pool="kill") if r.name == killed]
        assert stuck.state.type.value == "RUNNING" and stuck.labels["prefect.worker.name"] == "doomed-w0"

        # while its last sign of life is recent, a re-submit leaves the cell alone
        again = p.sweep("k", "--stale-after", "600", pool="kill")
        assert again.pop(killed) == ("skip", "running") and set(again.values()) == {("skip", "done, 2 rounds")}
        time.sleep(4)
        again = p.sweep("k", "--stale-after", "3", pool="kill")
        assert again.pop(killed) == ("submitted", "resume: its flow run shows no sign of life")
        assert set(again.values()) == {("skip", "done, 2 rounds")}
        wait_for(p, lambda: store_runs(p.out, "k")[killed] == ("done", 2), 600, "workers-ok.log")
    finally:
        kill_group(ok)
    ref = killed.replace("sw-k-", "sw-g-")
    assert_same_rounds(rounds(p.out, ref), rounds(p.out, killed))
    log = RunLog(p.out, killed)
    assert len(log.read("run_info")) == 1
    assert [(r["status"], r["reason"]) for r in log.read("status")] == [("running", ""), ("running", "resumed"),
                                                                        ("done", "")]
    stages = [(r["round"], r["stage"]) for r in log.read("stages")]
    assert len(stages) == len(set(stages)) == len(RunLog(p.out, ref).read("stages"))  # round 0 not redone
    n = [len([x for x in RunLog(p.out, r).read("heal_steps") if x["round"] == 1]) for r in (killed, ref)]
    assert n[0] == n[1] > 0
    mine = [r for r in p.flow_runs(pool="kill") if r.name == killed]
    assert [(r.state.type.value, r.idempotency_key) for r in mine] == [("CRASHED", killed + "#0"),
                                                                       ("COMPLETED", killed + "#1")]


@pytest.mark.slow
def test_stopping_a_worker_drains_its_cell_and_a_resubmit_resumes_it_at_once(sqlite_pool, grid):
    """Ctrl-C on `just worker` SIGTERMs the flow run first: the run writes `interrupted`, Prefect marks the flow run
    Crashed, so the next `just sweep` resumes the cell without waiting out --stale-after."""
    p, one, rid = sqlite_pool, ["--lam", "1", "--seeds", "0"], "sw-d-lam=1-s0"
    sup = p.workers(1, "drain", "drain")
    p.sweep("d", pool="drain", grid=one)
    wait_for(p, lambda: (0, "extract") in {(r["round"], r["stage"]) for r in RunLog(p.out, rid).read("stages")}
             if (p.out / "runs" / rid).is_dir() else False, 600, "workers-drain.log", every=0.2)
    os.kill(sup.pid, signal.SIGINT)
    assert sup.wait(60) == 0, p.tail("workers-drain.log")
    assert RunLog(p.out, rid).read("status")[-1]["status"] == "interrupted"
    assert [r.state.type.value for r in p.flow_runs(pool="drain")] == ["CRASHED"]
    assert p.sweep("d", pool="drain", grid=one) == {rid: ("submitted", "resume after Crashed")}
    sup = p.workers(1, "drain2", "drain")
    try:
        wait_for(p, lambda: store_runs(p.out, "d").get(rid) == ("done", 2), 600, "workers-drain2.log")
    finally:
        kill_group(sup)
    assert_same_rounds(rounds(p.out, "sw-g-lam=1-s0"), rounds(p.out, rid))
    assert [r["status"] for r in RunLog(p.out, rid).read("status")] == ["running", "interrupted", "running", "done"]


# ---------------------------------------------------------------- slow: the same grid with Prefect on Postgres

@pytest.fixture(scope="module")
def pg_pool(tmp_path_factory):
    if not (shutil.which("initdb") or Path("/usr/lib/postgresql/15/bin/initdb").exists()):
        pytest.skip("no Postgres here: initdb is not on PATH")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.skip("running as root without runuser: initdb refuses root")
    # the postgres user must traverse every parent: a world-readable temp root, not pytest's 0700 one
    root = Path(tempfile.mkdtemp(prefix="steer-heal-pg-"))
    root.chmod(0o755)
    cluster = PgCluster(root / "pg")
    try:
        try:
            url = cluster.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"a throwaway Postgres cluster did not start: {e}")
        pool = Pool(tmp_path_factory.mktemp("pgpool"), db_url=url)
        try:
            pool.start()
            yield pool
        finally:
            pool.stop()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_grid_with_prefect_on_postgres(pg_pool, sqlite_pool, grid):
    got = run_grid(pg_pool, "g")
    try:
        assert store_runs(pg_pool.out, "g") == {f"sw-g-{c}": ("done", 2) for c in CELLS}
        assert {r.labels["prefect.worker.name"] for r in got["runs"]} == {"gw-w0", "gw-w1"}
        assert len(got["runs"]) == 4 and all(r.state.type.value == "COMPLETED" for r in got["runs"])
        assert not (pg_pool.out / "prefect-server" / "prefect.db").exists()  # the server used Postgres
        for c in CELLS:  # the same cells give the same rows, whichever worker and database ran them
            assert len(RunLog(pg_pool.out, f"sw-g-{c}").read("run_info")) == 1
            assert_same_rounds(rounds(sqlite_pool.out, f"sw-g-{c}"), rounds(pg_pool.out, f"sw-g-{c}"))
        print(f"\npostgres grid wall {got['wall']:.1f} s")
    finally:
        kill_group(got["workers"])

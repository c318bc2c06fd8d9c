"""Sweeps and the queue on a real local Prefect server and process workers (the recipes' own code paths):
a grid over two workers into one store, a worker killed mid-round, re-submission, the queue without
pueue, and the grid again with Prefect on Postgres.

Every server, worker supervisor and flow-run process is torn down after the test, even on failure: each
is started in its own session and killed by group, and flow runs (Prefect puts them in sessions of their
own) are found by the server URL in their environment.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from prefect.client.orchestration import SyncPrefectClient
from test_flow import ARGS, assert_same_rounds, rounds

from steer_heal.store import RunLog, query

REPO = Path(__file__).resolve().parents[1]
GRID = ["--lam", "0.3", "1", "--seeds", "0", "1"]  # 4 cells
CELLS = ["lam=0.3-s0", "lam=0.3-s1", "lam=1-s0", "lam=1-s1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def path_without_pueue() -> str:
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if d and not (Path(d) / "pueue").exists())


def kill_group(p: subprocess.Popen, grace: float = 15.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
            break
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)  # whatever the leader left in its group
    except ProcessLookupError:
        pass


class Pool:
    """A Prefect server on a free port with its own PREFECT_HOME, the store root beside it, and helpers
    to start worker supervisors (`just worker`) and to call the sweep CLI against it."""

    def __init__(self, tmp: Path, db_url: str | None = None):
        self.tmp, self.db_url = tmp, db_url
        self.out, self.home = tmp / "store", tmp / "prefect-home"
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.procs: list[subprocess.Popen] = []

    def env(self, client: bool = True, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # no stray profile or URL
        env.update(PREFECT_HOME=str(self.home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
                   PREFECT_LOGGING_LEVEL="WARNING", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        if client:
            env["PREFECT_API_URL"] = self.api
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def spawn(self, argv: list[str], log: str, env: dict) -> subprocess.Popen:
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=open(self.tmp / log, "ab"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def start(self, timeout: float = 180.0) -> float:
        env = self.env(client=False)
        if self.db_url:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = self.db_url
        t0 = time.time()
        p = self.spawn([sys.executable, "-m", "steer_heal.sweep", "server", "--out", str(self.out), "--port",
                        str(self.port), "--", "--no-ui"], "server.log", env)
        while time.time() - t0 < timeout:
            assert p.poll() is None, self.tail("server.log")
            try:
                with urllib.request.urlopen(self.api + "/health", timeout=2):
                    return time.time() - t0
            except OSError:
                time.sleep(0.25)
        raise TimeoutError(self.tail("server.log"))

    def workers(self, n: int, prefix: str, pool: str = "steer-heal", **env) -> subprocess.Popen:
        return self.spawn([sys.executable, "-m", "steer_heal.sweep", "worker", str(n), "--prefix", prefix, "--pool",
                           pool], f"workers-{prefix}.log", self.env(**env))

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "steer_heal.sweep", *args], env=self.env(), cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)

    def sweep(self, name: str, *extra: str, pool: str = "steer-heal", grid: list[str] = GRID) -> dict[str, tuple]:
        """Submit the grid (4 cells); what happened to each cell: run_id -> (action, why)."""
        got = self.cli("submit", "--name", name, "--pool", pool, *grid, *extra, "--", *ARGS, "--out", str(self.out))
        assert got.returncode == 0, got.stderr[-3000:]
        rows = [re.split(r"\s{2,}", x.strip(), maxsplit=2) for x in got.stdout.splitlines() if x.startswith("sw-")]
        return {r[0]: (r[1], r[2]) for r in rows}

    def client(self) -> SyncPrefectClient:
        return SyncPrefectClient(self.api)  # not get_client(): this process's Prefect settings are not ours

    def flow_runs(self, flow: str = "steer-heal-cell", pool: str = "steer-heal") -> list:
        from steer_heal.sweep.pool import flow_runs

        with self.client() as c:
            return flow_runs(c, c.read_deployment_by_name(f"{flow}/{pool}").id)

    def online(self, prefix: str, pool: str = "steer-heal") -> int:
        from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

        with self.client() as c:
            try:
                return sum(w.name.startswith(prefix) and w.status.value == "ONLINE"
                           for w in c.read_workers_for_work_pool(pool))
            except (ObjectNotFound, PrefectHTTPStatusError):  # 404: the first worker creates the pool
                return 0

    def tail(self, log: str, n: int = 4000) -> str:
        f = self.tmp / log
        return f"--- {log}\n" + (f.read_text(errors="replace")[-n:] if f.exists() else "(none)")

    def stop(self) -> None:
        for p in reversed(self.procs):
            kill_group(p)
        for pid in flow_run_pids(self.api):  # flow runs a killed worker left behind
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def flow_run_pids(api: str) -> list[int]:
    marker = f"PREFECT_API_URL={api}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def store_runs(out: Path, name: str) -> dict[str, tuple]:
    if not (out / "runs").is_dir():
        return {}
    _, rows = query(out, "SELECT run_id, status, rounds_done FROM runs WHERE starts_with(run_id, ?)", [f"sw-{name}-"])
    return {r[0]: r[1:] for r in rows}


def wait_for(pool: Pool, what, timeout: float, *logs: str, every: float = 1.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = what()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s\n" + "\n".join(pool.tail(x) for x in logs))


def run_grid(pool: Pool, name: str) -> dict:
    """Two workers, the 4-cell grid, until every cell is done; then the workers stop."""
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
    cells = p.flow_runs("steer-heal-cell", pool)
    assert sorted(r.name for r in cells) == ["sw-smoke-lam=0.3-s3", "sw-smoke-lam=1-s3"]
    assert all(r.parameters["out"] == str(p.out) and r.idempotency_key == r.name + "#0" for r in cells)
    status = p.cli("status", "smoke", "--pool", pool, "--out", str(p.out))
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

class PgCluster:
    """A throwaway Postgres cluster in a temp dir, on its own port and socket dir. initdb and postgres refuse
    to run as root, so as root they run as the `postgres` user, which must be able to reach the dir."""

    def __init__(self, root: Path):
        self.root, self.data, self.sock, self.port = root, root / "data", root / "sock", free_port()
        self.bin = Path(shutil.which("pg_ctl") or "/usr/lib/postgresql/15/bin/pg_ctl").resolve().parent

    def cmd(self, exe: str, *args: str) -> list[str]:
        argv = [str(self.bin / exe) if (self.bin / exe).exists() else exe, *args]
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def run(self, exe: str, *args: str) -> None:
        got = subprocess.run(self.cmd(exe, *args), capture_output=True, text=True, timeout=120)
        if got.returncode:
            raise RuntimeError(f"{exe} failed: {(got.stderr or got.stdout).strip()[-500:]}")

    def start(self) -> str:
        self.sock.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.sock, "postgres", "postgres")
        self.run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-instructions")
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "pg.log"), "-w", "-o",
                 f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1", "start")
        self.run("createdb", "-h", str(self.sock), "-p", str(self.port), "-U", "postgres", "prefect")
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/prefect"

    def stop(self) -> None:
        subprocess.run(self.cmd("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"), capture_output=True,
                       timeout=60)


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

"""Processes for tests/test_pool.py: a Prefect server on a free port with its own PREFECT_HOME, worker
supervisors and sweep CLI calls against it, a throwaway Postgres cluster; every process in its own
session, killed by group, flow runs found by the server URL in their environment."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prefect.client.orchestration import SyncPrefectClient
from test_flow import ARGS

from steer_heal.store import query

REPO = Path(__file__).resolve().parents[1]
GRID = ["--lam", "0.3", "1", "--seeds", "0", "1"]  # 4 cells


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
            return flow_runs(c, flow=flow, deployment_id=c.read_deployment_by_name(f"{flow}/{pool}").id)

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



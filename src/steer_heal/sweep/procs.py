"""`just server` and `just worker N`: the Prefect server a sweep talks to, and N process workers on its pool.

The server runs in the foreground (exec), so Ctrl-C and `kill` reach it directly. The workers each run
in their own session, one flow run at a time, started by a small supervisor that they do not outlive
(PR_SET_PDEATHSIG). On Ctrl-C or SIGTERM it drains: it SIGTERMs the flow runs first (see drain), then
sends each worker one SIGINT (a second one makes a Prefect worker SIGKILL itself and orphan its run).
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

from loguru import logger

DB_URL_VARS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")


def server(out: str, host: str, port: int, extra: list[str]) -> NoReturn:
    """exec `prefect server start`: SQLite under PREFECT_HOME (default <out>/prefect-server, started from
    the migrated template a run's home uses), or Postgres when Prefect's database URL is set."""
    from ..run import prefect_home
    from .pool import LOCAL_API

    home = Path(os.environ.get("PREFECT_HOME") or Path(out).resolve() / "prefect-server")
    db = next((os.environ[v] for v in DB_URL_VARS if os.environ.get(v)), "")
    sqlite = not db or db.startswith("sqlite")
    if sqlite:
        prefect_home(home)
    env = dict(os.environ, PREFECT_HOME=str(home))
    env.pop("PREFECT_API_URL", None)  # the server is no client of another server
    # SQLite: the late-runs service only renames queued runs `Late` and hits `database is locked` under
    # several workers; a queued cell is no error
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port),
            *(["--no-late-runs"] if sqlite else []), *extra]
    where = "localhost" if host in ("127.0.0.1", "localhost") else platform.node()
    print(f"steer-heal: Prefect server ({'SQLite in ' + str(home) if sqlite else 'Postgres'}) on port {port}. "
          f"Clients and workers: export PREFECT_API_URL=http://{where}:{port}/api "
          f"(unset, just worker/sweep/sweep-status use {LOCAL_API})", file=sys.stderr, flush=True)
    os.execve(sys.executable, argv, env)


def gpus() -> list[str]:
    """The GPUs a worker may take: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists, else none."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return [g for g in vis.split(",") if g.strip()]
    if not shutil.which("nvidia-smi"):
        return []
    got = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True)
    return got.stdout.split() if got.returncode == 0 else []


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (a worker's flow-run processes), from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


def drain(pids: list[int], grace: float = 30.0) -> None:
    """SIGTERM each flow run and wait for it: Prefect turns SIGTERM into an exception in the flow, so the run
    writes its status `interrupted` and the flow run ends Crashed, and a re-submit resumes it at once. A
    worker stopped first would SIGKILL it and leave it `running`, to be found stale only after --stale-after."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() and _running(p) for p in pids):
        time.sleep(0.2)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _relay(name: str, stream) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(f"[{name}] ".encode() + line)
        sys.stdout.flush()


def workers(n: int, pool: str, devices: list[str] | None, prefix: str) -> int:
    """Run n `prefect worker start --limit 1` processes on `pool` until Ctrl-C/SIGTERM or all exit. With
    GPUs each worker gets one (CUDA_VISIBLE_DEVICES, round robin); on CPU each gets OMP_NUM_THREADS=1
    unless set. The flow-run processes inherit the worker's environment."""
    devices = gpus() if devices is None else devices
    procs: dict[str, subprocess.Popen] = {}
    stopping = threading.Event()

    def stop(signum, _frame) -> None:
        if not stopping.is_set():  # the first signal drains: flow runs end as interrupted, then the workers stop
            stopping.set()
            runs = [c for p in procs.values() for c in children(p.pid)]
            logger.info(f"stopping {len(procs)} worker(s) and the {len(runs)} cell(s) they run; an interrupted cell "
                        "resumes when the sweep is submitted again (a second Ctrl-C stops at once)")
            drain(runs)
        for p in procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGINT)

    # handlers first: a child execs with SIGINT at default, not inherited as ignored (a `just worker &`
    # from a script ignores SIGINT, and a Prefect worker then never stops on it)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for i in range(n):
        env = dict(os.environ)
        env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")  # pick-up latency is about half of this
        name = f"{prefix}-w{i}"
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
            name += f"-gpu{env['CUDA_VISIBLE_DEVICES']}"
        else:
            env.setdefault("OMP_NUM_THREADS", "1")
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--limit", "1",
             "--name", name], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent)
    for name, p in procs.items():  # threads only after the last fork (preexec_fn and threads do not mix)
        threading.Thread(target=_relay, args=(name, p.stdout), daemon=True).start()
    logger.info(f"{n} worker(s) on pool {pool!r} at {os.environ.get('PREFECT_API_URL')}: {', '.join(procs)}")
    rcs = {name: p.wait() for name, p in procs.items()}
    bad = {k: v for k, v in rcs.items() if v not in (0, -signal.SIGINT, 130)}
    if bad and not stopping.is_set():
        logger.error(f"worker(s) exited: {bad}")
    return 1 if bad and not stopping.is_set() else 0

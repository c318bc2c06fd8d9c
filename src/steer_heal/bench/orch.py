"""Part e of `just bench`: orchestration. One fast-dev round through the real flow in a subprocess, twice:
plain (figures from the run's own store) and under cProfile (wall-clock), whose cumulative times split
the round into the stages' own work, Prefect's task runs around them and the store's reads and writes.
Nothing in the package is patched: the profile sees the flow's task functions by name.
"""

from __future__ import annotations

import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import load1, show

# env of the flow subprocess: the justfile's quiet, offline defaults
FLOW_ENV = {"HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
            "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
TASKS = ("extract_task", "dose_task", "eval_steered", "heal_task", "bake_task", "eval_healed")
STORE = ("append", "read", "drop", "touch_all")


def flow_figures(out: str) -> dict:
    """Round 0 of the one run under `out`, from its store."""
    from ..store import RunLog

    run_id = next(p.name for p in (Path(out) / "runs").iterdir() if p.is_dir())
    log = RunLog(out, run_id)
    rnd = log.read("rounds")[0]
    stages = [x for x in log.read("stages") if x["round"] == 0]
    ts = {x["status"]: x["ts"].timestamp() for x in log.read("status")}
    base = next(x for x in log.read("stages") if x["stage"] == "eval_base")
    work = sum(x["seconds"] for x in stages)
    return dict(run_id=run_id, sec_total=rnd["sec_total"], stage_seconds=work,
                stages={x["stage"]: x["seconds"] for x in stages}, gap=rnd["sec_total"] - work,
                flow_seconds=ts["done"] - ts["running"],
                start_to_eval_base=base["ts"].timestamp() - base["seconds"] - ts["running"],
                running_ts=ts["running"], done_ts=ts["done"])


def profile_figures(prof: str) -> dict:
    """Cumulative seconds of the task bodies, of Prefect's Task.__call__ around them, of RunLog's methods."""
    st = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}

    def cum(pred) -> tuple[float, int]:
        hits = [(v[3], v[1]) for (f, _, n), v in st.items() if pred(f, n)]
        return sum(c for c, _ in hits), sum(k for _, k in hits)

    body, n_body = cum(lambda f, n: f.endswith(os.path.join("steer_heal", "flow.py")) and n in TASKS)
    call, n_call = cum(lambda f, n: f.endswith(os.path.join("prefect", "tasks.py")) and n == "__call__")
    base_body, _ = cum(lambda f, n: f.endswith(os.path.join("steer_heal", "flow.py")) and n == "eval_base")
    store, n_store = cum(lambda f, n: f.endswith(os.path.join("store", "log.py")) and n in STORE)
    server, _ = cum(lambda f, n: "prefect" in f and n == "start" and "server" in f)
    state, _ = cum(lambda f, n: f.endswith(os.path.join("steer_heal", "flow.py")) and n == "__init__")
    return dict(task_bodies=body + base_body, task_calls=call, n_task_calls=n_call, n_bodies=n_body,
                prefect=call - body - base_body, store=store, store_ops=n_store, server_start=server,
                run_state=state)


def part_e(args, res: dict) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}
    env.update(FLOW_ENV)
    out = {}
    for mode in ("plain", "profiled"):
        tmp = tempfile.mkdtemp(prefix=f"bench-e-{mode}-")
        prof = os.path.join(tmp, "flow.prof")
        cmd = [sys.executable, *(["-m", "cProfile", "-o", prof] if mode == "profiled" else []),
               "-m", "steer_heal", "--preset", "fast-dev", "--n-rounds", "1", "--out", tmp]
        t0 = time.time()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if p.returncode:
            sys.exit(f"flow run ({mode}) failed:\n{p.stderr[-3000:]}")
        fig = flow_figures(tmp)
        fig.update(wall=wall, t_start=t0, load=load1())
        if mode == "profiled":
            fig.update(profile_figures(prof))
        shutil.rmtree(tmp, ignore_errors=True)  # the run's store and its Prefect home; the figures are in hand
        out[mode] = fig
    pl, pr = out["plain"], out["profiled"]
    frac = (pr["prefect"] + pr["store"]) / pr["task_calls"] if pr["task_calls"] else float("nan")
    pr["overhead_frac"] = frac
    rows = [
        ["process wall (start to exit)", pl["wall"], pr["wall"], ""],
        ["flow call (status running -> done)", pl["flow_seconds"], pr["flow_seconds"], ""],
        ["  flow start -> eval_base starts", pl["start_to_eval_base"], pr["start_to_eval_base"],
         f"server start {pr['server_start']:.2f}, Run (model load) {pr['run_state']:.2f}"],
        ["round 0: rounds.sec_total", pl["sec_total"], pr["sec_total"], ""],
        ["  stage seconds (stages table)", pl["stage_seconds"], pr["stage_seconds"], ""],
        ["  sec_total - stage seconds", pl["gap"], pr["gap"], ""],
        ["tasks called through Prefect (cumulative)", None, pr["task_calls"], f"{pr['n_task_calls']} task runs"],
        ["  the task bodies", None, pr["task_bodies"], ""],
        ["  Prefect around them", None, pr["prefect"], "calls - bodies"],
        ["  store appends/reads (inside the bodies)", None, pr["store"], f"{pr['store_ops']} ops"],
        ["  (Prefect + store) / task calls", None, frac, "target < 0.10"],
        ["after the flow -> process exit", pl["wall"] - (pl["done_ts"] - pl["t_start"]),
         pr["wall"] - (pr["done_ts"] - pr["t_start"]), "report, Prefect shutdown"],
    ]
    res["e"] = out
    show("e. orchestration: one fast-dev round through the real flow, OMP_NUM_THREADS=1",
         ["figure (seconds unless a fraction)", "plain", "profiled", "note"], rows,
         "plain: `python -m steer_heal --preset fast-dev --n-rounds 1 --out TMP`, figures from its store; "
         "profiled: the same command under\n`python -m cProfile` (wall clock, so profiling inflates Python-heavy "
         f"code a little); load at end {pl['load']} / {pr['load']}")

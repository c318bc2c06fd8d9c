"""Part r of `just bench`: one whole round, three ways, through the real flow (`python -m steer_heal --preset
small`, all the vignettes of --vignettes, 1 round), each in a fresh process with its own store and PREFECT_HOME:

  old     the paths before issue 17: one full forward per answer (--no-reuse-prefix), the adapters gated
          (--no-fold-history)
  tuned   the defaults
  batch1  one item at a time everywhere, like the anchor research loop: generation, filter scoring and the
          probes in batches of 1, the old eval path (heal's batch is a method knob and stays)

It prints the stage seconds side by side (the store's own `stages` and `rounds` rows), the ratios, each
stage's achieved FLOP rate against part m's matmul rate (yardstick.Flops), and how far every non-timing
`rounds` column of `tuned` is from `old`. batch1 samples its completions in other batches, so its walk and
numbers differ; it is there for time only.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import load1, show
from .orch import FLOW_ENV
from .yardstick import Flops, part_m

OLD = ["--no-reuse-prefix", "--no-fold-history"]
VARIANTS = {"old": OLD, "tuned": [], "batch1": ["--gen-batch", "1", "--eval-batch", "1", *OLD]}


def round_worker(args) -> dict:
    """In the fresh process: the flow under the FLOP counter, then what its store says."""
    from ..cli import main
    from ..store import RunLog

    variant = args.worker.split(":", 1)[1]
    out = Path(args.worker_out).with_suffix(".store")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "models").exists():  # share the converted SmolLM2 rather than convert it per variant
        Path(args.cache).mkdir(parents=True, exist_ok=True)
        (out / "models").symlink_to(Path(args.cache).resolve(), target_is_directory=True)
    preset = "small" if args.model == "smollm2-135m" else "fast-dev"  # fast-dev: a check of the part itself
    argv = ["--preset", preset, "--model", args.model, "--n-rounds", "1", "--out", str(out), "--run-id", variant,
            *VARIANTS[variant]]
    if Path(args.vignettes).is_file():
        argv += ["--vignettes", str(Path(args.vignettes).resolve())]
    with Flops() as f:
        t = time.time()
        rc = main(argv)
        wall = time.time() - t
    log = RunLog(out, variant)
    row = log.read("rounds")[0] if log.read("rounds") else {}
    return dict(rc=rc, wall=wall, flops=dict(f.by_task), load=load1(),
                stages={x["stage"]: x["seconds"] for x in log.read("stages")},
                row={k: v for k, v in row.items() if isinstance(v, (int, float, str, bool)) or v is None})


def _spawn(args, variant: str, tmp: Path) -> dict:
    cmd = [sys.executable, "-m", "steer_heal.bench", "--worker", f"round:{variant}", "--worker-out",
           str(tmp / f"{variant}.json"), "--cache", args.cache, "--vignettes", args.vignettes, "--model", args.model]
    env = {k: v for k, v in FLOW_ENV.items() if k != "OMP_NUM_THREADS"}
    env = dict(os.environ, **env, PREFECT_HOME=str(tmp / f"prefect-{variant}"))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    load0 = load1()
    print(f"r: {variant} round ({' '.join(VARIANTS[variant]) or 'defaults'}) ... load {load0}", flush=True)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    out = json.loads((tmp / f"{variant}.json").read_text()) if p.returncode == 0 else {}
    if out.get("rc") != 0:  # the worker crashed, or the run it started exited non-zero
        raise RuntimeError(f"bench r {variant} failed (rc {out.get('rc', p.returncode)}):\n{p.stderr[-3000:]}")
    out["load_start"] = load0
    print(f"r: {variant} done in {out['wall']:.0f} s, load {out['load']}", flush=True)
    return out


def compare(old: dict, new: dict, tol: float = 1e-4) -> tuple[int, list[tuple[str, float]]]:
    """(columns compared, [(column, |old - new|)] sorted worst first) over the non-timing rounds columns."""
    diffs = []
    for k, a in old.items():
        b = new.get(k)
        if k.startswith("sec_") or k in ("ts", "run_id") or isinstance(a, bool):
            continue
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            d = abs(a - b) if math.isfinite(a) and math.isfinite(b) else (0.0 if a == b else math.inf)
            diffs.append((k, d))
        elif a != b:
            diffs.append((k, math.inf))
    return len(diffs), sorted(diffs, key=lambda x: -x[1])


def part_r(args, res: dict) -> None:
    rate = (res.get("m") or part_m(args, res))["fp32"]
    with tempfile.TemporaryDirectory(prefix="bench-r-") as d:
        runs = {v: _spawn(args, v, Path(d)) for v in VARIANTS}
    res["r"] = runs
    rows = []
    # imported here, not at the top: stage.py reads the store, and `just bench --only gpu` runs store-free
    from ..stage import StageName

    for st in StageName:  # a stage's stored seconds against the FLOPs of its Prefect tasks (heal's: its bake too)
        s = {v: runs[v]["stages"].get(st, math.nan) for v in runs}
        gf = sum(runs["tuned"]["flops"].get(t, 0.0) for t in st.tasks) / 1e9
        rows.append([st, s["old"], s["tuned"], s["batch1"], s["old"] / s["tuned"], s["batch1"] / s["tuned"], gf,
                     gf / s["tuned"], 100 * gf / s["tuned"] / rate])
    tot = {v: runs[v]["row"].get("sec_total", math.nan) for v in runs}
    rows.append(["round (sec_total)", tot["old"], tot["tuned"], tot["batch1"], tot["old"] / tot["tuned"],
                 tot["batch1"] / tot["tuned"], "", "", ""])
    show(f"r. one {args.model} round, seconds per stage", ["stage", "old", "tuned", "batch1", "old/tuned",
         "batch1/tuned", "tuned GFLOP", "GFLOP/s", "% fp32 peak"], rows,
         note="load at start/end: " + ", ".join(f"{v} {runs[v]['load_start']}/{runs[v]['load']}" for v in runs)
         + f"; fp32 peak {rate:.0f} GFLOP/s (part m); eval_base is round -1, outside sec_total")
    n, diffs = compare(runs["old"]["row"], runs["tuned"]["row"])
    res["r_diff"] = dict(n=n, diffs=diffs)
    over = [(k, d) for k, d in diffs if d > 1e-4]
    show("r. tuned vs old: the stored rounds row", ["columns compared", "largest |diff|", "column", "over 1e-4"],
         [[n, diffs[0][1] if diffs else 0.0, diffs[0][0] if diffs else "", len(over)]],
         note=("over 1e-4: " + ", ".join(f"{k} {d:.2g}" for k, d in over)) if over else "")

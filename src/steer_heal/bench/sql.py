"""Part f of `just bench`: the per-round Pareto SQL of docs/store.md over a synthetic store."""

from __future__ import annotations

import math
import random
import statistics
import tempfile
from pathlib import Path

from .common import Clock, load1, show

PARETO_SQL = """
WITH m AS (
  SELECT run_id, round, stage, nats, coherence FROM stage_metrics
  WHERE evaluator = 'mfv' AND foundation = 'Authority'
), base AS (
  SELECT run_id, any_value(nats) AS base_nats, any_value(coherence) AS base_coherence
  FROM m WHERE stage = 'base' GROUP BY run_id
)
SELECT m.run_id, r.reg, m.stage, m.round,
       m.nats - base.base_nats AS trait_moved,
       m.coherence, m.coherence - base.base_coherence AS coherence_change
FROM m JOIN base USING (run_id) JOIN runs r USING (run_id)
WHERE m.stage <> 'base'
ORDER BY m.run_id, m.stage, m.round;
"""

def synth_store(root: Path, n_runs: int, n_rounds: int, seed: int = 0) -> int:
    """n_runs runs of n_rounds rounds written with RunLog, shaped like the flow's rows; returns rows written."""
    from ..config import FOUNDATIONS
    from ..store import RunLog

    rng = random.Random(seed)
    n = 0
    for i in range(n_runs):
        log = RunLog(root, f"synth-{i:04d}")
        log.touch_all()
        reg = ("nll", "kl_fwd", "kl_rev")[i % 3]
        n += log.append("run_info", dict(model="smollm2-135m", preset="small", reg=reg, seed=i // 3, n_rounds=n_rounds,
                                         config_hash=f"h{i % 12}", config={"reg": reg, "lam": 1.0}, env={}))
        n += log.append("status", dict(status="running", round=0))
        sm = []
        for r, stage in [(-1, "base"), (-1, "prompted")] + [(r, s) for r in range(n_rounds) for s in ("steered", "healed")]:
            ps = [rng.random() for _ in FOUNDATIONS]
            coh = rng.uniform(0.02, 0.2)
            sm += [dict(round=r, stage=stage, evaluator="mfv", foundation=f, prob=p / sum(ps),
                        nats=math.log(p / sum(ps)), coherence=coh, top1_agree=rng.random(), n=28, coef=1.0)
                   for f, p in zip(FOUNDATIONS, ps)]
            sm.append(dict(round=r, stage=stage, evaluator="contrast", foundation="trait", nats=rng.gauss(0, 0.3),
                           n=30, coef=1.0))
        n += log.append("stage_metrics", sm)
        n += log.append("stages", [dict(round=r, stage=s, seconds=rng.uniform(1, 100)) for r in range(n_rounds)
                                   for s in ("extract", "dose", "eval_steered", "heal", "eval_healed")])
        n += log.append("rounds", [dict(round=r, kappa=rng.random(), n_gen=48, n_kept=24, kept_frac=0.5,
                                        auth_nats=rng.gauss(-2, 0.3), coherence=rng.random(), sec_total=100.0)
                                   for r in range(n_rounds)])
        n += log.append("status", dict(status="done", round=n_rounds - 1))
    return n

def part_f(args, res: dict) -> None:
    from .. import store

    with tempfile.TemporaryDirectory(prefix="bench-f-") as root:
        with Clock() as c:
            n = synth_store(Path(root), args.runs, args.rounds)
        write_s, write_load = c.s, load1()
        con_t = []
        for _ in range(3):
            with Clock() as c:
                con = store.connect(root)
            con_t.append(c.s)
            con.close()
        con = store.connect(root)
        q_t, n_rows = [], 0
        for _ in range(6):
            with Clock() as c:
                n_rows = len(con.execute(PARETO_SQL).fetchall())
            q_t.append(c.s)
        # where the time goes: the views the query reads, and the same query joining run_info for reg
        parts = {}
        for label, sql in (("stage_metrics scan (count)", "SELECT count(*) FROM stage_metrics"),
                           ("runs view (all rows)", "SELECT * FROM runs"),
                           ("Pareto SQL with run_info in place of runs", PARETO_SQL.replace(
                               "JOIN runs r USING (run_id)", "JOIN run_info r USING (run_id)"))):
            ts = []
            for _ in range(3):
                with Clock() as c:
                    con.execute(sql).fetchall()
                ts.append(c.s)
            parts[label] = min(ts)
        con.close()
        sq_t = []
        for _ in range(3):
            with Clock() as c:
                store.query(root, PARETO_SQL)
            sq_t.append(c.s)
        n_files = sum(1 for _ in Path(root).glob("runs/*/*.jsonl"))
    out = dict(rows_written=n, files=n_files, write_s=write_s, write_load=write_load, connect=con_t,
               query_first=q_t[0], query_median=statistics.median(q_t[1:]), query_reps=q_t,
               store_query=sq_t, result_rows=n_rows, parts=parts, load=load1())
    res["f"] = out
    rows = [[f"write store (RunLog, {n} rows, {n_files} files)", write_s, write_load],
            ["connect() (views over every table), median of 3", statistics.median(con_t), out["load"]],
            ["Pareto SQL on an open connection, first", q_t[0], out["load"]],
            ["Pareto SQL on an open connection, median of next 5", out["query_median"], out["load"]],
            ["store.query (connect + Pareto SQL), median of 3", statistics.median(sq_t), out["load"]]]
    rows += [[f"  {k}, best of 3", v, out["load"]] for k, v in parts.items()]
    show(f"f. per-round Pareto SQL (docs/store.md) over {args.runs} runs x {args.rounds} rounds -> {n_rows} rows",
         ["step", "seconds", "load"], rows, "target < 1 s")


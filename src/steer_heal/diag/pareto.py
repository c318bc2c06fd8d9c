"""`just pareto [--sql QUERY] [--by run|config]`: per round, trait moved against coherence, with the front.

The points come from SQL. The query must return the columns label, round, stage, trait_moved and
coherence (others are kept in the stored rows). Besides the store's views it may use `run_meta`
(run_id, target, direction, sign, seed, reg, config_key, config_label, control, family), which holds
what the store does not: each run's target foundation and trait direction, from the bundled persona table.

The default query takes the target foundation's nats from stage_metrics (mfv), signed so that
positive means toward the trait: trait_moved = sign * (nats - the run's base nats). --by config
averages the runs of one config over their seeds. A control run (`control`, from run_meta) is
drawn hollow in its treatment's family, its label next to the treatment's (control comes last). Round -1 points (base, prompted) are references
drawn in every round's panel. A point is on the front when no other point in its panel has at
least as much trait moved and coherence and more of one; ties share the front. Arrows go from each
label's steered point to its healed point.

A point under the coherence floor (metrics.broken: `broken` from the `stage_broken` table, which holds
run_id, round, stage, broken for every stored stage; true for a --by config point when any of its seeds
is) is drawn crossed and is never on the front: a move bought by wrecking the model is no trade-off. A
--sql query that returns no `broken` column leaves its points unchecked (the summary says so).
"""

from __future__ import annotations

import argparse
import sys

import duckdb

from .. import data
from ..config import Config
from ..console import Parser, script
from ..errors import UserError
from ..evaluate import StageEval
from ..metrics import broken
from ..store import RunLog, check_read_only
from ..tables import table
from . import plots
from .record import Diagnostic
from .runs import connect_meta, sql_rows
from .stats import pareto_front

PROG = "just pareto"
NEED = ("label", "round", "stage", "trait_moved", "coherence")
DEFAULT_SQL = """
WITH m AS (
  SELECT s.run_id, k.config_label, k.control, s.round, s.stage, k.sign * s.nats AS signed, s.coherence
  FROM stage_metrics s JOIN run_meta k ON s.run_id = k.run_id AND s.foundation = k.target
  WHERE s.evaluator = 'mfv'
), b AS (SELECT run_id, signed AS base FROM m WHERE stage = 'base')
SELECT {label} AS label, m.round, m.stage, avg(m.signed - b.base) AS trait_moved,
       avg(m.coherence) AS coherence, count(*) AS n_runs, any_value(m.control) AS control,
       bool_or(coalesce(sb.broken, '') <> '') AS broken, count(*) FILTER (WHERE coalesce(sb.broken, '') <> '') AS n_broken
FROM m JOIN b USING (run_id) LEFT JOIN stage_broken sb USING (run_id, round, stage)
GROUP BY ALL ORDER BY ALL
"""
LABELS = {"run": "m.run_id", "config": "m.config_label"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sql", default=None, help="query returning label, round, stage, trait_moved, coherence")
    p.add_argument("--by", choices=tuple(LABELS), default="run", help="default query: one point per run or config")
    p.add_argument("--out", "--root", dest="out", default="out", help="store root")
    return p.parse_args(argv)


def facets(rows: list[dict]) -> dict[int, list[dict]]:
    """Points per round panel (round -1 references copied into each), each with its front flag."""
    pts = [dict(r, x=r["trait_moved"], y=r["coherence"]) for r in rows
           if r["trait_moved"] is not None and r["coherence"] is not None]
    refs = [p for p in pts if p["round"] < 0]
    rounds = sorted({p["round"] for p in pts if p["round"] >= 0}) or [-1]
    out = {}
    for r in rounds:
        panel = refs if r < 0 else [dict(p, round=r) for p in refs] + [p for p in pts if p["round"] == r]
        ok = [p for p in panel if not p.get("broken")]  # a broken point neither joins nor shapes the front
        flags = dict(zip(map(id, ok), pareto_front([(p["x"], p["y"]) for p in ok]), strict=True))
        out[r] = [dict(p, front=flags.get(id(p), False)) for p in panel]
    return out


def stage_broken(root: str, run_ids: list[str]) -> list[tuple[str, int, str, str]]:
    """(run_id, round, stage, why) for every stored stage: metrics.broken against the run's own base."""
    out = []
    for run_id in run_ids:
        log = RunLog(root, run_id)
        cfg = Config.from_dict(log.read("run_info")[0]["config"])  # as run_meta reads it: the points are its runs
        by = StageEval.by_stage(log.read("stage_metrics"), log.read("eval_items"))
        base = by.get((-1, "base"))
        for (r, stage), s in by.items():
            why = "" if base is None or stage == "base" else \
                broken(s, base, data.persona(cfg)["target"], cfg.coh_floor_rel)
            out.append((run_id, r, stage, why))
    return out


def summary(panels: dict[int, list[dict]]) -> str:
    front = sorted((p for pts in panels.values() for p in pts if p["front"]), key=lambda p: (p["round"], -p["x"]))
    body = [[p["round"], p["label"], p["stage"], p["x"], p["y"]] for p in front]
    pts = [p for ps in panels.values() for p in ps]
    bad = sorted((p for p in pts if p.get("broken")), key=lambda p: (p["round"], p["label"], p["stage"]))
    text = (table(["round", "label", "stage", "trait_moved", "coherence"], body)
            + f"\n{len(body)} of {len(pts)} points on the front (all of them are in the diagnostic's rows)")
    if bad:
        text += (f"\n{len(bad)} BROKEN point(s), under the coherence floor: drawn crossed, never on the front: "
                 + ", ".join(f"r{p['round']} {p['label']} {p['stage']}" for p in bad))
    if pts and "broken" not in pts[0]:
        text += "\nthe query returned no `broken` column: no point was checked against the coherence floor"
    return text


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    sql = a.sql or DEFAULT_SQL.format(label=LABELS[a.by])
    con = connect_meta(a.out)
    try:
        check_read_only(con, sql)  # --sql is the user's: it may only read, like `just sql`
        ids = [r[0] for r in con.execute("SELECT run_id FROM run_meta").fetchall()]
        con.execute("CREATE TEMP TABLE stage_broken (run_id VARCHAR, round INTEGER, stage VARCHAR, broken VARCHAR)")
        if ids:
            con.executemany("INSERT INTO stage_broken VALUES (?, ?, ?, ?)", stage_broken(a.out, ids))
        rows = sql_rows(con, sql)
    except duckdb.Error as e:
        raise UserError(f"the query failed: {str(e).strip().splitlines()[0]}") from None
    finally:
        con.close()
    lacking = [c for c in NEED if rows and c not in rows[0]]
    if lacking:
        raise UserError(f"the query must return the columns {', '.join(NEED)}; it lacks {', '.join(lacking)}")
    panels = facets(rows)
    diag = Diagnostic(a.out, "pareto", None, None, dict(sql=sql, by=None if a.sql else a.by))
    diag.add([{k: v for k, v in p.items() if k not in ("x", "y")} for pts in panels.values() for p in pts])
    files = plots.save(plots.pareto_figure(panels, "trait moved vs coherence" + ("" if a.sql else f", by {a.by}")),
                       diag.dir / "pareto") if rows else []
    diag.finish(summary(panels), files)
    return 0


def cli() -> int:
    return script(PROG, main, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(cli())

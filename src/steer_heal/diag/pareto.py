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
"""

from __future__ import annotations

import argparse
import sys

import duckdb

from ..config import ConfigError
from ..console import Parser, script
from ..report import table
from ..store import check_read_only
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
       avg(m.coherence) AS coherence, count(*) AS n_runs, any_value(m.control) AS control
FROM m JOIN b USING (run_id)
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
        flags = pareto_front([(p["x"], p["y"]) for p in panel])
        out[r] = [dict(p, front=f) for p, f in zip(panel, flags, strict=True)]
    return out


def summary(panels: dict[int, list[dict]]) -> str:
    front = sorted((p for pts in panels.values() for p in pts if p["front"]), key=lambda p: (p["round"], -p["x"]))
    body = [[p["round"], p["label"], p["stage"], p["x"], p["y"]] for p in front]
    n = sum(len(pts) for pts in panels.values())
    return (table(["round", "label", "stage", "trait_moved", "coherence"], body)
            + f"\n{len(body)} of {n} points on the front (all of them are in the diagnostic's rows)")


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    sql = a.sql or DEFAULT_SQL.format(label=LABELS[a.by])
    con = connect_meta(a.out)
    try:
        check_read_only(con, sql)  # --sql is the user's: it may only read, like `just sql`
        rows = sql_rows(con, sql)
    except duckdb.Error as e:
        raise ConfigError(f"the query failed: {str(e).strip().splitlines()[0]}") from None
    finally:
        con.close()
    lacking = [c for c in NEED if rows and c not in rows[0]]
    if lacking:
        raise ConfigError(f"the query must return the columns {', '.join(NEED)}; it lacks {', '.join(lacking)}")
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

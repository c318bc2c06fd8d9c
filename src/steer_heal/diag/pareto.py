"""`just pareto [--sql QUERY] [--by run|config] [--x COL] [--y COL]`: per round, trait moved against coherence,
with the front, on the axes the runs' probes can read.

The points come from SQL. The default query returns, per (label, round, stage): trait_moved (the target
foundation's seven-way nats, signed so that positive means toward the trait: sign * (nats - the run's base
nats)), d_trait (the held-out contrast probe's trait_nats minus base's), coherence (seven-way option mass) and
adapter_ppl (free text under base). `--x`/`--y` pick the columns; by default they are trait_moved and
coherence where the seven-way probe is informative on every run shown (probe_info, spec.md "Informative
probes"; a run stored before the check counts as informative), else d_trait and adapter_ppl (on SmolLM2).
The front minimises adapter_ppl and maximises every other axis. An axis resting on a probe at chance is
greyed in the figure and named in the summary. A --sql query must return label, round, stage and the two
columns (without --x/--y: trait_moved and coherence); besides the store's views it may use `run_meta` (run_id, target, direction, sign, seed, reg,
config_key, config_label, control, family), which holds what the store does not: each run's target
foundation and trait direction, from the bundled persona table.

--by config averages the runs of one config over their seeds. A control run (`control`, from run_meta) is
drawn hollow in its treatment's family, its label next to the treatment's (control comes last). Round -1
points (base, prompted) are references drawn in every round's panel. A point is on the front when no other
point in its panel is at least as good on both axes and better on one; ties share the front. Arrows go from
each label's steered point to its healed point.

A point under the coherence floor (metrics.broken: `broken` from the `stage_broken` table, which holds
run_id, round, stage, broken for every stored stage; true for a --by config point when any of its seeds
is) is drawn crossed and is never on the front: a move bought by wrecking the model is no trade-off. A
--sql query that returns no `broken` column leaves its points unchecked (the summary says so).
"""

from __future__ import annotations

import argparse
import sys

import duckdb

from .. import data, informative
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
NEED = ("label", "round", "stage")
DEFAULT_SQL = """
WITH m AS (
  SELECT s.run_id, k.config_label, k.control, s.round, s.stage,
         max(CASE WHEN s.evaluator = 'mfv' AND s.foundation = k.target THEN k.sign * s.nats END) AS signed,
         max(CASE WHEN s.evaluator = 'mfv' AND s.foundation = k.target THEN s.coherence END) AS coherence,
         max(CASE WHEN s.evaluator = 'contrast' THEN s.nats END) AS trait,
         max(CASE WHEN s.evaluator = 'freetext' THEN s.ppl END) AS adapter_ppl
  FROM stage_metrics s JOIN run_meta k USING (run_id) GROUP BY ALL
), b AS (SELECT run_id, signed AS base, trait AS base_trait FROM m WHERE stage = 'base')
SELECT {label} AS label, m.round, m.stage, avg(m.signed - b.base) AS trait_moved,
       avg(m.trait - b.base_trait) AS d_trait, avg(m.coherence) AS coherence, avg(m.adapter_ppl) AS adapter_ppl,
       count(*) AS n_runs, any_value(m.control) AS control,
       bool_or(coalesce(sb.broken, '') <> '') AS broken, count(*) FILTER (WHERE coalesce(sb.broken, '') <> '') AS n_broken
FROM m JOIN b USING (run_id) LEFT JOIN stage_broken sb USING (run_id, round, stage)
GROUP BY ALL ORDER BY ALL
"""
LABELS = {"run": "m.run_id", "config": "m.config_label"}
# the axes the default query returns: column -> (axis label, the probe it rests on, lower is better)
AXES = {"trait_moved": ("target moved (nats, toward the trait; seven-way)", "mfv", False),
        "d_trait": ("trait nats moved (held-out contrast)", "contrast", False),
        "coherence": ("coherence (seven-way option mass)", "mfv", False),
        "adapter_ppl": ("adapter_ppl (free text under base; lower is better)", "freetext", True)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sql", default=None, help="query returning label, round, stage and the --x and --y columns")
    p.add_argument("--x", default=None, help="x column (default: trait_moved where the seven-way probe is informative "
                                            "on every run, else d_trait, the held-out contrast probe)")
    p.add_argument("--y", default=None, help="y column (default: coherence where the seven-way probe is informative "
                                            "on every run, else adapter_ppl, lower is better)")
    p.add_argument("--by", choices=tuple(LABELS), default="run", help="default query: one point per run or config")
    p.add_argument("--out", "--root", dest="out", default="out", help="store root")
    return p.parse_args(argv)


def axes(verdicts: list[dict[str, bool]], x: str | None, y: str | None) -> tuple[str, str]:
    """The --x and --y columns, or the informative defaults: the seven-way probe's (trait_moved, coherence)
    where it is informative on every run shown (a run without probe_info counts as informative; one whose
    verdicts lack mfv skipped that probe, --probes), else d_trait (held-out contrast) against adapter_ppl."""
    mfv = all(v.get("mfv", not v) for v in verdicts)
    return x or ("trait_moved" if mfv else "d_trait"), y or ("coherence" if mfv else "adapter_ppl")


def facets(rows: list[dict], x: str = "trait_moved", y: str = "coherence") -> dict[int, list[dict]]:
    """Points per round panel (round -1 references copied into each), each with its front flag. The front
    maximises x and y, or minimises y where lower is better (adapter_ppl)."""
    flip = -1 if AXES.get(y, ("", "", False))[2] else 1
    pts = [dict(r, x=r[x], y=r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
    refs = [p for p in pts if p["round"] < 0]
    rounds = sorted({p["round"] for p in pts if p["round"] >= 0}) or [-1]
    out = {}
    for r in rounds:
        panel = refs if r < 0 else [dict(p, round=r) for p in refs] + [p for p in pts if p["round"] == r]
        ok = [p for p in panel if not p.get("broken")]  # a broken point neither joins nor shapes the front
        flags = dict(zip(map(id, ok), pareto_front([(p["x"], flip * p["y"]) for p in ok]), strict=True))
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
        floor = informative.floor(cfg, log.read("probe_info"))
        for (r, stage), s in by.items():
            why = "" if base is None or stage == "base" else \
                broken(s, base, data.persona(cfg)["target"], cfg.coh_floor_rel, **floor)
            out.append((run_id, r, stage, why))
    return out


def verdicts(root: str, run_ids: list[str]) -> list[dict[str, bool]]:
    return [informative.usable(RunLog(root, run_id).read("probe_info")) for run_id in run_ids]


def summary(panels: dict[int, list[dict]], x: str = "trait_moved", y: str = "coherence",
            at_chance: tuple[str, ...] = ()) -> str:
    front = sorted((p for pts in panels.values() for p in pts if p["front"]), key=lambda p: (p["round"], -p["x"]))
    body = [[p["round"], p["label"], p["stage"], p["x"], p["y"]] for p in front]
    pts = [p for ps in panels.values() for p in ps]
    bad = sorted((p for p in pts if p.get("broken")), key=lambda p: (p["round"], p["label"], p["stage"]))
    text = (f"x = {x}, y = {y}\n" + table(["round", "label", "stage", x, y], body)
            + f"\n{len(body)} of {len(pts)} points on the front (all of them are in the diagnostic's rows)")
    if at_chance:
        text += (f"\nAT CHANCE on these runs (probe_info): {', '.join(at_chance)}; the axis resting on it is greyed "
                 "and says nothing about the model (pick others with --x/--y)")
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
        seen = verdicts(a.out, ids)
    except duckdb.Error as e:
        raise UserError(f"the query failed: {str(e).strip().splitlines()[0]}") from None
    finally:
        con.close()
    # a --sql query names its own columns: without --x/--y they are the historical trait_moved, coherence
    x, y = axes(seen, a.x, a.y) if not a.sql else (a.x or "trait_moved", a.y or "coherence")
    need = (*NEED, x, y)
    lacking = [c for c in need if rows and c not in rows[0]]
    if lacking:
        raise UserError(f"the query must return the columns {', '.join(need)}; it lacks {', '.join(lacking)}")
    panels = facets(rows, x, y)
    off = () if a.sql else tuple(sorted({AXES[c][1] for c in (x, y)  # a --sql query's columns mean what it says
                                         if c in AXES and not all(v.get(AXES[c][1], True) for v in seen)}))
    diag = Diagnostic(a.out, "pareto", None, None, dict(sql=sql, by=None if a.sql else a.by, x=x, y=y,
                                                        at_chance=list(off)))
    diag.add([{k: v for k, v in p.items() if k not in ("x", "y")} for pts in panels.values() for p in pts])
    grey = {c: c in AXES and AXES[c][1] in off for c in (x, y)}
    label = {c: (AXES[c][0] if c in AXES else c) + (" [AT CHANCE]" if grey[c] else "") for c in (x, y)}
    files = plots.save(plots.pareto_figure(panels, f"{x} vs {y}" + ("" if a.sql else f", by {a.by}"),
                                           xlabel=label[x], ylabel=label[y], grey=grey), diag.dir / "pareto") if rows else []
    diag.finish(summary(panels, x, y, off), files)
    return 0


def cli() -> int:
    return script(PROG, main, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(cli())

"""`just plot RUN_ID`: target nats, trait nats, coherence, adapter_ppl (free text) and the steering KL by
round (steered and healed), with base and prompted as reference lines, and the kept fraction. PNG and SVG under out/runs/RUN_ID/plots/,
listed in the diagnostic's report.md. A stage under the coherence floor (metrics.broken) is crossed in the
figure and marked BROKEN in the table. Reads the store with SQL; no model is loaded.
"""

from __future__ import annotations

import argparse
import sys

from .. import data, informative, metrics
from ..console import Parser, script
from ..evaluate import StageEval, stage_order
from ..store import connect
from ..student import run_log, stored_config
from ..tables import table
from . import plots
from .record import Diagnostic
from .runs import sql_rows

PROG = "just plot"
METRICS_SQL = ("SELECT round, stage, evaluator, foundation, nats, coherence, ppl, kl FROM stage_metrics "
               "WHERE run_id = ? ORDER BY round, stage")
KEPT_SQL = "SELECT round, any_value(kept_frac) AS kept_frac FROM rounds WHERE run_id = ? GROUP BY round ORDER BY round"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__)
    p.add_argument("run_id")
    p.add_argument("--out", "--root", dest="out", default="out", help="store root")
    return p.parse_args(argv)


def series(stage_metrics: list[dict], target: str) -> dict[tuple[int, str], dict]:
    """{(round, stage): {target_nats, trait_nats, coherence, adapter_ppl, kl}} from stage_metrics rows."""
    return {k: dict(target_nats=s.nats.get(target), trait_nats=s.trait_nats, coherence=s.coherence,
                    adapter_ppl=s.adapter_ppl, kl=s.kl)
            for k, s in StageEval.by_stage(stage_metrics).items()}


def broken_stages(log, target: str, floor_rel: float, ppl_rel: float = 0.0,
                  verdict: dict | None = None) -> dict[tuple[int, str], str]:
    """Why each stage is under the coherence floor ('' when it is not), against the run's base."""
    by = StageEval.by_stage(log.read("stage_metrics"), log.read("eval_items"))
    base = by.get((-1, "base"))
    return {k: metrics.broken(s, base, target, floor_rel, ppl_rel, verdict) if base is not None and k[1] != "base"
            else "" for k, s in by.items()}


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    log = run_log(a.out, a.run_id)
    target = data.persona(stored_config(log))["target"]
    con = connect(a.out, strict=True)
    try:
        stages = series(sql_rows(con, METRICS_SQL, [a.run_id]), target)
        kept = {r["round"]: r["kept_frac"] for r in sql_rows(con, KEPT_SQL, [a.run_id])}
    finally:
        con.close()
    cfg = stored_config(log)
    verdict = informative.usable(log.read("probe_info"))
    floor = informative.floor(cfg, log.read("probe_info"))
    why = broken_stages(log, target, cfg.coh_floor_rel, floor["ppl_rel"], floor["informative"])
    at_chance = tuple(k for k in ("target_nats", "trait_nats", "coherence", "adapter_ppl")
                      if not informative.ok(verdict, informative.probe_of(k)))
    for key, v in stages.items():
        v["broken"] = why.get(key, "")
    rows = [dict(run_id=a.run_id, round=r, stage=st, **v, kept_frac=kept.get(r) if st == "healed" else None)
            for (r, st), v in sorted(stages.items(), key=lambda kv: stage_order(kv[0]))]
    diag = Diagnostic(a.out, "plot", a.run_id, None, dict(target=target))
    diag.add(rows)
    files = plots.save(plots.run_figure(stages, kept, f"run {a.run_id} (target {target})", at_chance),
                       log.dir / "plots" / "rounds")
    text = table(["r", "stage", "target", "trait", "coh", "adapter_ppl", "kl", "kept", "broken"],
                 [[r["round"], r["stage"], *informative.shade(
                     {k: r[k] for k in ("target_nats", "trait_nats", "coherence", "adapter_ppl")}, verdict).values(),
                   r["kl"], r["kept_frac"], "BROKEN" if r["broken"] else ""] for r in rows])
    if informative.note(verdict):
        text += "\n" + informative.note(verdict)
    diag.finish(text, files)
    return 0


def cli() -> int:
    return script(PROG, main, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(cli())

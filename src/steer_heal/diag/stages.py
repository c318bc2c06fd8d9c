"""`just stages RUN_ID... [--boot N]`: base / prompted / steered / healed for every round of the given runs.

Per stage: target nats, trait nats, coherence and adapter_ppl, each delta against the run's base and
against the previous student (the one that started the round) with a 95% paired bootstrap interval
over the run's items (spec.md "Intervals"; '~' marks an interval that holds 0), and, as the run's
round rows define them, retain (healed against steered), coh_cost and surgical. The coherence floor
comes first: a stage under it is flagged broken and its ratios print the flag, not a value. Every
stage of a run is evaluated on the run's own items; a stage whose n differs from base's is not paired,
so it gets no deltas (and the table says so).

Runs that share a config and differ only in seed are a group: each cell then also gets the mean over
the seeds and a 95% interval: for a delta, two-level (seeds, then the items every seed is scored on:
intervals.two_level, docs/diagnostics.md "Two-level intervals"); for a ratio, the t over seeds. Rounds 1
and on also get the growth over the round (the deltas against the previous student), two-level the same way. Runs that
differ only in `control` (and seed) are a family: the "beyond control" table gives the treatment's
d_trait, d_tgt, d_coh and d_ppl minus its control's at the same round and stage, paired by seed
(diag/control.py); treatment arms that differ in one knob (reg kl_rev vs nll) are differenced the same way
(diag/arms.py). Every table marks a stage under the coherence floor.
Reads the store only; no model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from .. import data, informative, intervals, metrics, seeds
from ..console import Parser, script
from ..evaluate import StageEval, stage_order
from ..report import DELTAS
from ..student import run_log, stored_config
from ..tables import table
from . import arms, control
from .record import Diagnostic
from .runs import config_key, config_labels, delta, family, seedless
from .stats import mean_ci

PROG = "just stages"
# the per-stage numbers averaged over seeds
AGG = ("d_target", "d_trait", "d_coh", "d_ppl", "retain", "retain_trait", "coh_cost")
# the deltas against the previous student (growth over a round), averaged over seeds the same way
GROWTH = tuple(f"{n}_prev" for _, n in DELTAS)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    p.add_argument("--boot", type=int, default=2000, help="paired bootstrap resamples per interval (0 = none)")
    p.add_argument("--out", "--root", dest="out", default="out", help="store root")
    p.add_argument("--unyoked", action="store_true", help="allow beyond-control rows over controls not yoked to "
                   "their treatment (--yoke): they ran their own walk, on other slots and seeds")
    p.add_argument("--beyond", action="store_true", help="print only beyond control and the filter per arm "
                   "(`just beyond`)")
    return p.parse_args(argv)


def run_rows(run_id: str, stage_metrics: list[dict], target: str, eval_items: list[dict] = (), seed: int = 0,
             boot: int = 2000, floor_rel: float = 0.0, ppl_rel: float = 0.0, verdict: dict | None = None,
             gate: bool = True) -> list[dict]:
    """One row per (round, stage) of one run: deltas against its base, and with eval_items their paired
    intervals against base and the previous student (d_<m>_lo/_hi/_ns, d_<m>_prev...); `broken` says why a
    stage is under the coherence floor ('' when it is not), and a broken stage's ratios are None. verdict: the
    run's informative.usable(probe_info), listed per row in `at_chance`; with gate, no floor or ratio rests on
    an uninformative probe."""
    by = StageEval.by_stage(stage_metrics, eval_items)
    base = by.get((-1, "base"))
    if base is None:
        return []
    items = intervals.by_stage(eval_items)
    bt = base.nats.get(target)
    at_chance = [p for p, ok in (verdict or {}).items() if not ok]
    floor = dict(ppl_rel=ppl_rel, informative=verdict if gate else None)
    use = {p: not gate or informative.ok(verdict, p) for p in ("mfv", "contrast")}
    rows = []
    for key in sorted(by, key=stage_order):
        (r, stage), s = key, by[key]
        t = s.nats.get(target)
        row = dict(run_id=run_id, round=r, stage=stage, n=s.n, paired=s.n == base.n,
                   target_nats=t, trait_nats=s.trait_nats, coherence=s.coherence, adapter_ppl=s.adapter_ppl, kl=s.kl,
                   broken=metrics.broken(s, base, target, floor_rel, **floor) if stage != "base" else "",
                   at_chance=at_chance)
        if row["paired"]:
            row.update(d_target=delta(t, bt), d_trait=delta(s.trait_nats, base.trait_nats),
                       d_coh=delta(s.coherence, base.coherence), d_ppl=delta(s.adapter_ppl, base.adapter_ppl))
        if row["paired"] and stage != "base":
            for iv in intervals.stage_intervals(items, r, stage, seed, boot):
                name = dict(DELTAS)[iv["metric"]] + ("_prev" if iv["ref"] == "prev" else "")
                row.update({name: iv["delta"], f"{name}_lo": iv["lo"], f"{name}_hi": iv["hi"], f"{name}_ns": iv["ns"]})
        if row["paired"] and stage != "base" and not row["broken"] and use["mfv"]:
            row["coh_cost"] = metrics.coh_cost(s.coherence, base.coherence, t, bt)
            if row["d_target"] is not None:
                off = {f: delta(s.nats.get(f), base.nats.get(f)) for f in metrics.OFF_TARGET}
                row["surgical"] = metrics.surgical(row["d_target"], off, target=target)
        if row["paired"] and stage == "healed" and (r, "steered") in by:
            st = by[(r, "steered")]
            if not (row["broken"] or metrics.broken(st, base, target, floor_rel, **floor)):
                row.update(retain=metrics.retain(t, st.nats.get(target), bt) if use["mfv"] else None,
                           retain_trait=metrics.retain(s.trait_nats, st.trait_nats, base.trait_nats)
                           if use["contrast"] else None)
            else:
                row["withheld"] = "BROKEN" if row["broken"] else "broken:steered"
        rows.append(row)
    return rows


def seed_rows(rows: list[dict], groups: dict[str, list[str]], labels: dict[str, str],
              items: dict[str, dict] | None = None, boot: int = 0) -> list[dict]:
    """Per config with two or more seeds, per (round, stage): mean and 95% interval of each AGG number.
    With the runs' items (run_id -> intervals.by_stage) a delta's interval is two-level (seeds, then the
    items they share: intervals.two_level); a ratio's, or a delta's without items, is the t over seeds
    (`<m>_over` says which). `broken` counts the seeds whose stage is under the coherence floor."""
    out = []
    row_of = {(r["run_id"], r["round"], r["stage"]): r for r in rows}
    for key, runs in groups.items():
        if len(runs) < 2:
            continue
        cells = defaultdict(list)
        for r in rows:
            if r["run_id"] in runs:
                cells[(r["round"], r["stage"])].append(r)
        for (rnd, stage) in sorted(cells, key=stage_order):
            if stage == "base":  # every delta is against base: nothing to average
                continue
            got = cells[(rnd, stage)]
            agg = dict(level="seeds", config=labels[key], config_key=key, runs=[r["run_id"] for r in got],
                       round=rnd, stage=stage, n_seeds=len(got),
                       surgical=sum(bool(r.get("surgical")) for r in got),
                       broken=sum(bool(r.get("broken")) for r in got),
                       # growth is read against the previous student: a seed counts broken if either stage is
                       broken_growth=sum(bool(r.get("broken") or row_of.get((r["run_id"], *intervals.previous(
                           rnd, stage)), {}).get("broken")) for r in got),
                       at_chance=sorted({p for r in got for p in r.get("at_chance") or ()}))
            for m in AGG + GROWTH:
                ci, over = mean_ci([r.get(m) for r in got]), "seeds"
                two = _two_level(got, m, items, boot) if items and boot else None
                if two is not None and two["lo"] is not None:
                    ci, over = dict(mean=two["delta"], lo=two["lo"], hi=two["hi"]), "seeds+items"
                agg.update({f"{m}_mean": ci["mean"], f"{m}_lo": ci["lo"], f"{m}_hi": ci["hi"], f"{m}_over": over})
            out.append(agg)
    return out


def _two_level(got: list[dict], m: str, items: dict[str, dict], boot: int) -> dict | None:
    """A delta's two-level interval over the paired seeds of one cell (None for a ratio or without items):
    against base, or for a growth delta (`<m>_prev`) against the student that started the round."""
    rnd, stage = got[0]["round"], got[0]["stage"]
    name, ref, vs = intervals.against(m, rnd, stage)
    metric = {name: metric for metric, name in DELTAS}.get(name)
    runs = [r for r in got if r.get("paired") and r["run_id"] in items]
    if metric is None or len(runs) < 2 or (vs and rnd < 0):
        return None
    lists = [[items[r["run_id"]].get((rnd, stage), []), items[r["run_id"]].get(ref, [])] for r in runs]
    return intervals.over_seeds(lists, (1, -1), metric, boot, seeds.bootstrap(0, rnd, f"seeds-{stage}{vs}.{metric}"))


def _yn(v) -> str:
    return "-" if v is None else ("yes" if v else "no")


def _pm(row: dict, m: str) -> str:
    mean, lo, hi = row[f"{m}_mean"], row[f"{m}_lo"], row[f"{m}_hi"]
    if mean is None:
        return "-"
    star = "*" if m.startswith("d_") and row.get(f"{m}_over") == "seeds" else ""
    return f"{mean:.3f}" if lo is None else f"{mean:.3f}±{(hi - lo) / 2:.3f}{star}"


def _broken(row: dict) -> str:
    """BROKEN k/n when k of the cell's n seeds are under the coherence floor, else ''."""
    return f"BROKEN {row['broken']}/{row['n_seeds']}" if row.get("broken") else ""


def _ci(row: dict, name: str) -> str:
    return intervals.fmt(dict(delta=row.get(name), lo=row.get(f"{name}_lo"), hi=row.get(f"{name}_hi"),
                              ns=row.get(f"{name}_ns")))


def _ratio(row: dict, key: str):
    """A ratio, or the flag that withheld it."""
    if row.get("broken") and row["stage"] != "base":
        return "BROKEN"
    return row.get("withheld") if key.startswith("retain") and row.get("withheld") else row.get(key)


def _shade(row: dict, cells: dict) -> dict:
    """cells of one row, an uninformative probe's greyed (the row's `at_chance`; informative.shade)."""
    return informative.shade(cells, {p: False for p in row.get("at_chance") or ()},
                             ratios=row["stage"] in ("steered", "healed"))


def summary(rows: list[dict], agg: list[dict]) -> str:
    def name(r: dict) -> str:
        return r["stage"] + ("" if r["paired"] else " (unpaired)")

    text = ("levels and ratios (a stage under the coherence floor shows BROKEN, not a ratio)\n" + table(
        ["run", "r", "stage", "n", "target", "trait", "coh", "ppl", "kl", "retain", "retain_trait", "coh_cost",
         "surgical", "broken"],
        [[r["run_id"], r["round"], name(r), r["n"], *_shade(r, dict(
            target_nats=r["target_nats"], trait_nats=r["trait_nats"], coherence=r["coherence"],
            adapter_ppl=r.get("adapter_ppl"))).values(), r.get("kl"), *_shade(r, dict(
            retain=_ratio(r, "retain"), retain_trait=_ratio(r, "retain_trait"), coh_cost=_ratio(r, "coh_cost"),
            surgical=_ratio(r, "surgical") if r.get("broken") else _yn(r.get("surgical")))).values(),
          r.get("broken") or ""]
         for r in rows]))
    notes = {p for r in rows for p in r.get("at_chance") or ()}
    if notes:
        text += "\n" + informative.note({p: False for p in notes})
    for title, suffix in (("against base", ""), ("against the previous student (base for round 0)", "_prev")):
        text += (f"\n\n{title}: delta [95% interval resampling this run's items (paired bootstrap)], ~ = the "
                 "interval holds 0; BROKEN = the stage is under the coherence floor\n"
                 + table(["run", "r", "stage", *[n for _, n in DELTAS], "broken"],
                         [[r["run_id"], r["round"], name(r),
                           *_shade(r, {n + suffix: _ci(r, n + suffix) for _, n in DELTAS}).values(),
                           "BROKEN" if r.get("broken") else ""]
                          for r in rows if r["stage"] != "base" and (suffix == "" or r["round"] >= 0)]))
    if agg:
        text += ("\n\nover seeds: mean ± half-width of the 95% interval; deltas (d_*): two-level, resampling seeds "
                 "and then the items they share (t over seeds alone, marked *, without items or with --boot 0); "
                 "ratios: t over seeds; broken: seeds whose stage is under the coherence floor\n") + table(
            ["config", "r", "stage", "seeds", *AGG, "surgical", "broken"],
            [[a["config"], a["round"], a["stage"], a["n_seeds"], *_shade(a, {m: _pm(a, m) for m in AGG}).values(),
              f"{a['surgical']}/{a['n_seeds']}", _broken(a)] for a in agg])
        grown = [a for a in agg if a["round"] >= 1]
        if grown:
            text += ("\n\nover seeds, against the previous student (growth over the round: round r's stage minus "
                     "round r-1's healed student, paired by seed, two-level like the deltas above)\n") + table(
                ["config", "r", "stage", "seeds", *[n for _, n in DELTAS], "broken"],
                [[a["config"], a["round"], a["stage"], a["n_seeds"],
                  *_shade(a, {n: _pm(a, f"{n}_prev") for _, n in DELTAS}).values(),
                  _broken(dict(a, broken=a["broken_growth"]))] for a in grown])
    return text


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    rows, groups, exps, cfgs, items, dropped = [], defaultdict(list), {}, {}, {}, {}
    for run_id in dict.fromkeys(a.run_ids):
        log = run_log(a.out, run_id)
        cfg = cfgs[run_id] = stored_config(log)
        key = config_key(cfg)
        groups[key].append(run_id)
        exps[key] = seedless(cfg)
        eval_items = log.read("eval_items")
        items[run_id] = intervals.by_stage(eval_items)
        dropped[run_id] = control.drop_counts(log.read("completions"), log.read("dose_steps"))
        rows += run_rows(run_id, log.read("stage_metrics"), data.persona(cfg)["target"], eval_items,
                         cfg.seed, a.boot, cfg.coh_floor_rel, cfg.ppl_floor_rel,
                         informative.usable(log.read("probe_info")), cfg.probe_gate)
    agg = seed_rows(rows, groups, config_labels(exps), items, a.boot)
    fams = {family(c): {k: v for k, v in seedless(c).items() if k != "control"} for c in cfgs.values()}
    beyond = control.beyond(rows, cfgs, config_labels(fams), items, a.boot, a.unyoked)
    diffs = arms.arms(rows, cfgs, items, a.boot)
    drops = control.drops(cfgs, config_labels(fams), dropped)
    diag = Diagnostic(a.out, "stages", ",".join(dict.fromkeys(a.run_ids)), None,
                      dict(runs=list(dict.fromkeys(a.run_ids)), level=0.95, boot=a.boot))
    diag.add([dict(level="run", **r) for r in rows] + agg + beyond + diffs + drops)
    text = control.summary(beyond) + arms.summary(diffs) + control.drops_summary(drops)
    diag.finish(text.lstrip("\n") if a.beyond else summary(rows, agg) + text)
    return 0


def cli() -> int:
    return script(PROG, main, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(cli())

"""Treatment beyond control: runs whose configs differ only in `control` (and seed) are one family; per
round and stage, the treatment's change against its own base minus the control's, paired by seed, with
the mean over seed pairs and a two-level 95% interval: seeds, then the items every pair is scored on
(intervals.two_level; each pair's difference is (treatment stage - its base) - (control stage - its base),
item by item), or the t over seeds where the runs hold no items. A treatment and its control share the base
model and the items, so for one seed pair the difference is the treatment's stage against the control's,
item by item: its interval is the paired bootstrap over items (intervals.py), as every other delta's.
Two runs of one arm with the same seed are refused: which of them pairs would be a guess. A stage under the
coherence floor in either arm is named in the row (`broken`) and the table. A control must be yoked to the
treatment it is paired with (`--yoke`, yoke.py: the same slots, seeds and number kept); an unyoked pair is
refused with one line unless `unyoked` (`--unyoked`), and its rows say so. Next to the rows, the filter's
drops per reason in each arm (`drops`): a filter that drops one arm's data more than the other's selects it.
From round 1 on, the growth over the round beyond the control's (`<m>_prev`: each arm against the student
that started its round) is differenced the same way.

A control heals on the same loop's text with the trait taken out (c0: unsteered completions; random: an
equal-norm random push), so what the treatment moves beyond it is what the trait vector adds over
self-distillation.
"""

from __future__ import annotations

from collections import defaultdict

from .. import informative, intervals, seeds
from ..config import Config
from ..errors import UserError
from ..evaluate import stage_order
from ..filter import CRITERIA
from ..tables import table
from .runs import family
from .stats import mean_ci

# what is differenced: the trait probe (the "d trait"), the target foundation, and the cost: seven-way
# coherence, and free-text perplexity (the cost a model at chance on the seven-way probe can show)
DIFFS = ("d_trait", "d_target", "d_coh", "d_ppl")
METRIC = {"d_trait": "trait", "d_target": "target", "d_coh": "coh", "d_ppl": "ppl"}  # intervals.METRICS' names
# the same differences of the growth over a round (against the previous student), from round 1 on
GROWTH = tuple(f"{m}_prev" for m in DIFFS)


def stage_rows(rows: list[dict]) -> dict[str, dict]:
    """run_id -> (round, stage) -> its steered and healed `just stages` rows that have deltas."""
    by_run = defaultdict(dict)
    for r in rows:
        if r["stage"] in ("steered", "healed") and r.get("paired"):
            by_run[r["run_id"]][(r["round"], r["stage"])] = r
    return by_run


def paired(by_run: dict, a: dict[int, str], b: dict[int, str], cfgs: dict[str, Config], items: dict | None,
           boot: int, prefix: str) -> list[dict]:
    """Arm a minus arm b (seed -> run_id each), paired by seed, per (round, stage) both have: the mean difference
    of their deltas against base with its interval, two-level over seed pairs and items (one pair: over items),
    as `<prefix>_<m>_mean/_lo/_hi/_over` (and `_items`), with the runs, the broken stages and the probes at chance."""
    common = sorted(set(a) & set(b))
    cells = sorted({k for s in common for k in by_run[a[s]]} & {k for s in common for k in by_run[b[s]]},
                   key=stage_order)
    out = []
    for key in cells:
        pairs = [(by_run[a[s]].get(key), by_run[b[s]].get(key)) for s in common]
        pairs = [(t, c) for t, c in pairs if t is not None and c is not None]
        row = dict(round=key[0], stage=key[1], n_pairs=len(pairs), treatment=[t["run_id"] for t, _ in pairs],
                   controls=[c["run_id"] for _, c in pairs],
                   broken=[x["run_id"] for t, c in pairs for x in (t, c) if x.get("broken")],
                   # the growth's reference, the student that started the round, may be broken too
                   broken_growth=[x["run_id"] for t, c in pairs for x in (t, c) if x.get("broken") or
                                  by_run[x["run_id"]].get(intervals.previous(*key), {}).get("broken")],
                   at_chance=sorted({p for t, c in pairs for x in (t, c) for p in x.get("at_chance") or ()}))
        for m in DIFFS + (GROWTH if key[0] >= 1 else ()):
            diffs = [None if t.get(m) is None or c.get(m) is None else t[m] - c[m] for t, c in pairs]
            ci, over = mean_ci(diffs), "seeds"
            two = _two_level(items, pairs, key, m, boot)
            if two is not None:
                ci, over = dict(mean=two["delta"], lo=two["lo"], hi=two["hi"]), "seeds+items"
            row.update({f"{prefix}_{m}_mean": ci["mean"], f"{prefix}_{m}_lo": ci["lo"], f"{prefix}_{m}_hi": ci["hi"],
                        f"{prefix}_{m}_over": over if len(pairs) > 1 else "items"})
        if len(pairs) == 1 and items and boot:
            got = _over_items(items, pairs[0][0]["run_id"], pairs[0][1]["run_id"], key, boot,
                              cfgs[pairs[0][0]["run_id"]].seed)
            row.update({f"{prefix}_{m}_items": got[m] for m in DIFFS})
        out.append(row)
    return out


def beyond(rows: list[dict], cfgs: dict[str, Config], labels: dict[str, str],
           items: dict[str, dict] | None = None, boot: int = 0, unyoked: bool = False) -> list[dict]:
    """rows: `just stages` run rows (run_id, round, stage, d_*); cfgs: run_id -> its config; labels: family
    -> a short name; items: run_id -> intervals.by_stage of its eval_items (for one seed pair's interval over
    items, `boot` resamples). One row per (family, control kind, round, stage) with a treatment/control pair."""
    by_run = stage_rows(rows)
    arms = defaultdict(dict)  # (family, control) -> seed -> run_id
    for run_id, cfg in cfgs.items():
        got = arms[(family(cfg), cfg.control)].setdefault(cfg.seed, run_id)
        if got != run_id:
            raise UserError(f"runs {got} and {run_id} are the same arm (control {cfg.control}) with the same seed "
                              f"{cfg.seed}: beyond control pairs arms by seed; pass only one of them")
    out = []
    for (fam, control), ctrl in sorted(arms.items()):
        treat = arms.get((fam, "none"), {})
        common = sorted(set(treat) & set(ctrl))
        if control == "none" or not common:
            continue
        loose = [(treat[s], ctrl[s]) for s in common if cfgs[ctrl[s]].yoke != treat[s]]
        if loose and not unyoked:
            t, c = loose[0]
            raise UserError(f"beyond control: {len(loose)} {control} run(s) are not yoked to the treatment they pair "
                              f"with (first: {c}, treatment {t}): an unyoked control runs its own walk on other slots "
                              f"and seeds; rerun it with --yoke {t} (just seeds --yoke-group does), or pass --unyoked")
        for row in paired(by_run, treat, ctrl, cfgs, items, boot, "beyond"):
            yoked = all(cfgs[c].yoke == t for t, c in zip(row["treatment"], row["controls"]))
            out.append(dict(level="beyond", family=labels.get(fam, fam), control=control, **row, yoked=yoked))
    return out


def _two_level(items: dict | None, pairs: list[tuple[dict, dict]], key: tuple[int, str], m: str,
               boot: int) -> dict | None:
    """Seeds, then items: per pair (treatment stage - its ref) - (control stage - its ref) on shared items, the
    ref being base, or for a growth difference (`<m>_prev`) the student that started the round."""
    if not items or not boot or len(pairs) < 2 or any(x["run_id"] not in items for p in pairs for x in p):
        return None
    name, ref, vs = intervals.against(m, *key)
    lists = [[items[x["run_id"]].get(k, []) for x in (t, c) for k in (key, ref)] for t, c in pairs]
    seed = seeds.bootstrap(0, key[0], f"beyond-{key[1]}{vs}.{name}")
    ci = intervals.over_seeds(lists, (1, -1, -1, 1), METRIC[name], boot, seed)
    return ci if ci is not None and ci["lo"] is not None else None


def _over_items(items: dict, treat: str, ctrl: str, key: tuple[int, str], boot: int, seed: int) -> dict:
    """One seed pair: the treatment's stage against the control's, paired over their shared items."""
    r, stage = key
    got = {x["metric"]: x for x in intervals.compare(items[treat].get(key, []), items[ctrl].get(key, []), boot,
                                                      lambda m: seeds.bootstrap(seed, r, f"beyond-{stage}.{m}"))}
    return {m: got.get(METRIC[m]) for m in DIFFS}


def ci_cell(row: dict, m: str, prefix: str = "beyond") -> str:
    """One difference as a table prints it: mean [two-level interval], * when over seed pairs only."""
    if row.get(f"{prefix}_{m}_items"):  # one seed pair: the paired bootstrap over items
        return intervals.fmt(row[f"{prefix}_{m}_items"])
    mean, lo, hi = row[f"{prefix}_{m}_mean"], row[f"{prefix}_{m}_lo"], row[f"{prefix}_{m}_hi"]
    if mean is None:
        return "-"
    star = "*" if row.get(f"{prefix}_{m}_over") == "seeds" else ""
    ns = "~" if intervals.crosses_zero(lo, hi) else ""
    return f"{mean:+.3f}" if lo is None else f"{ns}{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]{star}"


# what a difference table's interval resamples, said once for beyond control and arm differences
INTERVAL = ("mean [95% interval, two-level: resampling seed pairs, then the items they share (t over seed pairs alone, "
            "marked *, without items or with --boot 0); one seed pair: resampling its items (paired bootstrap)]; ~ = "
            "the interval holds 0; broken: runs whose stage is under the coherence floor")


def diff_cells(row: dict, prefix: str, ms: tuple[str, ...] = DIFFS) -> list[str]:
    """A `paired` row's differences as table cells (a probe at chance greyed), then its broken runs."""
    cells = informative.shade({m.removesuffix("_prev"): ci_cell(row, m, prefix) for m in ms},
                              {p: False for p in row.get("at_chance") or ()}, ratios=False)
    return [*cells.values(), "BROKEN " + ",".join(row["broken"]) if row.get("broken") else ""]


def summary(out: list[dict]) -> str:
    if not out:
        return ""
    return (f"\n\nbeyond control: treatment minus control, paired by seed; {INTERVAL}\n"
            + table(["family", "control", "yoked", "r", "stage", "pairs", *(f"beyond {m}" for m in DIFFS), "broken"],
                    [[r["family"], r["control"], "yes" if r.get("yoked") else "NO (--unyoked)", r["round"], r["stage"],
                      r["n_pairs"], *diff_cells(r, "beyond")] for r in out])
            + growth_summary([r for r in out if r["round"] >= 1]))


def growth_summary(out: list[dict]) -> str:
    """The growth over each round beyond control: did the round add more than the control's round did?"""
    if not out:
        return ""
    return ("\n\ngrowth beyond control: (treatment's round r minus its round r-1 healed student) minus the control's "
            f"same growth, paired by seed; {INTERVAL} (one seed pair: the mean alone)\n"
            + table(["family", "control", "yoked", "r", "stage", "pairs", *(f"growth {m}" for m in DIFFS), "broken"],
                    [[r["family"], r["control"], "yes" if r.get("yoked") else "NO (--unyoked)", r["round"], r["stage"],
                      r["n_pairs"], *diff_cells(dict(r, broken=r["broken_growth"]), "beyond", GROWTH)] for r in out]))


def drop_counts(completions: list[dict], steps: list[dict]) -> dict[int, dict]:
    """Per round of one run: the completions of the batches it banks from (collect and accepted probe batches, a
    yoked control's replays; a failed probe above the edge is left out): how many passed the filter and its drops
    per reason."""
    out = {}
    for r in sorted({x["round"] for x in steps}):
        st = [x for x in steps if x["round"] == r]
        old = any(x["phase"] is None for x in st)  # stored before dose_steps had a phase: every batch banked
        ok = {x["step"] for x in st if old or x["phase"] in ("collect", "yoke") or x["accepted"]}
        got = [x for x in completions if x["round"] == r and x["phase"] in ("probe", "collect") and x["step"] in ok]
        out[r] = dict(n=len(got), passed=sum(bool(x["keep"]) for x in got),
                      **{c: sum(x["reason"] == c for x in got if not x["keep"]) for c in CRITERIA})
    return out


def drops(cfgs: dict[str, Config], labels: dict[str, str], counts: dict[str, dict[int, dict]]) -> list[dict]:
    """The drop counts summed over each arm's seeds, one row per (family, round, arm), for families with a control."""
    fams = {family(c) for c in cfgs.values() if c.control != "none"}
    acc: dict = defaultdict(lambda: defaultdict(int))
    for run_id, cfg in cfgs.items():
        if family(cfg) in fams:
            for r, c in counts.get(run_id, {}).items():
                a = acc[(family(cfg), r, cfg.control)]
                a["runs"] += 1
                for k, v in c.items():
                    a[k] += v
    return [dict(level="drops", family=labels.get(f, f), round=r, control=ctl, **a)
            for (f, r, ctl), a in sorted(acc.items(), key=lambda x: (x[0][0], x[0][1], x[0][2] != "none", x[0][2]))]


def drops_summary(rows: list[dict]) -> str:
    if not rows:
        return ""
    arms = list(dict.fromkeys(r["control"] for r in rows))
    by = {(r["family"], r["round"], r["control"]): r for r in rows}
    cells = sorted({(r["family"], r["round"]) for r in rows})
    body = [[f, rd, what, *(_count(by.get((f, rd, a)), what) for a in arms)]
            for f, rd in cells for what in ("passed", *CRITERIA)
            if any((by.get((f, rd, a)) or {}).get(what) for a in arms)]
    return ("\n\nthe filter per arm: completions of the batches each arm banks from (a failed probe above the edge is "
            "left out), summed over seeds: passed the filter (banked up to n_keep), then dropped per reason (its first failing criterion), n/of\n"
            + table(["family", "r", "", *("treatment" if a == "none" else a for a in arms)], body))


def _count(row: dict | None, what: str) -> str:
    return "-" if row is None else f"{row[what]}/{row['n']}"

"""Treatment beyond control: runs whose configs differ only in `control` (and seed) are one family; per
round and stage, the treatment's change against its own base minus the control's, paired by seed, with
the mean and 95% t-interval of those paired differences. A treatment and its control share the base model
and the items, so for one seed pair the difference is the treatment's stage against the control's, item by
item: its interval is the paired bootstrap over items (intervals.py), as every other delta's.

A control heals on the same loop's text with the trait taken out (c0: unsteered completions; random: an
equal-norm random push), so what the treatment moves beyond it is what the trait vector adds over
self-distillation. The interval is over seeds: with one seed pair there is a difference and no interval.
"""

from __future__ import annotations

from collections import defaultdict

from .. import intervals, seeds
from ..config import Config
from ..evaluate import stage_order
from ..report import table
from .runs import family
from .stats import mean_ci

# what is differenced: the trait probe (the "d trait"), the target foundation, coherence (the cost)
DIFFS = ("d_trait", "d_target", "d_coh")
METRIC = {"d_trait": "trait", "d_target": "target", "d_coh": "coh"}  # intervals.METRICS' names


def beyond(rows: list[dict], cfgs: dict[str, Config], labels: dict[str, str],
           items: dict[str, dict] | None = None, boot: int = 0) -> list[dict]:
    """rows: `just stages` run rows (run_id, round, stage, d_*); cfgs: run_id -> its config; labels: family
    -> a short name; items: run_id -> intervals.by_stage of its eval_items (for one seed pair's interval over
    items, `boot` resamples). One row per (family, control kind, round, stage) with a treatment/control pair."""
    by_run = defaultdict(dict)
    for r in rows:
        if r["stage"] in ("steered", "healed") and r.get("paired"):
            by_run[r["run_id"]][(r["round"], r["stage"])] = r
    arms = defaultdict(dict)  # (family, control) -> seed -> run_id
    for run_id, cfg in cfgs.items():
        arms[(family(cfg), cfg.control)].setdefault(cfg.seed, run_id)
    out = []
    for (fam, control), ctrl in sorted(arms.items()):
        treat = arms.get((fam, "none"), {})
        seeds = sorted(set(treat) & set(ctrl))
        if control == "none" or not seeds:
            continue
        cells = sorted({k for s in seeds for k in by_run[treat[s]]} & {k for s in seeds for k in by_run[ctrl[s]]},
                       key=stage_order)
        for key in cells:
            pairs = [(by_run[treat[s]].get(key), by_run[ctrl[s]].get(key)) for s in seeds]
            pairs = [(t, c) for t, c in pairs if t is not None and c is not None]
            row = dict(level="beyond", family=labels.get(fam, fam), control=control, round=key[0], stage=key[1],
                       n_pairs=len(pairs), treatment=[t["run_id"] for t, _ in pairs],
                       controls=[c["run_id"] for _, c in pairs])
            for m in DIFFS:
                ci = mean_ci([None if t.get(m) is None or c.get(m) is None else t[m] - c[m] for t, c in pairs])
                row.update({f"beyond_{m}_mean": ci["mean"], f"beyond_{m}_lo": ci["lo"], f"beyond_{m}_hi": ci["hi"]})
            if len(pairs) == 1 and items and boot:
                row.update(_over_items(items, pairs[0][0]["run_id"], pairs[0][1]["run_id"], key, boot,
                                       cfgs[pairs[0][0]["run_id"]].seed))
            out.append(row)
    return out


def _over_items(items: dict, treat: str, ctrl: str, key: tuple[int, str], boot: int, seed: int) -> dict:
    """One seed pair: the treatment's stage against the control's, paired over their shared items."""
    r, stage = key
    got = {x["metric"]: x for x in intervals.compare(items[treat].get(key, []), items[ctrl].get(key, []), boot,
                                                      lambda m: seeds.bootstrap(seed, r, f"beyond-{stage}.{m}"))}
    return {f"beyond_{m}_items": got.get(METRIC[m]) for m in DIFFS}


def _ci(row: dict, m: str) -> str:
    if row.get(f"beyond_{m}_items"):  # one seed pair: the paired bootstrap over items
        return intervals.fmt(row[f"beyond_{m}_items"])
    mean, lo, hi = row[f"beyond_{m}_mean"], row[f"beyond_{m}_lo"], row[f"beyond_{m}_hi"]
    if mean is None:
        return "-"
    return f"{mean:+.3f}" if lo is None else f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def summary(out: list[dict]) -> str:
    if not out:
        return ""
    return ("\n\nbeyond control: treatment minus control, paired by seed (mean [95% t-interval over seeds]; one "
            "seed pair: [95% paired bootstrap over items], ~ = the interval holds 0)\n" + table(["family", "control", "r", "stage", "pairs", *(f"beyond {m}" for m in DIFFS)],
                                  [[r["family"], r["control"], r["round"], r["stage"], r["n_pairs"],
                                    *(_ci(r, m) for m in DIFFS)] for r in out]))

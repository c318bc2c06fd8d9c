"""Arm differences: two treatment arms whose configs differ in one experiment knob (the study's kl_rev and nll differ
in `reg`) are differenced seed by seed, the first named minus the second, per round and stage, with the interval
beyond control uses (diag/control.py `paired`: two-level over seed pairs and the items they share). Two arms of
one seed start from the same base and, in round 0, the same vector, walk and completions, so the difference is
what the knob changes. Controls are left to beyond control; arms differing in two knobs or more are not paired
(which knob moved it would be a guess).
"""

from __future__ import annotations

from collections import defaultdict

from ..config import Config
from ..tables import table
from .control import DIFFS, INTERVAL, diff_cells, paired, stage_rows
from .runs import config_key, config_labels, seedless


def arms(rows: list[dict], cfgs: dict[str, Config], items: dict | None = None, boot: int = 0) -> list[dict]:
    """rows: `just stages` run rows; cfgs: run_id -> config (in the order the runs were named). One row per (arm,
    versus, round, stage), each arm named by the knobs that set the treatment arms apart, fields `diff_<m>_*`
    as control.paired."""
    groups: dict[str, dict[int, str]] = defaultdict(dict)
    for run_id, cfg in cfgs.items():
        if cfg.control == "none":
            groups[config_key(cfg)].setdefault(cfg.seed, run_id)
    exp = {k: seedless(cfgs[next(iter(g.values()))]) for k, g in groups.items()}
    labels = config_labels(exp)
    by_run, keys, out = stage_rows(rows), list(groups), []
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            knobs = sorted(k for k in exp[a].keys() | exp[b].keys() if exp[a].get(k) != exp[b].get(k))
            if len(knobs) != 1:
                continue
            for row in paired(by_run, groups[a], groups[b], cfgs, items, boot, "diff"):
                out.append(dict(level="arms", arm=labels.get(a, a), versus=labels.get(b, b), knobs=knobs, **row))
    return out


def summary(out: list[dict]) -> str:
    if not out:
        return ""
    return (f"\n\narm differences: one treatment arm minus another that differs in one knob, paired by seed; "
            f"{INTERVAL}\n"
            + table(["arms", "r", "stage", "pairs", *(f"diff {m}" for m in DIFFS), "broken"],
                    [[f"{r['arm']} - {r['versus']}", r["round"], r["stage"], r["n_pairs"], *diff_cells(r, "diff")]
                     for r in out]))

"""Paired bootstrap intervals of the stage deltas (spec.md "Intervals").

Every delta the tables print (d target, d trait, d coherence, d adapter_ppl of a stage against base and
against the previous student) is a statistic of two stages measured on the same items, so the items
are resampled together: scipy.stats.bootstrap(paired=True), the percentile method (a reader can
recompute it: the 2.5th and 97.5th percentiles of the resampled deltas), a fixed seed per (run seed,
round, stage, metric, reference) from seeds.py, so a table printed twice gives the same interval.
The whole statistic is resampled, never a per-item difference: d target is log(mean p) - log(mean p'),
a ratio of means, not a mean of per-item log ratios.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from . import seeds

LEVEL = 0.95
# metric -> (evaluator, per-item column, statistic of the two stages' columns)
METRICS: dict[str, tuple[str, str, str]] = {
    "target": ("mfv", "p_target", "log_mean"),   # target_nats = log mean p_target
    "trait": ("contrast", "diff", "mean"),       # trait_nats = mean (trait lp - opposite lp)
    "coh": ("mfv", "pmass", "mean"),             # coherence = mean option mass
    "ppl": ("freetext", "ppl", "mean"),          # adapter_ppl = mean perplexity of the free text
}
REFS = ("base", "prev")


def _delta(kind: str):
    def stat(x, y, axis=-1):
        if kind == "log_mean":
            with np.errstate(divide="ignore"):
                return np.log(np.mean(x, axis=axis)) - np.log(np.mean(y, axis=axis))
        return np.mean(x, axis=axis) - np.mean(y, axis=axis)
    return stat


def paired(x: list[float], y: list[float], kind: str = "mean", boot: int = 2000, seed: int = 0,
           level: float = LEVEL) -> dict:
    """{delta, lo, hi, n}: statistic(x) - statistic(y) over paired items and its percentile interval
    (lo, hi None with fewer than two items or no resamples)."""
    from scipy.stats import bootstrap

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    stat = _delta(kind)
    d = float(stat(x, y)) if len(x) else None
    if len(x) < 2 or boot < 1 or d is None or not math.isfinite(d):
        return dict(delta=d, lo=None, hi=None, n=len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate sample (all items equal) gives lo = hi, which is right
        res = bootstrap((x, y), stat, paired=True, vectorized=True, n_resamples=boot, method="percentile",
                        confidence_level=level, rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return dict(delta=d, lo=lo if math.isfinite(lo) else None, hi=hi if math.isfinite(hi) else None, n=len(x))


def pairs(a: list[dict], b: list[dict], col: str) -> tuple[list[float], list[float]]:
    """The column of items present, and finite, in both stages, matched by item id. A repeated id in
    either stage is refused: it would pair one item's value with another's."""
    for rows in (a, b):
        seen: set = set()
        for r in rows:
            if r["item"] in seen:
                raise ValueError(f"repeated item id {r['item']!r} in one stage's items: each item must appear once "
                                 "per stage to be paired")
            seen.add(r["item"])
    ref = {r["item"]: r.get(col) for r in b}
    xs, ys = [], []
    for r in a:
        u, v = r.get(col), ref.get(r["item"])
        if u is not None and v is not None and math.isfinite(u) and math.isfinite(v):
            xs.append(u)
            ys.append(v)
    return xs, ys


def crosses_zero(lo: float | None, hi: float | None) -> bool | None:
    """True when the interval holds 0 (the delta is not told apart from no change); None without one."""
    return None if lo is None or hi is None else lo <= 0.0 <= hi


def compare(stage_items: list[dict], ref_items: list[dict], boot: int, seed_of) -> list[dict]:
    """One interval row per metric both stages measured: {metric, n, delta, lo, hi, boot, ns};
    seed_of(metric) is the metric's bootstrap seed."""
    out = []
    for metric, (evaluator, col, kind) in METRICS.items():
        a = [x for x in stage_items if x["evaluator"] == evaluator]
        b = [x for x in ref_items if x["evaluator"] == evaluator]
        x, y = pairs(a, b, col)
        if not x:  # not measured, or nothing finite to pair (e.g. every free-text generation empty)
            continue
        ci = paired(x, y, kind, boot, seed_of(metric))
        out.append(dict(metric=metric, **ci, boot=boot, ns=crosses_zero(ci["lo"], ci["hi"])))
    return out


def previous(r: int, stage: str) -> tuple[int, str]:
    """The student a stage of round r is compared with as 'prev': the one that started the round
    (round r-1's healed; base for round 0 and for round -1's prompted)."""
    return (r - 1, "healed") if r > 0 else (-1, "base")


def stage_intervals(items: dict[tuple[int, str], list[dict]], r: int, stage: str, seed: int, boot: int) -> list[dict]:
    """Interval rows of one stage against base and against the previous student (round -1: base only)."""
    base = items.get((-1, "base"), [])
    refs = [("base", (-1, "base"))] + ([("prev", previous(r, stage))] if r >= 0 else [])
    out = []
    for ref, key in refs:
        # the seed names the compared stages, so round 0's prev (= base) repeats its base interval exactly
        def seed_of(metric: str, key=key) -> int:
            return seeds.bootstrap(seed, r, f"{stage}-vs-{key[1]}{key[0]}.{metric}")
        for row in compare(items.get((r, stage), []), items.get(key, []), boot, seed_of):
            out.append(dict(round=r, stage=stage, ref=ref, ref_round=key[0], **row))
    return out if base else []


def by_stage(eval_items: list[dict]) -> dict[tuple[int, str], list[dict]]:
    out: dict[tuple[int, str], list[dict]] = {}
    for x in eval_items:
        out.setdefault((x["round"], x["stage"]), []).append(x)
    return out


def lookup(rows: list[dict]) -> dict[tuple[int, str, str, str], dict]:
    """Interval rows keyed by (round, stage, metric, ref)."""
    return {(x["round"], x["stage"], x["metric"], x["ref"]): x for x in rows}


def fmt(ci: dict | None, digits: int = 3) -> str:
    """'+0.016 [+0.004, +0.029]', with a leading '~' when the interval holds 0; '-' when there is none."""
    if not ci or ci.get("delta") is None:
        return "-"
    d = f"{ci['delta']:+.{digits}f}"
    if ci.get("lo") is None:
        return d
    return f"{'~' if ci.get('ns') else ''}{d} [{ci['lo']:+.{digits}f}, {ci['hi']:+.{digits}f}]"

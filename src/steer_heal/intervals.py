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


def against(name: str, r: int, stage: str) -> tuple[str, tuple[int, str], str]:
    """A delta column's (name without `_prev`, the stage it is taken against, its bootstrap-tag suffix): base,
    or for a growth column (`<name>_prev`) the student that started the round."""
    if name.endswith("_prev"):
        return name.removesuffix("_prev"), previous(r, stage), "-vs-prev"
    return name, (-1, "base"), ""


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


# ---------------------------------------------------------------- two levels: seeds, then items

def _stat(kind: str, x: np.ndarray) -> np.ndarray:
    """The statistic of one stage's item column over the last axis (mean, or log of the mean)."""
    if kind == "log_mean":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(np.mean(x, axis=-1))
    return np.mean(x, axis=-1)


def two_level(per_seed: list[np.ndarray], signs: tuple[float, ...], kind: str = "mean", boot: int = 2000,
              seed: int = 0, level: float = LEVEL) -> dict:
    """A delta averaged over seeds, with an interval for a new seed AND new items (docs/diagnostics.md
    "Two-level intervals"). per_seed: one [m, n] array per seed, m stage columns on the same n items (same
    order in every seed); the seed's delta is sum_c signs[c] * stat(column c).

    The seed-to-seed spread of the deltas already holds each seed's own item noise; what it misses is the
    part every seed shares because they are scored on the same items. That part is the item bootstrap's:
    resample item ids once for all seeds (v_joint, the variance of the seed-mean) and within each seed
    (v_seed); under seed + item + interaction noise, (k v_joint - mean v_seed) / (k - 1) estimates the
    shared item variance of the mean. The half-width is the mean of the Welch-Satterthwaite t half-width of
    s^2/k + that term and the two levels' t half-widths (t(k-1) for seeds, t(n-1) for items) in quadrature.
    (A plain percentile bootstrap of seeds-then-items undercovers with 3 seeds: the coverage of this one per
    seed count is in docs/diagnostics.md "Two-level intervals" and tests/test_intervals.py.)
    Returns {delta, lo, hi, n_seeds, n, seed_hw, item_hw}; lo/hi None with fewer than two seeds or items."""
    from scipy.stats import t as student_t

    k = len(per_seed)
    n = per_seed[0].shape[-1] if k else 0
    sg = np.asarray(signs, dtype=float)
    est = np.array([sg @ _stat(kind, x) for x in per_seed]) if k and n else np.array([])
    delta = float(est.mean()) if est.size and np.all(np.isfinite(est)) else None
    out = dict(delta=delta, lo=None, hi=None, n_seeds=k, n=n, seed_hw=None, item_hw=None)
    if delta is None or k < 2 or n < 2:
        return out
    seed_var = float(est.var(ddof=1)) / k
    item_var = 0.0
    if boot > 1:
        idx = np.random.default_rng(seed).integers(0, n, size=(boot, n))
        b = np.stack([np.einsum("m,mb->b", sg, _stat(kind, x[:, idx])) for x in per_seed])  # [k, boot]
        b = b[:, np.all(np.isfinite(b), axis=0)]  # a resample of only zero-probability items has no log mean
        if b.shape[1] > 1:
            v_seed = float(b.var(axis=1, ddof=1).mean())
            v_joint = float(b.mean(axis=0).var(ddof=1))
            item_var = max(0.0, (k * v_joint - v_seed) / (k - 1))
    q = 1 - (1 - level) / 2
    s_hw = float(student_t.ppf(q, k - 1)) * math.sqrt(seed_var)
    i_hw = float(student_t.ppf(q, n - 1)) * math.sqrt(item_var)
    var = seed_var + item_var
    df = var ** 2 / (seed_var ** 2 / (k - 1) + item_var ** 2 / (n - 1)) if var > 0 else float(k - 1)
    # Welch-Satterthwaite alone is liberal with few seeds (its df is estimated too high when the seed term
    # is small by chance); the two t half-widths added in quadrature are conservative when the terms are
    # alike. Their mean covered 93.9-96.4% in every simulated mix of seed, item and interaction noise for 3-10 seeds.
    hw = (float(student_t.ppf(q, df)) * math.sqrt(var) + math.hypot(s_hw, i_hw)) / 2
    return dict(out, lo=delta - hw, hi=delta + hw, seed_hw=s_hw, item_hw=i_hw)


def aligned(stage_lists: list[list[list[dict]]], evaluator: str, col: str) -> list[np.ndarray]:
    """stage_lists: per seed, the m stages' item rows. One [m, n] array per seed over the item ids every
    stage of every seed scored finitely (sorted, so item j is the same item in every seed)."""
    per = []
    for stages in stage_lists:
        cols = [{r["item"]: r.get(col) for r in items if r.get("evaluator") == evaluator} for items in stages]
        per.append(cols)
    ok = None
    for cols in per:
        for c in cols:
            good = {i for i, v in c.items() if v is not None and math.isfinite(v)}
            ok = good if ok is None else ok & good
    ids = sorted(ok or ())
    return [np.array([[c[i] for i in ids] for c in cols], dtype=float).reshape(len(cols), len(ids)) for cols in per]


def over_seeds(stage_lists: list[list[list[dict]]], signs: tuple[float, ...], metric: str, boot: int,
               seed: int) -> dict | None:
    """The two-level interval of one metric's delta (intervals.METRICS), or None when no item is shared."""
    evaluator, col, kind = METRICS[metric]
    per = aligned(stage_lists, evaluator, col)
    if not per or per[0].shape[1] == 0:
        return None
    ci = two_level(per, signs, kind, boot, seed)
    return dict(ci, ns=crosses_zero(ci["lo"], ci["hi"]))

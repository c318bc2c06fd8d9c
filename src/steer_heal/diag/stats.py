"""Statistics of the diagnostics: Student-t intervals over seeds and the Pareto front."""

from __future__ import annotations

import math
import statistics


def _t_within(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df: the finite sums of Abramowitz & Stegun 26.7.3-4."""
    th = math.atan(t / math.sqrt(df))
    c2 = math.cos(th) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(th) * total
    term = total = math.cos(th) if df > 1 else 0.0
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (th + math.sin(th) * total)


def t_quantile(level: float, df: int) -> float:
    """t such that P(|T| < t) = level (two-sided; 0.95 -> the 97.5th percentile), by bisection."""
    if df < 1 or not 0 < level < 1:
        raise ValueError(f"t_quantile needs df >= 1 and 0 < level < 1, got df={df} level={level}")
    lo, hi = 0.0, 1.0
    while _t_within(hi, df) < level:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_within(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float | None], level: float = 0.95) -> dict:
    """Mean and the t interval mean +- t(level, n-1) * sd / sqrt(n) over the non-missing values.
    With one value the interval is missing (None), with none the mean is too."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return dict(mean=None, lo=None, hi=None, n=0)
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return dict(mean=m, lo=None, hi=None, n=1)
    hw = t_quantile(level, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return dict(mean=m, lo=m - hw, hi=m + hw, n=len(xs))


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """True where no other point is at least as good on both axes and better on one (both maximised).
    Equal points do not dominate each other, so tied points stay on the front together."""
    return [not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points) for p in points]


"""Paired bootstrap intervals (intervals.py) against hand computations: an enumerable case, a fixed-seed
numpy reference of the percentile method, the ratio statistic of target nats, and the item pairing."""

import math
from itertools import product

import numpy as np
import pytest

from steer_heal import intervals as I
from steer_heal import seeds


def test_two_items_give_the_enumerated_percentile_interval():
    # stage - ref per item is (0, 1): the 4 equally likely resamples have mean delta 0, .5, .5, 1, so the
    # 2.5th and 97.5th percentiles of 2000 resamples are 0 and 1 (P(no 0 or no 1 among 2000) ~ 1e-250)
    means = sorted(np.mean(r) for r in product((0.0, 1.0), repeat=2))
    assert means == [0.0, 0.5, 0.5, 1.0]
    ci = I.paired([5.0, 7.0], [5.0, 6.0], "mean", boot=2000, seed=1)
    assert ci == dict(delta=0.5, lo=0.0, hi=1.0, n=2)
    assert I.crosses_zero(ci["lo"], ci["hi"])  # touching 0 counts: no change is not ruled out


def test_percentile_interval_matches_a_fixed_seed_numpy_reference():
    rng = np.random.default_rng(7)
    x, y = rng.normal(0.3, 1.0, 40), rng.normal(0.0, 1.0, 40)
    got = I.paired(x, y, "mean", boot=500, seed=123)
    idx = np.random.default_rng(123).integers(0, 40, (500, 40))  # scipy's paired resampling: one index set
    d = x[idx].mean(-1) - y[idx].mean(-1)
    lo, hi = np.quantile(d, [0.025, 0.975])
    assert got["delta"] == pytest.approx(x.mean() - y.mean())
    assert (got["lo"], got["hi"]) == pytest.approx((lo, hi), rel=1e-12)
    # pairing matters: the same numbers resampled independently would give a different (here wider) interval
    ind = np.random.default_rng(1).integers(0, 40, (500, 40))
    d_unpaired = x[idx].mean(-1) - y[ind].mean(-1)
    assert np.quantile(d_unpaired, 0.975) - np.quantile(d_unpaired, 0.025) != pytest.approx(hi - lo)


def test_target_delta_is_a_log_of_means_resampled_whole():
    x, y = [0.9, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]
    got = I.paired(x, y, "log_mean", boot=300, seed=5)
    assert got["delta"] == pytest.approx(math.log(0.3) - math.log(0.25))
    assert got["delta"] != pytest.approx(np.mean(np.log(x) - np.log(y)))  # not a mean of per-item log ratios
    xa, ya = np.array(x), np.array(y)
    idx = np.random.default_rng(5).integers(0, 4, (300, 4))
    d = np.log(xa[idx].mean(-1)) - np.log(ya[idx].mean(-1))
    assert (got["lo"], got["hi"]) == pytest.approx(tuple(np.quantile(d, [0.025, 0.975])), rel=1e-12)


def test_no_interval_without_two_items_or_resamples():
    assert I.paired([1.0], [0.5], boot=100) == dict(delta=0.5, lo=None, hi=None, n=1)
    assert I.paired([1.0, 2.0], [0.5, 0.5], boot=0)["lo"] is None
    assert I.paired([], [], boot=100) == dict(delta=None, lo=None, hi=None, n=0)
    assert I.crosses_zero(None, 1.0) is None


def test_items_pair_by_id_and_drop_what_either_stage_lacks():
    a = [dict(item="v2", pmass=0.2), dict(item="v1", pmass=0.1), dict(item="v3", pmass=None),
         dict(item="v4", pmass=float("nan")), dict(item="v5", pmass=0.5)]
    b = [dict(item="v1", pmass=1.0), dict(item="v2", pmass=2.0), dict(item="v3", pmass=3.0), dict(item="v4", pmass=4.0)]
    assert I.pairs(a, b, "pmass") == ([0.2, 0.1], [2.0, 1.0])


def _items(evaluator, col, values):
    return [dict(evaluator=evaluator, item=str(i), **{col: v}) for i, v in enumerate(values)]


def test_stage_intervals_against_base_and_previous_student():
    base = _items("contrast", "diff", [0.0, 0.1, 0.2, 0.0])
    healed0 = _items("contrast", "diff", [0.1, 0.2, 0.3, 0.1])
    healed1 = _items("contrast", "diff", [0.3, 0.2, 0.5, 0.1])
    items = {(-1, "base"): base, (0, "healed"): healed0, (1, "healed"): healed1}
    r0 = {x["ref"]: x for x in I.stage_intervals(items, 0, "healed", seed=0, boot=200)}
    r1 = {x["ref"]: x for x in I.stage_intervals(items, 1, "healed", seed=0, boot=200)}
    assert {k: (v["ref_round"], v["metric"]) for k, v in r1.items()} == {"base": (-1, "trait"), "prev": (0, "trait")}
    assert r0["base"]["delta"] == pytest.approx(0.1) and r0["base"]["lo"] == pytest.approx(0.1)  # constant shift
    assert r0["base"]["ns"] is False
    # round 0's previous student is base: the same comparison, the same seed, the same interval
    assert {k: v for k, v in r0["prev"].items() if k not in ("ref",)} == \
           {k: v for k, v in r0["base"].items() if k not in ("ref",)}
    assert r1["prev"]["delta"] == pytest.approx(0.1) and r1["base"]["delta"] == pytest.approx(0.2)
    # a fixed seed from seeds.py: computed twice, identical
    assert I.stage_intervals(items, 1, "healed", seed=0, boot=200) == I.stage_intervals(items, 1, "healed", 0, 200)
    assert seeds.bootstrap(0, 1, "x") != seeds.bootstrap(1, 1, "x")
    assert I.stage_intervals({(0, "healed"): healed0}, 0, "healed", 0, 200) == []  # no base, nothing to compare


def test_fmt_marks_an_interval_that_holds_zero():
    assert I.fmt(dict(delta=0.016, lo=0.004, hi=0.029, ns=False)) == "+0.016 [+0.004, +0.029]"
    assert I.fmt(dict(delta=0.003, lo=-0.01, hi=0.016, ns=True)) == "~+0.003 [-0.010, +0.016]"
    assert I.fmt(dict(delta=0.5, lo=None, hi=None)) == "+0.500"
    assert I.fmt(None) == "-"


def test_pairs_refuses_a_repeated_item_id():
    """A repeated id would pair one item's value with another's (issue 23 item 6, issue 30)."""
    a = [dict(item="x", nats=1.0), dict(item="x", nats=2.0), dict(item="y", nats=3.0)]
    b = [dict(item="x", nats=0.0), dict(item="y", nats=0.0)]
    with pytest.raises(ValueError, match="repeated item id 'x'"):
        I.pairs(a, b, "nats")
    with pytest.raises(ValueError, match="repeated item id 'x'"):
        I.pairs(b, a, "nats")
    assert I.pairs(b, b, "nats") == ([0.0, 0.0], [0.0, 0.0])

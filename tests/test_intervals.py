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
    # pairing matters: on strongly correlated stages paired() must resample items together, which gives an
    # interval far narrower than resampling the two stages independently (a paired=False bootstrap fails this)
    base = rng.normal(0.0, 1.0, 60)
    a, b = base + 0.1 + rng.normal(0, 0.05, 60), base + rng.normal(0, 0.05, 60)
    got_p = I.paired(a, b, "mean", boot=1000, seed=3)
    i1, i2 = np.random.default_rng(3).integers(0, 60, (2, 1000, 60))
    unpaired = np.quantile(a[i1].mean(-1) - b[i2].mean(-1), [0.025, 0.975])
    assert got_p["hi"] - got_p["lo"] < 0.2 * (unpaired[1] - unpaired[0])
    assert got_p["lo"] > 0  # the shift of 0.1 is resolved only by the paired interval
    assert unpaired[0] < 0


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


# ---------------------------------------------------------------- two levels: seeds, then items

def _study(rng, k: int, n: int, sd_seed: float, sd_item: float, sd_inter: float, truth: float = 0.1):
    """k seeds scored on the same n items: stage = base + truth + seed effect + item effect (shared by every
    seed, because every seed is scored on the same items) + seed x item noise."""
    base, item = rng.normal(0, 1, n), rng.normal(0, sd_item, n)
    return [np.stack([base + truth + rng.normal(0, sd_seed) + item + rng.normal(0, sd_inter, n), base])
            for _ in range(k)]


@pytest.mark.parametrize("sds", [(0.02, 0.15, 0.05), (0.1, 0.1, 0.1), (0.3, 0.05, 0.1)],
                         ids=["items-dominate", "balanced", "seeds-dominate"])
def test_two_level_intervals_cover_the_truth_of_simulated_studies(sds):
    """500 simulated studies per seed count with known seed, item and interaction variance: the 95% two-level
    interval covers the true delta 92-98% of the time. The t-interval over seeds alone (what the over-seed
    tables printed before) misses the item noise the seeds share, and undercovers where items dominate."""
    from scipy.stats import t as student_t

    for k in (3, 5, 10):
        rng = np.random.default_rng(k)
        hit = seeds_only = 0
        for s in range(500):
            per = _study(rng, k, 70, *sds)
            ci = I.two_level(per, (1, -1), "mean", boot=100, seed=s)
            hit += ci["lo"] <= 0.1 <= ci["hi"]
            d = np.array([p[0].mean() - p[1].mean() for p in per])
            hw = student_t.ppf(0.975, k - 1) * d.std(ddof=1) / math.sqrt(k)
            seeds_only += abs(d.mean() - 0.1) <= hw
        assert 0.92 <= hit / 500 <= 0.98, (k, hit / 500)
        if sds[1] > sds[0]:  # the shared item term is the larger: seeds alone cannot see it
            assert seeds_only / 500 < 0.90, (k, seeds_only / 500)


def test_two_level_adds_the_shared_item_term_and_is_the_seed_t_interval_without_it():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 40)
    # every seed moves every item by the same amount: nothing shared across items varies, so only seeds count
    per = [np.stack([base + 0.1 * j, base]) for j in (1, 2, 3)]
    ci = I.two_level(per, (1, -1), boot=300, seed=1)
    hw = 4.302653 * 0.1 / math.sqrt(3)
    assert ci["delta"] == pytest.approx(0.2) and ci["item_hw"] == pytest.approx(0.0, abs=1e-12)
    assert (ci["lo"], ci["hi"]) == pytest.approx((0.2 - hw, 0.2 + hw), rel=1e-5)
    # the same item effect in every seed, no seed effect: the interval is the shared item term alone
    item = rng.normal(0, 0.5, 40)
    per = [np.stack([base + 0.3 + item, base]) for _ in range(4)]
    ci = I.two_level(per, (1, -1), boot=2000, seed=2)
    se = item.std(ddof=1) / math.sqrt(40)
    assert ci["seed_hw"] == pytest.approx(0.0, abs=1e-12)
    assert ci["hi"] - ci["delta"] == pytest.approx(2.0227 * se, rel=0.1)  # t(39) x the item standard error
    assert I.two_level(per[:1], (1, -1))["lo"] is None  # one seed: no interval over seeds


def test_over_seeds_aligns_items_by_id_and_drops_what_a_seed_lacks():
    def rows(vals):
        return [dict(evaluator="contrast", item=i, diff=v) for i, v in vals.items()]
    seed0 = [rows({"a": 1.0, "b": 2.0, "c": 9.0}), rows({"b": 0.0, "a": 0.0, "c": 0.0})]
    seed1 = [rows({"b": 3.0, "a": 1.0}), rows({"a": 0.0, "b": 1.0, "c": None})]
    per = I.aligned([seed0, seed1], "contrast", "diff")
    assert [p.tolist() for p in per] == [[[1.0, 2.0], [0.0, 0.0]], [[1.0, 3.0], [0.0, 1.0]]]  # c: not in seed 1
    got = I.over_seeds([seed0, seed1], (1, -1), "trait", boot=50, seed=0)
    assert got["delta"] == pytest.approx((1.5 + 1.5) / 2) and got["n"] == 2 and got["n_seeds"] == 2


def test_pairs_refuses_a_repeated_item_id():
    """A repeated id would pair one item's value with another's (issue 23 item 6, issue 30)."""
    a = [dict(item="x", nats=1.0), dict(item="x", nats=2.0), dict(item="y", nats=3.0)]
    b = [dict(item="x", nats=0.0), dict(item="y", nats=0.0)]
    with pytest.raises(ValueError, match="repeated item id 'x' in one stage's items: each item must appear once per"):
        I.pairs(a, b, "nats")
    with pytest.raises(ValueError, match="repeated item id 'x'"):
        I.pairs(b, a, "nats")
    assert I.pairs(b, b, "nats") == ([0.0, 0.0], [0.0, 0.0])


def test_paired_defaults_level_and_one_resample_against_numpy():
    """The defaults are the tables' (2000 resamples, seed 0, 95%); `level` sets the percentiles; one resample is
    an interval of zero width at that resample's delta (only boot < 1 gives none)."""
    rng = np.random.default_rng(11)
    x, y = rng.normal(0.2, 1.0, 30), rng.normal(0.0, 1.0, 30)
    assert I.paired(x, y) == I.paired(x, y, "mean", 2000, 0, 0.95)
    idx = np.random.default_rng(4).integers(0, 30, (400, 30))
    d = x[idx].mean(-1) - y[idx].mean(-1)
    got = I.paired(x, y, boot=400, seed=4, level=0.8)
    assert (got["lo"], got["hi"]) == pytest.approx(tuple(np.quantile(d, [0.1, 0.9])), rel=1e-12)
    one = I.paired(x, y, boot=1, seed=4)
    i1 = np.random.default_rng(4).integers(0, 30, (1, 30))
    assert one["lo"] == one["hi"] == pytest.approx(float(x[i1].mean() - y[i1].mean()), rel=1e-12)
    assert one["delta"] == pytest.approx(x.mean() - y.mean())


def test_paired_withholds_each_non_finite_end_and_keeps_the_finite_one():
    """log_mean of items with zero probability: a third of the resamples draw only zeros, so that end is -inf
    (or +inf for the reference) and is withheld, while the delta and the other end stay numbers."""
    lo_inf = I.paired([0.0, 0.0, 0.0, 1.0], [1.0] * 4, "log_mean", boot=500, seed=0)
    assert lo_inf["delta"] == pytest.approx(math.log(0.25)) and lo_inf["lo"] is None
    assert lo_inf["hi"] is not None and math.isfinite(lo_inf["hi"])
    hi_inf = I.paired([1.0] * 4, [0.0, 0.0, 0.0, 1.0], "log_mean", boot=500, seed=0)
    assert hi_inf["delta"] == pytest.approx(-math.log(0.25)) and hi_inf["hi"] is None
    assert hi_inf["lo"] is not None and math.isfinite(hi_inf["lo"])
    assert I.paired([0.0, 0.0], [1.0, 1.0], "log_mean", boot=50) == dict(delta=float("-inf"), lo=None, hi=None, n=2)


def test_stage_intervals_rows_name_their_stage_and_use_the_runs_seed_stream():
    """Each row says its round and stage; its interval is paired() on seeds.bootstrap(seed, round, '<stage>-vs-
    <ref stage><ref round>.<metric>'), so the run's seed reaches it; round -1 has no previous student; without
    base nothing is compared, even where the previous student is there."""
    rng = np.random.default_rng(2)
    vals = {k: rng.normal(m, 0.3, 8) for k, m in (((-1, "base"), 0.0), ((-1, "prompted"), 0.1), ((0, "healed"), 0.2),
                                                   ((1, "healed"), 0.4))}
    items = {k: _items("contrast", "diff", v) for k, v in vals.items()}
    got = I.stage_intervals(items, 1, "healed", seed=7, boot=300)
    assert [(x["round"], x["stage"], x["ref"], x["ref_round"]) for x in got] == [(1, "healed", "base", -1),
                                                                                  (1, "healed", "prev", 0)]
    for x, ref in zip(got, [(-1, "base"), (0, "healed")], strict=True):
        want = I.paired(vals[(1, "healed")], vals[ref], "mean", 300,
                        seeds.bootstrap(7, 1, f"healed-vs-{ref[1]}{ref[0]}.trait"))
        assert {k: x[k] for k in want} == want
    assert got != I.stage_intervals(items, 1, "healed", seed=8, boot=300)
    pr = I.stage_intervals(items, -1, "prompted", seed=7, boot=300)
    assert [(x["round"], x["stage"], x["ref"]) for x in pr] == [(-1, "prompted", "base")]
    no_base = {k: v for k, v in items.items() if k != (-1, "base")}
    assert I.stage_intervals(no_base, 1, "healed", seed=7, boot=300) == []


def test_compare_lookup_and_crosses_zero_by_hand():
    """compare's rows carry their resample count; lookup keys them by (round, stage, metric, ref); an interval
    that ends exactly at 0 holds it, one above 0 does not; a zero-probability stage warns nothing."""
    import warnings

    rows = I.compare(_items("contrast", "diff", [0.1, 0.3, 0.2]), _items("contrast", "diff", [0.0] * 3), 40,
                     lambda m: 5)
    assert [(x["metric"], x["boot"], x["n"]) for x in rows] == [("trait", 40, 3)]
    ivs = [dict(round=1, stage="healed", metric="trait", ref="prev", delta=0.2), dict(round=0, stage="steered",
                                                                                      metric="coh", ref="base")]
    assert I.lookup(ivs) == {(1, "healed", "trait", "prev"): ivs[0], (0, "steered", "coh", "base"): ivs[1]}
    assert I.crosses_zero(-1.0, 0.0) is True and I.crosses_zero(0.0, 2.0) is True
    assert I.crosses_zero(0.5, 2.0) is False and I.crosses_zero(-2.0, -0.5) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert I.paired([0.0, 0.0], [1.0, 1.0], "log_mean", boot=20)["delta"] == float("-inf")


def test_over_seeds_edges_its_statistic_and_its_ns():
    """No seed or no shared item: None; one seed, or one shared item: the delta without an interval; the target's
    statistic is the log of the mean; `ns` says whether the interval holds 0; ids shared by every stage of every
    seed, whichever stage lists the most."""
    def rows(evaluator, col, vals):
        return [dict(evaluator=evaluator, item=i, **{col: v}) for i, v in vals.items()]

    assert I.over_seeds([], (1, -1), "trait", 50, 0) is None
    s = [rows("contrast", "diff", {"a": 1.0, "b": 3.0}), rows("contrast", "diff", {"a": 0.0, "b": 0.0})]
    one = I.over_seeds([s], (1, -1), "trait", 50, 0)
    assert one["delta"] == 2.0 and one["lo"] is None and one["ns"] is None and one["n_seeds"] == 1
    single = [rows("contrast", "diff", {"a": 1.0}), rows("contrast", "diff", {"a": 0.5})]
    got = I.over_seeds([single, single], (1, -1), "trait", 50, 0)
    assert got["delta"] == 0.5 and got["n"] == 1 and got["lo"] is None
    t = [[rows("mfv", "p_target", {"a": 0.1, "b": 0.3}), rows("mfv", "p_target", {"a": 0.2, "b": 0.2})],
         [rows("mfv", "p_target", {"a": 0.2, "b": 0.4}), rows("mfv", "p_target", {"a": 0.2, "b": 0.2})]]
    tgt = I.over_seeds(t, (1, -1), "target", 100, 0)
    assert tgt["delta"] == pytest.approx((math.log(0.2 / 0.2) + math.log(0.3 / 0.2)) / 2)
    assert tgt["ns"] == I.crosses_zero(tgt["lo"], tgt["hi"]) and tgt["ns"] is not None
    up = [[rows("contrast", "diff", {"a": 1.0 + k, "b": 1.1 + k, "c": 0.9 + k}),
           rows("contrast", "diff", {"a": 0.0, "b": 0.0, "c": 0.0})] for k in (0.0, 0.1, 0.2)]
    assert I.over_seeds(up, (1, -1), "trait", 100, 0)["ns"] is False
    # the last stage lists an item the others lack: only the shared ones are aligned
    wide = [rows("contrast", "diff", {"a": 1.0, "b": 2.0}), rows("contrast", "diff", {"a": 0.0, "b": 0.0, "z": 5.0})]
    assert [p.tolist() for p in I.aligned([wide, wide], "contrast", "diff")] == [[[1.0, 2.0], [0.0, 0.0]]] * 2


def _two_level_by_hand(per, signs, kind, boot, seed, level=0.95):
    """docs/diagnostics.md "Two-level intervals", step by step with numpy and scipy."""
    from scipy.stats import t

    stat = (lambda a: np.log(a.mean(-1))) if kind == "log_mean" else (lambda a: a.mean(-1))
    sg, k, n = np.asarray(signs, dtype=float), len(per), per[0].shape[1]
    est = np.array([sg @ stat(x) for x in per])
    s2k = est.var(ddof=1) / k
    idx = np.random.default_rng(seed).integers(0, n, (boot, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.array([[sg @ stat(x[:, i]) for i in idx] for x in per])  # [seed, resample]
    b = b[:, np.isfinite(b).all(0)]
    item = max(0.0, (k * b.mean(0).var(ddof=1) - b.var(axis=1, ddof=1).mean()) / (k - 1))
    q = 1 - (1 - level) / 2
    s_hw, i_hw = t.ppf(q, k - 1) * math.sqrt(s2k), t.ppf(q, n - 1) * math.sqrt(item)
    var = s2k + item
    df = var ** 2 / (s2k ** 2 / (k - 1) + item ** 2 / (n - 1))
    hw = (t.ppf(q, df) * math.sqrt(var) + math.hypot(s_hw, i_hw)) / 2
    return dict(delta=est.mean(), lo=est.mean() - hw, hi=est.mean() + hw, n_seeds=k, n=n, seed_hw=s_hw, item_hw=i_hw)


def test_two_level_is_the_documented_recipe_step_by_step():
    """Seed, item and seed x item noise (both terms > 0), mean and log-mean statistics, three signs, another level:
    every number is the recipe's; one resample (or none) leaves the item term out."""
    rng = np.random.default_rng(5)
    item = rng.normal(0, 0.2, 12)
    per = [np.stack([1.0 + 0.3 * j + item + rng.normal(0, 0.1, 12), 0.5 + rng.normal(0, 0.1, 12),
                     rng.normal(0, 0.1, 12)]) for j in range(3)]
    for kind, signs, level in (("mean", (1, -1, 0), 0.95), ("log_mean", (1, -1, 0), 0.95), ("mean", (1, -1, 2), 0.8)):
        xs = [np.abs(x) for x in per] if kind == "log_mean" else per
        got, want = I.two_level(xs, signs, kind, 300, 9, level), _two_level_by_hand(xs, signs, kind, 300, 9, level)
        assert want["item_hw"] > 0 and want["seed_hw"] > 0
        assert got == pytest.approx(want, rel=1e-9), (kind, signs, level)
    for boot in (0, 1):
        one = I.two_level(per, (1, -1, 0), "mean", boot, 9)
        seeds_only = 4.302653 * np.array([p[0].mean() - p[1].mean() for p in per]).std(ddof=1) / math.sqrt(3)
        assert one["item_hw"] == 0.0 and one["hi"] - one["delta"] == pytest.approx(seeds_only, rel=1e-6)
    # a resample that draws only zero-probability items has no log mean: it is left out, not the interval
    z = [np.array([[0.0, 0.2, 0.3, 0.0], [0.1, 0.1, 0.1, 0.1]]) * (1 + j / 10) for j in range(3)]
    got = I.two_level(z, (1, -1), "log_mean", 200, 3)
    assert got == pytest.approx(_two_level_by_hand(z, (1, -1), "log_mean", 200, 3), rel=1e-9)
    assert math.isfinite(got["lo"]) and math.isfinite(got["hi"])


def test_two_level_edges_defaults_and_quiet_numpy():
    """No seed, no item, one seed, a seed whose statistic is not finite: the delta or None, no interval, every key
    there and no numpy warning; the defaults are 2000 resamples on seed 0; two resamples already measure the item
    term; two identical seeds with nothing varying give a zero-width interval."""
    import warnings

    rng = np.random.default_rng(8)
    item = rng.normal(0, 0.3, 10)
    per = [np.stack([1.0 + 0.2 * j + item + rng.normal(0, 0.1, 10), np.zeros(10)]) for j in range(3)]
    empty = dict(lo=None, hi=None, seed_hw=None, item_hw=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert I.two_level([], (1, -1)) == dict(empty, delta=None, n_seeds=0, n=0)
        assert I.two_level([np.zeros((2, 0))] * 2, (1, -1)) == dict(empty, delta=None, n_seeds=2, n=0)
        assert I.two_level(per[:1], (1, -1)) == dict(empty, delta=pytest.approx(per[0][0].mean()), n_seeds=1, n=10)
        dead = [np.array([[0.2, 0.3], [0.1, 0.1]]), np.array([[0.0, 0.0], [0.1, 0.1]])]
        assert I.two_level(dead, (1, -1), "log_mean", 50, 0) == dict(empty, delta=None, n_seeds=2, n=2)
        z = [np.array([[0.0, 0.2, 0.3, 0.0], [0.1, 0.1, 0.1, 0.1]]) * (1 + j / 10) for j in range(3)]
        assert I.two_level(z, (1, -1), "log_mean", 200, 3)["item_hw"] > 0  # resamples of only zeros: no warning
    assert I.two_level(per, (1, -1)) == I.two_level(per, (1, -1), "mean", 2000, 0)
    two = I.two_level(per, (1, -1), "mean", 2, 4)
    want = _two_level_by_hand(per, (1, -1), "mean", 2, 4)
    assert want["item_hw"] > 0 and two == pytest.approx(want, rel=1e-9)
    flat = [np.stack([np.full(5, 0.7), np.full(5, 0.2)])] * 2
    got = I.two_level(flat, (1, -1), "mean", 50, 0)
    assert got["lo"] == got["hi"] == got["delta"] == pytest.approx(0.5) and got["seed_hw"] == got["item_hw"] == 0.0

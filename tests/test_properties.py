"""Laws that hold for every input, checked on inputs hypothesis draws (and shrinks when one fails)."""

from __future__ import annotations

import datetime as dt
import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from steer_heal.diag.stats import mean_ci, pareto_front, t_quantile
from steer_heal.heal import aggregate, divergence
from steer_heal.store import RunLog
from steer_heal.store.schema import AUTO_NOW, TABLES, tables_of, utcnow

# fewer draws per mutant under `just mutants` (mutmut sets MUTANT_UNDER_TEST): a law that breaks breaks early
FAST = settings(max_examples=25 if os.environ.get("MUTANT_UNDER_TEST") else 150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------- KL

logits = st.lists(st.floats(-8, 8, allow_nan=False), min_size=2, max_size=6)


def _lp(xs: list[float]) -> torch.Tensor:
    return torch.log_softmax(torch.tensor(xs, dtype=torch.float64), -1).view(1, 1, -1)


@FAST
@given(st.data())
def test_kl_is_nonnegative_zero_only_on_equal_distributions_and_above_pinsker(data):
    a = data.draw(logits)
    b = data.draw(st.lists(st.floats(-8, 8, allow_nan=False), min_size=len(a), max_size=len(a)))
    lp, lq = _lp(a), _lp(b)
    tv = 0.5 * float((lp.exp() - lq.exp()).abs().sum())
    for reg in ("kl_rev", "kl_fwd"):
        d = float(divergence(lp, lq, reg))
        assert d >= 2 * tv * tv - 1e-9  # Pinsker: KL >= 2 TV^2, so > 0 whenever the distributions differ
        assert float(divergence(lp, lp, reg)) == 0.0
    # the two directions are each other's mirror
    assert float(divergence(lp, lq, "kl_rev")) == pytest.approx(float(divergence(lq, lp, "kl_fwd")), abs=1e-12)


# ---------------------------------------------------------------- aggregation over positions

@FAST
@given(st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=40), st.data())
def test_aggregations_are_ordered(xs, data):
    """For divergences (>= 0): min <= mean <= rmse <= max and min <= p95 <= max. p95 is not ordered against
    the mean: one huge value among many zeros puts the mean above the 95th percentile."""
    d = torch.tensor(xs, dtype=torch.float64).view(1, -1)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(xs), max_size=len(xs))))
    assume(bool(mask.any()))
    mask = mask.view(1, -1)
    got = {how: float(aggregate(d, mask, how)) for how in ("mean", "rmse", "p95", "max")}
    kept = [x for x, m in zip(xs, mask[0].tolist()) if m]
    lo, hi, tol = min(kept), max(kept), 1e-9 * (1 + max(kept))
    assert got["max"] == hi
    assert lo - tol <= got["mean"] <= got["rmse"] + tol
    assert got["rmse"] <= hi + 1e-6 + tol  # rmse's eps: sqrt(mean x^2 + 1e-12)
    assert lo - tol <= got["p95"] <= hi + tol


def test_p95_can_sit_below_the_mean():
    d = torch.tensor([[0.0] * 99 + [1000.0]], dtype=torch.float64)
    mask = torch.ones_like(d, dtype=torch.bool)
    assert float(aggregate(d, mask, "p95")) < float(aggregate(d, mask, "mean"))


# ---------------------------------------------------------------- statistics

@FAST
@given(st.lists(st.tuples(st.integers(-5, 5), st.integers(-5, 5)).map(lambda t: (t[0] / 2, t[1] / 2)), max_size=25))
def test_pareto_front_has_no_dominated_point_and_everything_off_it_is_dominated(pts):
    flags = pareto_front(pts)

    def dominates(q, p):
        return q[0] >= p[0] and q[1] >= p[1] and q != p
    for p, on in zip(pts, flags):
        if on:
            assert not any(dominates(q, p) for q in pts)
        else:
            assert any(dominates(q, p) and f for q, f in zip(pts, flags))  # by a point on the front
    assert pts == [] or any(flags)
    assert pareto_front(pts[::-1])[::-1] == flags  # the order of the points does not matter


@FAST
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=20))
def test_mean_ci_is_centred_and_contains_the_mean(xs):
    ci = mean_ci(xs)
    assert ci["n"] == len(xs)
    assert ci["lo"] <= ci["mean"] <= ci["hi"]
    assert ci["mean"] - ci["lo"] == pytest.approx(ci["hi"] - ci["mean"], rel=1e-9, abs=1e-9)


@FAST
@given(st.integers(1, 60), st.floats(0.5, 0.99))
def test_t_quantile_inverts_and_shrinks_with_df(df, level):
    from steer_heal.diag.stats import _t_within

    t = t_quantile(level, df)
    assert _t_within(t, df) == pytest.approx(level, abs=1e-9)
    assert t_quantile(level, df + 1) < t and t_quantile(min(level + 0.005, 0.995), df) > t


# ---------------------------------------------------------------- the store: append / read round trip

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)  # lone surrogates cannot be UTF-8
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**53, 2**53) | TEXT
                    | st.floats(allow_nan=False, allow_infinity=False),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4), max_leaves=10)
VALUES = {"DOUBLE": st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**53, 2**53),
          "BIGINT": st.integers(-2**63, 2**63 - 1), "BOOLEAN": st.booleans(), "VARCHAR": TEXT,
          "TIMESTAMP": st.datetimes(min_value=dt.datetime(1900, 1, 1)), "JSON": JSON}
RUN_TABLES = tables_of("runs")


def rows_of(table: str):
    cols = {c: t for c, t in TABLES[table].items() if c != "run_id"}
    return st.lists(st.fixed_dictionaries({}, optional={c: st.none() | VALUES[t] for c, t in cols.items()}),
                    min_size=1, max_size=4)


NOW = object()  # an AUTO_NOW column the row left out: filled with the time of writing


def _expected(table: str, row: dict) -> dict:
    """What read() gives back: every column, the id filled in, numbers as the column's type."""
    out = {}
    for c, t in TABLES[table].items():
        v = row.get(c)
        if c == "run_id":
            v = "r"
        elif c in AUTO_NOW and c not in row:
            v = NOW
        elif t == "DOUBLE" and v is not None:
            v = float(v)
        out[c] = v
    return out


def _same(got: dict, want: dict, table: str) -> None:
    for c, t in TABLES[table].items():
        if want[c] is NOW:
            assert isinstance(got[c], dt.datetime) and abs(got[c] - utcnow()) < dt.timedelta(minutes=5)
        elif t == "JSON":
            assert json.dumps(got[c], sort_keys=True) == json.dumps(want[c], sort_keys=True)
        else:
            assert got[c] == want[c] and type(got[c]) is type(want[c]), (c, got[c], want[c])


@FAST
@given(st.data(), st.floats(0, 1), st.booleans())
def test_append_read_round_trip_with_a_torn_tail_between(tmp_path_factory, data, cut, torn):
    """Any rows of the schema read back as written; a writer killed mid-line before a resume costs only its
    own line, never a row before or after it."""
    table = data.draw(st.sampled_from(RUN_TABLES))
    rows, more = data.draw(rows_of(table)), data.draw(rows_of(table))
    log = RunLog(tmp_path_factory.mktemp("rt"), "r")
    assert log.append(table, rows) == len(rows)
    if torn:  # the killed writer's line: some prefix of a real row's bytes, short of its closing brace
        line = log._line(table, rows[0])
        with open(log.path(table), "ab") as f:
            f.write(line[: max(1, min(len(line) - 2, int(cut * len(line))))])
    resumed = RunLog(log.root, "r")  # a new process: it has not seen the tail yet
    assert resumed.append(table, more) == len(more)
    got = resumed.read(table)
    want = [_expected(table, r) for r in rows + more]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        _same(g, w, table)


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_non_finite_doubles_are_stored_as_null_and_finite_ones_exactly(tmp_path_factory, x):
    log = RunLog(tmp_path_factory.mktemp("f"), "r")
    log.append("dose_steps", dict(round=0, kappa=x))
    got = log.read("dose_steps")[0]["kappa"]
    assert got == (x if math.isfinite(x) else None)


@FAST
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=12), st.integers(-3, 3))
def test_drop_removes_exactly_the_rows_it_matches(tmp_path_factory, rounds, gone):
    log = RunLog(tmp_path_factory.mktemp("d"), "r")
    log.append("heal_steps", [dict(round=r, step=i) for i, r in enumerate(rounds)])
    assert log.drop("heal_steps", lambda x: x["round"] == gone) == rounds.count(gone)
    log.append("heal_steps", dict(round=gone, step=99))
    assert [(x["round"], x["step"]) for x in log.read("heal_steps")] == \
        [(r, i) for i, r in enumerate(rounds) if r != gone] + [(gone, 99)]

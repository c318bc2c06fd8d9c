import math

import pytest
import torch

from steer_heal import metrics as M
from steer_heal.config import FOUNDATIONS


def test_retain():
    assert M.retain(-1.5, -2.0, -1.0) == pytest.approx(0.5)
    assert M.retain(-2.0, -2.0, -1.0) == pytest.approx(1.0)
    assert M.retain(0.5, 1.0, 0.0) == pytest.approx(0.5)  # either sign of the shift
    assert M.retain(-1.0, -1.03, -1.0) is None  # |steered - base| under 0.05 nats
    assert M.retain(-1.0, -1.03, -1.0, min_den=0.01) == pytest.approx(0.0)
    assert M.retain(None, -2.0, -1.0) is None


def test_coh_cost():
    assert M.coh_cost(0.3, 0.5, -2.0, -1.0) == pytest.approx(0.2)
    assert M.coh_cost(0.3, 0.5, -1.01, -1.0) is None
    assert M.coh_cost(0.3, 0.5, None, -1.0) is None


def test_surgical():
    d = {"Care": 0.1, "Fairness": -0.2, "Authority": -0.5, "Loyalty": 3.0}
    assert M.surgical(d["Authority"], d, target="Authority")  # Loyalty is not an off-target by default
    assert not M.surgical(-0.15, d)
    assert not M.surgical(-0.5, d, off=("Care", "Fairness", "Loyalty"))
    # the target itself is never its own off-target
    assert M.surgical(0.3, {"Care": 0.3, "Fairness": 0.1}, target="Care")
    assert not M.surgical(0.3, {"Care": 0.3, "Fairness": 0.1})


def test_kept_stats():
    s = M.kept_stats([2.0, 4.0, 12.0, float("inf")], [True, True, False, False])
    assert s["kept_frac"] == 0.5
    assert s["ppl_mean"] == pytest.approx(6.0) and s["ppl_median"] == 4.0
    assert M.kept_stats([], []) == {"kept_frac": None, "ppl_mean": None, "ppl_median": None}
    with pytest.raises(ValueError):
        M.kept_stats([1.0], [True, False])


def test_cosine():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert M.cosine(a, b) == pytest.approx(0.0)
    assert M.cosine(a, -3 * a) == pytest.approx(-1.0)
    da = {12: torch.tensor([1.0, 0.0]), 13: torch.tensor([1.0, 0.0])}
    db = {13: torch.tensor([1.0, 0.0]), 12: torch.tensor([-1.0, 0.0])}  # key order must not matter
    assert M.cosine(da, db) == pytest.approx(0.0)
    assert M.cosine(da, da) == pytest.approx(1.0)
    assert M.cosine(a, torch.zeros(2)) == 0.0
    with pytest.raises(ValueError):
        M.cosine(da, {12: torch.ones(2)})
    assert isinstance(M.cosine(a, a), float) and math.isfinite(M.cosine(a, a))


def test_foundation_column():
    cols = [M.foundation_column(f) for f in FOUNDATIONS]
    assert cols == ["care_nats", "fairness_nats", "loyalty_nats", "auth_nats", "sanctity_nats",
                    "liberty_nats", "social_nats"]
    with pytest.raises(KeyError):
        M.foundation_column("Purity")

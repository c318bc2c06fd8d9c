import math
import re

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


# ---------------------------------------------------------------- the coherence floor, before any ratio

def _stage(coh, pmass, target=-2.0, trait=0.1, ppl=5.0, n_text=4):
    from steer_heal.evaluate import StageEval

    s = StageEval(nats={f: -1.9 for f in FOUNDATIONS} | {"Authority": target}, coherence=coh, n=len(pmass),
                  trait_nats=trait, n_trait=3, adapter_ppl=ppl, n_text=n_text)
    s.items = [dict(evaluator="mfv", item=f"v{i}", pmass=m) for i, m in enumerate(pmass)]
    return s


def test_broken_on_coherence_under_the_floor_of_base():
    base = _stage(0.054, [0.054] * 4)
    assert M.broken(base, base, "Authority", 0.85) == ""
    assert M.broken(_stage(0.047, [0.047] * 4), base, "Authority", 0.85) == ""  # 0.87 of base: held
    why = M.broken(_stage(0.004, [0.004] * 4), base, "Authority", 0.85)  # SmolLM2 steered at C=2
    assert "coherence 0.004 < 0.85 x base 0.054" in why and "option mass collapsed" in why
    assert M.broken(_stage(0.004, [0.004] * 4), base, "Authority", 0.0) == ""  # floor off


def test_broken_when_most_items_lost_their_mass_though_the_mean_holds():
    base = _stage(0.1, [0.1, 0.1, 0.1, 0.1])
    few_hold_it_up = _stage(0.1, [0.37, 0.01, 0.01, 0.01])  # mean 0.1 = base's
    why = M.broken(few_hold_it_up, base, "Authority", 0.85)
    assert why.startswith("option mass collapsed: median item keeps 0.1 of its base mass")


def test_broken_on_non_finite_or_empty_text():
    base = _stage(0.5, [0.5] * 4)
    assert "non-finite target nats" in M.broken(_stage(0.5, [0.5] * 4, target=float("-inf")), base, "Authority", 0.85)
    assert "non-finite trait nats" in M.broken(_stage(0.5, [0.5] * 4, trait=None), base, "Authority", 0.85)
    empty = _stage(0.5, [0.5] * 4, ppl=None, n_text=0)
    assert "every free-text generation was empty" in M.broken(empty, base, "Authority", 0.85)
    # base wrote nothing either (the tiny random model): empty text is then no evidence against the stage
    assert M.broken(empty, _stage(0.5, [0.5] * 4, ppl=None, n_text=0), "Authority", 0.85) == ""


class _Dose:
    kappa, walk, scored, kept = 1.0, "edge", [dict(ppl=5.0, keep=True)], [dict(ppl=5.0, keep=True)]


class _Ext:
    cos_v0, student_cos = 1.0, None


class _Heal:
    heal_nll, val_nll = 3.0, 3.1


def test_round_row_withholds_the_ratios_of_a_broken_stage():
    base = _stage(0.054, [0.054] * 4, target=-3.2, trait=-0.04)
    healed = _stage(0.051, [0.051] * 4, target=-3.5, trait=-0.02)
    ok = M.round_row(0, "Authority", _Ext, _Dose, _stage(0.05, [0.05] * 4, target=-4.2, trait=0.4), _Heal, healed,
                     base, {}, 0.85)
    assert ok["retain"] == pytest.approx(0.3) and ok["retain_trait"] == pytest.approx(0.02 / 0.44)
    assert ok["broken"] is False and ok["steered_broken"] is False and ok["broken_reason"] is None
    # steered at C=2 on SmolLM2: coherence 0.004, Authority -8.8 -- the -5.6 nats are mass leaving the options
    row = M.round_row(0, "Authority", _Ext, _Dose, _stage(0.004, [0.004] * 4, target=-8.8, trait=0.4), _Heal, healed,
                      base, {}, 0.85)
    assert row["steered_broken"] and not row["broken"]
    assert row["retain"] is None and row["retain_trait"] is None  # the denominator is a broken stage
    assert row["coh_cost"] is not None and row["surgical"] is not None  # healed against base still reads
    assert row["broken_reason"].startswith("steered: coherence 0.004")
    bad = M.round_row(0, "Authority", _Ext, _Dose, _stage(0.05, [0.05] * 4, target=-4.2), _Heal,
                      _stage(0.01, [0.01] * 4), base, {}, 0.85)
    assert bad["broken"] and all(bad.get(k) is None for k in ("retain", "retain_trait", "coh_cost", "surgical"))
    assert bad["broken_reason"].startswith("healed: coherence 0.01")


def test_shoulds_name_what_a_failure_means():
    row = dict(round=1, retain=1.4, retain_trait=0.05, broken=False, steered_broken=True, adapter_ppl=6.0,
               steered_adapter_ppl=9.0, cos_v0=0.3)
    ivs = {(1, "healed", "trait", "base"): dict(lo=0.01, hi=0.05), (1, "healed", "trait", "prev"): dict(lo=-0.01, hi=0.02),
           (1, "healed", "ppl", "base"): dict(lo=0.5, hi=2.0)}
    got = {re.sub(r" \((got|-?[0-9.]+\.\.)[^)]*\)", "", line.split(" --")[0]): held for held, line in M.shoulds(row, ivs)}
    assert got == {"steered coherence within the floor of base": False,
                   "healed coherence within the floor of base": True,
                   "retain in (0, 1]": False, "retain_trait in (0, 1]": True,
                   "healed d_trait vs base above 0 with its interval": True,
                   "healed d_trait vs the previous student above 0 with its interval": False,
                   "healed adapter_ppl 6 below the steered stage's 9": True,
                   "healed adapter_ppl not above base's with its interval": False,
                   "cos_v0 > 0.5": False}
    assert all(" -- else " in line or " -- <= 0" in line or " -- same" in line for _, line in M.shoulds(row, ivs))
    assert all(held is None for held, line in M.shoulds(dict(round=0), {}) if "coherence" not in line)


def test_a_should_that_rests_on_a_probe_at_chance_is_not_checked_and_says_why():
    """SmolLM2's seven-way probe and the tiny model's contrast probe are at chance: a SHOULD read off such a
    probe is neither held nor failed (its verdict would be noise), and its line names the probe."""
    row = dict(round=1, broken=False, steered_broken=False, adapter_ppl=6.0, steered_adapter_ppl=9.0)
    ivs = {(1, "healed", "trait", "base"): dict(lo=-0.05, hi=0.01), (1, "healed", "trait", "prev"): dict(lo=-0.01, hi=0.02),
           (1, "healed", "ppl", "base"): dict(lo=0.5, hi=2.0)}
    checks = M.shoulds(row, ivs, {"mfv": False, "contrast": False, "freetext": True})
    trait = [(h, line) for h, line in checks if "d_trait" in line]
    assert len(trait) == 2 and all(h is None and "not checked: contrast at chance" in line for h, line in trait)
    ppl = [(h, line) for h, line in checks if "adapter_ppl" in line]
    assert [h for h, _ in ppl] == [True, False]  # freetext reads: its checks stand
    assert [h for h, _ in M.shoulds(row, ivs, None) if "d_trait" in _] == [False, False]  # ungated: checked

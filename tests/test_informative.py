"""Probes that work on the model at hand (issue 24 item 5): the per-probe verdict at the base eval, the floor
from free-text adapter_ppl with its interval, the ratios and floors an uninformative probe no longer carries,
`just pareto`'s informative axes and --x/--y, and --probes skipping a probe entirely."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_flow import ARGS, steer_heal

from steer_heal import cli, informative, metrics
from steer_heal.config import FOUNDATIONS, Config
from steer_heal.errors import UserError
from steer_heal.evaluate import Probe, StageEval, measure
from steer_heal.store import RunLog


def _base(mass=0.9, top1=0.6, n=132, n_text=16) -> StageEval:
    return StageEval(nats={f: -1.9 for f in FOUNDATIONS}, coherence=mass, top1_agree=top1, n=n, trait_nats=0.1,
                     n_trait=70, n_text=n_text)


def _by(rows: list[dict]) -> dict:
    return {r["probe"]: r for r in rows}


# ---------------------------------------------------------------- the verdict, both ways

def test_verdict_informative_and_at_chance_on_hand_made_numbers():
    rng = np.random.default_rng(0)
    reads = list(1.2 + 0.5 * rng.standard_normal(70))  # replies likelier after their own dilemma (SmolLM2: +1.26)
    good = _by(informative.verdicts(_base(), reads))
    assert good["mfv"]["informative"] and good["contrast"]["informative"] and good["freetext"]["informative"]
    assert good["contrast"]["lo"] > 0 and all(r["round"] == -1 for r in good.values())

    # SmolLM2's numbers: 5% of the mass on the options and top-1 agreement 0.136 against chance 1/7
    low_mass = _by(informative.verdicts(_base(mass=0.054, top1=0.6)))["mfv"]
    assert not low_mass["informative"] and "option mass 0.054 < 0.5" in low_mass["reason"]
    chance_top1 = _by(informative.verdicts(_base(mass=0.9, top1=18 / 132)))["mfv"]
    assert not chance_top1["informative"] and "not above chance" in chance_top1["reason"]
    assert chance_top1["lo"] < 1 / 7 < chance_top1["hi"]

    blind = _by(informative.verdicts(_base(n_text=0), list(0.3 * rng.standard_normal(70))))
    assert not blind["contrast"]["informative"] and blind["contrast"]["lo"] < 0 < blind["contrast"]["hi"]
    assert not blind["freetext"]["informative"]


def test_verdict_on_the_tiny_model_is_at_chance(tiny):
    """The tiny random model reads nothing: its option mass is ~0.007 and a reply scores the same after any
    dilemma, so both probes are at chance. (SmolLM2, measured: mfv at chance, contrast +1.26 [+1.16, +1.39].)"""
    model, tok = tiny
    cfg = Config.from_dict(dict(model="tiny-random", n_vignettes=14, n_demo=0))
    probe = Probe.of(cfg)
    probe.dilemmas = probe.dilemmas[:16]
    base = measure(model, tok, probe)
    reads = informative.reads_items(model, tok, probe, probe.system, base.of("contrast"))
    got = _by(informative.verdicts(base, reads, boot=500))
    assert set(got) == {"mfv", "contrast"}
    assert not got["mfv"]["informative"] and got["mfv"]["mass"] < 0.05
    assert not got["contrast"]["informative"] and abs(got["contrast"]["separation"]) < 0.01


# ---------------------------------------------------------------- the floor from adapter_ppl, with its interval

def _text(ppls: list[float], coh=0.05) -> StageEval:
    s = StageEval(nats={f: -1.9 for f in FOUNDATIONS}, coherence=coh, n=4, trait_nats=0.1, n_trait=3)
    s.items = [dict(evaluator="mfv", item=f"v{i}", pmass=coh) for i in range(4)]
    s.add_text(ppls)
    return s


def test_ppl_floor_flags_a_rise_its_interval_clears_and_not_a_noisy_one():
    rng = np.random.default_rng(1)
    base_ppl = list(2.3 + 0.2 * rng.standard_normal(16))
    base = _text(base_ppl)
    doubled = _text([2.0 * p for p in base_ppl])
    why = metrics.broken(doubled, base, "Authority", 0.85, ppl_rel=1.5)
    assert why.startswith("adapter_ppl x2 [2, 2] of base > 1.5")
    assert metrics.broken(doubled, base, "Authority", 0.85) == ""  # floor off (ppl_rel 0): the old code's verdict
    # the mean rose 1.6x, but on two prompts of sixteen: the interval holds 1.5, so the floor does not flag it
    noisy = _text([p * (5.8 if i < 2 else 1.0) for i, p in enumerate(base_ppl)])
    assert noisy.adapter_ppl / base.adapter_ppl > 1.5
    assert metrics.broken(noisy, base, "Authority", 0.85, ppl_rel=1.5) == ""
    assert metrics.broken(base, base, "Authority", 0.85, ppl_rel=1.5) == ""


def test_no_floor_or_ratio_rests_on_an_uninformative_probe():
    base, collapsed = _text([2.3] * 8, coh=0.054), _text([2.3] * 8, coh=0.004)  # SmolLM2 at C=2: mass gone
    assert "coherence 0.004 < 0.85 x base 0.054" in metrics.broken(collapsed, base, "Authority", 0.85)
    assert metrics.broken(collapsed, base, "Authority", 0.85, informative={"mfv": False}) == ""

    class Ext:
        cos_v0, student_cos = 1.0, None

    class Dose:
        kappa, walk, scored, kept = 1.0, "edge", [dict(ppl=5.0, keep=True)], [dict(ppl=5.0, keep=True)]

    class Heal:
        heal_nll, val_nll = 1.0, 1.0

    def stage(target, trait):
        s = _text([2.3] * 8)
        s.nats["Authority"], s.trait_nats = target, trait
        return s

    steered, healed = stage(-3.0, 0.5), stage(-2.5, 0.3)
    row = metrics.round_row(0, "Authority", Ext, Dose, steered, Heal, healed, stage(-1.9, 0.1), {}, 0.85)
    assert row["retain"] == pytest.approx(0.6 / 1.1) and row["retain_trait"] == pytest.approx(0.5)
    assert row["coh_cost"] is not None and row["surgical"] is not None
    gated = metrics.round_row(0, "Authority", Ext, Dose, steered, Heal, healed, stage(-1.9, 0.1), {}, 0.85,
                              informative={"mfv": False, "contrast": True})
    assert gated["retain"] is None and gated.get("coh_cost") is None and gated.get("surgical") is None
    assert gated["retain_trait"] == pytest.approx(0.5)  # the contrast probe reads: its ratio stands
    assert gated["target_nats"] == row["target_nats"]  # stored all the same


def test_shade_greys_an_uninformative_probe_and_names_a_withheld_ratio():
    cells = dict(target_nats=-3.2, d_target_prev="-0.4 [-0.5, -0.3]", trait_nats=0.1, retain=None, kl=0.01)
    got = informative.shade(cells, {"mfv": False, "contrast": True})
    assert got == dict(target_nats="(-3.200)", d_target_prev="(-0.4 [-0.5, -0.3])", trait_nats=0.1,
                       retain="at chance", kl=0.01)
    assert informative.shade(cells, {}) == cells


# ---------------------------------------------------------------- just pareto: informative axes, --x/--y

def _hand_run(out, run_id: str, mfv_ok: bool | None, moved: float, ppl: float):
    """A run by hand: base and a healed stage; probe_info says whether mfv is informative (None: no rows)."""
    log = RunLog(out, run_id)
    log.append("run_info", dict(seed=0, config=Config(model="tiny-random").to_dict()))
    for r, stage, m, p in ((-1, "base", 0.0, 2.3), (0, "healed", moved, ppl)):
        log.append("stage_metrics", [dict(round=r, stage=stage, evaluator="mfv", foundation=f, n=7, coherence=0.05,
                                          nats=-2.0 - m) for f in ("Authority", "Care")]
                   + [dict(round=r, stage=stage, evaluator="contrast", foundation="trait", n=7, nats=0.1 + m),
                      dict(round=r, stage=stage, evaluator="freetext", foundation="adapter_ppl", n=7, ppl=p)])
    if mfv_ok is not None:
        log.append("probe_info", [dict(round=-1, probe="mfv", informative=mfv_ok, reason=""),
                                  dict(round=-1, probe="contrast", informative=True, reason="")])


def _pareto(out, *args) -> dict:
    from steer_heal.diag import pareto

    before = set((out / "diagnostics").iterdir()) if (out / "diagnostics").is_dir() else set()
    assert pareto.main(["--out", str(out), *args]) == 0
    (diag,) = set((out / "diagnostics").iterdir()) - before  # two in one second differ only in a random suffix
    return dict(text=(diag / "report.md").read_text(), rows=RunLog(out, diag.name, kind="diagnostics").read("diag_rows"))


def test_pareto_defaults_to_the_informative_axes_and_x_y_pick(tmp_path):
    _hand_run(tmp_path, "a", False, 0.2, 2.5)
    _hand_run(tmp_path, "b", False, 0.4, 3.5)
    got = _pareto(tmp_path)
    assert "x = d_trait, y = adapter_ppl" in got["text"]
    healed = {r["row"]["label"]: r["row"] for r in got["rows"] if r["row"]["stage"] == "healed"}
    assert healed["a"]["d_trait"] == pytest.approx(0.2) and healed["b"]["adapter_ppl"] == pytest.approx(3.5)
    assert healed["a"]["front"] and healed["b"]["front"]  # lower ppl vs more trait: a trade-off, both on it
    got = _pareto(tmp_path, "--x", "trait_moved", "--y", "coherence")
    assert "x = trait_moved, y = coherence" in got["text"] and "AT CHANCE on these runs (probe_info): mfv" in got["text"]
    with pytest.raises(UserError, match="lacks nosuch"):
        _pareto(tmp_path, "--y", "nosuch")


def test_pareto_keeps_the_seven_way_axes_where_that_probe_reads(tmp_path):
    _hand_run(tmp_path, "a", True, 0.2, 2.5)
    _hand_run(tmp_path, "old", None, 0.3, 2.5)  # stored before the check: counts as informative
    got = _pareto(tmp_path)
    assert "x = trait_moved, y = coherence" in got["text"] and "AT CHANCE" not in got["text"]


# ---------------------------------------------------------------- --probes

def test_probes_flag_sets_the_knobs_and_refuses_a_contradiction():
    cfg, explicit = cli.parse(["--probes", "contrast", "freetext"])
    assert cfg.eval == "contrast" and cfg.n_demo == Config.n_demo
    cfg, _ = cli.parse(["--probes", "mfv", "contrast"])
    assert cfg.eval == "both" and cfg.n_demo == 0
    with pytest.raises(UserError, match="means --eval contrast, but --eval mfv"):
        cli.parse(["--probes", "contrast", "--eval", "mfv"])
    with pytest.raises(UserError, match="needs mfv or contrast"):
        cli.parse(["--probes", "freetext"])
    probe = Probe.of(Config(eval="contrast"))
    assert probe.vignettes == [] and probe.mfv is None  # nothing of the seven-way probe is even read


@pytest.mark.slow
def test_a_run_with_probes_contrast_has_no_rows_of_the_skipped_probes(tmp_path):
    args = [a for i, a in enumerate(ARGS) if "--n-demo" not in ARGS[max(i - 1, 0):i + 1]]
    rc, _, se = steer_heal(tmp_path, *args, "--n-rounds", "1", "--probes", "contrast", "--run-id", "p")
    assert rc == 0, se[-3000:]
    log = RunLog(tmp_path, "p")
    assert {r["evaluator"] for r in log.read("stage_metrics")} <= {"contrast", "kl"}
    assert {r["evaluator"] for r in log.read("eval_items")} <= {"contrast", "kl"}
    assert not [c for c in log.read("completions") if c["phase"].startswith("demo")]
    assert [r["probe"] for r in log.read("probe_info")] == ["contrast"]
    info = log.read("run_info")[0]
    assert info["config"]["eval"] == "contrast" and info["resolved"]["vignettes"] is None
    row = log.read("rounds")[0]
    assert row["coherence"] is None and row["adapter_ppl"] is None and row["trait_nats"] is not None
    assert math.isfinite(row["trait_nats"])


def test_the_flow_stores_a_verdict_per_probe_and_the_report_greys_them(ref):
    """The shared fast-dev run (tests/conftest.py): one probe_info row per probe at round -1; the tiny random model
    is at chance on each, so report.md lists them and puts their numbers in parentheses."""
    rows = RunLog(ref, "ref").read("probe_info")
    assert sorted(r["probe"] for r in rows) == ["contrast", "freetext", "mfv"] and {r["round"] for r in rows} == {-1}
    assert not any(r["informative"] for r in rows) and all(r["reason"] for r in rows)
    report = (ref / "runs" / "ref" / "report.md").read_text()
    assert "- mfv: **at chance** (option mass" in report and "(...) = from a probe at chance" in report


def test_pareto_leaves_the_seven_way_axes_when_a_run_skipped_that_probe():
    """`just study` skips the seven-way probe (--probes contrast freetext): its runs have verdicts but none for mfv,
    so the default axes are d_trait and adapter_ppl, not the empty trait_moved/coherence; a run stored before the
    verdicts (none at all) still counts as reading mfv."""
    from steer_heal.diag.pareto import axes

    assert axes([{"contrast": True, "freetext": True}] * 3, None, None) == ("d_trait", "adapter_ppl")
    assert axes([{}, {"mfv": True, "contrast": True}], None, None) == ("trait_moved", "coherence")

"""Yoked controls (issue 24 item 2): a control replays its treatment's banked slots with only the push changed;
the random control is one direction shared across the band, at the vector's norms, calibrated to iso-KL;
beyond control refuses unmatched arms; the filter's drops per reason sit side by side per arm."""

import json
import math

import pytest
import torch

from steer_heal import seeds, yoke
from steer_heal.config import Config
from steer_heal.dose import DoseResult, Starved
from steer_heal.errors import UserError
from steer_heal.freetext import steer_kl
from steer_heal.generate import generate
from steer_heal.presets import preset
from steer_heal.steering import random_like

SLOT = ("prompt", "alpha", "kappa", "phase", "step", "idx")


# ---------------------------------------------------------------- the random direction

def test_random_control_is_one_direction_shared_by_the_bands_layers_at_the_vectors_norms():
    g = torch.Generator().manual_seed(0)
    vec = {3: torch.randn(32, generator=g) * 2, 4: torch.randn(32, generator=g) * 5, 5: torch.randn(32, generator=g)}
    r = random_like(vec, 11)
    for i in vec:
        assert r[i].norm().item() == pytest.approx(vec[i].norm().item(), rel=1e-5)
        for j in vec:
            assert torch.nn.functional.cosine_similarity(r[i], r[j], dim=0).item() == pytest.approx(1.0, abs=1e-6)
    assert abs(torch.nn.functional.cosine_similarity(r[3], vec[3], dim=0).item()) < 0.9  # not the vector's way
    assert not torch.equal(random_like(vec, 12)[3], r[3])


# ---------------------------------------------------------------- calibration and replay on their own

def test_calibrate_finds_the_scale_of_a_known_monotone_kl_both_ways():
    for target in (0.3, 40.0):  # under and over the KL at scale 1: halving, then doubling
        got = yoke.calibrate(lambda s: 1.7 * s * s, target)
        assert got["kl"] == pytest.approx(target, rel=yoke.KL_TOL)
        assert got["scale"] == pytest.approx(math.sqrt(target / 1.7), rel=yoke.KL_TOL)
        assert got["iters"] <= yoke.MAX_EVALS
    with pytest.raises(UserError, match="kl_steer"):
        yoke.calibrate(lambda s: s, 0.0)
    with pytest.raises(UserError, match="brackets"):
        yoke.calibrate(lambda s: 1e-3, 1.0)  # a push that never moves the model that far


def _treatment() -> DoseResult:
    """A walk's stored outcome: a failed probe (step 0), an accepted one (step 1, slot 5 dropped), a collect batch."""
    rows = [dict(prompt=f"p{i % 3}", alpha=(0.5, 1.0)[i % 2], kappa=k, coef=k * (0.5, 1.0)[i % 2], phase=ph, step=st,
                 idx=i, keep=keep, completion=f"c{i}", reason="" if keep else "ppl")
            for i, (k, ph, st, keep) in enumerate([(1.0, "probe", 0, False)] * 2 + [(0.5, "probe", 1, True)] * 2
                                                  + [(0.5, "probe", 1, False)] + [(0.5, "collect", 2, True)] * 3)]
    steps = [dict(step=0, phase="probe", kappa=1.0, n=2, n_kept=0, rate=0.0, accepted=False),
             dict(step=1, phase="probe", kappa=0.5, n=3, n_kept=2, rate=0.67, accepted=True),
             dict(step=2, phase="collect", kappa=0.5, n=3, n_kept=3, rate=1.0, accepted=True)]
    return DoseResult.from_rows(rows, steps, n_keep=8, kappa_min=0.2)


def test_replay_resamples_the_banked_slots_and_tops_up_what_the_filter_drops():
    treat, calls = _treatment(), []
    assert [x["idx"] for x in treat.kept] == [2, 3, 5, 6, 7]
    cfg = Config(**preset("fast-dev")).replace(alphas=(0.5, 1.0), min_train=2, max_batches=3)

    def sample(items, step):  # the control's filter drops slot 6 and the first top-up slot
        calls.append((step, [x["idx"] for x in items]))
        return [dict(x, completion="t", keep=x["idx"] not in (6, 8)) for x in items]

    res = yoke.replay(cfg, treat, [f"p{i}" for i in range(3)], sample, c0=False)
    assert calls == [(1, [2, 3]), (2, [5, 6, 7]), (3, [8]), (4, [9])]  # the treatment's steps, then the cursor on
    assert [x["idx"] for x in res.kept] == [2, 3, 5, 7, 9] and len(res.kept) == len(treat.kept)
    for got, want in zip(res.scored[:5], treat.kept):
        assert {k: got[k] for k in (*SLOT, "coef")} == {k: want[k] for k in (*SLOT, "coef")}
    assert res.scored[-1] == dict(prompt="p0", alpha=1.0, kappa=0.5, coef=0.5, phase="collect", step=4, idx=9,
                                  completion="t", keep=True)
    # read back from its rows as resume does: the same kept, in the same order
    comps, steps = res.rows()
    assert [x["idx"] for x in DoseResult.from_rows(comps, steps, 8, 0.2).kept] == [2, 3, 5, 7, 9]
    assert DoseResult.from_rows(comps, steps, 8, 0.2).walk == "none"
    c0 = yoke.replay(cfg, treat, ["p0"], lambda items, step: [dict(x, keep=True) for x in items], c0=True)
    assert [x["coef"] for x in c0.kept] == [0.0] * 5 and [x["alpha"] for x in c0.kept] == [x["alpha"] for x in treat.kept]
    with pytest.raises(Starved, match="yoked control kept 0"):
        yoke.replay(cfg, treat, ["p0"], lambda items, step: [dict(x, keep=False) for x in items], c0=True)


# ---------------------------------------------------------------- the tiny model, in-process

def _arm(tmp_path, run_id: str, control: str = "none", yoke_to: str = "", **kw):
    """Round 0's extract, dose and steered eval of a fast-dev run, in-process; a treatment also gets the
    run_info row a yoked control reads its config from."""
    from steer_heal import flow

    cfg = Config(**preset("fast-dev")).replace(out=str(tmp_path), control=control, yoke=yoke_to, n_vignettes=7,
                                               n_keep=6, min_train=2, max_new_tokens=8, ppl_tau=1e9, n_demo=0, **kw)
    run = flow.Run(cfg.validate(), run_id)
    if control == "none":
        run.log.append("run_info", dict(config=cfg.to_dict(), n_rounds=cfg.n_rounds, seed=cfg.seed, control=control))
    flow.extract_task.fn(run, 0)
    dose = flow.dose_task.fn(run, 0)
    steered = flow.eval_steered.fn(run, 0, dose.coef, dose.kept)
    return run, dose, steered


def test_yoked_controls_replay_the_treatments_slots_changing_only_the_push(tmp_path):
    t_run, t, t_steered = _arm(tmp_path, "t")
    assert len({x["step"] for x in t.kept}) > 1  # the replay spans a probe batch and a collect batch
    for control in ("c0", "random"):
        run, c, steered = _arm(tmp_path, f"y-{control}", control, "t")
        # the treatment's slots, in its order, the same number kept
        assert [{k: x[k] for k in SLOT} for x in c.kept] == [{k: x[k] for k in SLOT} for x in t.kept]
        assert [x["coef"] for x in c.kept] == ([0.0] * len(t.kept) if control == "c0" else [x["coef"] for x in t.kept])
        # the same per-slot seeds: regenerating each slot with the treatment's seeds.slot gives the control's text
        vec = run.gen_vector(0)
        assert (vec is None) == (control == "c0")
        for step in dict.fromkeys(x["step"] for x in c.kept):
            rows = [x for x in c.kept if x["step"] == step]
            again = generate(run.stack.model, run.tok, [x["prompt"] for x in rows], system=run.system, vec=vec,
                             coefs=[x["coef"] for x in rows], max_new_tokens=run.cfg.max_new_tokens,
                             seeds=[seeds.slot(0, 0, x["phase"], step, x["idx"]) for x in rows],
                             batch=run.cfg.gen_batch)
            assert [x["completion"] for x in rows] == again
        if control == "random":  # pushed another way: other text at the same slots
            assert [x["completion"] for x in c.kept] != [x["completion"] for x in t.kept]
            assert steered.coef == t_steered.coef


def test_yoked_random_control_is_at_iso_kl_with_the_treatment(tmp_path):
    t_run, t, t_steered = _arm(tmp_path, "t")
    assert t_steered.kl > 0
    run, c, steered = _arm(tmp_path, "y", "random", "t")
    (cal,) = run.log.read("yoke")
    assert cal["treatment"] == "t" and cal["kl_target"] == pytest.approx(t_steered.kl) and cal["n"] == len(t.kept)
    assert cal["kl"] == pytest.approx(t_steered.kl, rel=yoke.KL_TOL)
    # measured again, independently: the calibrated random vector on the treatment's kept completions
    vec = run.gen_vector(0)
    kl = steer_kl(run.stack.model, run.tok, [x["prompt"] for x in t.kept], [x["completion"] for x in t.kept],
                  system=run.system, vec=vec, coef=t.coef, max_len=run.cfg.max_len)
    assert sum(kl) / len(kl) == pytest.approx(t_steered.kl, rel=yoke.KL_TOL)
    raw = random_like(t_run.vectors[0], seeds.control_vector(0))  # still one direction at the vector's norms
    assert all(torch.allclose(vec[i], raw[i] * cal["scale"]) for i in raw)
    assert cal["scale"] != pytest.approx(1.0, abs=1e-3)  # the equal-norm push was not already iso-KL
    # resumed: the stored calibration is read back, not measured again
    from steer_heal import flow

    again = flow.Run(run.cfg, "y")
    again.vectors[0] = run.vectors[0]
    assert all(torch.equal(again.gen_vector(0)[i], vec[i]) for i in vec) and len(again.log.read("yoke")) == 1


def test_a_yoke_to_an_unmatched_or_missing_treatment_is_refused(tmp_path):
    from steer_heal.store import RunLog

    cfg = Config(**preset("fast-dev")).replace(out=str(tmp_path))
    RunLog(tmp_path, "t").append("run_info", dict(config=cfg.to_dict(), n_rounds=2))
    with pytest.raises(UserError, match="differs in lam, seed"):
        yoke.Treatment.open(cfg.replace(control="c0", yoke="t", seed=1, lam=2.0))
    with pytest.raises(UserError, match="no such run"):
        yoke.Treatment.open(cfg.replace(control="c0", yoke="nope"))
    with pytest.raises(UserError, match="round 0's dose"):
        yoke.Treatment.open(cfg.replace(control="c0", yoke="t")).dose(0)
    with pytest.raises(UserError, match="yoke"):
        cfg.replace(yoke="t").validate()  # a treatment has nothing to yoke to


# ---------------------------------------------------------------- beyond control over matched arms only

def _fake(out, run_id: str, seed: int, control: str, trait: float, yoke_to: str = "", dropped: int = 0):
    from steer_heal.store import RunLog

    log = RunLog(out, run_id)
    cfg = Config(model="tiny-random", seed=seed, control=control, yoke=yoke_to)
    log.append("run_info", dict(seed=seed, control=control, config=cfg.to_dict()))
    for r, stage, t in ((-1, "base", 0.0), (0, "steered", 0.9), (0, "healed", trait)):
        log.append("stage_metrics", [dict(round=r, stage=stage, evaluator="contrast", foundation="trait", n=7, nats=t),
                                     dict(round=r, stage=stage, evaluator="mfv", foundation="Authority", n=7,
                                          coherence=0.5, nats=-2.0 - t)])
    log.append("dose_steps", [dict(round=0, step=0, phase="probe", kappa=1.0, n=4, n_kept=0, rate=0.0, accepted=False),
                              dict(round=0, step=1, phase="collect", kappa=0.5, n=8, n_kept=8 - dropped, rate=1.0,
                                   accepted=True)])
    log.append("completions", [dict(round=0, phase="probe", step=0, idx=i, keep=False, reason="ppl", prompt="p",
                                    completion="x") for i in range(4)]
               + [dict(round=0, phase="collect", step=1, idx=4 + i, keep=i >= dropped,
                       reason="relevance" if i < dropped else "", prompt="p", completion="x") for i in range(8)])


def test_beyond_control_over_unyoked_arms_is_refused_unless_unyoked(tmp_path, capsys):
    from steer_heal.diag.stages import cli, main
    from steer_heal.store import query

    for s in range(2):
        _fake(tmp_path, f"t{s}", s, "none", 0.5 + s / 10, dropped=3)
        _fake(tmp_path, f"c{s}", s, "c0", 0.1, yoke_to=f"t{s}")
        _fake(tmp_path, f"u{s}", s, "random", 0.2)  # its own walk: unmatched
    ids = ["t0", "t1", "c0", "c1", "u0", "u1", "--out", str(tmp_path), "--boot", "0"]
    import sys
    argv, sys.argv = sys.argv, ["stages", *ids]
    try:
        assert cli() == 2
    finally:
        sys.argv = argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not yoked" in err and "u0" in err and "--unyoked" in err
    capsys.readouterr()
    assert main(["--beyond", *ids[:4], *ids[6:]]) == 0  # the yoked arm alone passes
    out = capsys.readouterr().out
    assert "beyond control" in out and "levels and ratios" not in out
    # the filter per arm, side by side: the treatment's drops (the failed probe left out) next to c0's
    assert "relevance" in out and "6/16" in out and "0/16" in out
    assert main([*ids, "--unyoked"]) == 0
    _, got = query(tmp_path, "SELECT row FROM diag_rows WHERE kind = 'stages'")
    rows = [json.loads(r[0]) for r in got]
    beyond = [r for r in rows if r["level"] == "beyond" and r["stage"] == "healed"]
    assert {(r["control"], r["yoked"]) for r in beyond} == {("c0", True), ("random", False)}
    drops = {(r["control"], r["round"]): r for r in rows if r["level"] == "drops"}
    assert drops[("none", 0)]["relevance"] == 6 and drops[("none", 0)]["n"] == 16 and drops[("c0", 0)]["passed"] == 16


def test_seeds_yokes_each_control_seed_to_the_treatment_run_of_that_seed(tmp_path):
    import os
    import subprocess
    import sys

    calls, stub = tmp_path / "calls.txt", tmp_path / "just"
    stub.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    stub.chmod(0o755)
    env, out = dict(os.environ, JUST=str(stub)), tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "steer_heal.repeat", "2", "small-run", "--run-id", "study-c0", "--out",
                        str(out), "--yoke-group", "study-kl_rev", "--control", "c0"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert calls.read_text().splitlines() == [
        f"small-run --seed {s} --run-id study-c0-s{s} --out {out} --control c0 --yoke study-kl_rev-s{s}" for s in (0, 1)]
    bad = subprocess.run([sys.executable, "-m", "steer_heal.repeat", "2", "small-run", "--yoke", "t"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--yoke is what this sets (--yoke-group)" in bad.stderr

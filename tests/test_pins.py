"""Pins: each test checks a number against a hand computation from spec.md, so it fails when the code that
makes the number is wrong (each was seen failing on the mutation it names; docs/testing.md lists them).

No subprocesses here: the tiny model in this process, or hand-made stores. The flow's kill points and
coh_floor are in test_flow_pins.py.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from steer_heal import metrics
from steer_heal.bake import lora_config
from steer_heal.config import Config
from steer_heal.diag import pareto, stages
from steer_heal.dose import DoseResult, dose_walk, settled_kappa
from steer_heal.evaluate import StageEval
from steer_heal.extract import Extracted
from steer_heal.heal import HealResult, aggregate, divergence, heal, spectral_norm
from steer_heal.models import load_model
from steer_heal.presets import preset
from steer_heal.stack import Stack
from steer_heal.store import RunLog, query

# ---------------------------------------------------------------- divergence and its aggregation

# a 2x3 pair: two completion positions, three tokens; P is the student, Q the reference
P = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]
Q = [[0.4, 0.4, 0.2], [0.3, 0.3, 0.4]]


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


KL_REV = [_kl(p, q) for p, q in zip(P, Q)]  # KL(student || ref) per position: [0.025267, 0.219722]
KL_FWD = [_kl(q, p) for p, q in zip(P, Q)]  # KL(ref || student): [0.025815, 0.236712]
AGG = {"mean": lambda k: sum(k) / 2, "rmse": lambda k: math.sqrt((k[0] ** 2 + k[1] ** 2) / 2),
       "p95": lambda k: min(k) + 0.95 * (max(k) - min(k)),  # linear interpolation between two values
       "max": max}


def _logs(rows):
    return torch.tensor(rows, dtype=torch.float64).log().unsqueeze(0)  # [B=1, C=2, V=3]


def test_kl_both_directions_against_the_hand_values():
    # 0.5 ln(5/4) + 0.3 ln(3/4) and 0.3 ln 3 + 0.3 ln(1/2) + 0.4 ln(4/3), on paper
    assert KL_REV[0] == pytest.approx(0.025267, abs=1e-6) and KL_FWD[1] == pytest.approx(0.236712, abs=1e-6)
    lp, lq = _logs(P), _logs(Q)
    torch.testing.assert_close(divergence(lp, lq, "kl_rev")[0], torch.tensor(KL_REV, dtype=torch.float64))
    torch.testing.assert_close(divergence(lp, lq, "kl_fwd")[0], torch.tensor(KL_FWD, dtype=torch.float64))
    assert float(divergence(lp, lp, "kl_rev").abs().max()) == 0.0


@pytest.mark.parametrize("how", list(AGG))
@pytest.mark.parametrize("reg", ["kl_rev", "kl_fwd"])
def test_each_aggregation_of_each_direction_by_hand(reg, how):
    # a third position carries a huge divergence but is masked out (padding): it must not count
    lp = torch.cat([_logs(P), _logs([[0.98, 0.01, 0.01]])], 1)
    lq = torch.cat([_logs(Q), _logs([[0.01, 0.01, 0.98]])], 1)
    mask = torch.tensor([[True, True, False]])
    got = float(aggregate(divergence(lp, lq, reg), mask, how))
    assert got == pytest.approx(AGG[how](KL_REV if reg == "kl_rev" else KL_FWD), rel=1e-6)


# ---------------------------------------------------------------- filter: the scores and where each threshold sits

def test_max_ngram_freq_by_hand():
    from steer_heal.filter import max_ngram_freq

    assert max_ngram_freq("a b c a b".split()) == 0.5  # bigrams ab bc ca ab: 2 of 4; trigrams: 3 < 4, too few
    assert max_ngram_freq("a b c a".split()) == 0.0     # 3 bigrams: too short to call a loop
    assert max_ngram_freq("abcab") == 0.5


def test_score_keeps_at_the_thresholds_and_passes_items_through(tiny):
    from steer_heal.filter import perplexity, score

    model, tok = tiny
    texts = ["I would help him first.", "I am someone who looks after others.", "a b c a b"]
    items = [dict(prompt="Should I report my friend?", completion=t, extra=i) for i, t in enumerate(texts)]
    ppl = perplexity(model, tok, [x["prompt"] for x in items], texts, "You are kind.")
    out = score(model, tok, items, system="You are kind.", ppl_tau=max(ppl), rep_tau=0.5)
    assert [r["ppl"] for r in out] == pytest.approx(ppl, rel=1e-6)  # the whole completion, under this system
    assert [r["extra"] for r in out] == [0, 1, 2] and [r["narration"] for r in out] == [False, True, False]
    assert [r["rep_word"] for r in out][2] == 0.5 and [r["reason"] for r in out] == ["", "narration", ""]
    assert [r["keep"] for r in out] == [True, False, True]  # ppl == ppl_tau and rep == rep_tau both pass
    tail = score(model, tok, items[:1], system="You are kind.", ppl_tau=1e9, rep_tau=0.5, window=2)
    assert tail[0]["ppl"] == pytest.approx(perplexity(model, tok, [items[0]["prompt"]], texts[:1], "You are kind.",
                                                      window=2)[0])


# ---------------------------------------------------------------- metrics: the edges of spec.md's definitions

def test_ratio_guard_is_strictly_below_the_minimum_denominator():
    assert metrics.retain(0.05, 0.05, 0.0) == 1.0  # |steered - base| = 0.05 exactly: not under 0.05, so a ratio
    assert metrics.retain(1.0, math.inf, 0.0) is None and metrics.coh_cost(0.5, 0.4, math.nan, 0.0) is None
    assert metrics._ratio(None, 1.0, 0.05) is None and metrics._ratio(1.0, None, 0.05) is None


def test_surgical_with_no_off_target_measured_is_any_move():
    assert metrics.surgical(0.5, {}) is True and metrics.surgical(-0.01, {"Care": None}) is True
    assert metrics.surgical(0.3, {"Care": 0.3}, off=("Care",), target="Care") is True  # the target is never its own
    assert metrics.surgical(0.0, {}) is False


def test_metric_errors_name_the_problem():
    with pytest.raises(KeyError, match="unknown foundation 'Purity': must be one of Care, Fairness, Loyalty"):
        metrics.foundation_column("Purity")
    with pytest.raises(ValueError, match="1 perplexities but 2 kept flags"):
        metrics.kept_stats([1.0], [True, False])
    with pytest.raises(ValueError, match=r"same layers, got a tensor of shape \(4,\) and layers \[12, 13\]"):
        metrics.cosine(torch.ones(4), {12: torch.ones(2), 13: torch.ones(2)})
    with pytest.raises(ValueError, match=r"different sizes \(2,\) and \(3,\)"):
        metrics.cosine(torch.ones(2), torch.ones(3))


def test_round_row_of_a_care_target_compares_only_fairness():
    """With Care as the target, surgical compares against Fairness alone (spec.md: the target is no off-target)."""
    base = StageEval(nats=dict(BASE), coherence=0.9)
    healed = StageEval(nats=dict(BASE, Care=-1.5, Fairness=-1.375), coherence=0.9)  # d Care 0.5, d Fairness 0.125
    steered = StageEval(nats=dict(BASE, Care=-1.0), coherence=0.9)
    row = metrics.round_row(0, "Care", Extracted({}, 0.9, 0.7), DoseResult(kappa=1.0, kept=[], scored=[]), steered,
                            HealResult(heal_nll=1.0, val_nll=None), healed, base, {"sec_total": 5.0}, 0.85)
    assert row["surgical"] is True and row["retain"] == pytest.approx(0.5)
    assert row["student_cos"] == 0.7 and row["sec_total"] == 5.0 and row["target_nats"] == -1.5


# ---------------------------------------------------------------- heal: the loss as spec.md writes it

KEPT = [dict(prompt=p, completion="I would help them right away and explain later.", ended=True)
        for p in ("Should I report my friend?", "My boss says ignore the injured man.", "The rule says no visitors.",
                  "Teacher forbids helping. Help?")]


def _stack(model_cache, history: bool):
    """A fresh stack; with `history`, a baked round-0 adapter with real weights under the new one."""
    model, tok = load_model("tiny-random", cache=model_cache)
    st = Stack(model)
    lora = lora_config(model, 4, 8, (0.0, 1.0))
    if history:
        st.add("r0", lora, seed=1)
        with torch.no_grad():
            for p in st.trainable():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.2)
        st.model.requires_grad_(False)
    st.add("r1", lora, seed=2)
    return st, tok


def _by_hand_div(st, tok, reg, how, ref):
    """The barrier's D on all of KEPT as one batch, from the two models' log-probs and spec.md's formula."""
    from steer_heal.tokens import chat, completion_logits, pack

    b = pack(tok, [chat(tok, k["prompt"], "") for k in KEPT], [k["completion"] for k in KEPT], 96, "cpu", eos=True)
    with torch.no_grad():
        lp = torch.log_softmax(completion_logits(st.model, b), -1).double()
        with st.ref(ref):
            lq = torch.log_softmax(completion_logits(st.model, b), -1).double()
    a, c = (lp, lq) if reg == "kl_rev" else (lq, lp)
    k = (a.exp() * (a - c)).sum(-1)[b["cmask"]].sort().values
    if how == "p95":  # linear interpolation, as numpy's default percentile
        pos = 0.95 * (len(k) - 1)
        lo = int(pos)
        return float(k[lo] + (pos - lo) * (k[min(lo + 1, len(k) - 1)] - k[lo]))
    return float({"mean": k.mean(), "rmse": k.pow(2).mean().sqrt(), "max": k.max()}[how])


@pytest.mark.parametrize("reg,how", [("kl_fwd", "mean"), ("kl_fwd", "rmse"), ("kl_rev", "p95"), ("kl_fwd", "max")])
def test_heal_logs_the_barrier_of_spec_md(model_cache, reg, how):
    """With lr = 0 the student stays put, so every step's D is the hand value on the whole (one-batch) data;
    barrier = lam * (1 + round)^lam_round_pow * relu(D - tau) with tau between 0 and D, and loss = nll + barrier."""
    st, tok = _stack(model_cache, history=True)
    want = _by_hand_div(st, tok, reg, how, "base")
    assert want > 1e-3
    cfg = Config(**preset("fast-dev")).replace(reg=reg, kl_agg=how, lr=0.0, epochs=2, batch_size=4, val_frac=0.0,
                                                lam=2.0, lam_round_pow=-0.5, tau=want / 3, barrier_ref="base")
    out = heal(st, tok, KEPT, cfg, 3, seed=0, system="")
    assert len(out.steps) == 2
    for s in out.steps:
        assert s["div"] == pytest.approx(want, rel=2e-4)
        assert s["barrier"] == pytest.approx(2.0 * 4 ** -0.5 * (s["div"] - want / 3), rel=1e-5)
        assert s["loss"] == pytest.approx(s["nll"] + s["barrier"], rel=1e-6)
    high = heal(st, tok, KEPT, cfg.replace(tau=2 * want), 3, seed=0, system="")
    assert all(s["barrier"] == 0.0 and s["div"] > 0 for s in high.steps)  # below tau the barrier is free


def test_barrier_ref_prev_is_the_student_before_this_round(model_cache):
    """The new adapter starts as a no-op, so against prev (history on) the first step's D is 0; against base
    (history off) it is the history's own divergence."""
    cfg = Config(**preset("fast-dev")).replace(reg="kl_rev", lr=0.0, epochs=1, batch_size=4, val_frac=0.0, lam=1.0)
    st, tok = _stack(model_cache, history=True)
    prev = heal(st, tok, KEPT, cfg.replace(barrier_ref="prev"), 1, seed=0, system="")
    base = heal(st, tok, KEPT, cfg.replace(barrier_ref="base"), 1, seed=0, system="")
    assert abs(prev.steps[0]["div"]) < 1e-6
    assert base.steps[0]["div"] == pytest.approx(_by_hand_div(st, tok, "kl_rev", "mean", "base"), rel=2e-4)
    assert base.steps[0]["div"] > 1e-3


def _sigma_by_svd(model) -> float:
    """spec.md: the mean over the trainable LoRA modules of sigma_max(scale * B @ A)."""
    sigmas = []
    for m in model.modules():
        if hasattr(m, "lora_A"):
            for name, a in m.lora_A.items():
                if a.weight.requires_grad:
                    w = m.scaling[name] * (m.lora_B[name].weight @ a.weight)
                    sigmas.append(float(torch.linalg.svdvals(w.detach().double())[0]))
    return sum(sigmas) / len(sigmas)


def test_spectral_penalty_is_the_mean_of_largest_singular_values(model_cache):
    st, tok = _stack(model_cache, history=True)
    with torch.no_grad():
        for i, p in enumerate(st.trainable()):  # give the current adapter a non-zero B A
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
    want = _sigma_by_svd(st.model)
    assert want > 0.01
    assert float(spectral_norm(st.model)) == pytest.approx(want, rel=1e-4)
    cfg = Config(**preset("fast-dev")).replace(reg="nll", lr=0.0, epochs=1, batch_size=4, val_frac=0.0,
                                                spectral_lam=0.3)
    s = heal(st, tok, KEPT, cfg, 0, seed=0, system="").steps[0]
    assert s["loss"] - s["nll"] == pytest.approx(0.3 * want, rel=1e-4)


def test_grad_accum_two_halves_equal_one_batch_of_two(model_cache):
    """Completions of equal token count: two accumulated micro-batches of 1 take the step one batch of 2 takes."""
    weights, steps = {}, {}
    for name, kw in {"batch": dict(batch_size=2, grad_accum=1), "accum": dict(batch_size=1, grad_accum=2)}.items():
        st, tok = _stack(model_cache, history=False)
        cfg = Config(**preset("fast-dev")).replace(reg="nll", lr=5e-3, epochs=2, val_frac=0.0, **kw)
        steps[name] = [s["step"] for s in heal(st, tok, KEPT, cfg, 0, seed=4, system="").steps]
        weights[name] = torch.cat([p.detach().flatten() for p in st.trainable()])
    assert steps["batch"] == [0, 1, 2, 3] and steps["accum"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert weights["batch"].abs().max() > 1e-3
    torch.testing.assert_close(weights["accum"], weights["batch"], rtol=1e-3, atol=5e-5)


# ---------------------------------------------------------------- the dose walk's contract

def _walk(cfg, survival):
    """Walk on a synthetic filter whose survival rate at kappa is survival(kappa) (kept items first)."""
    def sample(items, step):
        n_keep = round(survival(items[0]["kappa"]) * len(items))
        return [dict(x, completion="ok", keep=i < n_keep) for i, x in enumerate(items)]
    return dose_walk(cfg, [f"prompt {i}" for i in range(5)], sample)


def _resolution(cfg, res) -> float:
    """Bisection on log kappa: after bisect_steps halvings the bracket is log(top / kappa_min) / 2^steps wide."""
    top = max(max(s["kappa"] for s in res.steps), 1.0)
    return math.log(top / cfg.kappa_min) / 2 ** cfg.bisect_steps


@pytest.mark.parametrize("edge", [0.07, 0.3, 0.55, 0.97])
def test_walk_settles_at_the_largest_surviving_kappa(edge):
    cfg = Config(**preset("fast-dev")).replace(bisect_steps=6, kappa_min=0.05, probe_size=4, collect_size=4, n_keep=6,
                                                min_train=2, dose_target=0.75)
    res = _walk(cfg, lambda k: 1.0 if k <= edge else 0.5)  # 0.5 < dose_target: above the edge fails
    assert res.kappa <= edge
    assert math.log(edge / res.kappa) <= _resolution(cfg, res) + 1e-9
    assert res.kappa == settled_kappa(res.steps, cfg.kappa_min)
    assert [s["accepted"] for s in res.steps if s["phase"] == "probe"] == \
        [s["kappa"] <= edge for s in res.steps if s["phase"] == "probe"]
    assert any(s["kappa"] > edge for s in res.steps)  # it looked above the edge
    assert sum(s["phase"] == "probe" for s in res.steps) <= cfg.bisect_steps + 1
    assert all(x["kappa"] == res.kappa for x in res.scored if x["phase"] == "collect")
    assert len(res.kept) == 6 and all(x["keep"] for x in res.kept)


def test_walk_survival_target_is_inclusive():
    """Survival exactly at dose_target passes: the edge is where survival drops below it."""
    cfg = Config(**preset("fast-dev")).replace(bisect_steps=6, probe_size=4, collect_size=4, n_keep=4, min_train=2,
                                                dose_target=0.5)
    res = _walk(cfg, lambda k: 0.5 if k <= 0.2 else 0.25)
    assert 0.2 * math.exp(-_resolution(cfg, res)) <= res.kappa <= 0.2


def test_walk_on_a_filter_that_always_passes_settles_at_the_top():
    cfg = Config(**preset("fast-dev")).replace(bisect_steps=4, probe_size=4, collect_size=4, n_keep=6, min_train=2)
    res = _walk(cfg, lambda k: 1.0)
    probes = [s for s in res.steps if s["phase"] == "probe"]
    assert all(s["accepted"] for s in probes)
    assert res.kappa == max(s["kappa"] for s in probes) >= 1.0  # today: 1.0, the full dose


def test_walk_records_every_batch_as_it_was_made():
    """Items cycle prompts and alphas by a running index; coef = kappa * alpha; each batch's step row counts
    exactly what its sample returned; every scored item is kept in order, and kept is cut at n_keep."""
    cfg = Config(**preset("fast-dev")).replace(bisect_steps=2, probe_size=3, collect_size=1, n_keep=5, min_train=5,
                                                max_batches=6, alphas=(1.0, 2.0, 4.0), dose_target=0.6)
    prompts = [f"prompt {i}" for i in range(5)]
    calls = []

    def sample(items, step):
        calls.append((step, items))
        return [dict(x, completion="ok", keep=x["idx"] % 3 != 2) for x in items]  # 2 of every 3 survive

    res = dose_walk(cfg, prompts, sample)
    items = [x for _, batch in calls for x in batch]
    assert [x["idx"] for x in items] == list(range(len(items)))
    for x in items:
        assert x["prompt"] == prompts[x["idx"] % 5] and x["alpha"] == cfg.alphas[x["idx"] % 3]
        assert x["coef"] == pytest.approx(x["kappa"] * x["alpha"])
    assert [step for step, _ in calls] == list(range(len(calls))) == [s["step"] for s in res.steps]
    for (step, batch), row in zip(calls, res.steps):
        assert all(x["step"] == step and x["kappa"] == row["kappa"] and x["phase"] == row["phase"] for x in batch)
        n_kept = sum(x["idx"] % 3 != 2 for x in batch)
        assert (row["n"], row["n_kept"]) == (len(batch), n_kept) and row["rate"] == pytest.approx(n_kept / len(batch))
        assert row["accepted"] == (n_kept / len(batch) >= 0.6)
    phases = [s["phase"] for s in res.steps]
    assert phases[0] == "probe" and phases == sorted(phases, key=lambda p: p != "probe") and "collect" in phases
    assert res.scored == [dict(x, completion="ok", keep=x["idx"] % 3 != 2) for x in items]
    # banked: survivors of accepted probes and of collect batches, never of a failed probe (spec.md "dose")
    banked = [x for (step, batch), row in zip(calls, res.steps) if row["accepted"] or row["phase"] == "collect"
              for x in batch if x["idx"] % 3 != 2]
    assert res.kept == [dict(x, completion="ok", keep=True) for x in banked[:5]]  # exactly min_train kept: not starved
    assert len(banked) - len([x for x in calls[-1][1] if x["idx"] % 3 != 2]) < 5  # no batch after n_keep banked
    assert res.n_gen == len(items) and len(res.steps[0]) and res.rows()[1][0] == {k: res.steps[0][k] for k in
                                                                                  ("step", "phase", "kappa", "n",
                                                                                   "n_kept", "rate", "accepted")}


def test_starved_walk_reports_its_counts():
    from steer_heal.dose import Starved

    cfg = Config(**preset("fast-dev")).replace(bisect_steps=1, probe_size=2, collect_size=2, n_keep=6, min_train=6,
                                                max_batches=2, kappa_min=0.25, dose_target=0.9)
    with pytest.raises(Starved) as e:
        _walk(cfg, lambda k: 0.5)  # one of every two survives, at every dose: no probe passes
    c = e.value.counts
    # two failed probes (kappa 1, then 0.5) bank nothing; two collect batches at kappa_min keep 1 of 2 each
    assert (c["kappa"], c["kept"], c["generated"]) == (0.25, 2, 8)
    assert "kept 2 of 8 generated at kappa=0.250 (walk: floor), min_train=6" in str(e.value)
    assert str(e.value).endswith("Lower --alphas or --kappa-min for gentler steering, loosen "
                                 "--ppl-tau/--rep-tau/--rel-tau, or raise --max-batches.")


def test_stored_walk_reads_back_the_same_dose():
    cfg = Config(**preset("fast-dev")).replace(bisect_steps=5, probe_size=4, collect_size=4, n_keep=6, min_train=2)
    res = _walk(cfg, lambda k: 1.0 if k <= 0.4 else 0.0)
    completions, steps = res.rows()
    back = DoseResult.from_rows(completions, steps, cfg.n_keep, cfg.kappa_min)
    assert back.kappa == res.kappa and back.kept == res.kept and back.coef == pytest.approx(res.coef)
    assert back.scored == completions and back.steps == steps
    none_passed = DoseResult.from_rows(completions, [dict(x, accepted=False) for x in steps], 2, 0.125)
    # no probe accepted: kappa_min, and only collect batches' survivors are banked (failed probes bank nothing)
    assert none_passed.kappa == 0.125
    assert none_passed.kept == [x for x in completions if x["phase"] == "collect" and x["keep"]][:2]
    assert res.coef == pytest.approx(sum(x["kappa"] * x["alpha"] for x in res.kept) / len(res.kept))


# ---------------------------------------------------------------- a fixed stored run: round row, stage table, report

BASE = {"Care": -2.0, "Fairness": -1.5, "Loyalty": -1.8, "Authority": -2.0, "Sanctity": -2.2, "Liberty": -1.9,
        "SocialNorms": -1.7}
STEERED = dict(BASE, Authority=-2.8, Care=-1.9, Fairness=-1.6)
HEALED = dict(BASE, Authority=-2.2, Care=-2.1, Fairness=-1.45)
COH = {"base": 0.90, "prompted": 0.88, "steered": 0.80, "healed": 0.86}
TRAIT = {"base": 0.10, "prompted": 0.50, "steered": 0.90, "healed": 0.30}


def _stage_rows(r, stage, nats, n=7):
    rows = [dict(round=r, stage=stage, evaluator="mfv", foundation=f, prob=math.exp(v), nats=v,
                 coherence=COH[stage], top1_agree=0.5, n=n, coef=0.0) for f, v in nats.items()]
    return rows + [dict(round=r, stage=stage, evaluator="contrast", foundation="trait", nats=TRAIT[stage], n=30,
                        coef=0.0)]


@pytest.fixture()
def fixed_run(tmp_path):
    """One stored round of a run, every number chosen by hand (coherence healthy: no stage is broken)."""
    log = RunLog(tmp_path, "fixed")
    log.append("run_info", dict(model="tiny-random", reg="kl_rev", seed=0, n_rounds=1,
                                config=Config(model="tiny-random").to_dict()))
    for r, stage, nats in ((-1, "base", BASE), (-1, "prompted", BASE), (0, "steered", STEERED), (0, "healed", HEALED)):
        log.append("stage_metrics", _stage_rows(r, stage, nats))
    ppl = [3.0, 5.0, 10.0, 40.0]
    log.append("completions", [dict(round=0, phase="probe", step=0, idx=i, alpha=1.0, kappa=0.5, coef=0.5,
                                    prompt="p", completion="c", ppl=p, keep=p < 20) for i, p in enumerate(ppl)])
    log.append("dose_steps", [dict(round=0, step=0, kappa=1.0, n=2, n_kept=0, rate=0.0, accepted=False),
                              dict(round=0, step=1, kappa=0.5, n=4, n_kept=3, rate=0.75, accepted=True)])
    log.append("heal_steps", [dict(round=0, step=i, epoch=i // 2, nll=nll, div=0.01, barrier=0.0, loss=nll, lr=1e-3,
                                   val_nll=v) for i, (nll, v) in enumerate([(3.0, None), (2.0, 2.5), (1.0, None),
                                                                            (0.5, 1.7)])])
    return log


def _round_row(log):
    cfg = Config(model="tiny-random")
    by = StageEval.by_stage(log.read("stage_metrics"))
    dose = DoseResult.from_rows([x for x in log.read("completions") if x["round"] == 0], log.read("dose_steps"),
                                cfg.n_keep, cfg.kappa_min)
    hl = HealResult.from_steps(log.read("heal_steps"), epochs=2)
    ext = Extracted({}, 0.9, None)
    return metrics.round_row(0, "Authority", ext, dose, by[(0, "steered")], hl, by[(0, "healed")], by[(-1, "base")],
                             {}, 0.85)


def test_round_row_derived_metrics_by_hand(fixed_run):
    row = _round_row(fixed_run)
    assert row["retain"] == pytest.approx((-2.2 + 2.0) / (-2.8 + 2.0))         # 0.25
    assert row["retain_trait"] == pytest.approx((0.30 - 0.10) / (0.90 - 0.10))  # 0.25
    assert row["coh_cost"] == pytest.approx((0.86 - 0.90) / (-2.2 + 2.0))       # 0.2 coherence per nat
    assert row["surgical"] is True  # |d Authority| 0.2 is above |d Care| 0.1 and |d Fairness| 0.05
    assert (row["target_nats"], row["trait_nats"], row["coherence"]) == (-2.2, 0.30, 0.86)
    assert (row["steered_target_nats"], row["steered_trait_nats"], row["steered_coherence"]) == (-2.8, 0.90, 0.80)
    assert row["auth_nats"] == -2.2 and row["care_nats"] == -2.1 and row["fairness_nats"] == -1.45
    assert (row["kappa"], row["n_gen"], row["n_kept"], row["kept_frac"]) == (0.5, 4, 3, 0.75)
    assert (row["ppl_mean"], row["ppl_median"]) == (pytest.approx(14.5), 7.5)
    assert row["heal_nll"] == pytest.approx(0.75) and row["val_nll"] == 1.7  # last epoch's mean; last val
    assert row["cos_v0"] == 0.9


SURGICAL_CASES = [  # (healed Care, healed Fairness, surgical): binary-exact moves against d Authority = -0.25
    (-2.125, -1.5625, True),  # |d| 0.125 and 0.0625 < 0.25
    (-2.5, -1.5, False),      # Care moved 0.5
    (-2.0, -1.875, False),    # Fairness moved 0.375
    (-1.75, -1.5, False),     # Care moved exactly 0.25: not larger
]


@pytest.mark.parametrize("care,fair,want", SURGICAL_CASES)
def test_round_row_surgical_by_hand(tmp_path, care, fair, want):
    log = RunLog(tmp_path, "s")
    healed = dict(HEALED, Authority=-2.25, Care=care, Fairness=fair)
    for r, stage, nats in ((-1, "base", BASE), (0, "steered", STEERED), (0, "healed", healed)):
        log.append("stage_metrics", _stage_rows(r, stage, nats))
    by = StageEval.by_stage(log.read("stage_metrics"))
    dose = DoseResult(kappa=1.0, kept=[], scored=[])
    row = metrics.round_row(0, "Authority", Extracted({}, 1.0, None), dose, by[(0, "steered")],
                            HealResult(heal_nll=1.0, val_nll=None), by[(0, "healed")], by[(-1, "base")], {}, 0.85)
    assert row["surgical"] is want


def test_round_row_with_collapsed_coherence_is_flagged_not_green(fixed_run):
    """spec's rule (issue 14): check coherence before any ratio; a collapsed stage gets no retain/coh_cost/surgical."""
    log = fixed_run
    rows = [dict(x, coherence=0.002) if x["stage"] == "healed" and x["evaluator"] == "mfv" else x
            for x in log.read("stage_metrics")]
    log.drop("stage_metrics", lambda x: True)
    log.append("stage_metrics", [{k: v for k, v in x.items() if k != "run_id"} for x in rows])
    row = _round_row(log)
    assert row.get("broken")
    assert all(row.get(k) is None for k in ("retain", "retain_trait", "coh_cost", "surgical"))


def test_stage_table_pairs_only_stages_evaluated_on_base_items():
    rows = [x for r, stage, nats in ((-1, "base", BASE), (0, "steered", STEERED), (0, "healed", HEALED))
            for x in _stage_rows(r, stage, nats)]
    rows += [dict(x, round=1) for x in _stage_rows(0, "steered", STEERED)]
    rows += [dict(x, round=1, n=5) for x in _stage_rows(0, "healed", HEALED)]  # on 5 of the 7 vignettes
    got = {(x["round"], x["stage"]): x for x in stages.run_rows("a", rows, "Authority")}
    h0, h1 = got[(0, "healed")], got[(1, "healed")]
    assert h0["paired"] and h0["d_target"] == pytest.approx(-0.2) and h0["d_coh"] == pytest.approx(-0.04)
    assert h0["retain"] == pytest.approx(0.25) and h0["retain_trait"] == pytest.approx(0.25)
    assert h0["coh_cost"] == pytest.approx(0.2) and h0["surgical"] is True
    assert got[(0, "steered")]["d_target"] == pytest.approx(-0.8) and got[(0, "steered")]["surgical"] is True
    assert not h1["paired"]
    assert all(h1.get(k) is None for k in ("d_target", "d_trait", "d_coh", "retain", "coh_cost", "surgical"))
    assert got[(1, "steered")]["paired"] and got[(1, "steered")]["d_target"] == pytest.approx(-0.8)
    assert "healed (unpaired)" in stages.summary(list(got.values()), [])


def test_report_tables_carry_the_stored_numbers(fixed_run):
    from steer_heal.report import write_report

    fixed_run.append("rounds", _round_row(fixed_run))
    fixed_run.append("completions", dict(round=0, phase="demo:healed", idx=0, coef=0.0, prompt="Help?",
                                         completion="I would help."))
    text = write_report(fixed_run, "Authority")
    lines = text.splitlines()
    rounds_row = next(x for x in lines if x.startswith("|") and "0.250" in x)  # r gen kept kappa ... retain
    # r gen kept kappa walk heal_nll target trait d_trait(CI: no items stored) coh ppl kl cos_v0 retain retain_trait
    # the fixture's steps were stored before dose_steps had a phase: a refused 1.0 above the settled 0.5 is an edge
    assert [c.strip() for c in rounds_row.strip("|").split("|")] == \
        ["0", "4", "3", "0.500", "edge", "0.750", "-2.200", "0.300", "-", "0.860", "-", "-", "0.900", "0.250", "0.250"]
    healed = [x for x in lines if x.startswith("|") and "healed" in x]
    # round stage n target d_target trait d_trait coh d_coh adapter_ppl d_ppl kl broken: point deltas (no items)
    assert [c.strip() for c in healed[0].strip("|").split("|")] == \
        ["0", "healed", "7", "-2.200", "-0.200", "0.300", "+0.200", "0.860", "-0.040", "-", "-", "-", ""]
    assert [c.strip() for c in healed[1].strip("|").split("|")] == ["0", "healed", "-0.200", "+0.200", "-0.040", "-", ""]
    assert "- r0 healed | 'Help?'\n  -> 'I would help.'" in text


# ---------------------------------------------------------------- the Pareto query's sign

def test_pareto_default_query_signs_trait_moved_toward_the_trait(tmp_path, capsys):
    """care_vs_authority lowers Authority (sign -1): a 0.5-nat fall is +0.5 toward the trait; a run whose direction
    is overridden to 'up' counts a 0.3-nat rise as +0.3."""
    for run_id, direction, move in (("down", "", -0.5), ("up", "up", 0.3)):
        log = RunLog(tmp_path, run_id)
        log.append("run_info", dict(seed=0, config=Config(model="tiny-random", direction=direction).to_dict()))
        log.append("stage_metrics", _stage_rows(-1, "base", BASE))
        log.append("stage_metrics", _stage_rows(0, "healed", dict(BASE, Authority=BASE["Authority"] + move)))
    assert pareto.main(["--out", str(tmp_path)]) == 0
    _, ids = query(tmp_path, "SELECT diag_id FROM diagnostics WHERE kind = 'pareto'")
    _, got = query(tmp_path, "SELECT row->>'label', row->>'stage', CAST(row->>'trait_moved' AS DOUBLE) FROM diag_rows "
                             "WHERE diag_id = ? AND row->>'round' = '0'", [ids[0][0]])
    moved = {(label, stage): x for label, stage, x in got}
    assert moved[("down", "healed")] == pytest.approx(0.5) and moved[("up", "healed")] == pytest.approx(0.3)
    assert moved[("down", "base")] == 0 and moved[("up", "base")] == 0


# ---------------------------------------------------------------- statistics: the edges

def test_mean_ci_of_nothing_and_of_one_value():
    from steer_heal.diag.stats import mean_ci

    assert mean_ci([]) == dict(mean=None, lo=None, hi=None, n=0) == mean_ci([None, None])
    assert mean_ci([None, 2.5]) == dict(mean=2.5, lo=None, hi=None, n=1)


@pytest.mark.parametrize("df,level", [(0, 0.95), (3, 0.0), (3, 1.0), (3, 1.5), (-1, 0.5)])
def test_t_quantile_refuses_what_has_no_quantile(df, level):
    from steer_heal.diag.stats import t_quantile

    with pytest.raises(ValueError, match=f"needs df >= 1 and 0 < level < 1, got df={df} level={level}"):
        t_quantile(level, df)


# ---------------------------------------------------------------- the store's lines, byte for byte

def test_appends_write_exactly_their_lines_and_set_a_torn_tail_aside(tmp_path):
    log = RunLog(tmp_path, "b")
    assert log.append("dose_steps", []) == 0 and not log.path("dose_steps").exists()
    log.append("dose_steps", dict(round=0, step=0))
    line = log._line("dose_steps", dict(round=0, step=0))
    assert log.path("dose_steps").read_bytes() == line  # no blank line before the first row
    assert log.path("dose_steps").stat().st_mode & 0o777 == 0o644 & ~_umask()
    RunLog(tmp_path, "b").append("dose_steps", dict(round=0, step=0))  # a new process, a clean tail
    assert log.path("dose_steps").read_bytes() == line * 2
    log.touch_all()
    RunLog(tmp_path, "b").append("heal_steps", dict(round=0, step=0))  # an empty file: nothing to heal
    assert log.path("heal_steps").read_bytes() == log._line("heal_steps", dict(round=0, step=0))
    with open(log.path("dose_steps"), "ab") as f:
        f.write(line[:9])  # a killed writer's half line
    RunLog(tmp_path, "b").append("dose_steps", dict(round=0, step=0))
    # the half line goes to the side file (left in place it would be damage in the middle)
    assert log.path("dose_steps").read_bytes() == line * 3
    assert (tmp_path / "runs/b/dose_steps.jsonl.aside").read_bytes() == line[:9] + b"\n"


def _umask() -> int:
    import os

    old = os.umask(0)
    os.umask(old)
    return old


def test_a_short_write_raises_and_the_next_append_starts_a_fresh_line(tmp_path, monkeypatch):
    import os

    import steer_heal.store.log as store_log

    log = RunLog(tmp_path, "w")
    log.append("dose_steps", dict(round=0, step=0))
    real = os.write
    monkeypatch.setattr(store_log.os, "write", lambda fd, data: real(fd, data[:5]))  # the disk filled up
    with pytest.raises(OSError, match=r"short write to .*dose_steps.jsonl: 5 of \d+ bytes"):
        log.append("dose_steps", dict(round=1, step=0))
    monkeypatch.setattr(store_log.os, "write", real)
    log.append("dose_steps", dict(round=2, step=0))
    assert [x["round"] for x in log.read("dose_steps")] == [0, 2]


def test_read_and_drop_go_past_blank_lines_and_a_torn_tail_and_refuse_a_torn_line_above_it(tmp_path):
    """Issue 23 item 4: a torn last line is a crash's (or in flight) and skipped; a torn line with rows after it
    means the file was changed: read and drop refuse it naming file:line, and drop rewrites nothing."""
    from steer_heal.store.log import StoreDamaged

    log = RunLog(tmp_path, "d")
    assert log.drop("dose_steps", lambda x: True) == 0  # no file yet
    a, b, c = (log._line("dose_steps", dict(round=r, step=0)) for r in (0, 1, 2))
    log.path("dose_steps").write_bytes(a + b"\n" + b + c + b'{"run_id"')
    assert [x["round"] for x in log.read("dose_steps")] == [0, 1, 2]
    other = RunLog(tmp_path, "e")
    damaged = a + b'{"run_id": "e", "ro' + b"\n" + b  # torn, then a row after it
    other.path("dose_steps").write_bytes(damaged)
    with pytest.raises(StoreDamaged, match=r"runs/e/dose_steps.jsonl:2: not a whole JSON line.*just fsck e"):
        other.read("dose_steps")
    with pytest.raises(StoreDamaged, match=r"dose_steps.jsonl:2: "):
        other.drop("dose_steps", lambda x: x["round"] == 0)
    assert other.path("dose_steps").read_bytes() == damaged
    assert log.drop("dose_steps", lambda x: x["round"] == 0) == 1
    assert [x["round"] for x in log.read("dose_steps")] == [1, 2]
    assert (tmp_path / "runs/d/dose_steps.jsonl.aside").read_bytes() == b'{"run_id"\n'  # the torn tail, kept


# ---------------------------------------------------------------- the store's safety (issue 12 fixes these)

def test_append_after_a_drop_over_a_torn_tail_loses_nothing(tmp_path):
    log = RunLog(tmp_path, "t")
    log.append("dose_steps", dict(round=0, step=0, kappa=1.0))
    with open(log.path("dose_steps"), "ab") as f:
        f.write(b'{"run_id": "t", "round": 1, "st')  # a kill mid-line
    resumed = RunLog(tmp_path, "t")
    assert resumed.drop("dose_steps", lambda x: x["round"] == 5) == 0  # nothing of that stage to drop
    resumed.append("dose_steps", dict(round=1, step=0, kappa=0.5))
    assert [(x["round"], x["kappa"]) for x in resumed.read("dose_steps")] == [(0, 1.0), (1, 0.5)]


def test_sql_copy_to_a_run_file_is_refused_and_changes_nothing(tmp_path):
    log = RunLog(tmp_path, "x")
    log.append("rounds", dict(round=0, coherence=0.5))
    target = log.path("rounds")
    before = target.read_bytes()
    sql = f"COPY (SELECT run_id, round, 999.0 AS coherence FROM rounds) TO '{target}' (FORMAT json)"
    r = subprocess.run([sys.executable, "-m", "steer_heal.store", "sql", "--root", str(tmp_path), sql],
                       capture_output=True, text=True)
    assert target.read_bytes() == before
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_withheld_names_the_flag_that_withheld_a_ratio():
    from steer_heal.tables import withheld

    assert withheld(dict(broken="coherence 0.004 < 0.85 x base"), 0.25) == "BROKEN"
    assert withheld(dict(broken="x", steered_broken="y"), None) == "BROKEN"  # the healed flag comes first
    assert withheld(dict(steered_broken="y"), None) == "broken:steered"
    assert withheld(dict(steered_broken="y"), 0.25) == 0.25  # a ratio that was computed is shown
    assert withheld(dict(broken="", steered_broken=""), 0.25) == 0.25 and withheld({}, None) is None

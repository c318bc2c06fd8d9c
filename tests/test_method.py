"""The method's own pieces (issue 15): the dose walk finds the edge, controls change only what they should,
presets say what they are, the spectral penalty is a mean, EOS only after a completion that ended itself."""

import copy
import math
from pathlib import Path

import pytest
import torch

from steer_heal import seeds
from steer_heal.config import Config
from steer_heal.dose import BRACKET, DoseResult, Starved, collect_at, dose_walk
from steer_heal.filter import foils, perplexity, score
from steer_heal.generate import generate
from steer_heal.models import load_model
from steer_heal.presets import preset
from steer_heal.steering import control_vector
from steer_heal.tokens import turn_end_id

PROMPTS = ["My boss says ignore the injured man. What now?", "Should I report my friend?",
           "The rule says no visitors but she is lonely.", "Teacher forbids helping. Help?"]
DOCS = Path(__file__).parents[1] / "docs"

# ---------------------------------------------------------------- spectral mean, EOS

def test_spectral_penalty_is_the_mean_over_lora_modules(model_cache):
    from steer_heal.bake import lora_config
    from steer_heal.heal import spectral_norm
    from steer_heal.stack import Stack

    model, _ = load_model("tiny-random", cache=model_cache)
    st = Stack(model)
    st.add("r0", lora_config(model, 4, 8, (0.0, 1.0)), seed=1)
    with torch.no_grad():
        for p in st.trainable():
            p.add_(torch.randn_like(p) * 0.1)
    sig = [m.scaling["r0"] * torch.linalg.matrix_norm(m.lora_B["r0"].weight @ m.lora_A["r0"].weight, ord=2).item()
           for m in st.model.modules() if hasattr(m, "lora_A") and "r0" in m.lora_A]
    assert len(sig) > 2
    assert spectral_norm(st.model).item() == pytest.approx(sum(sig) / len(sig), rel=1e-4)


def test_heal_adds_the_turn_end_only_after_completions_that_ended(model_cache, monkeypatch):
    import steer_heal.heal as heal_mod
    from steer_heal.bake import lora_config
    from steer_heal.stack import Stack

    model, tok = load_model("tiny-random", cache=model_cache)
    st = Stack(model)
    st.add("r0", lora_config(model, 4, 8, (0.0, 1.0)), seed=1)
    seen = []
    real = heal_mod.completion_rows
    monkeypatch.setattr(heal_mod, "completion_rows", lambda m, b: seen.append(b) or real(m, b))
    text = "I would help them right away"
    kept = [dict(prompt=PROMPTS[0], completion=text, ended=True), dict(prompt=PROMPTS[1], completion=text, ended=False)]
    cfg = Config(**preset("fast-dev")).replace(reg="nll", epochs=1, batch_size=2, val_frac=0.0)
    heal_mod.heal(st, tok, kept, cfg, 0, seed=0, system="")
    b = seen[0]
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    lens = b["cmask"].sum(-1).tolist()
    by_len = dict(zip(lens, b["targets"].tolist()))
    assert sorted(lens) == [n, n + 1]  # the cut completion trains no stop token
    assert by_len[n + 1][n] == turn_end_id(tok)


def test_turn_end_is_what_the_template_closes_a_turn_with(tiny):
    _, tok = tiny
    assert turn_end_id(tok) == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    other = copy.deepcopy(tok)  # gemma-like: the turn closes with a token that is not the eos
    other.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n"
                           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert turn_end_id(other) == other.convert_tokens_to_ids("<|endoftext|>") != other.eos_token_id


def test_generate_tells_rows_that_stopped_from_rows_that_were_cut(tiny):
    model, tok = tiny
    kw = dict(max_new_tokens=6, seeds=[1, 2, 3, 4])
    texts, ended = generate(model, tok, PROMPTS, with_ended=True, **kw)
    assert ended == [False] * 4 and all(texts)  # the random model never emits its eos: every row was cut
    saved = model.generation_config.eos_token_id
    try:  # a list of stop ids, as gemma has; with every id a stop, every row stops by itself at once
        model.generation_config.eos_token_id = list(range(len(tok)))
        out, ended = generate(model, tok, PROMPTS, with_ended=True, **kw)
    finally:
        model.generation_config.eos_token_id = saved
    assert ended == [True] * 4 and all(len(o) <= len(t) for o, t in zip(out, texts))

# ---------------------------------------------------------------- the dose walk, on synthetic filters

def walk_cfg(**kw) -> Config:
    base = dict(alphas=(1.0,), dose_target=0.75, kappa_min=0.2, bisect_steps=6, probe_size=8, collect_size=8,
                n_keep=12, min_train=4)
    return Config(**preset("fast-dev")).replace(**{**base, **kw})


def edge_filter(edge: float, above: float = 0.5):
    """Every completion at C <= edge survives; above it a fraction `above` (< the target) does."""
    def sample(items, step):
        return [dict(x, completion="ok", keep=x["coef"] <= edge or (i % 8) < 8 * above) for i, x in enumerate(items)]
    return sample


@pytest.mark.parametrize("edge", [0.3, 0.55, 0.9])
def test_walk_settles_at_the_known_edge_within_the_bisection_resolution(edge):
    cfg = walk_cfg()
    res = dose_walk(cfg, PROMPTS, edge_filter(edge))
    probes = [s for s in res.steps if s["phase"] == "probe"]
    assert probes[0]["kappa"] == 1.0 and not probes[0]["accepted"]  # the top of the range first, above the edge
    assert res.walk == "edge" and res.kappa <= edge
    failed_above = min(s["kappa"] for s in probes if not s["accepted"])
    assert edge < failed_above and failed_above / res.kappa < BRACKET  # bracketed to the method's resolution
    assert len(probes) <= 1 + cfg.bisect_steps
    # banked: accepted probes' and collect batches' survivors only, none from a probe above the edge
    assert len(res.kept) == cfg.n_keep and all(x["coef"] <= edge for x in res.kept)
    assert any(x["keep"] and x["coef"] > edge for x in res.scored)  # they were scored and stored, not banked
    again = DoseResult.from_rows(*res.rows(), cfg.n_keep, cfg.kappa_min)  # what resume reads back
    assert again.kappa == res.kappa and again.kept == res.kept and again.walk == "edge"


def test_walk_on_a_filter_that_always_passes_still_probes_the_top_first_and_says_so(capsys):
    from loguru import logger

    cfg = walk_cfg()
    sink = []
    hid = logger.add(sink.append, level="WARNING")
    try:
        res = dose_walk(cfg, PROMPTS, lambda items, step: [dict(x, completion="ok", keep=True) for x in items])
    finally:
        logger.remove(hid)
    assert res.steps[0] == dict(step=0, phase="probe", kappa=1.0, n=8, n_kept=8, rate=1.0, accepted=True)
    assert res.walk == "top" and res.kappa == 1.0
    assert any("never reached the coherent edge" in str(m) and "--alphas" in str(m) for m in sink)


def test_walk_that_finds_no_passing_dose_settles_on_the_floor_and_starves_loudly():
    cfg = walk_cfg()
    with pytest.raises(Starved, match=r"kept 0 of \d+ generated at kappa=0.200 \(walk: floor\).*--rel-tau"):
        dose_walk(cfg, PROMPTS, lambda items, step: [dict(x, completion="", keep=False) for x in items])


def test_walk_pools_survival_over_the_alphas_of_each_probe():
    cfg = walk_cfg(alphas=(0.5, 1.0))
    res = dose_walk(cfg, PROMPTS, edge_filter(0.6, above=0.0))  # only C <= 0.6 survives
    for s in res.steps:
        items = [x for x in res.scored if x["step"] == s["step"]]
        assert {x["alpha"] for x in items} == {0.5, 1.0}
        assert s["rate"] == sum(x["coef"] <= 0.6 for x in items) / len(items)
    assert res.kappa <= 0.6 and res.walk == "edge"  # both alphas must survive: kappa * 1.0 <= 0.6


def test_c0_collects_unsteered_without_a_walk():
    cfg = walk_cfg()
    res = collect_at(cfg, PROMPTS, lambda items, step: [dict(x, completion="ok", keep=True) for x in items], 0.0)
    assert res.walk == "none" and res.kappa == 0.0 and res.coef == 0.0
    assert {s["phase"] for s in res.steps} == {"collect"} and all(x["coef"] == 0.0 for x in res.scored)
    assert DoseResult.from_rows(*res.rows(), cfg.n_keep, cfg.kappa_min).kappa == 0.0


def test_dose_rows_stored_by_the_older_walk_read_back_as_they_were_used():
    """Stores written before dose_steps had a phase: every survivor was banked, kappa the largest accepted."""
    steps = [dict(step=0, phase=None, kappa=1.0, n=2, n_kept=1, rate=0.5, accepted=False),
             dict(step=1, phase=None, kappa=0.4, n=2, n_kept=2, rate=1.0, accepted=True)]
    comps = [dict(step=0, keep=True, coef=1.0), dict(step=0, keep=False, coef=1.0),
             dict(step=1, keep=True, coef=0.4), dict(step=1, keep=True, coef=0.4)]
    res = DoseResult.from_rows(comps, steps, n_keep=8, kappa_min=0.05)
    assert res.kappa == 0.4 and res.kept == [comps[0], comps[2], comps[3]]

# ---------------------------------------------------------------- the relevance signal

def test_relevance_is_own_prompt_minus_foil_log_prob_and_can_drop(tiny):
    model, tok = tiny
    fo = foils(PROMPTS)
    assert set(fo) == set(PROMPTS) and all(fo[p] != p for p in PROMPTS) and foils(["one", "one"]) == {}
    items = [dict(prompt=p, completion="I would help him first and ask later.") for p in PROMPTS]
    got = score(model, tok, items, system="", ppl_tau=1e9, rep_tau=0.9, foil=fo)
    own = perplexity(model, tok, PROMPTS, [x["completion"] for x in items])
    other = perplexity(model, tok, [fo[p] for p in PROMPTS], [x["completion"] for x in items])
    assert [r["relevance"] for r in got] == pytest.approx([math.log(o / w) for w, o in zip(own, other)], abs=1e-6)
    assert all(r["keep"] for r in got)  # rel_tau 0: recorded, nothing dropped
    strict = score(model, tok, items, system="", ppl_tau=1e9, rep_tau=0.9, foil=fo, rel_tau=1e6)
    assert [r["reason"] for r in strict] == ["relevance"] * len(items)
    assert score(model, tok, items[:1], system="", ppl_tau=1e9, rep_tau=0.9)[0]["relevance"] is None


def test_relevance_gate_at_its_boundary_and_without_a_foil(tiny):
    """rv < rel_tau drops, rv == rel_tau keeps (the gate is strict); a gate that cannot be applied to an item
    (no foil: one distinct prompt) refuses rather than waving the item through."""
    model, tok = tiny
    fo = foils(PROMPTS)
    items = [dict(prompt=p, completion="I would help him first and ask later.") for p in PROMPTS]
    rv = score(model, tok, items[:1], system="", ppl_tau=1e9, rep_tau=0.9, foil=fo)[0]["relevance"]
    at = score(model, tok, items[:1], system="", ppl_tau=1e9, rep_tau=0.9, foil=fo, rel_tau=rv)[0]
    above = score(model, tok, items[:1], system="", ppl_tau=1e9, rep_tau=0.9, foil=fo,
                  rel_tau=math.nextafter(rv, math.inf))[0]
    assert rv > 0 and at["keep"] and (above["keep"], above["reason"]) == (False, "relevance")
    with pytest.raises(ValueError, match="rel_tau=0.5 .* no unrelated prompt"):
        score(model, tok, items[:1], system="", ppl_tau=1e9, rep_tau=0.9, foil={}, rel_tau=0.5)

# ---------------------------------------------------------------- controls

def _round0(tmp_path, control: str):
    """Round 0's extract, dose and steered eval of a fast-dev run with this control, in-process."""
    from steer_heal import flow

    cfg = Config(**preset("fast-dev")).replace(out=str(tmp_path / control), control=control, n_vignettes=7,
                                               n_keep=6, min_train=2, max_new_tokens=8, ppl_tau=1e9)
    run = flow.Run(cfg, "c")
    flow.extract_task.fn(run, 0)
    dose = flow.dose_task.fn(run, 0)
    steered = flow.eval_steered.fn(run, 0, dose.coef, dose.kept)
    return cfg, run, dose, steered


def test_controls_change_only_what_they_should(tmp_path):
    arms = {c: _round0(tmp_path, c) for c in ("none", "c0", "random")}
    cfgs = {c: a[0].to_dict() for c, a in arms.items()}
    for c in ("c0", "random"):
        diff = {k for k in cfgs["none"] if cfgs["none"][k] != cfgs[c][k]}
        assert diff == {"control", "out"}
    t, c0, rnd = (arms[c][2] for c in ("none", "c0", "random"))
    walk = lambda d: [(x["step"], x["phase"], x["prompt"], x["alpha"], x["kappa"], x["coef"]) for x in d.scored]  # noqa: E731
    assert walk(rnd) == walk(t)  # the same dose walk (this filter keeps everything) at the same coefficients ...
    assert [x["completion"] for x in rnd.scored] != [x["completion"] for x in t.scored]  # ... pushed another way
    assert arms["random"][3].coef == arms["none"][3].coef > 0
    assert c0.walk == "none" and {x["coef"] for x in c0.scored} == {0.0} and c0.kappa == 0.0
    assert arms["c0"][3].coef == 0.0
    # c0's completions are exactly the unsteered model's, with the seeds the treatment would have used
    run = arms["c0"][1]
    for step in sorted({x["step"] for x in c0.scored}):
        rows = [x for x in c0.scored if x["step"] == step]
        plain = generate(run.stack.model, run.tok, [x["prompt"] for x in rows], system=run.system,
                         max_new_tokens=run.cfg.max_new_tokens,
                         seeds=[seeds.slot(run.cfg.seed, 0, x["phase"], step, x["idx"]) for x in rows],
                         batch=run.cfg.gen_batch)
        assert [x["completion"] for x in rows] == plain
    # every arm extracted the same vector; the random control pushes with its norms, the same way each round
    v = arms["none"][1].vectors[0]
    assert all(torch.equal(v[k], arms[c][1].vectors[0][k]) for c in ("c0", "random") for k in v)
    rv = arms["random"][1].gen_vector(0)
    assert {k: float(x.norm()) for k, x in rv.items()} == pytest.approx({k: float(x.norm()) for k, x in v.items()})
    assert arms["c0"][1].gen_vector(0) is None and arms["none"][1].gen_vector(0) is v
    v2 = {k: 3 * x for k, x in v.items()}  # a later round's vector: same direction drawn, its own norms
    r2 = control_vector(v2, "random", seeds.control_vector(0))
    assert all(torch.allclose(r2[k], 3 * rv[k]) for k in v)
    # the stored completions rows carry the same columns in every arm, ended and relevance included
    cols = {tuple(sorted(r)) for a in arms.values() for r in a[1].log.read("completions")}
    assert len(cols) == 1 and {"ended", "relevance", "coef"} <= set(next(iter(cols)))


# ---------------------------------------------------------------- beyond control

def _fake_run(out, run_id: str, seed: int, control: str, healed_trait: float, lam: float = 1.0):
    from steer_heal.store import RunLog

    log = RunLog(out, run_id)
    log.append("run_info", dict(seed=seed, control=control,
                                config=Config(model="tiny-random", seed=seed, lam=lam, control=control).to_dict()))
    for r, stage, t in ((-1, "base", 0.0), (0, "steered", 0.9), (0, "healed", healed_trait)):
        log.append("stage_metrics", [dict(round=r, stage=stage, evaluator="contrast", foundation="trait", n=7, nats=t),
                                     dict(round=r, stage=stage, evaluator="mfv", foundation="Authority", n=7,
                                          coherence=0.5, nats=-2.0 - t)])


def test_stages_prints_treatment_beyond_control_paired_by_seed(tmp_path):
    import json

    from steer_heal.diag.stages import main as stages
    from steer_heal.store import query

    treat, c0 = {0: 0.5, 1: 0.7, 2: 0.6}, {0: 0.1, 1: 0.2, 2: 0.3}
    for s in range(3):
        _fake_run(tmp_path, f"t{s}", s, "none", treat[s])
        _fake_run(tmp_path, f"c{s}", s, "c0", c0[s])
    _fake_run(tmp_path, "c9", 9, "c0", 5.0)  # a seed the treatment lacks: no pair, left out
    _fake_run(tmp_path, "x0", 0, "c0", 5.0, lam=2.0)  # another family: never paired with the treatment
    assert stages([*(f"t{s}" for s in range(3)), *(f"c{s}" for s in range(3)), "c9", "x0", "--out", str(tmp_path),
                   "--unyoked"]) == 0  # hand-made controls, not yoked (tests/test_yoke.py: the refusal)
    _, got = query(tmp_path, "SELECT row FROM diag_rows WHERE kind = 'stages'")
    beyond = [json.loads(r[0]) for r in got if json.loads(r[0])["level"] == "beyond"]
    healed = [b for b in beyond if b["stage"] == "healed" and b["n_pairs"] == 3]
    assert len(healed) == 1 and healed[0]["control"] == "c0" and healed[0]["controls"] == ["c0", "c1", "c2"]
    diffs = [treat[s] - c0[s] for s in range(3)]  # 0.4, 0.5, 0.3
    hw = 4.302653 * 0.1 / math.sqrt(3)
    h = healed[0]
    assert (h["beyond_d_trait_mean"], h["beyond_d_trait_lo"], h["beyond_d_trait_hi"]) == \
        pytest.approx((sum(diffs) / 3, 0.4 - hw, 0.4 + hw))
    assert h["beyond_d_target_mean"] == pytest.approx(-0.4)  # Authority moved down by the same amounts
    steered = next(b for b in beyond if b["stage"] == "steered" and b["n_pairs"] == 3)
    assert steered["beyond_d_trait_mean"] == pytest.approx(0.0)  # same steered numbers in both arms
    lone = [b for b in beyond if "x0" in b["controls"]]
    assert lone == []  # x0's family has no treatment
    report = (tmp_path / "diagnostics").glob("*/report.md")
    assert any("beyond control" in p.read_text() for p in report)

def test_one_seed_pair_beyond_control_is_the_paired_bootstrap_over_items(tmp_path):
    """With one seed the t-interval over seeds is undefined; the treatment's healed items against the control's
    (the same items, the same base) give the interval: here every item differs by exactly 0.2, so [0.2, 0.2]."""
    import json

    from steer_heal.diag.stages import main as stages
    from steer_heal.store import RunLog, query

    for run_id, control, shift in (("t", "none", 0.2), ("c", "c0", 0.0)):
        _fake_run(tmp_path, run_id, 0, control, 0.3 + shift)
        log = RunLog(tmp_path, run_id)
        for r, stage, add in ((-1, "base", 0.0), (0, "steered", 0.9), (0, "healed", 0.3 + shift)):
            log.append("eval_items", [dict(round=r, stage=stage, evaluator="contrast", item=f"d{i}",
                                           diff=0.1 * i + add) for i in range(7)])
    assert stages(["t", "c", "--out", str(tmp_path), "--boot", "500", "--unyoked"]) == 0
    _, got = query(tmp_path, "SELECT row FROM diag_rows WHERE kind = 'stages'")
    h = next(b for b in (json.loads(r[0]) for r in got) if b["level"] == "beyond" and b["stage"] == "healed")
    ci = h["beyond_d_trait_items"]
    assert ci["delta"] == pytest.approx(0.2) and ci["lo"] == pytest.approx(0.2) and ci["hi"] == pytest.approx(0.2)
    assert ci["n"] == 7 and h["beyond_d_trait_lo"] is None  # one pair: no interval over seeds


def test_beyond_control_over_seed_pairs_adds_the_items_they_share(tmp_path):
    """Three seed pairs scored on the same 7 dilemmas: the treatment moves each item by its own amount e_i (the
    same in every seed) plus 0.1 x seed. The t over pairs sees only the 0.1 x seed spread; the two-level interval
    adds what the shared items leave uncertain, so it is wider, and it is recomputed from the items."""
    import json

    from steer_heal.diag.stages import main as stages
    from steer_heal.store import RunLog, query

    e = [0.3, -0.2, 0.5, 0.0, 0.4, -0.1, 0.2]
    for s in range(3):
        for run_id, control, move in ((f"t{s}", "none", True), (f"c{s}", "c0", False)):
            _fake_run(tmp_path, run_id, s, control, 0.0)
            log = RunLog(tmp_path, run_id)
            for r, stage in ((-1, "base"), (0, "steered"), (0, "healed")):
                add = [x + 0.1 * s if move and stage == "healed" else 0.0 for x in e]
                log.append("eval_items", [dict(round=r, stage=stage, evaluator="contrast", item=f"d{i}",
                                               diff=0.05 * i + add[i]) for i in range(7)])
    assert stages([*(f"t{s}" for s in range(3)), *(f"c{s}" for s in range(3)), "--out", str(tmp_path),
                   "--boot", "400", "--unyoked"]) == 0
    _, got = query(tmp_path, "SELECT row FROM diag_rows WHERE kind = 'stages'")
    h = next(b for b in (json.loads(r[0]) for r in got) if b["level"] == "beyond" and b["stage"] == "healed")
    assert h["beyond_d_trait_over"] == "seeds+items" and h["n_pairs"] == 3
    assert h["beyond_d_trait_mean"] == pytest.approx(sum(e) / 7 + 0.1)
    seeds_only = 4.302653 * 0.1 / math.sqrt(3)  # the t over the pairs' differences 0.1 s + mean(e)
    assert (h["beyond_d_trait_hi"] - h["beyond_d_trait_lo"]) / 2 > seeds_only * 1.05


# ---------------------------------------------------------------- presets

# presets: tests/test_presets.py

# ---------------------------------------------------------------- just seeds

def test_seeds_runs_each_seed_once_and_resumes_the_unfinished(tmp_path):
    import os
    import subprocess
    import sys

    from steer_heal.store import RunLog

    calls = tmp_path / "calls.txt"
    stub = tmp_path / "just"
    stub.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    stub.chmod(0o755)
    out = tmp_path / "out"
    for s, st in ((0, "done"), (1, "running")):
        log = RunLog(out, f"g-s{s}")
        log.append("run_info", dict(seed=s, config=Config(model="tiny-random", seed=s).to_dict()))
        log.append("status", dict(status=st))
    env = dict(os.environ, JUST=str(stub))
    r = subprocess.run([sys.executable, "-m", "steer_heal.repeat", "3", "fast-dev-run", "--run-id", "g", "--out",
                        str(out), "--reg", "nll"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert calls.read_text().splitlines() == [f"resume g-s1 --out {out}",
                                              f"fast-dev-run --seed 2 --run-id g-s2 --out {out} --reg nll"]
    assert "g-s0 already done, skipped" in r.stderr
    bad = subprocess.run([sys.executable, "-m", "steer_heal.repeat", "2", "small-run", "--seed", "3"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--seed is what this sets" in bad.stderr


def test_beyond_control_includes_the_free_text_perplexity_cost(tmp_path):
    """On a model whose seven-way probe is at chance (SmolLM2), the coherence cost beyond control is read in free
    text: the treatment's healed adapter_ppl rises by 0.5 on every held-out prompt, the control's by nothing, in
    each of two seed pairs; beyond d_ppl is +0.5, two-level, and its row and table carry it."""
    import json

    from steer_heal.diag.stages import main as stages
    from steer_heal.store import RunLog, query

    for s in range(2):
        for run_id, control, cost in ((f"t{s}", "none", 0.5), (f"c{s}", "c0", 0.0)):
            _fake_run(tmp_path, run_id, s, control, 0.3)
            log = RunLog(tmp_path, run_id)
            for r, stage in ((-1, "base"), (0, "steered"), (0, "healed")):
                add = cost if stage == "healed" else 0.0
                ppl = [2.0 + 0.1 * i + 0.05 * s + add for i in range(6)]
                log.append("stage_metrics", [dict(round=r, stage=stage, evaluator="freetext", foundation="adapter_ppl",
                                                  n=6, ppl=sum(ppl) / 6)])
                log.append("eval_items", [dict(round=r, stage=stage, evaluator="freetext", item=str(i), ppl=p)
                                          for i, p in enumerate(ppl)])
    assert stages(["t0", "t1", "c0", "c1", "--out", str(tmp_path), "--boot", "200", "--unyoked"]) == 0
    _, got = query(tmp_path, "SELECT row FROM diag_rows WHERE kind = 'stages'")
    h = next(b for b in (json.loads(r[0]) for r in got) if b["level"] == "beyond" and b["stage"] == "healed")
    assert h["beyond_d_ppl_mean"] == pytest.approx(0.5) and h["beyond_d_ppl_over"] == "seeds+items"
    assert h["beyond_d_ppl_lo"] == pytest.approx(0.5) and h["beyond_d_ppl_hi"] == pytest.approx(0.5)
    report = next(p for p in (tmp_path / "diagnostics").glob("*/report.md") if "beyond control" in p.read_text())
    assert "beyond d_ppl" in report.read_text() and "+0.500 [+0.500, +0.500]" in report.read_text()


def test_stages_prints_arm_differences_paired_by_seed(tmp_path):
    """Two treatment arms that differ in one knob (here lam; in the study, reg kl_rev vs nll) are differenced seed by
    seed, first-named minus second, with the same interval as beyond control; arms differing in two knobs are not."""
    import json

    from steer_heal.diag.stages import main as stages
    from steer_heal.store import query

    a, b = {0: 0.5, 1: 0.7, 2: 0.6}, {0: 0.1, 1: 0.2, 2: 0.3}
    for s in range(3):
        _fake_run(tmp_path, f"a{s}", s, "none", a[s])
        _fake_run(tmp_path, f"b{s}", s, "none", b[s], lam=2.0)
    _fake_run(tmp_path, "c0", 0, "c0", 5.0, lam=2.0)  # a control: beyond control's business, not an arm
    assert stages([*(f"a{s}" for s in range(3)), *(f"b{s}" for s in range(3)), "c0", "--out", str(tmp_path),
                   "--unyoked"]) == 0
    _, got = query(tmp_path, "SELECT row FROM diag_rows WHERE kind = 'stages'")
    arms = [json.loads(r[0]) for r in got if json.loads(r[0])["level"] == "arms"]
    h = next(x for x in arms if x["stage"] == "healed")
    assert (h["arm"], h["versus"], h["knobs"], h["n_pairs"]) == ("lam=1", "lam=2", ["lam"], 3)
    hw = 4.302653 * 0.1 / math.sqrt(3)
    assert (h["diff_d_trait_mean"], h["diff_d_trait_lo"], h["diff_d_trait_hi"]) == pytest.approx((0.4, 0.4 - hw, 0.4 + hw))
    assert all(x["treatment"][0].startswith("a") and not any("c0" in y for y in x["controls"]) for x in arms)
    report = next(p for p in (tmp_path / "diagnostics").glob("*/report.md") if "arm differences" in p.read_text())
    assert "lam=1 - lam=2" in report.read_text()

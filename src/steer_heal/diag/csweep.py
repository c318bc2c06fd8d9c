"""`just csweep RUN_ID [ROUND] [--coefs C ...] [--random N]`: the dose sweep of one round.

Loads the student that started ROUND (its baked history) and the round's vector, evaluates the
steered model at each coefficient (target nats, every foundation, trait nats, coherence) with one
greedy generation, and writes one diagnostic row per (vector, coefficient). The round's own dose is
always swept too, so its row reproduces the run's stored `steered` evaluation.

--random N adds N random directions with the vector's per-layer norms, swept the same way and drawn
as a band: the trait vector should move the metrics more than an arbitrary push of the same size.
"""

from __future__ import annotations

import argparse
import sys

from .. import data, seeds
from ..console import Parser, script
from ..errors import UserError
from ..evaluate import measure
from ..generate import generate
from ..steering import random_like
from ..tables import table
from . import plots
from .model import RoundModel, open_round
from .record import Diagnostic

PROG = "just csweep"
DEFAULT_COEFS = (-1.0, 0.0, 0.5, 1.0, 2.0, 4.0)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_id")
    p.add_argument("round", nargs="?", type=int, default=None, help="round (default: the newest with a vector)")
    p.add_argument("--coefs", type=float, nargs="+", default=DEFAULT_COEFS, help="steering coefficients C")
    p.add_argument("--random", type=int, default=0, metavar="N", help="random equal-norm control vectors")
    p.add_argument("--device", default="auto", help="torch device (auto: cuda if present)")
    p.add_argument("--out", "--root", dest="out", default="out", help="store root")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="needed for a run started with it: lets its model's own Python code run")
    return p.parse_args(argv)


def sweep(rm: RoundModel, name: str, vec: dict, coefs: list[float], demo: bool) -> list[dict]:
    """One row per coefficient: the steered model's evaluation, and a greedy generation when `demo`."""
    from ..backends import steer_fn

    steer, prompt = steer_fn(rm.cfg), data.prompts(1)[0]
    rows = []
    for c in coefs:
        with steer(rm.stack.model, vec, c):
            m = measure(rm.stack.model, rm.tok, rm.probe).summary(rm.probe.target)
            text = generate(rm.stack.model, rm.tok, [prompt], system=rm.probe.system,
                            max_new_tokens=rm.cfg.max_new_tokens, repetition_penalty=rm.cfg.repetition_penalty,
                            no_repeat_ngram=rm.cfg.no_repeat_ngram)[0] if demo else None
        rows.append(dict(vector=name, coef=c, dose=c == rm.coef, **m, prompt=prompt if demo else None,
                         generation=text))
    return rows


def band(rows: list[dict], coef: float, key: str) -> str:
    vals = [r[key] for r in rows if r["coef"] == coef and r[key] is not None]
    return f"{min(vals):.3f}..{max(vals):.3f}" if vals else "-"


def summary(trait: list[dict], random: list[dict]) -> str:
    header = ["C", "dose", "target", "trait", "coh"]
    if random:
        header += ["rand target", "rand trait", "rand coh"]
    body = []
    for r in trait:
        row = [r["coef"], "*" if r["dose"] else "", r["target_nats"], r["trait_nats"], r["coherence"]]
        if random:
            row += [band(random, r["coef"], k) for k in ("target_nats", "trait_nats", "coherence")]
        body.append(row + [repr(r["generation"][:40])])
    return table(header + ["greedy generation"], body)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    rm = open_round(a.out, a.run_id, a.round, a.device, a.trust_remote_code)
    if rm.vector is None:
        raise UserError(f"run {a.run_id} round {rm.round} has no stored vector yet")
    coefs = sorted(set(a.coefs) | ({rm.coef} if rm.coef is not None else set()))
    rseeds = [seeds.random_vector(rm.cfg.seed, rm.round, k) for k in range(a.random)]
    diag = Diagnostic(a.out, "csweep", a.run_id, rm.round,
                      dict(coefs=coefs, random=a.random, random_seeds=rseeds, dose=rm.coef, device=a.device))
    trait = sweep(rm, "trait", rm.vector, coefs, demo=True)
    diag.add(trait)
    random = []
    for k, s in enumerate(rseeds):
        rows = sweep(rm, f"random{k}", random_like(rm.vector, s), coefs, demo=False)
        diag.add(rows)
        random += rows
    fig = plots.sweep_figure(trait, random, rm.coef, f"c-sweep: run {a.run_id}, round {rm.round} "
                                                     f"(target {rm.probe.target}, trait {'up' if rm.probe.sign > 0 else 'down'})")
    files = plots.save(fig, diag.dir / "csweep")
    diag.finish(summary(trait, random), files)
    return 0


def cli() -> int:
    return script(PROG, main, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(cli())

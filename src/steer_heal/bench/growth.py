"""Part g of `just bench`: cost against the round index. Every baked adapter stays in a gated stack's
forward; `--fold-history` folds them into the weights (stack.Stack(fold=True)).

1. SmolLM2: one eval-shaped forward (16 x 120 tokens, no grad; the folded stack merged, as the frozen stages
   run) and one heal-shaped step (4 x 120, forward and backward through a fresh live adapter on the history)
   with 0-10 baked adapters, gated and folded, best of 3 (steps best of 2); and how far the folded stack's
   logits are from the gated one's at 10 (base must be bitwise).
2. --growth-rounds N (0 = skip): a real fast-dev run of N rounds, gated and folded (tiny model, 1 thread),
   seconds per round from its store.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import Clock, load1, show
from .orch import FLOW_ENV

MARKS = (0, 1, 2, 5, 10)


def _stacks(model, n: int):
    """Yield (k, gated, folded) after k = 0..n baked adapters (random B, as a trained one would move the logits)."""
    import torch

    from ..bake import lora_config
    from ..stack import Stack

    stacks = [Stack(copy.deepcopy(model), fold=f) for f in (False, True)]
    lora = lora_config(model, 8, 16.0, (0.0, 1.0))
    yield 0, *stacks
    for k in range(1, n + 1):
        for st in stacks:
            st.add(f"r{k}", lora, seed=k)
            g = torch.Generator().manual_seed(k)
            for name, p in st.model.named_parameters():
                if f".r{k}." in name and "lora_B" in name:
                    p.data = torch.randn(p.shape, generator=g) * 0.01
            st.model.requires_grad_(False)
        yield k, *stacks


def _best(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        with Clock() as c:
            fn()
        best = min(best, c.s)
    return best


def forward_sweep(model, n: int = 10) -> tuple[list[list], dict]:
    import torch

    from ..bake import lora_config

    x = torch.randint(100, 1000, (16, 120))
    y = torch.randint(100, 1000, (4, 120))
    rows, diff = [], {}

    def step(st) -> float:  # a heal step: a fresh live adapter trains on the history (which a fold folds)
        st = copy.deepcopy(st)
        st.add("live", lora_config(model, 8, 16.0, (0.0, 1.0)), seed=0)

        def once():
            st.model(input_ids=y, labels=y).loss.backward()
            st.model.zero_grad(set_to_none=True)
        return _best(once, reps=2)

    for k, gated, folded in _stacks(model, n):
        if k not in MARKS:
            continue
        with torch.no_grad():  # an eval-shaped forward as the frozen stages run it: folded ones merged
            fwd = _best(lambda m=gated.model: m(input_ids=x, logits_to_keep=1))
            with folded.merged():
                fwd = [fwd, _best(lambda m=folded.model: m(input_ids=x, logits_to_keep=1))]
        stp = [step(gated), step(folded)]
        rows.append([k, fwd[0], fwd[1], fwd[0] / fwd[1], stp[0], stp[1], stp[0] / stp[1], load1()])
        if k == n:
            with torch.no_grad():
                lg = lambda st: st.model(input_ids=x[:4, :40]).logits  # noqa: E731
                diff["student"] = float((lg(gated) - lg(folded)).abs().max())
                with gated.prev(), folded.prev():
                    diff["prev"] = float((lg(gated) - lg(folded)).abs().max())
                with gated.base(), folded.base():
                    diff["base_bitwise"] = bool(torch.equal(lg(gated), lg(folded)))
    return rows, diff


def round_sweep(n: int, tmp: Path) -> dict[str, list[float]]:
    """sec_total per round of an n-round fast-dev run, gated and folded."""
    from ..store import RunLog

    out = {}
    for name, extra in (("gated", []), ("folded", ["--fold-history"])):
        env = dict(os.environ, **FLOW_ENV, PREFECT_HOME=str(tmp / f"prefect-{name}"))
        cmd = [sys.executable, "-m", "steer_heal", "--preset", "fast-dev", "--n-rounds", str(n), "--out", str(tmp),
               "--run-id", name, *extra]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"bench g: fast-dev {name} failed:\n{p.stderr[-2000:]}")
        out[name] = [r["sec_total"] for r in sorted(RunLog(tmp, name).read("rounds"), key=lambda r: r["round"])]
    return out


def part_g(ctx, res: dict) -> None:
    rows, diff = forward_sweep(ctx.model)
    res["g"] = dict(forward=rows, diff=diff)
    f0 = rows[0][1]
    show("g. cost against the round index (SmolLM2): baked adapters in the forward",
         ["adapters", "fwd gated s", "fwd folded s", "gated/folded", "step gated s", "step folded s", "gated/folded",
          "load"], rows,
         note=f"gated forward at 10 = {rows[-1][1] / f0:.2f}x at 0 (fold when > 1.15x); folded vs gated at 10: "
              f"student max|dlogit| {diff['student']:.2g}, prev {diff['prev']:.2g}, base bitwise {diff['base_bitwise']}")
    n = ctx.args.growth_rounds
    if n:
        with tempfile.TemporaryDirectory(prefix="bench-g-") as d:
            sec = round_sweep(n, Path(d))
        res["g"]["rounds"] = sec
        show(f"g. a fast-dev run of {n} rounds (tiny model, 1 thread): seconds per round",
             ["round", "gated", "folded"], [[i, a, b] for i, (a, b) in enumerate(zip(sec["gated"], sec["folded"]))],
             note=f"load {load1()}")

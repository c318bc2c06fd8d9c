"""Part c of `just bench`: one heal step (heal.heal as the flow runs it), nll vs kl_rev variants, each in
a fresh subprocess (time per step split into forward, reference forward and backward; peak RSS)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import Clock, load1, maxrss_mb, reset_peak, rss_mb, show


def _heal_inputs(tok, n: int, n_tok: int) -> list[dict]:
    """n completions of exactly n_tok tokens of bundled text (content does not matter for timing)."""
    from .. import data

    ids = tok(" ".join(data.contexts() + data.prompts()), add_special_tokens=False)["input_ids"]
    while len(ids) < n * n_tok:
        ids = ids + ids
    prompts = data.prompts(n)
    return [dict(prompt=prompts[i], completion=tok.decode(ids[i * n_tok:(i + 1) * n_tok]).strip()) for i in range(n)]


# part c's variants: Config overrides of a 2-epoch kl_rev heal (nll: no barrier at all)
HEAL_VARIANTS = {
    "nll": {},
    "kl_rev": dict(gnorm_every=0),                           # ref cached after epoch 0; the flow also splits 1 step in 10
    "kl_rev_nocache": dict(ref_cache_mb=0, gnorm_every=0),   # reference forward at every step
    "kl_rev_split": dict(ref_cache_mb=0, gnorm_every=1),     # the old step: no cache, two backward passes
}

def heal_worker(args) -> dict:
    """One variant in a fresh process: heal.heal as the flow runs it, 2 epochs of one batch, per step."""
    import torch

    from .. import data
    from .. import heal as heal_mod
    from ..bake import lora_config
    from ..config import Config
    from ..models import load_model
    from ..stack import Stack
    from ..tokens import chat, pack

    if args.threads:
        torch.set_num_threads(args.threads)
    variant = args.worker.split(":", 1)[1]
    with Clock() as c:
        model, tok = load_model(args.model, device=args.device, cache=args.cache)
    load_s = c.s
    cfg = Config(reg="nll" if variant == "nll" else "kl_rev", epochs=2, batch_size=4, val_frac=0.0, max_len=1024,
                 **HEAL_VARIANTS[variant])
    system = data.persona(cfg)["neutral"]
    kept = _heal_inputs(tok, 4, args.heal_tokens)
    b = pack(tok, [chat(tok, k["prompt"], system) for k in kept], [k["completion"] for k in kept], cfg.max_len,
             "cpu", eos=True)
    shape = dict(batch=b["input_ids"].shape[0], columns=b["input_ids"].shape[1],
                 completion_tokens=int(b["cmask"].sum()), prompt_columns=int(b["keep"][0]) + 1)
    stack = Stack(model)
    stack.add("r0", lora_config(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_layers), seed=0)

    # timers around heal()'s pieces, set from outside (no package code edited)
    ev: list[tuple[str, float]] = []
    orig_cl, orig_bw = heal_mod.completion_rows, torch.Tensor.backward

    def timed_cl(model_, batch):
        with Clock() as c:
            out = orig_cl(model_, batch)
        ev.append(("fwd" if torch.is_grad_enabled() else "ref_fwd", c.s))
        return out

    def timed_bw(self, *a, **k):
        with Clock() as c:
            out = orig_bw(self, *a, **k)
        ev.append(("bwd", c.s))
        return out

    def step() -> dict:
        ev.clear()
        with Clock() as c:
            steps = len(heal_mod.heal(stack, tok, kept, cfg.part("heal"), 0, seed=0, system=system).steps)
        fwd = sum(s for k, s in ev if k == "fwd") / steps
        ref = sum(s for k, s in ev if k == "ref_fwd") / steps
        bwd = sum(s for k, s in ev if k == "bwd") / steps
        return dict(total=c.s / steps, fwd=fwd, ref_fwd=ref, bwd=bwd, n_bwd=len([k for k, _ in ev if k == "bwd"]),
                    n_ref=len([k for k, _ in ev if k == "ref_fwd"]), other=c.s / steps - fwd - ref - bwd)

    heal_mod.completion_rows, torch.Tensor.backward = timed_cl, timed_bw
    try:
        rss0, maxrss0 = rss_mb(), maxrss_mb()
        did_reset = reset_peak()
        cold = step()
        peak = maxrss_mb()
        warm = [step()]
    finally:
        heal_mod.completion_rows, torch.Tensor.backward = orig_cl, orig_bw
    best = min(warm, key=lambda x: x["total"])
    out = dict(variant=variant, load_s=load_s, shape=shape, cold=cold, warm=warm, best=best,
               rss_before_mb=rss0, peak_mb=peak, peak_extra_mb=peak - rss0, peak_reset=did_reset,
               maxrss_before_mb=maxrss0, threads=torch.get_num_threads(), load=load1())
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out

def part_c(args, res: dict) -> None:
    out: dict = {}
    variants = tuple(HEAL_VARIANTS)
    # the variants take turns (nll, kl_rev, ..., nll, ...) so a change in background load hits all of them
    for _ in range(max(1, args.reps)):
        for variant in variants:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                path = f.name
            cmd = [sys.executable, "-m", "steer_heal.bench", "--worker", f"heal:{variant}", "--worker-out", path, "--model",
                   args.model, "--cache", args.cache, "--device", args.device, "--threads", str(args.threads),
                   "--heal-tokens", str(args.heal_tokens)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"heal worker {variant} failed:\n{p.stderr[-3000:]}")
            o = json.loads(Path(path).read_text())
            Path(path).unlink()
            prev = out.get(variant)
            o["runs"] = (prev["runs"] if prev else []) + [dict(best=o["best"]["total"], peak_extra_mb=o["peak_extra_mb"],
                                                             load=o["load"])]
            if prev is None or o["best"]["total"] < prev["best"]["total"]:
                out[variant] = o
            else:
                prev["runs"] = o["runs"]
    nll = out["nll"]["best"]["total"]
    rows = []
    for v, o in out.items():
        w = o["best"]
        rows.append([v, o["cold"]["total"], w["total"], w["total"] / nll, w["fwd"], w["ref_fwd"], w["bwd"],
                     w["other"], w["n_ref"], w["n_bwd"], o["peak_extra_mb"], o["peak_mb"], o["load"]])
    sh = out["nll"]["shape"]
    t = {v: out[v]["best"]["total"] for v in variants}
    flow = t["kl_rev"] + (t["kl_rev_split"] - t["kl_rev_nocache"]) / 10  # + the split's cost on 1 step in 10
    res["c"] = dict(out, **{f"ratio_{v}": t[v] / nll for v in variants}, flow_step_s=flow, ratio_flow=flow / nll)
    reset = all(o["peak_reset"] for o in out.values())
    show(f"c. one heal step on {sh['batch']} x {sh['columns']} tokens ({sh['completion_tokens']} completion tokens), "
         f"mean of a 2-epoch heal (2 steps), threads {out['nll']['threads']}, best of {max(1, args.reps)} processes",
         ["variant", "cold_s", "warm_s", "x_vs_nll", "fwd", "ref_fwd", "bwd", "other", "n_ref", "n_bwd",
          "peak_extra_mb", "peak_rss_mb", "load"], rows,
         f"kl_rev / nll = {res['c']['ratio_kl_rev']:.2f}x; with the flow's gnorm split on 1 step in 10: {flow:.2f} s = "
         f"{flow / nll:.2f}x (target <= 1.5x; reference 10.3 / 7.3 s = 1.41x). Variants: " + "; ".join(f"{v}: {kw or 'defaults'}" for v, kw in HEAL_VARIANTS.items()) + ".\n"
         "seconds per step; warm_s: the warm call (each process: one cold call, then one warm); fwd/ref_fwd/bwd: timers "
         "wrapped around heal's completion_rows and Tensor.backward; other: packing, optimizer, KL arithmetic.\n"
         "memory: fresh process per variant, "
         + ("peak RSS mark reset via /proc/self/clear_refs right before the first heal call; peak_extra = "
            "ru_maxrss after - RSS before" if reset else
            "ru_maxrss delta (peak mark could not be reset: a load-time peak may hide the heal's)"))


"""`just bench [--only a,b,...]`: where a round's time goes, measured with the package's own functions.

Parts (each prints one compact table; ratios side by side, same model and inputs in one run):
  a  steered generation (generate.generate, vector from extract.extract on band 0.4-0.6):
     batch 16 vs one prompt at a time on the same 16 prompts, a fixed number of new tokens
  b  filter perplexity (filter.perplexity): batch 16 vs one at a time on the same 16 completions
  c  one heal step (heal.heal, epochs=1, batch_size=4, 4 completions of ~200 tokens, one fresh
     adapter): reg=nll vs kl_rev vs a one-backward kl_rev step, time and peak RSS, each variant
     in a fresh subprocess
  d  eval: evaluate.mfv seconds per vignette, think_tokens 0 vs 8; evaluate.contrast per dilemma
  e  orchestration: one fast-dev round through the real flow in a subprocess (OMP_NUM_THREADS=1),
     (Prefect + store seconds) / round seconds, and the Prefect server start
  f  the per-round Pareto SQL of docs/store.md over a synthetic store of 200 runs x 10 rounds

Every figure carries the 1-minute load average read right after it (other processes may share the
CPU). On a shared 2-core box pass --threads 1 when other torch jobs run: 2-thread torch beside them
slows down several-fold. Methods and the figures of a run are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would garble the tables
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROG = "just bench"
PARTS = "abcdef"
VIGNETTES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mfv_classic_other_violate.jsonl"
PARETO_SQL = """
WITH m AS (
  SELECT run_id, round, stage, nats, coherence FROM stage_metrics
  WHERE evaluator = 'mfv' AND foundation = 'Authority'
), base AS (
  SELECT run_id, any_value(nats) AS base_nats, any_value(coherence) AS base_coherence
  FROM m WHERE stage = 'base' GROUP BY run_id
)
SELECT m.run_id, r.reg, m.stage, m.round,
       m.nats - base.base_nats AS trait_moved,
       m.coherence, m.coherence - base.base_coherence AS coherence_change
FROM m JOIN base USING (run_id) JOIN runs r USING (run_id)
WHERE m.stage <> 'base'
ORDER BY m.run_id, m.stage, m.round;
"""
# env of the flow subprocess (part e): the justfile's quiet, offline defaults
FLOW_ENV = {"HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
            "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model for parts a-d (name as for --model of a run)")
    p.add_argument("--cache", default="out/models", help="model cache folder (smollm2-135m's fp32 copy lives here)")
    p.add_argument("--only", default=",".join(PARTS), help="comma-separated parts to run, e.g. a,b (default: all)")
    p.add_argument("--device", default="auto", help="torch device for parts a-d")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for parts a-d (0: torch's default)")
    p.add_argument("--reps", type=int, default=2, help="timed repeats per measurement in a, b, d (best is reported)")
    p.add_argument("--new-tokens", type=int, default=32, help="part a: new tokens per completion (forced)")
    p.add_argument("--coef", type=float, default=1.0, help="part a: steering coefficient C")
    p.add_argument("--heal-tokens", type=int, default=200, help="part c: tokens per completion")
    p.add_argument("--vignettes", default=str(VIGNETTES), help="part d: vignette JSONL (missing: bundled smoke set)")
    p.add_argument("--n-vignettes", type=int, default=28, help="part d: vignettes (stratified subset)")
    p.add_argument("--runs", type=int, default=200, help="part f: synthetic runs")
    p.add_argument("--rounds", type=int, default=10, help="part f: rounds per synthetic run")
    p.add_argument("--json", default="", help="also write every figure to this JSON file")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: heal variant / orch
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    parts = [x for x in args.only if x not in ", "]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"--only: unknown part(s) {bad}; choose from {','.join(PARTS)}")
    args.parts = [x for x in PARTS if x in parts]
    return args


# ---------------------------------------------------------------- small helpers

def load1() -> float:
    return round(os.getloadavg()[0], 2)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clock:
    """with Clock() as c: ...; c.s is the wall seconds (device synchronised)."""

    def __enter__(self):
        sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync()
        self.s = time.perf_counter() - self.t0


def show(title: str, cols: list[str], rows: list[list], note: str = "") -> None:
    from steer_heal.store import format_table

    fmt = [[round(v, 4) if isinstance(v, float) else v for v in r] for r in rows]
    print(f"\n== {title}  (load now {load1()})")
    print("\n".join(format_table(cols, [tuple(r) for r in fmt]).splitlines()[:-1]))  # drop "(n rows)"
    if note:
        print(note)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM, which ru_maxrss reports) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def machine() -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((int(ln.split()[1]) / 2**20 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), float("nan"))
    return dict(nproc=os.cpu_count(), cpu=cpu, ram_gib=round(mem, 1), python=platform.python_version(),
                torch=torch.__version__, torch_threads=torch.get_num_threads(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS", ""), load=os.getloadavg())


class Ctx:
    """The model, vector and inputs shared by parts a, b and d (loaded once, on first use)."""

    def __init__(self, args):
        self.args, self._model, self._vec, self.completions = args, None, None, None

    @property
    def model(self):
        if self._model is None:
            from steer_heal.models import load_model

            with Clock() as c:
                self._model, self.tok = load_model(self.args.model, device=self.args.device, cache=self.args.cache)
            self.load_s = c.s
            print(f"loaded {self.args.model} in {c.s:.1f} s (load {load1()})")
        return self._model

    @property
    def system(self) -> str:
        from steer_heal import data
        from steer_heal.config import Config

        return data.persona(Config())["neutral"]

    @property
    def vec(self):
        if self._vec is None:
            from steer_heal import data
            from steer_heal.config import Config
            from steer_heal.extract import extract
            from steer_heal.models import band, get_layers

            m = self.model
            self.layers = band((0.4, 0.6), len(get_layers(m)))
            cfg = Config()
            p = data.persona(cfg)
            with Clock() as c:
                self._vec = extract(m, self.tok, p["pos"], p["neg"], data.contexts(), self.layers,
                                    cfg.steer_system, cfg.normalize, cfg.eval_batch)
            self.extract_s, self.extract_load = c.s, load1()
            print(f"extract: layers {self.layers[0]}-{self.layers[-1]}, {len(data.contexts())} contexts x 2 in "
                  f"{c.s:.1f} s (load {self.extract_load})")
        return self._vec


# ---------------------------------------------------------------- a: generation

def _count_generate(model):
    """Wrap model.generate to count the new tokens it returns (rows x new columns) and early stops."""
    counts = {"tokens": 0, "stops": 0}
    orig = model.generate
    stop = {model.generation_config.eos_token_id, model.generation_config.pad_token_id} - {None}

    @functools.wraps(orig)
    def gen(*a, **k):
        ids = orig(*a, **k)
        new = ids[:, k["input_ids"].shape[1]:]
        counts["tokens"] += new.numel()
        counts["stops"] += sum(any(t in stop for t in row) for row in new.tolist())
        return ids

    model.generate = gen  # an instance attribute shadowing the method; deleting it restores the method
    return counts, lambda: model.__dict__.pop("generate", None)


def part_a(ctx: Ctx, res: dict) -> None:
    from steer_heal import data
    from steer_heal.generate import generate

    m, tok, vec, n_new, reps = ctx.model, ctx.tok, ctx.vec, ctx.args.new_tokens, ctx.args.reps
    gc = m.generation_config
    saved = gc.min_new_tokens
    counts, restore = _count_generate(m)
    rows, out = [], {}
    try:
        # generate() has no min_new_tokens knob; the model's generation_config is merged into every
        # model.generate call, so min = max forces exactly n_new tokens per row on both sides.
        gc.min_new_tokens = n_new
        plan = [("steered", 16, 1, True), ("steered", 16, 16, True), ("unsteered", 16, 16, False),
                ("steered", 32, 32, True)]
        for label, n, bs, steered in plan:
            prompts, times = data.prompts(n), []
            for _ in range(reps):
                counts.update(tokens=0, stops=0)
                with Clock() as c:
                    outs = generate(m, tok, prompts, system=ctx.system, vec=vec if steered else None,
                                    coefs=[ctx.args.coef] * n, max_new_tokens=n_new, seed=0, batch=bs)
                times.append(c.s)
            s = min(times)
            key = f"{label}_b{bs}_n{n}"
            out[key] = dict(seconds=s, reps=times, tokens=counts["tokens"], tok_s=counts["tokens"] / s,
                            early_stops=counts["stops"], load=load1())
            rows.append([label, n, bs, counts["tokens"], counts["stops"], s, out[key]["tok_s"], out[key]["load"]])
            if key == "steered_b16_n16":
                ctx.completions = (prompts, outs)
    finally:
        gc.min_new_tokens = saved
        restore()
    base = out["steered_b1_n16"]["tok_s"]
    for r in rows:
        r.insert(7, r[6] / base)
    res["a"] = dict(out, speedup_b16=out["steered_b16_n16"]["tok_s"] / base, coef=ctx.args.coef,
                    layers=ctx.layers, new_tokens=n_new, extract_s=ctx.extract_s, extract_load=ctx.extract_load)
    show(f"a. steered generation, {n_new} new tokens forced per completion (C={ctx.args.coef}, "
         f"layers {ctx.layers[0]}-{ctx.layers[-1]}), best of {reps}",
         ["model", "prompts", "batch", "tokens", "early_stops", "seconds", "tok_s", "x_vs_b1", "load"], rows,
         f"speedup batch 16 vs 1: {res['a']['speedup_b16']:.2f}x (target >= 5x; plain transformers reference "
         "11.6 / 67 / 82 tok/s at batch 1 / 16 / 32)")


# ---------------------------------------------------------------- b: perplexity

def part_b(ctx: Ctx, res: dict) -> None:
    from steer_heal import data
    from steer_heal.config import Config
    from steer_heal.filter import perplexity
    from steer_heal.generate import generate

    m, tok = ctx.model, ctx.tok
    if ctx.completions is None:
        prompts = data.prompts(16)
        ctx.completions = (prompts, generate(m, tok, prompts, system=ctx.system, vec=ctx.vec,
                                             coefs=[ctx.args.coef] * 16, max_new_tokens=ctx.args.new_tokens,
                                             seed=0, batch=16))
    prompts, comps = ctx.completions
    window = Config().ppl_window
    perplexity(m, tok, prompts[:2], comps[:2], ctx.system, window, batch=2)  # warm-up
    rows, out, vals = [], {}, {}
    for bs in (16, 1):
        times = []
        for _ in range(ctx.args.reps + 1):
            with Clock() as c:
                vals[bs] = perplexity(m, tok, prompts, comps, ctx.system, window, batch=bs)
            times.append(c.s)
        s = min(times)
        out[f"b{bs}"] = dict(seconds=s, ms_per_completion=1000 * s / len(comps), reps=times, load=load1())
        rows.append([bs, len(comps), s, 1000 * s / len(comps), out[f"b{bs}"]["load"]])
    diff = max(abs(a - b) / b for a, b in zip(vals[16], vals[1]))
    speed = out["b1"]["seconds"] / out["b16"]["seconds"]
    for r in rows:
        r.insert(4, out["b1"]["seconds"] / r[2])
    res["b"] = dict(out, speedup_b16=speed, max_rel_diff=diff, window=window,
                    ppl_median=statistics.median(vals[16]))
    show(f"b. filter perplexity (tail window {window}), best of {ctx.args.reps + 1}",
         ["batch", "completions", "seconds", "ms_each", "x_vs_b1", "load"], rows,
         f"speedup batch 16 vs 1: {speed:.2f}x; largest relative ppl difference batched vs alone: {diff:.2e}")


# ---------------------------------------------------------------- c: heal step (subprocess per variant)

def _heal_inputs(tok, n: int, n_tok: int) -> list[dict]:
    """n completions of exactly n_tok tokens of bundled text (content does not matter for timing)."""
    from steer_heal import data

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

    import steer_heal.heal as heal_mod
    from steer_heal import data
    from steer_heal.bake import Stack, lora_config
    from steer_heal.config import Config
    from steer_heal.models import chat, load_model, pack

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
    orig_cl, orig_bw = heal_mod.completion_logits, torch.Tensor.backward

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
            steps = len(heal_mod.heal(stack, tok, kept, cfg, 0, seed=0, system=system)["steps"])
        fwd = sum(s for k, s in ev if k == "fwd") / steps
        ref = sum(s for k, s in ev if k == "ref_fwd") / steps
        bwd = sum(s for k, s in ev if k == "bwd") / steps
        return dict(total=c.s / steps, fwd=fwd, ref_fwd=ref, bwd=bwd, n_bwd=len([k for k, _ in ev if k == "bwd"]),
                    n_ref=len([k for k, _ in ev if k == "ref_fwd"]), other=c.s / steps - fwd - ref - bwd)

    heal_mod.completion_logits, torch.Tensor.backward = timed_cl, timed_bw
    try:
        rss0, maxrss0 = rss_mb(), maxrss_mb()
        did_reset = reset_peak()
        cold = step()
        peak = maxrss_mb()
        warm = [step()]
    finally:
        heal_mod.completion_logits, torch.Tensor.backward = orig_cl, orig_bw
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
            cmd = [sys.executable, __file__, "--worker", f"heal:{variant}", "--worker-out", path, "--model",
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
         "wrapped around heal's completion_logits and Tensor.backward; other: packing, optimizer, KL arithmetic.\n"
         "memory: fresh process per variant, "
         + ("peak RSS mark reset via /proc/self/clear_refs right before the first heal call; peak_extra = "
            "ru_maxrss after - RSS before" if reset else
            "ru_maxrss delta (peak mark could not be reset: a load-time peak may hide the heal's)"))


# ---------------------------------------------------------------- d: eval

def part_d(ctx: Ctx, res: dict) -> None:
    from steer_heal import data, evaluate

    path = ctx.args.vignettes if Path(ctx.args.vignettes).is_file() else ""
    vig = data.load_vignettes(path, ctx.args.n_vignettes)
    dil = data.dilemmas("care_vs_authority")
    m, tok = ctx.model, ctx.tok
    evaluate.mfv(m, tok, vig[:2], system=ctx.system, think_tokens=0)  # warm-up
    rows, out = [], {}
    jobs = [(f"mfv_think{k}", f"mfv think {k}", len(vig),
             functools.partial(evaluate.mfv, m, tok, vig, system=ctx.system, think_tokens=k, batch=16)) for k in (0, 8)]
    jobs.append(("contrast", "contrast", len(dil), functools.partial(evaluate.contrast, m, tok, dil,
                                                                    system=ctx.system, batch=16)))
    for key, label, n, fn in jobs:
        times = []
        for _ in range(ctx.args.reps):
            with Clock() as c:
                fn()
            times.append(c.s)
        s = min(times)
        out[key] = dict(seconds=s, per_item=s / n, n=n, reps=times, load=load1())
        rows.append([label, n, s, s / n, out[key]["load"]])
    t0 = out["mfv_think0"]["per_item"]
    for r in rows:
        r.insert(4, r[3] / t0)
    res["d"] = dict(out, vignettes=path or "bundled smoke set")
    show(f"d. eval, {'Clifford' if path else 'bundled smoke'} vignettes (both option orders), batch 16, "
         f"best of {ctx.args.reps}",
         ["evaluator", "items", "seconds", "s_per_item", "x_vs_think0", "load"], rows,
         "the flow runs each evaluator on 2 stages per round (steered, healed) plus base and prompted once")


# ---------------------------------------------------------------- e: orchestration

def orch_worker(args) -> None:
    """Run `python -m steer_heal ...` in this process with timers set from outside the package."""
    from prefect.server.api.server import SubprocessASGIServer

    import steer_heal.run as run_mod
    from steer_heal import cli, store

    ev: list[dict] = []

    def timed(kind: str, name: str, fn, arg: int | None = None):
        @functools.wraps(fn)
        def w(*a, **k):
            t0 = time.time()
            try:
                return fn(*a, **k)
            finally:
                ev.append(dict(kind=kind, name=name if arg is None else f"{name}:{a[arg]}", t0=t0, t1=time.time()))
        return w

    for meth in ("append", "read", "drop", "touch_all"):
        setattr(store.RunLog, meth, timed("store", meth, getattr(store.RunLog, meth), 1 if meth != "touch_all" else None))
    SubprocessASGIServer.start = timed("server", "start", SubprocessASGIServer.start)
    orig_load = run_mod._load_flow

    def load_flow():
        mod = orig_load()
        for name in ("eval_base", "extract_task", "dose_task", "eval_steered", "heal_task", "eval_healed"):
            task = getattr(mod, name)
            task.fn = timed("body", name, task.fn)  # the engine calls task.fn: the stage's own work
            setattr(mod, name, timed("call", name, task))  # the flow calls this: Prefect's task run around it
        mod.State = timed("state", "State", mod.State)
        mod.write_report = timed("report", "write_report", mod.write_report)
        mod.steer_heal = timed("flow", "steer_heal", mod.steer_heal)
        return mod

    run_mod._load_flow = load_flow
    t0 = time.time()
    rc = cli.main(["--preset", "fast-dev", "--n-rounds", "1", "--out", args.worker_out])
    Path(args.worker_out, "bench_events.json").write_text(json.dumps(dict(rc=rc, t_main=t0, events=ev)))
    sys.exit(rc)


def _flow_figures(out: str) -> dict:
    from steer_heal.store import RunLog

    run_id = next(p.name for p in (Path(out) / "runs").iterdir() if p.is_dir())
    log = RunLog(out, run_id)
    rnd = log.read("rounds")[0]
    stages = [x for x in log.read("stages") if x["round"] == 0]
    status = log.read("status")
    ts = {x["status"]: x["ts"].timestamp() for x in status}
    base = next(x for x in log.read("stages") if x["stage"] == "eval_base")
    work = sum(x["seconds"] for x in stages)
    return dict(run_id=run_id, sec_total=rnd["sec_total"], stage_seconds=work,
                stages={x["stage"]: x["seconds"] for x in stages}, gap=rnd["sec_total"] - work,
                flow_seconds=ts["done"] - ts["running"],
                start_to_eval_base=base["ts"].timestamp() - base["seconds"] - ts["running"],
                running_ts=ts["running"], done_ts=ts["done"])


def part_e(args, res: dict) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}
    env.update(FLOW_ENV)
    out = {}
    for mode in ("plain", "timed"):
        tmp = tempfile.mkdtemp(prefix=f"bench-e-{mode}-")
        cmd = ([sys.executable, "-m", "steer_heal", "--preset", "fast-dev", "--n-rounds", "1", "--out", tmp]
               if mode == "plain" else [sys.executable, __file__, "--worker", "orch", "--worker-out", tmp])
        t0 = time.time()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if p.returncode:
            sys.exit(f"flow run ({mode}) failed:\n{p.stderr[-3000:]}")
        fig = _flow_figures(tmp)
        fig.update(wall=wall, t_start=t0, load=load1())
        if mode == "timed":
            fig.update(_events(tmp, fig))
        shutil.rmtree(tmp, ignore_errors=True)  # the run's store and its Prefect home; the figures are in hand
        out[mode] = fig
    pl, tm = out["plain"], out["timed"]
    rows = [
        ["process wall (start to exit)", pl["wall"], tm["wall"], ""],
        ["flow call (status running -> done)", pl["flow_seconds"], tm["flow_seconds"], ""],
        ["  flow start -> eval_base starts", pl["start_to_eval_base"], tm["start_to_eval_base"],
         f"server {tm['server_start']:.2f}, State (model) {tm['state']:.2f}"],
        ["round 0: rounds.sec_total", pl["sec_total"], tm["sec_total"], ""],
        ["  stage seconds (stages table)", pl["stage_seconds"], tm["stage_seconds"], ""],
        ["  sec_total - stage seconds", pl["gap"], tm["gap"], ""],
        ["  Prefect task-run overhead", None, tm["prefect_round"], "sum(call - body), 5 tasks"],
        ["  store appends/reads", None, tm["store_round"], f"{tm['store_ops_round']} ops"],
        ["  (Prefect + store) / round", None, tm["overhead_frac"], "target < 0.10"],
        ["  (sec_total - stages) / round", pl["gap"] / pl["sec_total"], tm["gap"] / tm["sec_total"],
         "store-only estimate"],
        ["after the flow -> process exit", pl["wall"] - (pl["done_ts"] - pl["t_start"]),
         tm["wall"] - (tm["done_ts"] - tm["t_start"]), "report, Prefect shutdown"],
    ]
    res["e"] = out
    show("e. orchestration: one fast-dev round through the real flow, OMP_NUM_THREADS=1",
         ["figure (seconds unless a fraction)", "plain", "timed", "note"], rows,
         "plain: `python -m steer_heal --preset fast-dev --n-rounds 1 --out TMP`, figures from its store; "
         "timed: the same cli.main in a\nsubprocess with timers wrapped around the tasks, RunLog methods and "
         f"the Prefect server start (load at end {pl['load']} / {tm['load']})")


def _events(out: str, fig: dict) -> dict:
    data = json.loads(Path(out, "bench_events.json").read_text())
    ev = data["events"]
    calls = [e for e in ev if e["kind"] == "call" and e["name"] != "eval_base"]
    bodies = [e for e in ev if e["kind"] == "body" and e["name"] != "eval_base"]
    r_start = min(e["t0"] for e in calls)
    r_end = next(e["t1"] for e in ev if e["kind"] == "store" and e["name"] == "append:rounds")
    prefect = sum(c["t1"] - c["t0"] for c in calls) - sum(b["t1"] - b["t0"] for b in bodies)
    store_ev = [e for e in ev if e["kind"] == "store" and r_start <= e["t0"] <= r_end]
    store_s = sum(e["t1"] - e["t0"] for e in store_ev)
    window = r_end - r_start
    base_call = next(e for e in ev if e["kind"] == "call" and e["name"] == "eval_base")
    base_body = next(e for e in ev if e["kind"] == "body" and e["name"] == "eval_base")
    server = sum(e["t1"] - e["t0"] for e in ev if e["kind"] == "server")
    state = sum(e["t1"] - e["t0"] for e in ev if e["kind"] == "state")
    return dict(prefect_round=prefect, store_round=store_s, store_ops_round=len(store_ev), window=window,
                overhead_frac=(prefect + store_s) / fig["sec_total"], overhead_frac_window=(prefect + store_s) / window,
                server_start=server, state=state, eval_base_prefect=(base_call["t1"] - base_call["t0"])
                - (base_body["t1"] - base_body["t0"]),
                store_total=sum(e["t1"] - e["t0"] for e in ev if e["kind"] == "store"),
                store_ops_total=sum(e["kind"] == "store" for e in ev),
                tasks={c["name"]: dict(call=c["t1"] - c["t0"], body=b["t1"] - b["t0"])
                       for c, b in zip(sorted(calls, key=lambda e: e["t0"]), sorted(bodies, key=lambda e: e["t0"]))})


# ---------------------------------------------------------------- f: SQL

def synth_store(root: Path, n_runs: int, n_rounds: int, seed: int = 0) -> int:
    """n_runs runs of n_rounds rounds written with RunLog, shaped like the flow's rows; returns rows written."""
    from steer_heal.config import FOUNDATIONS
    from steer_heal.store import RunLog

    rng = random.Random(seed)
    n = 0
    for i in range(n_runs):
        log = RunLog(root, f"synth-{i:04d}")
        log.touch_all()
        reg = ("nll", "kl_fwd", "kl_rev")[i % 3]
        n += log.append("run_info", dict(model="smollm2-135m", preset="small", reg=reg, seed=i // 3, n_rounds=n_rounds,
                                         config_hash=f"h{i % 12}", config={"reg": reg, "lam": 1.0}, env={}))
        n += log.append("status", dict(status="running", round=0))
        sm = []
        for r, stage in [(-1, "base"), (-1, "prompted")] + [(r, s) for r in range(n_rounds) for s in ("steered", "healed")]:
            ps = [rng.random() for _ in FOUNDATIONS]
            coh = rng.uniform(0.02, 0.2)
            sm += [dict(round=r, stage=stage, evaluator="mfv", foundation=f, prob=p / sum(ps),
                        nats=math.log(p / sum(ps)), coherence=coh, top1_agree=rng.random(), n=28, coef=1.0)
                   for f, p in zip(FOUNDATIONS, ps)]
            sm.append(dict(round=r, stage=stage, evaluator="contrast", foundation="trait", nats=rng.gauss(0, 0.3),
                           n=30, coef=1.0))
        n += log.append("stage_metrics", sm)
        n += log.append("stages", [dict(round=r, stage=s, seconds=rng.uniform(1, 100)) for r in range(n_rounds)
                                   for s in ("extract", "dose", "eval_steered", "heal", "eval_healed")])
        n += log.append("rounds", [dict(round=r, kappa=rng.random(), n_gen=48, n_kept=24, kept_frac=0.5,
                                        auth_nats=rng.gauss(-2, 0.3), coherence=rng.random(), sec_total=100.0)
                                   for r in range(n_rounds)])
        n += log.append("status", dict(status="done", round=n_rounds - 1))
    return n


def part_f(args, res: dict) -> None:
    from steer_heal import store

    with tempfile.TemporaryDirectory(prefix="bench-f-") as root:
        with Clock() as c:
            n = synth_store(Path(root), args.runs, args.rounds)
        write_s, write_load = c.s, load1()
        con_t = []
        for _ in range(3):
            with Clock() as c:
                con = store.connect(root)
            con_t.append(c.s)
            con.close()
        con = store.connect(root)
        q_t, n_rows = [], 0
        for _ in range(6):
            with Clock() as c:
                n_rows = len(con.execute(PARETO_SQL).fetchall())
            q_t.append(c.s)
        # where the time goes: the views the query reads, and the same query joining run_info for reg
        parts = {}
        for label, sql in (("stage_metrics scan (count)", "SELECT count(*) FROM stage_metrics"),
                           ("runs view (all rows)", "SELECT * FROM runs"),
                           ("Pareto SQL with run_info in place of runs", PARETO_SQL.replace(
                               "JOIN runs r USING (run_id)", "JOIN run_info r USING (run_id)"))):
            ts = []
            for _ in range(3):
                with Clock() as c:
                    con.execute(sql).fetchall()
                ts.append(c.s)
            parts[label] = min(ts)
        con.close()
        sq_t = []
        for _ in range(3):
            with Clock() as c:
                store.query(root, PARETO_SQL)
            sq_t.append(c.s)
        n_files = sum(1 for _ in Path(root).glob("runs/*/*.jsonl"))
    out = dict(rows_written=n, files=n_files, write_s=write_s, write_load=write_load, connect=con_t,
               query_first=q_t[0], query_median=statistics.median(q_t[1:]), query_reps=q_t,
               store_query=sq_t, result_rows=n_rows, parts=parts, load=load1())
    res["f"] = out
    rows = [[f"write store (RunLog, {n} rows, {n_files} files)", write_s, write_load],
            ["connect() (views over every table), median of 3", statistics.median(con_t), out["load"]],
            ["Pareto SQL on an open connection, first", q_t[0], out["load"]],
            ["Pareto SQL on an open connection, median of next 5", out["query_median"], out["load"]],
            ["store.query (connect + Pareto SQL), median of 3", statistics.median(sq_t), out["load"]]]
    rows += [[f"  {k}, best of 3", v, out["load"]] for k, v in parts.items()]
    show(f"f. per-round Pareto SQL (docs/store.md) over {args.runs} runs x {args.rounds} rounds -> {n_rows} rows",
         ["step", "seconds", "load"], rows, "target < 1 s")


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        if args.worker == "orch":
            orch_worker(args)
        out = heal_worker(args)
        Path(args.worker_out).write_text(json.dumps(out))
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(f"{PROG}: parts {','.join(args.parts)} on {args.model}; {info['nproc']} CPUs ({info['cpu']}), "
          f"{info['ram_gib']} GiB, torch {info['torch']} with {info['torch_threads']} threads; "
          f"load {' '.join(f'{x:.2f}' for x in info['load'])}")
    res: dict = {"machine": info, "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")}}
    import steer_heal.generate

    steer_heal.generate.tqdm = lambda it, **_: it  # its bar would garble the tables (passes disable= itself)
    ctx = Ctx(args)
    t0 = time.time()
    for part in args.parts:
        fn = {"a": part_a, "b": part_b, "d": part_d}.get(part)
        if fn is not None:
            fn(ctx, res)
        else:
            {"c": part_c, "e": part_e, "f": part_f}[part](args, res)
        sys.stdout.flush()
    res["seconds"] = time.time() - t0
    res["load_end"] = os.getloadavg()
    print(f"\ndone in {res['seconds']:.0f} s; load {' '.join(f'{x:.2f}' for x in res['load_end'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

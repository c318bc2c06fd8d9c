"""Parts a and b of `just bench`: steered generation (batch 16 vs one prompt at a time) and the filter's
perplexity (batched vs one at a time), on the same prompts and completions."""

from __future__ import annotations

import functools
import statistics

from .common import Clock, Ctx, load1, show


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
    from .. import data
    from ..generate import generate

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
                                    coefs=[ctx.args.coef] * n, max_new_tokens=n_new, seeds=list(range(n)), batch=bs)
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
    from .. import data
    from ..config import Config
    from ..filter import perplexity
    from ..generate import generate

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


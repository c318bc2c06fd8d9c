"""Part p of `just bench`: bf16 autocast against fp32, on the same model and inputs (`--bf16 eval|heal`).

eval: evaluate.measure with the small preset's probes on all the vignettes of --vignettes, for base (the
neutral system prompt) and prompted (the persona's), fp32 then bf16: seconds, the largest per-foundation
|nats| difference, trait_nats and coherence differences, and the difference of the stage delta
d = prompted - base, which is what a stage table reads (the issue's tolerance: |d nats| <= 0.01).
heal: heal.heal on 16 completions of 48 tokens (4 held out), 2 epochs, a fresh adapter each time: seconds
and val nll (tolerance: within 1%).
Next to each ratio: this machine's bf16/fp32 matmul rate, from part m when it ran in the same bench, else
from the run's own start-up check (bf16.matmul_rates, 256 x 256): bf16 pays only with bf16 matrix units.
"""

from __future__ import annotations

import copy

from .common import Clock, load1, show


def _eval(ctx, bf16: bool) -> tuple[dict, float]:
    from .. import data
    from ..config import Config
    from ..evaluate import Probe, measure
    from ..presets import preset

    cfg = Config.from_dict(dict(preset("small"), vignettes=ctx.args.vignettes, bf16="eval" if bf16 else "off"))
    probe = Probe.of(cfg.part("probes"))
    probe.texts = []  # the free-text generations are not under autocast
    out, secs = {}, 0.0
    for stage, system in (("base", None), ("prompted", cfg.steer_system.format(persona=data.persona(cfg)["pos"]))):
        with Clock() as c:
            out[stage] = measure(ctx.model, ctx.tok, probe, system=system)
        secs += c.s
    return out, secs


def _heal(ctx, bf16: bool) -> tuple[float | None, float]:
    from .. import data
    from ..bake import lora_config
    from ..config import Config
    from ..heal import heal
    from ..presets import preset
    from ..stack import Stack
    from .heal import _heal_inputs

    cfg = Config.from_dict(dict(preset("small"), val_frac=0.25, bf16="heal" if bf16 else "off"))
    model = copy.deepcopy(ctx.model)
    stack = Stack(model)
    stack.add("r0", lora_config(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_layers, cfg.lora_targets), seed=0)
    kept = [dict(k, ended=True) for k in _heal_inputs(ctx.tok, 16, 48)]
    with Clock() as c:
        res = heal(stack, ctx.tok, kept, cfg.part("heal"), 0, seed=0, system=data.persona(cfg)["neutral"])
    return res.val_nll, c.s


def _matmul(res: dict) -> dict:
    """bf16 and fp32 matmul GFLOP/s: part m's 2048 x 2048 when it ran, else the start-up check's quick one."""
    from ..bf16 import matmul_rates

    m = res.get("m") or matmul_rates()
    src = "part m, 2048x2048" if "m" in res else f"start-up check, {m['n']}x{m['n']}"
    return dict(fp32=m["fp32"], bf16=m["bf16"], ratio=m["bf16"] / m["fp32"], source=src)


def part_p(ctx, res: dict) -> None:
    mm = _matmul(res)
    (f32, s32), (b16, s16) = _eval(ctx, False), _eval(ctx, True)
    load_eval = load1()
    nats = max(abs(f32[s].nats[f] - b16[s].nats[f]) for s in f32 for f in f32[s].nats)
    d = lambda ev, f: ev["prompted"].nats[f] - ev["base"].nats[f]  # noqa: E731
    dn = max(abs(d(f32, f) - d(b16, f)) for f in f32["base"].nats)
    dt = abs((f32["prompted"].trait_nats - f32["base"].trait_nats) - (b16["prompted"].trait_nats - b16["base"].trait_nats))
    trait = max(abs(f32[s].trait_nats - b16[s].trait_nats) for s in f32)
    coh = max(abs(f32[s].coherence - b16[s].coherence) for s in f32)
    (v32, h32), (v16, h16) = _heal(ctx, False), _heal(ctx, True)
    rel = abs(v16 - v32) / abs(v32) if v32 else float("nan")
    res["p"] = dict(eval_s=(s32, s16), nats=nats, d_nats=dn, d_trait=dt, trait=trait, coherence=coh, heal_s=(h32, h16),
                    val_nll=(v32, v16), val_rel=rel, load_eval=load_eval, load=load1(), matmul=mm)
    rate = f"{mm['ratio']:.2f}"
    show("p. bf16 autocast vs fp32", ["what", "fp32 s", "bf16 s", "fp32/bf16", "matmul bf16/fp32", "largest difference",
                                      "tolerance", "holds"], [
        ["eval: base + prompted", s32, s16, s32 / s16, rate, f"nats {nats:.4f}, trait {trait:.4f}, coherence {coh:.5f}", "", ""],
        ["eval: d = prompted - base", "", "", "", "", f"d nats {dn:.4f}, d trait {dt:.4f}", "0.01", str(max(dn, dt) <= 0.01)],
        ["heal: 12 train, 4 val, 2 epochs", h32, h16, h32 / h16, rate, f"val nll {v32:.4f} vs {v16:.4f} ({100 * rel:.2f}%)",
         "1%", str(rel <= 0.01)]],
        note=f"{f32['base'].n} vignettes and {f32['base'].n_trait} dilemmas per stage; load {load_eval} after eval, "
             f"{res['p']['load']} after heal; matmul bf16 {mm['bf16']:.1f} / fp32 {mm['fp32']:.1f} GFLOP/s ({mm['source']}): "
             "fp32/bf16 above 1 needs bf16 matrix units (AVX512-BF16 or AMX on x86, any recent GPU)")

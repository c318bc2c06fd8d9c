"""Part s of `just bench`: how a round's two big costs grow with its inputs, on the tuned path.

eval: evaluate.measure (the small preset's probes, no free text) on 33, 66 and all 132 Clifford vignettes;
heal: heal.heal (small preset: 2 epochs, batch 4) on 8, 16 and 24 kept completions of 48 tokens; and both
on the tiny random model against SmolLM2-135M (33 vignettes, 8 completions).
"""

from __future__ import annotations

import copy

from .common import Clock, load1, show

VIGNETTES = (33, 66, 132)
KEPT = (8, 16, 24)


def _probe(ctx, n: int):
    from ..config import Config
    from ..evaluate import Probe
    from ..presets import preset

    p = Probe.of(Config.from_dict(dict(preset("small"), vignettes=ctx.args.vignettes, n_vignettes=n)).part("probes"))
    p.texts = []
    return p


def eval_seconds(model, tok, probe) -> float:
    from ..evaluate import measure

    with Clock() as c:
        measure(model, tok, probe)
    return c.s


def heal_seconds(model, tok, n: int) -> float:
    from .. import data
    from ..bake import lora_config
    from ..config import Config
    from ..heal import heal
    from ..presets import preset
    from ..stack import Stack
    from .heal import _heal_inputs

    cfg = Config.from_dict(dict(preset("small")))
    model = copy.deepcopy(model)
    stack = Stack(model)
    stack.add("r0", lora_config(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_layers, cfg.lora_targets), seed=0)
    kept = [dict(k, ended=True) for k in _heal_inputs(tok, n, 48)]
    with Clock() as c:
        heal(stack, tok, kept, cfg.part("heal"), 0, seed=0, system=data.persona(cfg)["neutral"])
    return c.s


def part_s(ctx, res: dict) -> None:
    from ..models import load_model

    model, tok = ctx.model, ctx.tok
    rows, out = [], {"eval": {}, "heal": {}, "size": {}}
    for n in VIGNETTES:
        probe = _probe(ctx, n)
        s = eval_seconds(model, tok, probe)
        out["eval"][n] = s
        rows.append(["eval (mfv + contrast)", f"{len(probe.vignettes)} vignettes", s, s / len(probe.vignettes), load1()])
    for n in KEPT:
        s = heal_seconds(model, tok, n)
        out["heal"][n] = s
        rows.append(["heal (2 epochs)", f"{n} kept", s, s / n, load1()])
    show("s. cost against the inputs (SmolLM2-135M, tuned path)", ["stage", "inputs", "seconds", "per item", "load"],
         rows, note="per item: per vignette (the 70 dilemmas' contrast is in every eval) or per kept completion")
    tiny, ttok = load_model("tiny-random", cache=ctx.args.cache)
    rows = []
    for name, (m, t) in (("tiny-random", (tiny, ttok)), (ctx.args.model, (model, tok))):
        params = sum(p.numel() for p in m.parameters()) / 1e6
        e, h = eval_seconds(m, t, _probe(ctx, VIGNETTES[0])), heal_seconds(m, t, KEPT[0])
        out["size"][name] = dict(params_m=params, eval=e, heal=h)
        rows.append([name, round(params, 2), e, h, load1()])
    rows.append(["ratio", round(rows[1][1] / rows[0][1], 1), rows[1][2] / rows[0][2], rows[1][3] / rows[0][3], ""])
    show("s. tiny vs SmolLM2 (33 vignettes; heal on 8 kept)", ["model", "params (M)", "eval s", "heal s", "load"], rows)
    res["s"] = out

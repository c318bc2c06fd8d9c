"""Part d of `just bench`: evaluation seconds per item (mfv with and without thinking, contrast)."""

from __future__ import annotations

import functools
from pathlib import Path

from .common import Clock, Ctx, load1, show


def part_d(ctx: Ctx, res: dict) -> None:
    from .. import contrast, data, mfv

    path = ctx.args.vignettes if Path(ctx.args.vignettes).is_file() else ""
    vig = data.load_vignettes(path, ctx.args.n_vignettes)
    dil = data.dilemmas("care_vs_authority")
    m, tok = ctx.model, ctx.tok
    mfv.mfv(m, tok, vig[:2], system=ctx.system, think_tokens=0)  # warm-up
    rows, out = [], {}
    jobs = [(f"mfv_think{k}", f"mfv think {k}", len(vig),
             functools.partial(mfv.mfv, m, tok, vig, system=ctx.system, think_tokens=k, batch=16)) for k in (0, 8)]
    jobs.append(("contrast", "contrast", len(dil), functools.partial(contrast.contrast, m, tok, dil,
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


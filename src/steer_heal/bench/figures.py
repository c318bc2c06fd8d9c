"""The bench's figures for docs/performance.md, from a `just bench --json FILE` result:
`python -m steer_heal.bench.figures FILE [DIR]` writes DIR/bench-round.png (part r: stage seconds,
old / tuned / batch 1) and DIR/bench-growth.png (part g: forward seconds against baked adapters, gated
and folded, and the fast-dev run's seconds per round), each also as SVG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure

from ..diag.plots import save
from .round import STAGES

COLORS = {"old": "#999999", "tuned": "#1f77b4", "batch1": "#d62728", "gated": "#999999", "folded": "#1f77b4"}


def round_figure(r: dict) -> Figure:
    fig = Figure(figsize=(8, 3.6), layout="constrained")
    ax = fig.add_subplot()
    names = [v for v in ("old", "tuned", "batch1") if v in r]
    w = 0.8 / len(names)
    for j, v in enumerate(names):
        secs = [r[v]["stages"].get(s, 0.0) for s in STAGES]
        ax.bar([i + j * w for i in range(len(STAGES))], secs, w, label=f"{v} (round {r[v]['row']['sec_total']:.0f} s)",
               color=COLORS[v])
    ax.set_xticks([i + w * (len(names) - 1) / 2 for i in range(len(STAGES))], list(STAGES))
    ax.set_ylabel("seconds")
    ax.set_title("one SmolLM2 round by stage (eval_base is round -1)")
    ax.legend(frameon=False)
    return fig


def growth_figure(g: dict) -> Figure:
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    a, b = fig.subplots(1, 2)
    k = [row[0] for row in g["forward"]]
    for col, v in ((1, "gated"), (2, "folded")):
        a.plot(k, [row[col] for row in g["forward"]], "o-", color=COLORS[v], label=v)
    a.set_xlabel("baked adapters (= round index)")
    a.set_ylabel("seconds per forward (16 x 120 tokens)")
    a.set_title("SmolLM2 forward")
    a.set_ylim(bottom=0)
    a.legend(frameon=False)
    for v, secs in g.get("rounds", {}).items():
        b.plot(range(len(secs)), secs, "o-", color=COLORS[v], label=v)
    b.set_xlabel("round")
    b.set_ylabel("seconds")
    b.set_title("a fast-dev run, seconds per round")
    b.set_ylim(bottom=0)
    b.legend(frameon=False)
    return fig


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    res = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1] if len(argv) > 1 else "docs/img")
    if "r" in res:
        print(*save(round_figure(res["r"]), out / "bench-round"))
    if "g" in res:
        print(*save(growth_figure(res["g"]), out / "bench-growth"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

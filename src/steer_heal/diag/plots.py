"""Figures of the diagnostics: plain data in, a matplotlib Figure out, `save` writes PNG and SVG.

Figures are built on matplotlib.figure.Figure directly, not pyplot: no global figure state, no
display backend, safe in a worker thread or a queued job without a screen.
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from ..files import atomic_write_bytes

STAGE_MARKERS = {"base": "o", "prompted": "*", "steered": "^", "healed": "s"}
# the three numbers every evaluation gives, as (key, panel title)
PANELS = (("target_nats", "target nats"), ("trait_nats", "trait nats (contrast)"), ("coherence", "coherence"))
# a run's figure also shows how it writes: free-text perplexity under base, and the steering KL on the kept data
RUN_PANELS = PANELS + (("adapter_ppl", "adapter_ppl (free text, under base)"),
                       ("kl", "KL(steered || unsteered), kept data"))


def save(fig: Figure, stem: Path) -> list[Path]:
    """stem.png and stem.svg, each written atomically so a reader never sees half a file."""
    out = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=120, bbox_inches="tight")
        path = stem.with_suffix(f".{ext}")
        atomic_write_bytes(path, buf.getvalue())
        out.append(path)
    return out


def _colors(labels: list[str]) -> dict[str, str]:
    return {lab: f"C{i % 10}" for i, lab in enumerate(dict.fromkeys(labels))}


def _xy(rows: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = sorted((r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None)
    return [p[0] for p in pts], [p[1] for p in pts]


# ---------------------------------------------------------------- c-sweep

def sweep_figure(trait: list[dict], random: list[dict], dose: float | None, title: str) -> Figure:
    """Each metric against the coefficient: the trait vector as a line, the random vectors of the same
    per-layer norms as a min-max band (rows: {coef, vector, target_nats, trait_nats, coherence})."""
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    for ax, (key, name) in zip(axes, PANELS, strict=True):
        by_coef = defaultdict(list)
        for r in random:
            if r.get(key) is not None:
                by_coef[r["coef"]].append(r[key])
        if by_coef:
            cs = sorted(by_coef)
            ax.fill_between(cs, [min(by_coef[c]) for c in cs], [max(by_coef[c]) for c in cs], color="0.8",
                            label=f"random, same norms (n={len({r['vector'] for r in random})})")
        x, y = _xy(trait, "coef", key)
        ax.plot(x, y, "o-", color="C3", label="trait vector")
        if dose is not None:
            ax.axvline(dose, color="0.4", ls=":", lw=1, label=f"round dose {dose:.3g}")
        ax.set(xlabel="coefficient C", title=name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- Pareto

def pareto_figure(facets: dict[int, list[dict]], title: str, xlabel: str = "trait moved (nats, toward the trait)",
                  ylabel: str = "coherence", grey: dict[str, bool] | None = None) -> Figure:
    """One panel per round: points {label, stage, x, y, front, broken}; the front as a step line, an arrow from
    each label's steered point to its healed point; a broken point crossed (the legend says so). Round -1 points (base, prompted) are references.
    grey: {axis column: True} for an axis resting on a probe at chance (probe_info): its label says so and the
    panel is greyed, so no one reads it as a result."""
    off = [k for k, v in (grey or {}).items() if v]
    if off:
        title += f" -- {', '.join(off)} AT CHANCE on these runs"
    rounds = sorted(facets)
    fig = Figure(figsize=(4.2 * max(1, len(rounds)), 4.0), layout="constrained")
    axes = fig.subplots(1, max(1, len(rounds)), squeeze=False)[0]
    colors = _colors([p["label"] for pts in facets.values() for p in pts])
    for ax, r in zip(axes, rounds, strict=False):
        pts = facets[r]
        for p in pts:
            hollow = p.get("control") not in (None, "none")  # a control run: hollow, in its treatment's family
            ax.scatter(p["x"], p["y"], marker=STAGE_MARKERS.get(p["stage"], "o"), s=60 if p["front"] else 30,
                       facecolors="none" if hollow else colors[p["label"]],
                       edgecolors=colors[p["label"]] if hollow else ("k" if p["front"] else "none"), zorder=3)
            if p.get("broken"):  # under the coherence floor: crossed out, and never on the front
                ax.scatter(p["x"], p["y"], marker="x", s=90, color="k", lw=1.5, zorder=4)
        front = sorted((p["x"], p["y"]) for p in pts if p["front"])
        if front:
            ax.step([x for x, _ in front], [y for _, y in front], where="post", color="k", lw=1, alpha=0.6, zorder=2)
        for lab in dict.fromkeys(p["label"] for p in pts):
            ends = {p["stage"]: p for p in pts if p["label"] == lab}
            if "steered" in ends and "healed" in ends:
                s, h = ends["steered"], ends["healed"]
                ax.annotate("", xy=(h["x"], h["y"]), xytext=(s["x"], s["y"]),
                            arrowprops=dict(arrowstyle="->", color=colors[lab], lw=1.2))
        ax.axvline(0, color="0.6", lw=0.8)
        ax.set(title=f"round {r}", xlabel=xlabel, ylabel=ylabel)
        if off:  # a probe at chance: greyed panel
            ax.set_facecolor("0.92")
            for p in ax.collections:
                p.set_alpha(0.4)
        ax.grid(alpha=0.3)
    handles = [axes[0].scatter([], [], color=c, label=lab) for lab, c in colors.items()]
    handles += [axes[0].scatter([], [], marker=m, color="0.3", label=s) for s, m in STAGE_MARKERS.items()]
    if any(p.get("broken") for pts in facets.values() for p in pts):
        handles.append(axes[0].scatter([], [], marker="x", s=90, color="k", lw=1.5,
                                       label="broken (under the coherence floor): never on the front"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- one run

def run_figure(stages: dict[tuple[int, str], dict], kept: dict[int, float], title: str,
               at_chance: tuple[str, ...] = ()) -> Figure:
    """By round: steered and healed lines, base and prompted as horizontal reference lines, and the
    kept fraction. stages: {(round, stage): {target_nats, trait_nats, coherence, adapter_ppl, kl, broken}},
    round -1 = references; a broken stage's points are crossed. at_chance: the keys whose probe is at chance on
    this model (probe_info): their panels are greyed and say so."""
    fig = Figure(figsize=(3.6 * (len(RUN_PANELS) + 1), 3.6), layout="constrained")
    axes = fig.subplots(1, len(RUN_PANELS) + 1)
    rounds = sorted({r for r, _ in stages if r >= 0})
    for ax, (key, name) in zip(axes, RUN_PANELS, strict=False):
        broken_shown = ax is not axes[0]  # the legend (first panel) names the cross once
        for stage, style in (("base", dict(color="0.4", ls="--")), ("prompted", dict(color="C2", ls=":"))):
            v = stages.get((-1, stage), {}).get(key)
            if v is not None:
                ax.axhline(v, lw=1.2, label=stage, **style)
        for stage, color in (("steered", "C1"), ("healed", "C0")):
            pts = [(r, stages[(r, stage)].get(key)) for r in rounds if (r, stage) in stages]
            pts = [(r, v) for r, v in pts if v is not None]
            if pts:
                ax.plot([r for r, _ in pts], [v for _, v in pts], "o-", color=color, label=stage)
            bad = [(r, v) for r, v in pts if stages[(r, stage)].get("broken")]
            if bad:  # under the coherence floor: crossed, so no one reads it as a trade-off
                ax.scatter([r for r, _ in bad], [v for _, v in bad], marker="x", s=90, color="k", lw=1.5, zorder=4,
                           label=None if broken_shown else "broken (under the coherence floor)")
                broken_shown = True
        ax.set(title=name + (" [AT CHANCE]" if key in at_chance else ""), xlabel="round")
        ax.grid(alpha=0.3)
        if key in at_chance:  # shown, not to be read as a result
            ax.set_facecolor("0.92")
            for ln in ax.lines + ax.collections:
                ln.set_alpha(0.35)
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    ks = sorted(kept)
    ax.bar(ks, [kept[r] for r in ks], color="C0", alpha=0.7)
    ax.set(title="kept fraction", xlabel="round", ylim=(0, 1.05))
    ax.grid(alpha=0.3, axis="y")
    for ax in axes:
        if rounds:
            ax.set_xticks(rounds)
    fig.suptitle(title)
    return fig

"""End-of-run tables: the compact per-round log table and the run's markdown report."""

from __future__ import annotations

import json

from .store import RunLog, atomic_write_bytes

ROUND_COLS = [("round", "r"), ("n_gen", "gen"), ("n_kept", "kept"), ("kappa", "kappa"), ("heal_nll", "heal_nll"),
              ("target_nats", "target"), ("trait_nats", "trait"), ("coherence", "coh"), ("cos_v0", "cos_v0"),
              ("retain", "retain")]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def table(header: list[str], rows: list[list], md: bool = False) -> str:
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: ("| " if md else "") + (" | " if md else "  ").join(c.rjust(w[i]) for i, c in enumerate(r)) + (" |" if md else "")  # noqa: E731
    out = [line(cells[0])]
    if md:
        out.append("|" + "|".join("-" * (x + 2) for x in w) + "|")
    return "\n".join(out + [line(r) for r in cells[1:]])


def round_table(rounds: list[dict], md: bool = False) -> str:
    rows = sorted(rounds, key=lambda x: x["round"])
    return table([h for _, h in ROUND_COLS], [[r.get(c) for c, _ in ROUND_COLS] for r in rows], md)


def by_stage(metrics: list[dict]) -> dict[tuple, dict]:
    """stage_metrics rows -> {(round, stage): {nats: {foundation: nats}, coherence, trait_nats}}."""
    by: dict[tuple, dict] = {}
    for m in metrics:
        d = by.setdefault((m["round"], m["stage"]), {"nats": {}, "coherence": None, "trait_nats": None})
        if m["evaluator"] == "contrast":
            d["trait_nats"] = m["nats"]
        else:
            d["nats"][m["foundation"]] = m["nats"]
            d["coherence"] = m["coherence"]
    return by


def _delta(x, base):
    return None if x is None or base is None else x - base


def write_report(log: RunLog, target: str = "Authority") -> str:
    rounds = log.read("rounds")
    info = (log.read("run_info") or [{}])[-1]
    by = by_stage(log.read("stage_metrics"))
    base = by.get((-1, "base"), {})
    rows = []
    for (r, stage), d in sorted(by.items(), key=lambda x: (x[0][0], ["base", "prompted", "steered", "healed"].index(x[0][1]))):
        t = d.get("nats", {}).get(target)
        bt = base.get("nats", {}).get(target)
        rows.append([r, stage, t, _delta(t, bt), d["trait_nats"], _delta(d["trait_nats"], base.get("trait_nats")),
                     d["coherence"], _delta(d["coherence"], base.get("coherence"))])
    demos = [c for c in log.read("completions") if (c["phase"] or "").startswith("demo")]
    parts = [f"# Run {log.run_id}", "", f"model `{info.get('model')}`, reg `{info.get('reg')}`, seed {info.get('seed')}, "
             f"config hash `{info.get('config_hash')}`", "", "## Rounds", "", round_table(rounds, md=True), "",
             f"## Stages (target = {target})", "",
             table(["round", "stage", "target", "d_target", "trait", "d_trait", "coh", "d_coh"], rows, md=True),
             "", "## Demo generations (greedy)", ""]
    for c in sorted(demos, key=lambda c: (c["idx"], c["round"])):
        parts.append(f"- r{c['round']} {c['phase'][5:]} | {c['prompt'][:80]!r}\n  -> {c['completion']!r}")
    parts += ["", "## Plots and diagnostics", ""] + (_extras(log) or ["none yet: `just plot RUN_ID`, `just csweep RUN_ID` ..."])
    text = "\n".join(parts) + "\n"
    atomic_write_bytes(log.dir / "report.md", text.encode())
    return text


def _extras(log: RunLog) -> list[str]:
    """Links to the run's plots and to every diagnostic that read this run (they may be written later)."""
    out = [f"- [{p.name}](plots/{p.name})" for p in sorted((log.dir / "plots").glob("*.png"))]
    for f in sorted((log.root / "diagnostics").glob("*/diagnostics.jsonl")):
        try:
            d = json.loads(f.read_text().splitlines()[0])
        except (OSError, IndexError, ValueError):
            continue  # a diagnostic being created right now
        if log.run_id in str(d.get("source_run") or "").split(","):
            r = "" if d.get("round") is None else f" round {d['round']}"
            out.append(f"- {d['kind']}{r}: [{f.parent.name}](../../diagnostics/{f.parent.name}/report.md)")
    return out

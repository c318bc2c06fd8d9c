"""Tables: the compact per-round log table, the run's markdown report, and the aligned SQL result table."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from .evaluate import StageEval, stage_order
from .files import atomic_write_bytes
from .store import RunLog

ROUND_COLS = [("round", "r"), ("n_gen", "gen"), ("n_kept", "kept"), ("kappa", "kappa"), ("walk", "walk"),
              ("heal_nll", "heal_nll"),
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


def dose_table(steps: list[dict]) -> str:
    """The dose stage's batches: every probe of the walk, then the collect batches at the settled kappa."""
    return table(["step", "phase", "kappa", "kept", "rate", "accepted"],
                 [[s["step"], s["phase"], s["kappa"], f"{s['n_kept']}/{s['n']}", s["rate"], s["accepted"]] for s in steps])


def _delta(x, base):
    return None if x is None or base is None else x - base


def write_report(log: RunLog, target: str = "Authority") -> str:
    rounds = log.read("rounds")
    info = (log.read("run_info") or [{}])[-1]
    by = StageEval.by_stage(log.read("stage_metrics"))
    base = by.get((-1, "base"), StageEval())
    rows = []
    for (r, stage), d in sorted(by.items(), key=lambda x: stage_order(x[0])):
        t, bt = d.nats.get(target), base.nats.get(target)
        rows.append([r, stage, t, _delta(t, bt), d.trait_nats, _delta(d.trait_nats, base.trait_nats),
                     d.coherence, _delta(d.coherence, base.coherence)])
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


def _cell(v: Any, width: int = 60) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dt.datetime):
        return v.isoformat(sep=" ", timespec="seconds")
    s = str(v).replace("\n", "\\n")
    return s if len(s) <= width else s[: width - 1] + "…"


def format_table(columns: list[str], rows: list[tuple]) -> str:
    """Aligned plain-text table of SQL results (`just sql`); numbers right-aligned, long text cut."""
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)
               for i in range(len(columns))]

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric, strict=True)).rstrip()

    out = [line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)

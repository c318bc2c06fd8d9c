"""tables: the printers of plain-text and markdown tables (the round table, the dose walk, a diagnostic's,
the SQL result table). They format rows they are given and read nothing."""

from __future__ import annotations

import datetime as dt
from typing import Any

from . import informative, intervals

ROUND_COLS = [("round", "r"), ("n_gen", "gen"), ("n_kept", "kept"), ("kappa", "kappa"), ("walk", "walk"),
              ("heal_nll", "heal_nll"),
              ("target_nats", "target"), ("trait_nats", "trait"), ("d_trait", "d_trait vs base (95% CI over items)"),
              ("coherence", "coh"), ("adapter_ppl", "ppl"), ("kl_steer", "kl"), ("cos_v0", "cos_v0"),
              ("retain", "retain"), ("retain_trait", "retain_trait")]


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


def withheld(row: dict, value):
    """A ratio of a round row, or the flag that withheld it (the coherence floor comes before any ratio)."""
    if row.get("broken"):
        return "BROKEN"
    if row.get("steered_broken") and value is None:
        return "broken:steered"
    return value


def round_table(rounds: list[dict], ivs: list[dict] = (), md: bool = False, verdict: dict | None = None) -> str:
    """The per-round table; d_trait is the healed student against base with its paired interval over the run's
    items ('~': holds 0), marked BROKEN when the healed stage is under the coherence floor. verdict: the run's
    informative.usable(probe_info): an uninformative probe's numbers are greyed out (in parentheses)."""
    got = intervals.lookup(ivs)
    body = [[informative.shade(round_cells(r, got), verdict).get(c) for c, _ in ROUND_COLS]
            for r in sorted(rounds, key=lambda x: x["round"])]
    text = table([h for _, h in ROUND_COLS], body, md)
    return text + ("\n" + informative.note(verdict) if informative.note(verdict) else "")


def round_cells(r: dict, got: dict) -> dict:
    """A round row as the table shows it (also the round's Prefect artifact): d_trait with its interval, the
    ratios or the flag that withheld them. got: intervals.lookup() of the run."""
    d_trait = intervals.fmt(got.get((r["round"], "healed", "trait", "base")))
    return dict(r, d_trait=d_trait + (" BROKEN" if r.get("broken") else ""),  # the healed stage's flag
                retain=withheld(r, r.get("retain")), retain_trait=withheld(r, r.get("retain_trait")))


def dose_table(steps: list[dict]) -> str:
    """The dose stage's batches: every probe of the walk, then the collect batches at the settled kappa."""
    return table(["step", "phase", "kappa", "kept", "rate", "accepted"],
                 [[s["step"], s["phase"], s["kappa"], f"{s['n_kept']}/{s['n']}", s["rate"], s["accepted"]] for s in steps])


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

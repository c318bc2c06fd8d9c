"""`just fsck RUN [--fix]`: find the lines of a run's tables that are not rows, and (with --fix) move them aside.

A crash tears at most the last line of a table (log.py); every reader skips that one and refuses any other
(StoreDamaged, file:line). fsck lists both. --fix, under the run's writer lock, moves each damaged line to
the table's side file (<table>.jsonl.aside, byte for byte: nothing is deleted), then takes the run back
to the last round whose rows are all intact: every row of the damaged round and of the rounds after it
moves to the side files too, and a status row says so, so `just resume RUN` redoes exactly those rounds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..files import atomic_write_bytes
from .lock import WriterLock
from .log import RunLog, parse, set_aside
from .schema import TABLES

_ROUND = re.compile(rb'"round":\s*(-?\d+)')
UNROUNDED = ("run_info", "status")  # tables whose rows belong to no round


@dataclass
class Damage:
    table: str
    line: int
    why: str
    round: int | None  # the round the line belonged to, as far as it can be told (None: a run-wide table)


@dataclass
class Report:
    damage: list[Damage] = field(default_factory=list)
    torn: dict[str, int] = field(default_factory=dict)  # table -> bytes of its torn last line

    def back_to(self) -> int | None:
        """The first round that is not intact (rows of it and every later round are redone); None: none."""
        rounds = [d.round for d in self.damage if d.round is not None]
        return min(rounds) if rounds else None


def scan(log: RunLog) -> Report:
    rep = Report()
    for table in log.tables:
        path = log.path(table)
        if not path.exists():
            continue
        lines = path.read_bytes().split(b"\n")
        if lines[-1].strip():
            rep.torn[table] = len(lines[-1])
        last = None  # the round of the row above: a line that names none belongs to that round or a later one
        for i, line in enumerate(lines[:-1]):
            if not line.strip():
                continue
            row, why = parse(line, log.id_col)
            if row is not None:
                last = row.get("round")
                continue
            m = _ROUND.search(line)
            r = None if table in UNROUNDED else int(m.group(1)) if m else (last if last is not None else -1)
            rep.damage.append(Damage(table, i + 1, why, r))
    return rep


def describe(log: RunLog, rep: Report) -> list[str]:
    out = [f"{log.path(d.table)}:{d.line}: {d.why}" + ("" if d.round is None else f" (round {d.round})")
           for d in rep.damage]
    out += [f"{log.path(t)}: torn last line ({n} bytes): a writer in flight or killed; the next append "
            "sets it aside" for t, n in rep.torn.items()]
    if not out:
        out.append(f"run {log.run_id}: every line of every table is a row")
    elif rep.damage and log.kind == "runs" and (k := rep.back_to()) is not None:
        out.append(f"--fix moves the damaged lines aside and takes the run back to {_kept(k)} (rows of rounds >= {k} "
                   f"go aside, then `just resume {log.run_id}` redoes them)")
    return out


def _kept(k: int) -> str:
    return f"round {k - 1}" if k > 0 else "its base eval (no round kept)" if k == 0 else "its start (nothing kept)"


def _move(log: RunLog, table: str, out: Callable[[int, dict | None], bool]) -> int:
    """Rewrite a table without the lines `out(line_no, row)` picks (row None: damaged); they go aside first."""
    path = log.path(table)
    lines = path.read_bytes().split(b"\n")
    keep, aside = [], []
    for i, line in enumerate(lines[:-1]):
        if not line.strip():
            continue
        row = parse(line, log.id_col)[0]
        (aside if out(i + 1, row) else keep).append(line)
    if aside:
        set_aside(path, aside)  # synced before the table loses them
        atomic_write_bytes(path, b"".join(x + b"\n" for x in keep) + lines[-1])
    return len(aside)


def fix(log: RunLog, rep: Report) -> list[str]:
    """Move the damaged lines aside and roll the run back past them; returns what was done."""
    done = []
    with WriterLock(log.dir, "run"):  # a live writer would race the rewrite: refused at once
        bad = {(d.table, d.line) for d in rep.damage}
        k = rep.back_to() if log.kind == "runs" else None  # a diagnostic has no rounds to redo: its damage only
        for table in log.tables:
            if not log.path(table).exists():
                continue
            rolled = k is not None and table not in UNROUNDED and "round" in TABLES[table]
            n = _move(log, table, lambda i, row, t=table, rolled=rolled:
                      (t, i) in bad or (rolled and row is not None and row.get("round") is not None
                                        and row["round"] >= k))
            if n:
                done.append(f"{log.path(table)}: {n} line(s) moved to {log.path(table).name}.aside")
        if k is not None:
            log.append("status", dict(status="interrupted", round=k,
                                      reason=f"fsck --fix: rows of rounds >= {k} moved aside; resume redoes them"))
            done.append(f"run {log.run_id} taken back to {_kept(k)}: `just resume {log.run_id}` redoes the rest")
    return done

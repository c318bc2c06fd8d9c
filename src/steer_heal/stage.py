"""A round's stages as the store knows them, and the one way a stage runs: `run_stage()`.

Each stage is declared once below (`STAGES`): its name (one `StageName`: the store marker, the Prefect task
name, the bench's label), the rows of its round it owns, how a finished stage is read back as its own result
type, and when it counts as finished. `run_stage()` does, for every stage alike: the resume guard, the
read-back, dropping the rows a crashed attempt left, the work, its writes and crash points in order, and the
marker. A stage writes its rows, then its marker in `stages`; a marked stage is read back, an unmarked one
has its partial rows dropped and is redone with the same seeds (seeds.py), so a resume stores each row once.

The flow (flow.py) gives each stage its work; the work returns `Done(value, writes)` (or an `Outcome` that
ends the run: starved, failed), and touches the store only through those writes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from . import student
from .config import Config
from .evaluate import StageEval
from .status import Outcome
from .store import RunLog


class StageName(StrEnum):
    """A stage's one name: its value is the store marker (`eval_steered`), `.task` the Prefect task name."""
    EVAL_BASE = "eval_base"
    EXTRACT = "extract"
    DOSE = "dose"
    EVAL_STEERED = "eval_steered"
    HEAL = "heal"
    EVAL_HEALED = "eval_healed"

    @property
    def task(self) -> str:
        """Its Prefect task's name (a task run adds -r<round>, prefect_ui.py): eval-steered."""
        return self.value.replace("_", "-")

    @property
    def tasks(self) -> tuple[str, ...]:
        """The Prefect tasks its stored seconds cover: heal's include the bake that finishes it."""
        return (self.task, BAKE_TASK) if self is StageName.HEAL else (self.task,)


BAKE_TASK = "bake"  # the second half of the heal stage, a task of its own (flow.bake_task)

Rows = Callable[[dict], bool]  # which of a round's rows of a table a stage owns


def _all(_: dict) -> bool:
    return True


def _evals(*labels: str) -> tuple[tuple[str, Rows], ...]:
    """An evaluation's rows: its means, its items and its free-text generations (phase demo:<label>)."""
    return (("stage_metrics", lambda x: x["stage"] in labels), ("eval_items", lambda x: x["stage"] in labels),
            ("completions", lambda x: x["phase"] in {f"demo:{s}" for s in labels}))


def _eval(label: str) -> Callable[[RunLog, int, Config], StageEval]:
    return lambda log, r, cfg: student.stored_evals(log).get((r, label), StageEval())


@dataclass(frozen=True)
class Stage:
    name: StageName
    rows: tuple[tuple[str, Rows], ...]               # (table, which rows of the round): dropped before a redo
    read_back: Callable[[RunLog, int, Config], Any]  # a finished stage's result, as its own type
    done_row: str = ""  # "": finished once marked in `stages`; else once its round has a row in this table


STAGES: dict[StageName, Stage] = {s.name: s for s in (
    Stage(StageName.EVAL_BASE, (*_evals("base", "prompted"), ("intervals", _all), ("probe_info", _all)), _eval("base")),
    Stage(StageName.EXTRACT, (("vectors", _all),), lambda log, r, cfg: student.stored_vector(log, r)),
    Stage(StageName.DOSE, (("completions", lambda x: x["phase"] in ("probe", "collect")), ("dose_steps", _all),
                           ("yoke", _all)),
          student.stored_dose),
    Stage(StageName.EVAL_STEERED, _evals("steered"), _eval("steered")),
    # heal is finished once bake stored its adapters row (the adapter file, hash-checked, is what a resume
    # trusts; retraining would be waste): bake then marks heal, and a crash between the two is still healed
    Stage(StageName.HEAL, (("heal_steps", _all),), lambda log, r, cfg: student.stored_heal(log, r, cfg),
          done_row="adapters"),
    Stage(StageName.EVAL_HEALED, _evals("healed"), _eval("healed")),
)}

# what a stage stores, in order: (table, rows) appends, where rows may be a callable called at its turn
# (rows computed from the ones stored before), and crash point names (crash_point)
Write = tuple[str, list[dict] | dict | Callable[[], list[dict] | dict]] | str


@dataclass
class Done:
    """A stage's work, done: its result and its writes."""
    value: Any
    writes: list[Write] = field(default_factory=list)


class Ledger:
    """Which of a run's stages are finished, read from the store once and kept as they are marked."""

    def __init__(self, log: RunLog):
        self.log = log
        self.marked = {(r["round"], r["stage"]) for r in log.read("stages")}

    def row(self, table: str, r: int) -> dict | None:
        return next((x for x in self.log.read(table) if x["round"] == r), None)

    def finished(self, name: StageName, r: int) -> bool:
        """The one resume rule: a stage's marker is stored (or, for heal, its done_row)."""
        done_row = STAGES[name].done_row
        return self.row(done_row, r) is not None if done_row else (r, name) in self.marked

    def mark(self, r: int, name: StageName, seconds: float) -> None:
        self.log.append("stages", dict(round=r, stage=str(name), seconds=seconds))
        self.marked.add((r, name))

    def forget(self, r: int, name: StageName) -> None:
        """Drop rows a crashed attempt at this stage left behind, before redoing it."""
        for table, which in STAGES[name].rows:
            self.log.drop(table, lambda x, which=which: x["round"] == r and which(x))


def store(log: RunLog, writes: Iterable[Write]) -> None:
    for w in writes:
        if isinstance(w, str):
            crash_point(w)
        else:
            table, rows = w
            log.append(table, rows() if callable(rows) else rows)


def run_stage(ledger: Ledger, name: StageName, r: int, cfg: Config, work: Callable[[], Done | Outcome]) -> Any:
    """Stage `name` of round r: read back when finished, else its partial rows dropped, its work done, its
    writes stored and (unless its done_row finishes it) its marker. An Outcome (starved, failed) is returned
    as it is: nothing more is stored, and the run ends."""
    stage = STAGES[name]
    if ledger.finished(name, r):
        return stage.read_back(ledger.log, r, cfg)
    ledger.forget(r, name)
    t = time.time()
    out = work()
    if isinstance(out, Outcome):
        return out
    store(ledger.log, out.writes)
    if not stage.done_row:
        ledger.mark(r, name, time.time() - t)
    return out.value


def crash_point(where: str) -> None:
    """Fault injection for crash-and-resume tests: STEER_HEAL_KILL_AT=<where> SIGKILLs the whole process
    group here (its Prefect server, in a session of its own, follows its parent), like a power cut would.
    Points sit inside each stage after its first stored rows (tests/test_faults.py, tests/test_flow_pins.py):
    eval_base:base, eval_<label>:rR:demo and :metrics (every evaluation), extract:rR:saved, dose:rR:stepS,
    dose:rR:completions, heal:rR:stepS, heal:rR:steps, bake:rR:saved, bake:rR:adapter, rows:rR.
    In a sweep cell, the Prefect worker that started this process goes first."""
    if os.environ.get("STEER_HEAL_KILL_AT") == where:
        if os.environ.get("PREFECT__WORKER_NAME"):
            os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
        os.killpg(os.getpgid(0), signal.SIGKILL)

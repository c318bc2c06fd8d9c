"""stage.run_stage and status.RunStatus: the one resume rule and the one run-status vocabulary.

- A finished stage is read back as its own result type; its work is not run again.
- An unfinished stage's partial rows are dropped and the stage is redone with the same seeds: each row
  once, the same values (the real flow's dose stage on the tiny model, in-process).
- Heal counts as done once its adapters row exists, marker or not (the one special rule, in STAGES).
- Status rows as every steer-heal version wrote them read back unchanged; `finished` is the one rule.
"""

from __future__ import annotations

import pytest
import torch

from steer_heal import flow
from steer_heal.config import Config
from steer_heal.heal import HealResult
from steer_heal.presets import preset
from steer_heal.stage import STAGES, Done, Ledger, StageName, run_stage
from steer_heal.status import Outcome, RunStatus, finished
from steer_heal.store import RunLog

VOLATILE = {"ts", "run_id", "seconds"}


def _cfg(tmp_path) -> Config:
    return Config(**preset("fast-dev")).replace(out=str(tmp_path), n_vignettes=7, n_keep=6, min_train=2,
                                                max_new_tokens=8, ppl_tau=1e9)


def _rows(log: RunLog, table: str, r: int) -> list[dict]:
    return [{k: v for k, v in x.items() if k not in VOLATILE} for x in log.read(table) if x["round"] == r]


def _never(*_):
    raise AssertionError("a finished stage was computed again")


def test_a_marked_stage_is_read_back_and_an_unmarked_ones_partial_rows_are_redone_once(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    run = flow.Run(cfg, "s")
    v = flow.extract_task.fn(run, 0).vector
    first = flow.dose_task.fn(run, 0)
    comps, steps = _rows(run.log, "completions", 0), _rows(run.log, "dose_steps", 0)
    assert comps and steps and {(0, "extract"), (0, "dose")} <= run.ledger.marked
    # what a kill at dose:r0:completions leaves: the completions stored, no dose_steps, no marker
    run.log.drop("dose_steps", lambda x: True)
    run.log.drop("stages", lambda x: x["stage"] == "dose")

    again = flow.Run(cfg, "s")  # a resume: a fresh process reads the ledger from the store
    monkeypatch.setattr(flow, "extract", _never)  # extract is marked: read back, hash-checked
    v2 = flow.extract_task.fn(again, 0).vector
    assert v2.keys() == v.keys() and all(torch.equal(v[k], v2[k]) for k in v)
    second = flow.dose_task.fn(again, 0)
    assert _rows(again.log, "completions", 0) == comps  # each row once, the same seeds drawn again
    assert _rows(again.log, "dose_steps", 0) == steps
    assert (second.coef, [x["completion"] for x in second.kept]) == (first.coef, [x["completion"] for x in first.kept])
    # now marked: read back as a DoseResult, the walk not run
    monkeypatch.setattr(flow, "dose_walk", _never)
    last = flow.Run(cfg, "s")
    flow.extract_task.fn(last, 0)
    third = flow.dose_task.fn(last, 0)
    assert type(third) is type(first) and third.coef == second.coef
    assert [(x["prompt"], x["completion"]) for x in third.kept] == [(x["prompt"], x["completion"]) for x in second.kept]


def test_heal_is_finished_by_its_adapters_row_and_other_stages_by_their_marker(tmp_path):
    cfg = Config(**preset("fast-dev"))
    log = RunLog(tmp_path, "h")
    ledger = Ledger(log)
    assert not ledger.finished(StageName.HEAL, 0)
    log.append("adapters", dict(round=0, path="adapters/round_0.safetensors", sha256="0" * 64))
    assert ledger.finished(StageName.HEAL, 0) and not ledger.finished(StageName.HEAL, 1)
    assert isinstance(run_stage(ledger, StageName.HEAL, 0, cfg, _never), HealResult)
    # a marker-finished stage: the marker alone decides, read back without its work
    assert not ledger.finished(StageName.EVAL_HEALED, 0)
    ledger.mark(0, StageName.EVAL_HEALED, 1.0)
    assert Ledger(log).finished(StageName.EVAL_HEALED, 0)  # as a resume reads it
    run_stage(Ledger(log), StageName.EVAL_HEALED, 0, cfg, _never)
    # an unmarked stage runs its work, stores its writes in order and is marked; an Outcome stores nothing
    out = run_stage(ledger, StageName.EVAL_STEERED, 0, cfg, lambda: Done(7, [("intervals", lambda: [])]))
    assert out == 7 and ledger.finished(StageName.EVAL_STEERED, 0)
    stop = Outcome(RunStatus.STARVED, "kept 0 of 8")
    assert run_stage(ledger, StageName.DOSE, 0, cfg, lambda: stop) is stop
    assert not Ledger(log).finished(StageName.DOSE, 0)


def test_one_stage_vocabulary():
    assert list(STAGES) == list(StageName)
    assert [s.task for s in StageName] == ["eval-base", "extract", "dose", "eval-steered", "heal", "eval-healed"]
    assert StageName.HEAL.tasks == ("heal", "bake") and StageName.DOSE.tasks == ("dose",)
    assert [flow.eval_base.name, flow.extract_task.name, flow.eval_steered.name] == \
        ["eval-base", "extract", "eval-steered"]


OLD_ROWS = [dict(status="running", reason=""), dict(status="running", reason="resumed"), dict(status="done", reason=""),
            dict(status="stopped", reason="healed coherence 0.001 < coh_floor 0.5"),
            dict(status="starved", reason="the filter kept 0 of 8 completions at every dose"),
            dict(status="failed", reason="HealError: loss is nan"), dict(status="interrupted", reason="Ctrl-C")]


def test_run_status_reads_back_stored_status_rows_unchanged(tmp_path):
    log = RunLog(tmp_path, "st")
    log.append("status", OLD_ROWS)  # as steer-heal has always written them: plain strings
    back = [Outcome.of_row(x) for x in log.read("status")]
    assert [x.row() for x in back] == OLD_ROWS
    assert [str(x) for x in back][3] == "stopped: healed coherence 0.001 < coh_floor 0.5"
    assert Outcome.of_row(None) is None and Outcome.of_row(dict(status=None)).status is RunStatus.RUNNING
    with pytest.raises(ValueError):
        Outcome.of_row(dict(status="starved:kept 0"))  # the old in-flow string was never a stored status


@pytest.mark.parametrize("status, rounds, n_rounds, want", [
    ("done", 2, 2, True), ("done", 1, 2, False), ("done", 1, None, True), ("stopped", 0, 3, True),
    ("starved", 0, 3, True), ("failed", 3, 3, False), ("interrupted", 3, 3, False), ("running", 3, 3, False),
    ("stale", 3, 3, False), (None, 0, 3, False)])
def test_finished_is_one_rule_for_the_runner_the_sweep_and_seeds(status, rounds, n_rounds, want):
    from steer_heal.sweep.state import StoreState

    assert finished(status, rounds, n_rounds) is want
    assert finished(None if status is None else Outcome.of_row(dict(status=status)), rounds, n_rounds) is want
    if n_rounds is not None:
        assert StoreState(status, "", rounds).finished(n_rounds) is want

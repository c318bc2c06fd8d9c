"""The flow pinned on the tiny model (real subprocess runs, as in test_flow.py).

- A SIGKILL inside a stage after it has stored some of its rows (stage.crash_point names each window),
  then a resume: every table ends exactly as in the uninterrupted run, each row once.
- The round row is its stored stage rows put through spec.md's formulas.
- coh_floor stops the run after the round whose healed coherence falls under it, and not before.

Each kill test costs ~40 s (a killed run and its resume); one runs by default, the rest with --slow.
"""

from __future__ import annotations

import json
import math
import signal

import pytest
from test_flow import ARGS, steer_heal

from steer_heal.store import RunLog

# coherence on the tiny random model is ~0.007: 1e-6 never stops the reference, 0.5 stops after round 0
RUN = [*ARGS, "--coh-floor", "1e-6"]
TABLES = ("rounds", "stage_metrics", "completions", "heal_steps", "dose_steps", "stages", "adapters")
VOLATILE = {"run_id", "ts", "created", "seconds", "sec_extract", "sec_dose", "sec_heal", "sec_eval", "sec_total"}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("pins_ref")
    rc, _, se = steer_heal(out, *RUN, "--run-id", "ref")
    assert rc == 0, se[-3000:]
    return RunLog(out, "ref")


def _rows(log: RunLog, table: str) -> list[dict]:
    rows = [{k: v for k, v in r.items() if k not in VOLATILE} for r in log.read(table)]
    return sorted(rows, key=lambda r: json.dumps({k: v for k, v in r.items() if not isinstance(v, float)},
                                                 sort_keys=True, default=str))


def assert_same_store(a: RunLog, b: RunLog) -> None:
    """Every table of b holds the rows of a: the same count (nothing twice, nothing lost) and the same values."""
    for table in TABLES:
        x, y = _rows(a, table), _rows(b, table)
        assert len(y) == len(x), f"{table}: {len(y)} rows, the uninterrupted run has {len(x)}"
        for i, (r, s) in enumerate(zip(x, y)):
            assert r.keys() == s.keys()
            for k in r:
                if isinstance(r[k], float):
                    assert s[k] == pytest.approx(r[k], rel=1e-5, abs=1e-6), (table, i, k)
                else:
                    assert s[k] == r[k], (table, i, k)


KILLS = [
    "heal:r1:steps",            # heal_steps stored, the adapter not yet baked
    pytest.param("eval_healed:r1:metrics", marks=pytest.mark.slow),  # healed means stored, its items not yet
    pytest.param("dose:r1:completions", marks=pytest.mark.slow),     # completions stored, dose_steps not
    pytest.param("eval_steered:r1:metrics", marks=pytest.mark.slow),  # steered rows stored, stage not marked
    pytest.param("bake:r1:adapter", marks=pytest.mark.slow),          # adapters row stored, heal not marked
]


@pytest.mark.parametrize("kill_at", KILLS)
def test_kill_inside_a_stage_then_resume_stores_every_row_once(ref, tmp_path, kill_at):
    rc, _, se = steer_heal(tmp_path, *RUN, "--run-id", "k", kill_at=kill_at)
    assert rc == -signal.SIGKILL, se[-2000:]
    log = RunLog(tmp_path, "k")
    stage = kill_at.split(":")[0]
    assert log.read("status")[-1]["status"] == "running"
    assert (1 if stage != "eval_base" else -1, stage) not in {(r["round"], r["stage"]) for r in log.read("stages")}
    rc, _, se = steer_heal(tmp_path, "--resume", "k")
    assert rc == 0, se[-3000:]
    assert_same_store(ref, log)


def test_round_rows_are_their_stored_stage_rows_through_spec_formulas(ref):
    """Against the stored rows, independent of metrics.round_row: a swap of healed and steered, or of a
    stage's rows, in the flow shows up here."""
    nats, coh, trait = {}, {}, {}
    for m in ref.read("stage_metrics"):
        key = (m["round"], m["stage"])
        if m["evaluator"] == "contrast":
            trait[key] = m["nats"]
        elif m["foundation"] == "Authority":  # the fast-dev persona's target
            nats[key], coh[key] = m["nats"], m["coherence"]
    rounds = sorted(ref.read("rounds"), key=lambda r: r["round"])
    assert [r["round"] for r in rounds] == [0, 1]
    b = (-1, "base")
    for row in rounds:
        h, s = (row["round"], "healed"), (row["round"], "steered")
        assert (row["target_nats"], row["coherence"], row["trait_nats"]) == (nats[h], coh[h], trait[h])
        assert (row["steered_target_nats"], row["steered_coherence"], row["steered_trait_nats"]) == \
            (nats[s], coh[s], trait[s])
        for col, (num, den) in {"retain": (nats[h] - nats[b], nats[s] - nats[b]),
                                "retain_trait": (trait[h] - trait[b], trait[s] - trait[b]),
                                "coh_cost": (coh[h] - coh[b], nats[h] - nats[b])}.items():
            want = num / den if abs(den) >= 0.05 else None
            if row.get("broken"):  # issue 14: a collapsed stage gets no ratio
                assert row[col] is None
            else:
                assert row[col] == (None if want is None else pytest.approx(want, rel=1e-9)), col
        steps = [x for x in ref.read("heal_steps") if x["round"] == row["round"]]
        last = [x["nll"] for x in steps if x["epoch"] == max(y["epoch"] for y in steps)]
        assert row["heal_nll"] == pytest.approx(sum(last) / len(last))
        made = [x for x in ref.read("completions") if x["round"] == row["round"] and x["phase"] in ("probe", "collect")]
        assert row["n_gen"] == len(made) and row["kept_frac"] == pytest.approx(sum(x["keep"] for x in made) / len(made))
        accepted = [x["kappa"] for x in ref.read("dose_steps") if x["round"] == row["round"] and x["accepted"]]
        assert row["kappa"] == max(accepted)
    assert not math.isnan(rounds[0]["cos_v0"]) and rounds[0]["cos_v0"] == pytest.approx(1.0)


def test_coh_floor_stops_the_run_after_the_round_that_fell_under_it(ref, tmp_path):
    assert ref.read("status")[-1]["status"] == "done"  # 1e-6 is under the tiny model's coherence: no stop
    rc, _, se = steer_heal(tmp_path, *ARGS, "--run-id", "f", "--coh-floor", "0.5")
    assert rc == 0, se[-3000:]
    log = RunLog(tmp_path, "f")
    last = log.read("status")[-1]
    assert last["status"] == "stopped" and "< coh_floor 0.5" in last["reason"]
    assert [r["round"] for r in log.read("rounds")] == [0]  # round 0 kept, round 1 never started
    assert max(r["round"] for r in log.read("stages")) == 0
    assert (log.dir / "report.md").is_file()

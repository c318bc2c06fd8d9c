"""The Prefect flow end to end on the tiny model: rows, views, crash-and-resume, resume rules.

Each run is a real subprocess in its own session, so a SIGKILL takes its Prefect
server down with it and nothing is left behind.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from steer_heal.store import RunLog, query

ARGS = ["--preset", "fast-dev", "--n-vignettes", "7", "--n-prompts", "6", "--n-keep", "4", "--min-train", "2",
        "--probe-size", "4", "--gen-batch", "4", "--max-new-tokens", "8", "--bisect-steps", "1",
        "--max-batches", "2", "--epochs", "2", "--batch-size", "2", "--n-demo", "1", "--seed", "3"]
SKIP = {"run_id", "sec_extract", "sec_dose", "sec_heal", "sec_eval", "sec_total"}


def steer_heal(out, *args, kill_at=None, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PREFECT_HOME", None)
    env.pop("PREFECT_API_URL", None)
    if kill_at:
        env["STEER_HEAL_KILL_AT"] = kill_at
    p = subprocess.Popen([sys.executable, "-m", "steer_heal", "--out", str(out), *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        so, se = p.communicate(timeout=timeout)
    finally:
        try:  # whatever happened, no Prefect server outlives the test
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return p.returncode, so, se


def rounds(out, run_id):
    rows = sorted(RunLog(out, run_id).read("rounds"), key=lambda r: r["round"])
    return [{k: v for k, v in r.items() if k not in SKIP} for r in rows]


def assert_same_rounds(a, b):
    assert [r["round"] for r in a] == [r["round"] for r in b]
    for x, y in zip(a, b):
        for k in x:
            if isinstance(x[k], float):
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), k
            else:
                assert x[k] == y[k], k


def test_two_round_flow_writes_rows_and_views(ref):
    cols, rows = query(ref, "SELECT round, auth_nats, coherence, trait_nats, kept_frac, kappa, n_gen, n_kept "
                            "FROM rounds WHERE run_id = 'ref' ORDER BY round")
    assert [r[0] for r in rows] == [0, 1] and all(r[1] is not None and 0 <= r[2] <= 1 for r in rows)
    _, st = query(ref, "SELECT round, stage, count(*) FROM stage_metrics GROUP BY ALL ORDER BY ALL")
    assert {(r, s) for r, s, _ in st} == {(-1, "base"), (-1, "prompted"), (0, "steered"), (0, "healed"),
                                          (1, "steered"), (1, "healed")}
    assert all(n == 8 for *_, n in st)  # 7 foundations + the contrast probe
    _, c = query(ref, "SELECT count(*), count(*) FILTER (WHERE keep), count(DISTINCT round) FROM completions "
                      "WHERE phase IN ('probe', 'collect')")
    assert c[0][0] >= c[0][1] >= 8 and c[0][2] == 2
    _, h = query(ref, "SELECT count(*), count(val_nll) FROM heal_steps")
    assert h[0][0] > 0
    _, runs = query(ref, "SELECT run_id, status, rounds_done FROM runs")
    assert runs == [("ref", "done", 2)]
    info = RunLog(ref, "ref").read("run_info")[0]
    assert info["config"]["reg"] == "kl_rev" and info["env"]["torch"] and len(info["config_hash"]) == 16
    assert (ref / "runs" / "ref" / "report.md").read_text().count("| 1 |") >= 1


def test_finished_run_resume_is_a_noop(ref):
    before = (ref / "runs" / "ref" / "rounds.jsonl").read_bytes()
    rc, so, se = steer_heal(ref, "--resume", "ref")
    assert rc == 0 and "nothing to do" in se
    assert (ref / "runs" / "ref" / "rounds.jsonl").read_bytes() == before


@pytest.mark.parametrize("kill_at", ["dose:r1:step0", "heal:r1:step2"])
def test_sigkill_mid_round_then_resume_matches_uninterrupted(ref, tmp_path, kill_at):
    rc, _, _ = steer_heal(tmp_path, *ARGS, "--run-id", "k", kill_at=kill_at)
    assert rc == -signal.SIGKILL
    log = RunLog(tmp_path, "k")
    assert [r["round"] for r in log.read("rounds")] == [0]  # round 0 survived, round 1 did not finish
    assert log.read("status")[-1]["status"] == "running"
    rc, so, se = steer_heal(tmp_path, "--resume", "k")
    assert rc == 0, se[-3000:]
    assert_same_rounds(rounds(ref, "ref"), rounds(tmp_path, "k"))
    _, n = query(tmp_path, "SELECT count(*) FROM heal_steps WHERE round = 1")
    _, m = query(ref, "SELECT count(*) FROM heal_steps WHERE round = 1")
    assert n == m  # no duplicated rows from the crashed attempt


def test_resume_refuses_changed_experiment_and_accepts_more_rounds(ref, tmp_path):
    import shutil

    shutil.copytree(ref / "runs" / "ref", tmp_path / "runs" / "ref")
    rc, _, se = steer_heal(tmp_path, "--resume", "ref", "--reg", "nll", "--lam", "2")
    assert rc == 2 and "--reg" in se and "--lam" in se and "Traceback" not in se
    rc, _, se = steer_heal(tmp_path, "--resume", "ref", "--n-rounds", "3")
    assert rc == 0, se[-3000:]
    got = rounds(tmp_path, "ref")
    assert [r["round"] for r in got] == [0, 1, 2]
    assert_same_rounds(rounds(ref, "ref"), got[:2])
    assert json.loads((tmp_path / "runs" / "ref" / "run_info.jsonl").read_text().splitlines()[0])["n_rounds"] == 2


def test_prefect_home_starts_from_a_migrated_template(tmp_path):
    """A fresh run's Prefect home gets its own copy of a migrated database (saves the server ~12 s)."""
    import sqlite3

    from steer_heal.run import prefect_home

    home = prefect_home(tmp_path / "prefect")
    db = home / "prefect.db"
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM flow_run").fetchone()[0] == 0
    finally:
        con.close()
    db.write_bytes(db.read_bytes() + b"")  # a resumed run keeps its own file: not copied over again
    before = db.stat().st_mtime_ns
    prefect_home(tmp_path / "prefect")
    assert db.stat().st_mtime_ns == before

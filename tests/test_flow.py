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
        "--probe-size", "4", "--collect-size", "4", "--gen-batch", "4", "--max-new-tokens", "8", "--bisect-steps", "1",
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
    # 7 foundations + the contrast probe + the free text (+ the steering KL for steered)
    assert {(s, n) for _, s, n in st} == {("base", 9), ("prompted", 9), ("steered", 10), ("healed", 9)}
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


def test_stage_means_equal_their_items_and_intervals_and_flags_are_stored(ref):
    """Every stored stage mean is the mean of its eval_items (target_nats = log of mean p_target, not a mean of
    logs); every stage delta has its paired interval; each round row says whether a stage broke the floor."""
    _, got = query(ref, """
        WITH i AS (SELECT round, stage, ln(avg(p_target) FILTER (evaluator = 'mfv')) AS t,
                          avg(ln(p_target)) FILTER (evaluator = 'mfv') AS mean_log,
                          avg(pmass) FILTER (evaluator = 'mfv') AS coh, avg(diff) FILTER (evaluator = 'contrast') AS trait,
                          avg(ppl) FILTER (evaluator = 'freetext') AS ppl, avg(kl) FILTER (evaluator = 'kl') AS kl,
                          count(*) FILTER (evaluator = 'mfv') AS n
                   FROM eval_items WHERE run_id = 'ref' GROUP BY ALL),
             m AS (SELECT round, stage, any_value(nats) FILTER (foundation = 'Authority') AS t,
                          any_value(coherence) FILTER (evaluator = 'mfv') AS coh,
                          any_value(nats) FILTER (evaluator = 'contrast') AS trait,
                          any_value(ppl) FILTER (evaluator = 'freetext') AS ppl,
                          any_value(kl) FILTER (evaluator = 'kl') AS kl, any_value(n) FILTER (evaluator = 'mfv') AS n
                   FROM stage_metrics WHERE run_id = 'ref' GROUP BY ALL)
        SELECT m.round, m.stage, m.t, i.t, i.mean_log, m.coh, i.coh, m.trait, i.trait, m.ppl, i.ppl, m.kl, i.kl, m.n, i.n
        FROM m JOIN i USING (round, stage) ORDER BY ALL""")
    assert len(got) == 6
    for r, stage, t, ti, mean_log, c, ci, tr, tri, p, pi, k, ki, n, ni in got:
        assert t == pytest.approx(ti, abs=1e-12) and t != pytest.approx(mean_log, abs=1e-9), (r, stage)
        assert (c, tr, n) == pytest.approx((ci, tri, ni), abs=1e-12), (r, stage)
        assert (p is None and pi is None) or p == pytest.approx(pi, abs=1e-12)
        assert (k is None) == (stage != "steered") and (k is None or k == pytest.approx(ki, abs=1e-12))
    _, iv = query(ref, "SELECT round, stage, ref, ref_round, metric, n, delta, lo, hi, ns FROM intervals "
                       "WHERE run_id = 'ref' ORDER BY ALL")
    keys = {(r, s, rf, rr) for r, s, rf, rr, *_ in iv}
    assert keys == {(-1, "prompted", "base", -1)} | {(r, s, "base", -1) for r in (0, 1) for s in ("steered", "healed")}         | {(r, s, "prev", r - 1 if r else -1) for r in (0, 1) for s in ("steered", "healed")}
    # no interval (lo, hi, ns NULL) only where fewer than two items pair up (the tiny model's empty free text)
    assert all((lo is None and hi is None and ns is None and n < 2) or (lo <= d <= hi and ns == (lo <= 0 <= hi))
               for *_, n, d, lo, hi, ns in iv)
    assert sum(lo is not None for *_, lo, hi, ns in iv) >= len(iv) * 3 // 4
    by = {(r, s, rf, m): x for r, s, rf, _, m, *x in iv}
    assert by[(0, "healed", "prev", "trait")] == by[(0, "healed", "base", "trait")]  # round 0's prev is base
    _, rows = query(ref, "SELECT round, broken, steered_broken, broken_reason, kl_steer FROM rounds WHERE run_id = 'ref'")
    assert all(b is not None and sb is not None and (why is None) == (not b and not sb) and k > 0
               for _, b, sb, why, k in rows)
    report = (ref / "runs" / "ref" / "report.md").read_text()
    assert "95% paired bootstrap" in report and "Against the previous student" in report


# one kill point in the default suite; the rest (same mechanism, other windows) with --slow
@pytest.mark.parametrize("kill_at", [pytest.param("dose:r1:step0", marks=pytest.mark.slow), "heal:r1:step2",
                                     pytest.param("rows:r1", marks=pytest.mark.slow)])
def test_sigkill_mid_round_then_resume_matches_uninterrupted(ref, tmp_path, kill_at):
    rc, _, _ = steer_heal(tmp_path, *ARGS, "--run-id", "k", kill_at=kill_at)
    assert rc == -signal.SIGKILL
    log = RunLog(tmp_path, "k")
    assert [r["round"] for r in log.read("rounds")] == [0]  # round 0 survived, round 1 did not finish
    assert log.read("status")[-1]["status"] == "running"
    rc, so, se = steer_heal(tmp_path, "--resume", "k")
    assert rc == 0, se[-3000:]
    assert_same_rounds(rounds(ref, "ref"), rounds(tmp_path, "k"))
    for table in ("heal_steps", "eval_items", "stage_metrics", "intervals", "completions"):
        _, n = query(tmp_path, f"SELECT round, count(*) FROM {table} GROUP BY ALL ORDER BY ALL")
        _, m = query(ref, f"SELECT round, count(*) FROM {table} GROUP BY ALL ORDER BY ALL")
        assert n == m, table  # no duplicated rows from the crashed attempt


def test_resume_refuses_changed_experiment_and_accepts_more_rounds(ref, tmp_path):
    import shutil

    shutil.copytree(ref / "runs" / "ref", tmp_path / "runs" / "ref")
    rc, _, se = steer_heal(tmp_path, "--resume", "ref", "--reg", "nll", "--lam", "2")
    assert rc == 2 and "--reg" in se and "--lam" in se and "Traceback" not in se
    # how it computes may change on resume (Exec), and is said: here the probes' shared-prefix pass goes
    rc, _, se = steer_heal(tmp_path, "--resume", "ref", "--n-rounds", "3", "--no-reuse-prefix", "--eval-batch", "8")
    assert rc == 0, se[-3000:]
    assert "changes how it computes (not the experiment): --eval-batch 16 -> 8, --reuse-prefix True -> False" in se
    got = rounds(tmp_path, "ref")
    assert [r["round"] for r in got] == [0, 1, 2]
    assert_same_rounds(rounds(ref, "ref"), got[:2])
    # the extended target is stored: the resume wrote its own run_info row, and `runs` shows it
    info = [json.loads(x) for x in (tmp_path / "runs" / "ref" / "run_info.jsonl").read_text().splitlines()]
    assert [x["n_rounds"] for x in info] == [2, 3] and info[0].get("resumed_from") is None
    assert info[1]["resumed_from"] == "round 2 (done)" and info[1]["config"]["n_rounds"] == 3
    assert info[1]["config_hash"] == info[0]["config_hash"]  # the same experiment, a longer target
    assert info[1]["config"]["reuse_prefix"] is False and info[0]["config"]["reuse_prefix"] is True
    assert query(tmp_path, "SELECT n_rounds, resumed_from, rounds_done, status FROM runs")[1] == [
        (3, "round 2 (done)", 3, "done")]
    rc, _, se = steer_heal(tmp_path, "--resume", "ref")  # a plain resume of a finished extension: nothing to do
    assert rc == 0 and "already done (3 rounds)" in se, se[-2000:]


ROUND_TABLES = ("stages", "vectors", "adapters", "completions", "dose_steps", "heal_steps", "stage_metrics",
                "eval_items", "intervals", "rounds")


@pytest.mark.slow
def test_a_killed_extension_resumed_plainly_finishes_the_extended_target(ref, tmp_path):
    """Issue 23 item 5: `resume --n-rounds 3` killed in round 2's heal, then a plain `resume`: it continues to the
    stored target 3 (not the start's 2), ends done with rounds 0..2, and holds no rows of an unfinished round."""
    import shutil

    shutil.copytree(ref / "runs" / "ref", tmp_path / "runs" / "ref")
    rc, _, _ = steer_heal(tmp_path, "--resume", "ref", "--n-rounds", "3", kill_at="heal:r2:step2")
    assert rc == -signal.SIGKILL
    rc, _, se = steer_heal(tmp_path, "--resume", "ref")
    assert rc == 0, se[-3000:]
    assert "resuming ref at round 2 of 3" in se
    log = RunLog(tmp_path, "ref")
    assert [r["round"] for r in log.read("rounds")] == [0, 1, 2]
    assert log.read("status")[-1]["status"] == "done"
    assert [x["n_rounds"] for x in log.read("run_info")] == [2, 3, 3]
    for table in ROUND_TABLES:
        assert {x["round"] for x in log.read(table)} <= {-1, 0, 1, 2}, table
    _, n = query(tmp_path, "SELECT round, count(*) FROM heal_steps GROUP BY ALL ORDER BY ALL")
    _, m = query(ref, "SELECT round, count(*) FROM heal_steps GROUP BY ALL ORDER BY ALL")
    assert n[:2] == m and n[2][1] == m[1][1]  # round 2 healed once, its killed attempt's steps dropped


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


@pytest.mark.slow
def test_a_cut_line_is_refused_everywhere_then_fsck_fix_and_resume_redo_exactly_what_is_missing(ref, tmp_path):
    """Issue 23 item 4, as a user found it: the first line of a finished run's rounds.jsonl cut in half. Every
    reader refuses naming file:line (it used to show `done` and a resume rebuilt round 0, then ran round 1 twice);
    `fsck --fix` moves it aside and takes the run back; the resume then matches the undisturbed run."""
    import shutil

    shutil.copytree(ref / "runs" / "ref", tmp_path / "runs" / "ref")
    path = tmp_path / "runs" / "ref" / "rounds.jsonl"
    first, rest = path.read_bytes().split(b"\n", 1)
    path.write_bytes(first[: len(first) // 2] + b"\n" + rest)
    where = f"{path}:1: not a whole JSON line"
    store = [sys.executable, "-m", "steer_heal.store"]
    for argv in (["runs"], ["sql", "SELECT count(*) FROM rounds"]):
        p = subprocess.run(store + argv + ["--out", str(tmp_path)], capture_output=True, text=True)
        assert p.returncode == 2 and where in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = subprocess.run([sys.executable, "scripts/stages.py", "ref", "--out", str(tmp_path)], capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 2 and where in p.stderr, p.stderr[-2000:]
    rc, _, se = steer_heal(tmp_path, "--resume", "ref", "--n-rounds", "3")
    assert rc == 2 and where in se, se[-2000:]
    p = subprocess.run(store + ["fsck", "ref", "--out", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 1 and f"{path}:1: not a whole JSON line (cut or overwritten) (round 0)" in p.stdout
    p = subprocess.run(store + ["fsck", "ref", "--fix", "--out", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 0 and "taken back to its base eval" in p.stdout, p.stdout + p.stderr
    rc, _, se = steer_heal(tmp_path, "--resume", "ref")
    assert rc == 0 and "resuming ref at round 0 of 2" in se, se[-3000:]
    assert_same_rounds(rounds(ref, "ref"), rounds(tmp_path, "ref"))
    assert all(r["sec_dose"] > 0 and r["sec_heal"] > 0 for r in RunLog(tmp_path, "ref").read("rounds"))  # redone
    for table in ("heal_steps", "eval_items", "stage_metrics", "intervals", "completions", "stages"):
        _, n = query(tmp_path, f"SELECT round, count(*) FROM {table} GROUP BY ALL ORDER BY ALL")
        _, m = query(ref, f"SELECT round, count(*) FROM {table} GROUP BY ALL ORDER BY ALL")
        assert n == m, table

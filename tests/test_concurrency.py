"""Three runs write one store at once while a reader polls it: nothing lost, nobody waits."""

import os
import signal
import subprocess
import sys
import time

from test_flow import ARGS

from steer_heal.store import query


def test_three_concurrent_runs_and_a_polling_reader(tmp_path):
    args = [a if a != "2" or ARGS[i - 1] != "--epochs" else "1" for i, a in enumerate(ARGS)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PREFECT_HOME", None)
    procs = [subprocess.Popen([sys.executable, "-m", "steer_heal", "--out", str(tmp_path), *args,
                               "--n-rounds", "1", "--run-id", f"c{i}", "--seed", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
             for i in range(3)]
    polls, errors, seen = 0, [], set()
    try:
        while any(p.poll() is None for p in procs):
            try:
                query(tmp_path, "SELECT count(*) FROM completions")
                seen |= set(query(tmp_path, "SELECT status FROM runs")[1])
                polls += 1
            except Exception as e:  # noqa: BLE001 - any reader failure is the finding
                errors.append(repr(e))
            time.sleep(0.2)
        outs = [p.communicate() for p in procs]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    # a lock would stall a reader for a whole run: it would then never see a run in progress
    assert not errors and polls > 10 and ("running",) in seen
    _, runs = query(tmp_path, "SELECT run_id, status, rounds_done FROM runs ORDER BY run_id")
    assert runs == [("c0", "done", 1), ("c1", "done", 1), ("c2", "done", 1)]
    # every row each writer wrote is there, exactly once
    for i in range(3):
        lines = (tmp_path / "runs" / f"c{i}" / "completions.jsonl").read_text().splitlines()
        _, n = query(tmp_path, f"SELECT count(*) FROM completions WHERE run_id = 'c{i}'")
        assert n[0][0] == len([x for x in lines if x.strip()]) > 0
        _, m = query(tmp_path, f"SELECT count(*) FROM stage_metrics WHERE run_id = 'c{i}'")
        sm = (tmp_path / "runs" / f"c{i}" / "stage_metrics.jsonl").read_text().splitlines()
        assert m[0][0] == len([x for x in sm if x.strip()])
        _, st = query(tmp_path, f"SELECT DISTINCT stage FROM stage_metrics WHERE run_id = 'c{i}'")
        assert {x[0] for x in st} == {"base", "prompted", "steered", "healed"}

"""Faults end in a recorded status with a message, finished rounds intact, the run resumable."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_flow import ARGS, steer_heal

from steer_heal.bake import lora_config
from steer_heal.config import Config
from steer_heal.heal import HealError, heal
from steer_heal.models import load_model
from steer_heal.presets import preset
from steer_heal.stack import Stack
from steer_heal.store import RunLog, query


def test_nan_loss_stops_heal_with_a_message(model_cache):
    model, tok = load_model("tiny-random", cache=model_cache)
    st = Stack(model)
    st.add("r0", lora_config(model, 4, 8, (0.0, 1.0)), seed=0)
    cfg = Config(**preset("fast-dev")).replace(lr=1e30, grad_clip=1e30, epochs=3, batch_size=2, val_frac=0.0)
    kept = [dict(prompt="Help?", completion="I would help her now.")] * 4
    with pytest.raises(HealError, match="non-finite loss.*Lower --lr"):
        heal(st, tok, kept, cfg, 0, seed=1, system="")


def test_starved_filter_ends_the_run_as_starved(tmp_path):
    rc, _, se = steer_heal(tmp_path, *ARGS, "--run-id", "s", "--ppl-tau", "1.0")
    assert rc == 3 and "filter starved" in se and "Traceback" not in se
    last = RunLog(tmp_path, "s").read("status")[-1]
    assert last["status"] == "starved" and "kept 0 of" in last["reason"] and "min_train=2" in last["reason"]


def same_rows(out_a, id_a, out_b, id_b):
    """Every table of two runs holds the same rows, each exactly once (timings and timestamps aside)."""
    def norm(rows):
        return sorted(json.dumps({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()
                                  if k not in VOLATILE and not k.startswith("sec_")}, sort_keys=True, default=str)
                      for r in rows)
    for t in COMPARED:
        a, b = norm(RunLog(out_a, id_a).read(t)), norm(RunLog(out_b, id_b).read(t))
        assert a == b, (t, len(a), len(b))


VOLATILE = {"run_id", "ts", "created", "seconds"}
COMPARED = ("rounds", "stage_metrics", "completions", "heal_steps", "dose_steps", "adapters", "vectors", "stages",
            "probe_info")


def servers_of(home: Path) -> list[int]:
    """Pids of live processes started with PREFECT_HOME=home (the run's Prefect server)."""
    want = f"PREFECT_HOME={home}".encode()
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if want in env.read_bytes().split(b"\0"):
                pids.append(int(env.parent.name))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc to find the server")
def test_terminal_ctrl_c_ends_the_run_interrupted_and_resume_gives_the_same_rows(ref, tmp_path, request):
    """A terminal sends SIGINT to the whole foreground process group; the run's Prefect server is not in it,
    so the run records `interrupted` at once (no retries against a dead server), the server goes too, and
    a resume ends with exactly the undisturbed run's rows."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PREFECT_HOME", None)
    env.pop("PREFECT_API_URL", None)
    p = subprocess.Popen([sys.executable, "-m", "steer_heal", "--out", str(tmp_path), *ARGS, "--run-id", "c"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stages = tmp_path / "runs" / "c" / "stages.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (stages.exists() and '"extract"' in stages.read_text()):
            time.sleep(0.1)
        home = tmp_path / "runs" / "c" / "prefect"
        assert servers_of(home), "the run's Prefect server should be up"
        t = time.time()
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        _, se = p.communicate(timeout=120)
        took = time.time() - t
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert p.returncode == 130, se[-2000:]
    if request.config.getoption("--slow"):  # a wall-clock margin only with --slow: ~3 s idle, the bug was 70-80 s
        assert took < 30, took  # of API retries once the group's SIGINT had killed the server
    assert "Traceback" not in se and "ConnectError" not in se and "just resume c" in se, se[-2000:]
    assert "ERROR" not in se, se[-2000:]  # no "Crash detected!" from Prefect either: one line says it all
    assert RunLog(tmp_path, "c").read("status")[-1]["status"] == "interrupted"
    deadline = time.time() + 15
    while servers_of(home) and time.time() < deadline:
        time.sleep(0.2)
    assert not servers_of(home), "the server outlived its run"
    rc, _, se = steer_heal(tmp_path, "--resume", "c")
    assert rc == 0, se[-2000:]
    assert RunLog(tmp_path, "c").read("status")[-1]["status"] == "done"
    same_rows(ref, "ref", tmp_path, "c")


def test_a_sigkilled_run_leaves_no_server_behind(tmp_path):
    """The server is outside the run's process group, so a SIGKILL of the group misses it: it must notice
    its parent is gone (the pipe closes) and exit by itself."""
    rc, _, _ = steer_heal(tmp_path, *ARGS, "--run-id", "k", kill_at="extract:r0:saved")
    assert rc == -signal.SIGKILL
    home = tmp_path / "runs" / "k" / "prefect"
    deadline = time.time() + 20
    while servers_of(home) and time.time() < deadline:
        time.sleep(0.2)
    assert not servers_of(home)


@pytest.mark.parametrize("kill_at", [pytest.param(k, marks=pytest.mark.slow) for k in
                                     ("eval_base:base", "extract:r1:saved", "bake:r1:saved")] + ["eval_healed:r1:demo"])
def test_kill_point_then_resume_gives_the_undisturbed_rows_once(ref, tmp_path, kill_at):
    """SIGKILL at a kill point, then resume: every table equals the undisturbed run's, no row twice (a kill
    during the base eval used to duplicate its rows), and no temp file of a killed write is left."""
    rc, _, _ = steer_heal(tmp_path, *ARGS, "--run-id", "k", kill_at=kill_at)
    assert rc == -signal.SIGKILL
    run = tmp_path / "runs" / "k"
    stray = run / "adapters" / ".round_1.safetensors.x1y2z3.tmp"  # what a kill inside atomic_write_bytes leaves
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"half an adapter")
    rc, _, se = steer_heal(tmp_path, "--resume", "k")
    assert rc == 0, se[-3000:]
    same_rows(ref, "ref", tmp_path, "k")
    assert not stray.exists() and not list(run.rglob(".*.tmp"))
    assert {oct(f.stat().st_mode & 0o777) for d in ("adapters", "vectors") for f in (run / d).iterdir()} == {"0o644"}


@pytest.mark.slow
def test_a_folded_run_killed_in_round_1_resumes_to_the_undisturbed_folded_rows(tmp_path):
    """--fold-history adds the baked adapters into the weights: a resume must rebuild that folded history from
    the stored adapters, so its round 1 equals an undisturbed folded run's, row for row."""
    a, b = tmp_path / "a", tmp_path / "b"
    rc, _, se = steer_heal(a, *ARGS, "--run-id", "f", "--fold-history")
    assert rc == 0, se[-3000:]
    rc, _, _ = steer_heal(b, *ARGS, "--run-id", "f", "--fold-history", kill_at="heal:r1:step2")
    assert rc == -signal.SIGKILL
    rc, _, se = steer_heal(b, "--resume", "f")
    assert rc == 0, se[-3000:]
    same_rows(a, "f", b, "f")


def test_two_resumes_at_once_one_is_refused_and_rows_are_written_once(ref, tmp_path):
    rc, _, _ = steer_heal(tmp_path, *ARGS, "--run-id", "k", kill_at="dose:r1:step0")
    assert rc == -signal.SIGKILL
    lock = tmp_path / "runs" / "k" / "writer.lock"
    old = time.time() - 120
    os.utime(lock, (old, old))  # two minutes after the kill
    assert query(tmp_path, "SELECT status FROM runs WHERE run_id = 'k'")[1] == [("stale",)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PREFECT_HOME", None)
    env.pop("PREFECT_API_URL", None)
    procs = [subprocess.Popen([sys.executable, "-m", "steer_heal", "--out", str(tmp_path), "--resume", "k"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for _ in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    codes = sorted(p.returncode for p in procs)
    refused = next(se for p, (_, se) in zip(procs, outs) if p.returncode == 2)
    winner = next(p for p in procs if p.returncode == 0)
    assert codes == [0, 2], [se[-1500:] for _, se in outs]
    assert f"run k is being written by pid {winner.pid} on" in refused and "Traceback" not in refused
    assert len(refused.strip().splitlines()) == 1
    same_rows(ref, "ref", tmp_path, "k")
    assert query(tmp_path, "SELECT status, rounds_done FROM runs WHERE run_id = 'k'")[1] == [("done", 2)]


def in_namespace(script: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a bash script as root of a fresh user + mount namespace, where it may mount a small tmpfs (a real
    full disk) or a read-only bind mount (a real read-only store) that only it sees."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-euc", script], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _namespaces() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_namespaces = pytest.mark.skipif(not _namespaces(), reason="needs unshare --user --mount (a tmpfs of our own)")


@needs_namespaces
def test_a_full_disk_ends_in_one_line_with_the_status_written_and_resume_loses_nothing(ref, tmp_path):
    """A real full disk: the run's store is a 256 KiB tmpfs, enough for round 0 but not round 1's adapter, so
    the kernel answers ENOSPC mid-run. One line, exit 1, `failed` recorded; with room again the resume ends
    with the undisturbed run's rows."""
    model = next((ref / "models").glob("tiny-random-qwen3-*"))  # outside the tmpfs: the same bytes as ref's
    store, log = tmp_path / "store", tmp_path / "log"
    store.mkdir()
    args = " ".join([*ARGS, "--model", str(model)])
    py = f"{sys.executable} -m steer_heal --out {store}"
    r = in_namespace(f"""
        export PREFECT_HOME={tmp_path / 'prefect'}
        mount -t tmpfs -o size=256k tmpfs {store}
        set +e
        {py} {args} --run-id f 2> {log}.1; echo "first=$?"
        mount -o remount,size=8m {store}
        {py} --resume f 2> {log}.2; echo "second=$?"
        cp -r {store} {tmp_path}/kept
        """)
    assert r.returncode == 0, r.stderr[-2000:]
    first, second = (log.with_suffix(f".{i}").read_text() for i in (1, 2))
    assert "first=1" in r.stdout and "second=0" in r.stdout, (r.stdout, first[-2000:], second[-2000:])
    errors = [line for line in first.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in first, first[-3000:]
    statuses = [x["status"] for x in RunLog(tmp_path / "kept", "f").read("status")]
    assert statuses == ["running", "failed", "running", "done"]
    assert "No space left on device" in RunLog(tmp_path / "kept", "f").read("status")[1]["reason"]
    same_rows(ref, "ref", tmp_path / "kept", "f")


@needs_namespaces
def test_a_read_only_store_is_read_but_never_written(ref, tmp_path):
    """On a read-only mount, resume and a diagnostic end in one line (exit 1); reading commands work."""
    import shutil

    shutil.copytree(ref / "runs" / "ref", tmp_path / "store" / "runs" / "ref", ignore=shutil.ignore_patterns("prefect"))
    store = tmp_path / "store"
    py = f"{sys.executable}"
    r = in_namespace(f"""
        mount --bind {store} {store} && mount -o remount,bind,ro {store}
        set +e
        {py} -m steer_heal --out {store} --resume ref --n-rounds 3 2> {tmp_path}/resume.err; echo "resume=$?"
        {py} -m steer_heal.diag.stages ref --out {store} 2> {tmp_path}/stages.err; echo "stages=$?"
        {py} -m steer_heal.store runs --out {store}; echo "runs=$?"
        """, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resume=1" in r.stdout and "stages=1" in r.stdout and "runs=0" in r.stdout, r.stdout
    for name in ("resume", "stages"):
        err = (tmp_path / f"{name}.err").read_text()
        assert "Read-only file system" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "ref" in r.stdout.split("runs=")[0]



def test_ctrl_c_stops_a_runaway_query_in_one_line(tmp_path):
    """DuckDB checks no Python signal while it executes: a Ctrl-C once waited for the query's end (a cross
    join of two ranges: hours) and then printed a traceback. Now the query stops at once, one line, exit 130."""
    p = subprocess.Popen([sys.executable, "-m", "steer_heal.store", "sql", "--out", str(tmp_path), "--timeout", "0",
                          "SELECT count(*) FROM range(1000000000) a, range(1000000000) b"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4)  # past startup: the query is running
        assert p.poll() is None
        t = time.time()
        p.send_signal(signal.SIGINT)
        _, se = p.communicate(timeout=30)
        took = time.time() - t
    finally:
        p.kill()
    assert p.returncode == 130 and took < 10, (p.returncode, took, se)
    assert se.strip().splitlines() == ["steer-heal sql: interrupted (Ctrl-C); the query was stopped"], se


def test_a_server_that_dies_at_start_fails_within_seconds_naming_the_cause(tmp_path, monkeypatch):
    """Prefect's own start() waited out the whole startup timeout (120 s) for a server that had already
    exited, then said only "timed out". A damaged database kills the server at once: the run must say so."""
    from steer_heal.errors import UserError
    from steer_heal.server import serve

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    home = tmp_path / "prefect"
    home.mkdir()
    (home / "prefect.db").write_bytes(b"this is not a database " * 200)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    t = time.time()
    with pytest.raises(UserError) as e:
        with serve(home):
            pass
    took = time.time() - t
    msg = str(e.value)
    assert "exited with code" in msg and "not a database" in msg and len(msg.splitlines()) == 1, msg
    assert took < 60, took  # the startup timeout is 120 s (conftest); the server dies within seconds


def test_each_run_server_keeps_its_own_database_under_a_shared_prefect_home(tmp_path, monkeypatch):
    """Three runs under one PREFECT_HOME (a Prefect user's shell) once gave their servers one database: each
    server migrated it at start, and alembic's race killed two of three. The server's database is the run's."""
    from steer_heal.run import prefect_home
    from steer_heal.server import serve

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    shared = tmp_path / "shared-home"
    shared.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(shared))
    home = prefect_home(tmp_path / "runs" / "a" / "prefect")
    with serve(home):
        assert servers_of(home), "the server should run with the run's own home"
    assert not (shared / "prefect.db").exists()
    assert (home / "prefect.db").stat().st_size > 0


@pytest.mark.slow
def test_three_concurrent_runs_under_one_prefect_home_all_finish(tmp_path):
    """The issue's case as a user meets it: three fast-dev runs at once with PREFECT_HOME set to one folder."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PREFECT_HOME=str(tmp_path / "home"))
    env.pop("PREFECT_API_URL", None)
    ps = [subprocess.Popen([sys.executable, "-m", "steer_heal", "--out", str(tmp_path), *ARGS, "--run-id", f"c{i}"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
          for i in range(3)]
    try:
        outs = [p.communicate(timeout=1200) for p in ps]
    finally:
        for p in ps:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for i, (p, (_, se)) in enumerate(zip(ps, outs)):
        assert p.returncode == 0, (i, se[-2000:])
        assert RunLog(tmp_path, f"c{i}").read("status")[-1]["status"] == "done"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc to find the server")
def test_a_server_that_dies_mid_run_fails_the_run_within_seconds(tmp_path):
    """The run's server killed mid-run (OOM killer, a stray kill): Prefect's client retried the dead server
    for about 70 s and the run ended in a traceback. Now the run fails at once, with the cause in one line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PREFECT_HOME", None)
    env.pop("PREFECT_API_URL", None)
    p = subprocess.Popen([sys.executable, "-m", "steer_heal", "--out", str(tmp_path), *ARGS, "--run-id", "d"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stages = tmp_path / "runs" / "d" / "stages.jsonl"
    home = tmp_path / "runs" / "d" / "prefect"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (stages.exists() and '"extract"' in stages.read_text()):
            time.sleep(0.1)
        pids = servers_of(home)
        assert pids, "the run's Prefect server should be up"
        t = time.time()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        _, se = p.communicate(timeout=120)
        took = time.time() - t
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert p.returncode == 2 and took < 20, (p.returncode, took, se[-2000:])
    assert "Traceback" not in se and "exited with code -9 mid-run" in se and "just resume d" in se, se[-2000:]
    last = RunLog(tmp_path, "d").read("status")[-1]
    assert last["status"] == "failed" and "exited with code -9 mid-run" in last["reason"], last

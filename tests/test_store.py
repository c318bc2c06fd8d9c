"""Store tests: real files, real DuckDB, real processes."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

from steer_heal import files
from steer_heal.store import TABLES, RunLocked, RunLog, SqlRefused, WriterLock, connect, query, write_catalog
from steer_heal.store import lock as store_lock
from steer_heal.store import log as store_log
from steer_heal.store.lock import LOCK_FILE, STALE_S

SRC = Path(__file__).resolve().parents[1] / "src"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    return env


# Child processes import only the store (the package's __init__ imports nothing heavy).
_LOAD = """
import sys
from steer_heal import store
"""


@pytest.fixture
def spawn():
    """Start `python -c <code> args...` with store loaded; kills leftovers when a test fails."""
    started: list[subprocess.Popen] = []

    def _spawn(code: str, *args: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", _LOAD + textwrap.dedent(code), *args],
                             env=_env(), text=True, **kw)
        started.append(p)
        return p

    yield _spawn
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def _view_types(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    return {r[0]: r[1] for r in con.execute(f'DESCRIBE "{table}"').fetchall()}


# ---------------------------------------------------------------- schema & types

def test_empty_store_has_typed_empty_views(tmp_path):
    con = connect(tmp_path / "nothing-here")
    for table, cols in TABLES.items():
        assert _view_types(con, table) == cols, table
        assert con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 0


def test_touched_empty_files_give_typed_empty_views(tmp_path):
    RunLog(tmp_path, "r0").touch_all()
    RunLog(tmp_path, "d0", kind="diagnostics").touch_all()
    assert (tmp_path / "runs/r0/completions.jsonl").stat().st_size == 0
    con = connect(tmp_path)
    for table, cols in TABLES.items():
        assert _view_types(con, table) == cols, table
        assert con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] == 0


def test_round_trip_with_types(tmp_path):
    np = pytest.importorskip("numpy")
    log = RunLog(tmp_path, "r1")
    created = dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    log.append("run_info", {"created": created, "model": "tiny", "seed": np.int64(7),
                            "config": {"lr": np.float32(0.5), "layers": [12, 18],
                                       "bad": float("nan"), "out": Path("/x")}})
    log.append("rounds", [{"round": r, "kappa": np.float64(0.25 * r), "n_gen": np.int32(10),
                           "auth_nats": float("nan"), "retain": float("inf"),
                           "surgical": np.bool_(r % 2 == 0)} for r in range(3)])

    con = connect(tmp_path)
    assert _view_types(con, "rounds") == TABLES["rounds"]
    rows = con.execute("SELECT run_id, round, kappa, n_gen, auth_nats, retain, surgical "
                       "FROM rounds ORDER BY round").fetchall()
    assert rows == [("r1", 0, 0.0, 10, None, None, True), ("r1", 1, 0.25, 10, None, None, False),
                    ("r1", 2, 0.5, 10, None, None, True)]
    created_db, seed, lr, out = con.execute(
        "SELECT created, seed, config->>'lr', config->>'out' FROM run_info").fetchone()
    assert created_db == dt.datetime(2024, 5, 1, 10, 0, 0, 123456)  # stored as naive UTC
    log.append("status", {"ts": "2024-05-01T12:00:00+02:00", "status": "running"})
    assert query(tmp_path, "SELECT ts FROM status")[1] == [(dt.datetime(2024, 5, 1, 10),)]
    assert (seed, lr, out) == (7, "0.5", "/x")

    # The pure-Python reader agrees, with every column present.
    (info,) = log.read("run_info")
    assert info["created"] == created_db and info["preset"] is None
    assert info["config"] == {"lr": 0.5, "layers": [12, 18], "bad": None, "out": "/x"}
    assert [r["surgical"] for r in log.read("rounds")] == [True, False, True]


def test_diagnostics_tables(tmp_path):
    log = RunLog(tmp_path, "sweep1", kind="diagnostics")
    assert log.dir == tmp_path / "diagnostics" / "sweep1"
    log.append("diagnostics", {"kind": "c_sweep", "source_run": "r1", "round": 0,
                               "config": {"cs": [0.5, 1]}})
    log.append("diag_rows", [{"kind": "c_sweep", "row": {"c": c, "ppl": 2.0 * c}} for c in (1, 2)])
    cols, rows = query(tmp_path, "SELECT diag_id, row->>'c' FROM diag_rows ORDER BY 2")
    assert rows == [("sweep1", "1"), ("sweep1", "2")]
    with pytest.raises(ValueError, match="unknown table 'rounds'"):
        log.append("rounds", {"round": 0})


def test_unknown_table_or_column_raises(tmp_path):
    log = RunLog(tmp_path, "r1")
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['kapa'\].*allowed: run_id, round, kappa"):
        log.append("rounds", [{"round": 0}, {"round": 1, "kapa": 1.0}])
    with pytest.raises(ValueError, match="unknown table 'nope'.*allowed: run_info"):
        log.append("nope", {"x": 1})
    with pytest.raises(ValueError, match="rounds.n_gen is BIGINT"):
        log.append("rounds", {"round": 0, "n_gen": "ten"})
    with pytest.raises(ValueError, match="status.ts is TIMESTAMP"):
        log.append("status", {"ts": "yesterday"})
    with pytest.raises(ValueError, match="run_id"):
        log.append("rounds", {"run_id": "someone-else", "round": 0})
    # Validation happens before writing: the good first row was not written either.
    assert log.read("rounds") == []


def test_oversized_row_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(store_log, "MAX_LINE_BYTES", 1000)
    log = RunLog(tmp_path, "r1")
    log.append("completions", {"completion": "x" * 900})
    with pytest.raises(ValueError, match="limit is 1000"):
        log.append("completions", {"completion": "x" * 1000})
    assert len(log.read("completions")) == 1


def test_torn_last_line_is_skipped_and_healed(tmp_path):
    log = RunLog(tmp_path, "r1")
    log.append("rounds", [{"round": r, "kappa": 1.0} for r in range(3)])
    with open(log.path("rounds"), "ab") as f:  # what a kill mid-write leaves
        f.write(b'{"run_id": "r1", "round": 3, "kap')

    assert [r["round"] for r in log.read("rounds")] == [0, 1, 2]
    assert query(tmp_path, "SELECT count(*), sum(round) FROM rounds")[1] == [(3, 3)]

    # A resumed writer starts on a fresh line, so its row is not lost.
    RunLog(tmp_path, "r1").append("rounds", {"round": 3, "kappa": 2.0})
    assert [r["round"] for r in log.read("rounds")] == [0, 1, 2, 3]
    assert query(tmp_path, "SELECT count(*), max(kappa) FROM rounds")[1] == [(4, 2.0)]


# ---------------------------------------------------------------- damage in the middle (issue 23 item 4)

DAMAGE = {  # what a person's editor, a bad copy or a disk error leaves in the middle of a table
    "half": (lambda line: line[: len(line) // 2], "not a whole JSON line"),
    "nul": (lambda line: b"\x00" * len(line), "NUL bytes"),
    "utf8": (lambda line: line.replace(b'"r1"', b'"r\xff1"'), "invalid UTF-8"),
    "array": (lambda line: b"[1, 2]", "a JSON list, not an object"),
    "number": (lambda line: b"5", "a JSON int, not an object"),
    "null": (lambda line: b"null", "a JSON NoneType, not an object"),
    "no id": (lambda line: b'{"round": 0}', "an object without run_id"),
}


def _damaged(root: Path, how: str, torn_tail: bool = False) -> Path:
    """Run r1's rounds 0..2 with its first line damaged (and, when asked, a torn tail too)."""
    log = RunLog(root, "r1")
    log.append("run_info", {"n_rounds": 3})
    log.append("rounds", [{"round": r, "kappa": 1.0} for r in range(3)])
    path = log.path("rounds")
    first, rest = path.read_bytes().split(b"\n", 1)
    path.write_bytes(DAMAGE[how][0](first) + b"\n" + rest + (b'{"run_id": "r1", "ro' if torn_tail else b""))
    return path


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_line_in_the_middle_is_refused_by_every_reader_naming_file_and_line(tmp_path, how):
    from steer_heal.store.log import StoreDamaged

    path = _damaged(tmp_path, how)
    before = path.read_bytes()
    want = rf"{path}:1: {DAMAGE[how][1]}.*just fsck r1"
    with pytest.raises(StoreDamaged, match=want):
        RunLog(tmp_path, "r1").read("rounds")
    with pytest.raises(StoreDamaged, match=want):
        query(tmp_path, "SELECT count(*) FROM rounds")
    with pytest.raises(StoreDamaged, match=want):
        query(tmp_path, "SELECT run_id, rounds_done FROM runs")
    with pytest.raises(StoreDamaged, match=want):
        RunLog(tmp_path, "r1").drop("rounds", lambda x: x["round"] == 2)
    assert path.read_bytes() == before
    torn = _damaged(tmp_path / "torn", how, torn_tail=True)  # a torn tail below the damage hides nothing
    with pytest.raises(StoreDamaged, match=rf"{torn}:1: {DAMAGE[how][1]}"):
        query(tmp_path / "torn", "SELECT count(*) FROM rounds")


def test_only_a_torn_tail_is_tolerated_and_an_append_sets_it_aside(tmp_path):
    log = RunLog(tmp_path, "r1")
    log.append("rounds", [{"round": r} for r in range(2)])
    with open(log.path("rounds"), "ab") as f:
        f.write(b'{"run_id": "r1", "round": 2, "ka')
    assert query(tmp_path, "SELECT count(*) FROM rounds")[1] == [(2,)] and len(log.read("rounds")) == 2
    RunLog(tmp_path, "r1").append("rounds", {"round": 2})
    assert [r["round"] for r in log.read("rounds")] == [0, 1, 2]
    assert query(tmp_path, "SELECT count(*) FROM rounds")[1] == [(3,)]
    assert (tmp_path / "runs/r1/rounds.jsonl.aside").read_bytes() == b'{"run_id": "r1", "round": 2, "ka\n'


def test_fsck_reports_then_fix_moves_damage_aside_and_takes_the_run_back(tmp_path, capsys):
    """--fix moves the damaged line and every row of its round and later rounds to side files (nothing
    deleted), and a status row sends a resume back to the damaged round."""
    from steer_heal.store.__main__ import main as store_main

    log = RunLog(tmp_path, "r1")
    log.append("run_info", {"n_rounds": 3})
    log.append("status", {"status": "done"})
    for table in ("stages", "rounds", "heal_steps"):
        log.append(table, [{"round": r} for r in (-1, 0, 1, 2) if table == "stages" or r >= 0])
    path = log.path("heal_steps")
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:22]  # round 1's step, cut: '{"run_id": "r1", "roun'  (no round number left)
    path.write_bytes(b"\n".join(lines))
    before = {t: log.path(t).read_bytes() for t in log.tables if log.path(t).exists()}
    assert store_main(["fsck", "r1", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:2: not a whole JSON line (cut or overwritten) (round 0)" in out  # the row above's round
    assert {t: log.path(t).read_bytes() for t in before} == before  # a report changes nothing
    assert store_main(["fsck", "r1", "--out", str(tmp_path), "--fix"]) == 0
    assert [r["round"] for r in log.read("rounds")] == [] and [r["round"] for r in log.read("stages")] == [-1]
    assert log.read("status")[-1]["status"] == "interrupted" and log.read("status")[-1]["round"] == 0
    for t, raw in before.items():  # every line is still somewhere: in its table or its side file
        aside = Path(str(log.path(t)) + ".aside")
        kept = log.path(t).read_bytes() + (aside.read_bytes() if aside.exists() else b"")
        assert sorted(x for x in kept.split(b"\n") if x) == sorted(x for x in raw.split(b"\n") if x) or t == "status"
    assert b'{"run_id": "r1", "roun\n' in Path(str(path) + ".aside").read_bytes()
    assert store_main(["fsck", "r1", "--out", str(tmp_path)]) == 0
    assert "every line of every table is a row" in capsys.readouterr().out


# ---------------------------------------------------------------- runs view, catalog

def _seed_two_runs(root: Path) -> None:
    a, b = RunLog(root, "a"), RunLog(root, "b")
    t0 = dt.datetime(2024, 1, 1)
    a.append("run_info", {"created": t0, "model": "tiny", "reg": "kl"})
    b.append("run_info", {"created": t0 + dt.timedelta(hours=1), "model": "smol", "reg": "none"})
    a.append("status", [{"ts": t0, "status": "running", "round": 0},
                        {"ts": t0 + dt.timedelta(minutes=9), "status": "done", "round": 2,
                         "reason": "all rounds"}])
    b.append("status", {"ts": t0 + dt.timedelta(hours=1), "status": "running", "round": 0})
    a.append("rounds", [{"round": r, "auth_nats": -1.0 - r} for r in (0, 1, 2)])
    a.append("rounds", {"round": 2, "auth_nats": -3.0})  # a duplicate must not count twice
    b.append("rounds", {"round": 0, "auth_nats": -0.5})
    b.append("stages", {"round": 1, "stage": "extract", "seconds": 1.0,
                        "ts": t0 + dt.timedelta(hours=2)})


def test_runs_view_latest_status_and_rounds_done(tmp_path):
    _seed_two_runs(tmp_path)
    sql = "SELECT run_id, status, reason, rounds_done, last_ts FROM runs ORDER BY run_id"
    t0 = dt.datetime(2024, 1, 1)
    with WriterLock(tmp_path / "runs" / "b"):  # b's writer is alive
        assert query(tmp_path, sql)[1] == [("a", "done", "all rounds", 3, t0 + dt.timedelta(minutes=9)),
                                           ("b", "running", None, 1, t0 + dt.timedelta(hours=2))]


def test_a_running_run_without_a_live_writer_reads_stale(tmp_path):
    """`running` needs a heartbeat younger than STALE_S: a killed writer's run reads `stale`, as does a
    run with no writer lock at all; `done` stays `done` however old its heartbeat."""
    _seed_two_runs(tmp_path)
    RunLog(tmp_path, "c").append("status", {"status": "running"})  # never had a writer lock
    sql = "SELECT run_id, status FROM runs ORDER BY run_id"
    lock = WriterLock(tmp_path / "runs" / "b").acquire()
    lock.release()  # what a SIGKILL does to the lock; the heartbeat file stays
    assert query(tmp_path, sql)[1] == [("a", "done"), ("b", "running")]  # heartbeat still fresh
    old = time.time() - STALE_S - 5
    os.utime(tmp_path / "runs" / "b" / LOCK_FILE, (old, old))
    assert query(tmp_path, sql)[1] == [("a", "done"), ("b", "stale")]
    RunLog(tmp_path, "c").append("run_info", {"created": dt.datetime(2024, 1, 2), "model": "m"})
    assert query(tmp_path, sql)[1] == [("a", "done"), ("b", "stale"), ("c", "stale")]
    with WriterLock(tmp_path / "runs" / "b"):  # a resume takes over: running again at once
        assert query(tmp_path, sql)[1][1] == ("b", "running")


def test_the_heartbeat_keeps_a_long_run_running(tmp_path, monkeypatch):
    monkeypatch.setattr(store_lock, "HEARTBEAT_S", 0.05)
    path = tmp_path / LOCK_FILE
    with WriterLock(tmp_path) as lock:
        os.utime(path, (0, 0))
        deadline = time.monotonic() + 60  # a wait on the condition, not a sleep: a loaded box is slow, not wrong
        while path.stat().st_mtime == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert path.stat().st_mtime > 0  # touched again by the heartbeat thread
    assert not lock._beat.is_alive()  # release joined it
    os.utime(path, (0, 0))
    assert path.stat().st_mtime == 0  # released: no more beats


def test_a_second_writer_process_is_refused_naming_the_holder(tmp_path, spawn):
    """flock across processes: the holder's pid and host in the refusal; free again once it is killed."""
    holder = spawn("""
        from steer_heal.store import WriterLock
        lock = WriterLock(sys.argv[1]).acquire()
        print("locked", flush=True)
        sys.stdin.read()
        """, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunLocked, match=f"is being written by pid {holder.pid} on .* since .*just resume"):
        WriterLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    WriterLock(tmp_path).acquire().release()  # the kernel dropped the dead holder's lock


def test_a_refusal_names_the_new_holder_not_an_empty_or_dead_one(tmp_path):
    """Between a new holder's flock and its pid write the file is empty, or still names the writer that was
    killed; a second writer arriving then must wait for the new name, not print "not written yet" or the
    dead pid (test_faults' two resumes at once hit this window on a loaded box)."""
    import fcntl
    import json
    import platform
    import threading

    path = tmp_path / LOCK_FILE
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps(dict(pid=int(dead.stdout), host=platform.node(), since="then")))  # the killed one
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the new holder has the lock, its name not yet written

    def write_late() -> None:
        time.sleep(0.3)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dict(pid=4242, host=platform.node(), since="now")).encode(), 0)

    t = threading.Thread(target=write_late)
    t.start()
    try:
        with pytest.raises(RunLocked, match="is being written by pid 4242 on "):
            WriterLock(tmp_path).acquire()
    finally:
        t.join()
        os.close(fd)


def test_torn_tail_then_drop_then_append_loses_no_row(tmp_path):
    """A drop that matches nothing must still rewrite a torn tail away, or the next append is glued onto
    the torn line and lost with it."""
    log = RunLog(tmp_path, "r1")
    log.append("heal_steps", [{"round": 0, "step": s} for s in range(3)])
    with open(log.path("heal_steps"), "ab") as f:  # a kill mid-write
        f.write(b'{"run_id": "r1", "round": 1, "st')
    resumed = RunLog(tmp_path, "r1")
    assert resumed.drop("heal_steps", lambda x: x["round"] == 5) == 0  # nothing to drop
    resumed.append("heal_steps", {"round": 1, "step": 0})
    assert [(r["round"], r["step"]) for r in resumed.read("heal_steps")] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert query(tmp_path, "SELECT count(*) FROM heal_steps")[1] == [(4,)]


def test_catalog_opens_read_only_and_sees_new_rows(tmp_path):
    _seed_two_runs(tmp_path)
    path = write_catalog(tmp_path)
    assert path == tmp_path.resolve() / "catalog.duckdb"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.duckdb", "runs"]
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT count(*) FROM rounds").fetchone()[0] == 5
    # The open catalog locks nothing the writers need, and reads live files.
    RunLog(tmp_path, "b").append("rounds", {"round": 1})
    assert con.execute("SELECT rounds_done FROM runs WHERE run_id = 'b'").fetchone()[0] == 2
    write_catalog(tmp_path)  # replacing it under an open session is fine too
    assert con.execute("SELECT count(*) FROM rounds").fetchone()[0] == 6
    con.close()


def test_atomic_write_and_sha256(tmp_path):
    p = tmp_path / "adapters" / "round_0.safetensors"
    files.atomic_write_bytes(p, b"abc")
    assert p.read_bytes() == b"abc"
    assert files.sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    files.atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new" and list(p.parent.iterdir()) == [p]  # no tmp left


# ---------------------------------------------------------------- CLI

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steer_heal.store", *args],
                          env=_env(), capture_output=True, text=True, timeout=60)


def test_cli_table_csv_runs_and_errors(tmp_path):
    _seed_two_runs(tmp_path)
    sql = "SELECT run_id, round, auth_nats FROM rounds WHERE run_id = 'a' ORDER BY round LIMIT 2"

    r = _cli("sql", sql, "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["run_id", "round", "auth_nats"]
    assert lines[2].split() == ["a", "0", "-1"] and lines[3].split() == ["a", "1", "-2"]
    assert len({len(line) for line in lines[1:4]}) == 1  # aligned columns
    assert lines[-1] == "(2 rows)"

    r = _cli("sql", sql, "--root", str(tmp_path), "--csv")
    assert r.returncode == 0, r.stderr
    assert list(csv.reader(io.StringIO(r.stdout))) == [
        ["run_id", "round", "auth_nats"], ["a", "0", "-1.0"], ["a", "1", "-2.0"]]

    r = _cli("runs", "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    body = [line.split() for line in r.stdout.splitlines()[2:-1]]
    assert [row[0] for row in body] == ["a", "b"]
    assert body[0][-4:] == ["tiny", "kl", "3", "done"]
    assert body[1][-4:] == ["smol", "none", "1", "stale"]  # running, but no live writer (no heartbeat)

    r = _cli("sql", "SELEC oops", "--root", str(tmp_path))
    assert r.returncode != 0
    assert "syntax error" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- processes

WRITER = """
log = store.RunLog(sys.argv[1], "shared")
w = int(sys.argv[2])
for i in range(int(sys.argv[3])):
    # Rows of very different sizes, some spanning pages, to give interleaving a chance.
    log.append("completions", {"round": w, "idx": i, "completion": "x" * (i * 37 % 9000)})
"""

READER = """
import json, os, time
con = store.connect(sys.argv[1])  # one open session, like a person's; globs re-read per query
counts = []
while True:
    done = os.path.exists(sys.argv[2])  # checked before the query: the last one sees all
    counts.append(con.execute("SELECT count(*) FROM completions").fetchone()[0])
    if done:
        break
    open(sys.argv[3], "a").close()  # ready: the writers may start
    time.sleep(0.005)
print(json.dumps(counts))
"""


def test_three_writer_processes_and_a_reader(tmp_path, spawn):
    n_writers, n_rows = 3, 2000
    root, stop, ready = tmp_path / "store", tmp_path / "stop", tmp_path / "ready"
    RunLog(root, "shared").touch_all()
    total = n_writers * n_rows
    reader = spawn(READER, str(root), str(stop), str(ready), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not ready.exists() and reader.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    writers = [spawn(WRITER, str(root), str(w), str(n_rows)) for w in range(n_writers)]
    for w in writers:
        assert w.wait(timeout=60) == 0
    stop.touch()
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    counts = json.loads(out)
    assert counts[-1] == total
    assert counts == sorted(counts)  # a reader never sees a row vanish
    assert any(0 < c < total for c in counts), counts  # it did read while rows were landing

    # Every line is intact and every (writer, idx) is there exactly once.
    # (A writer's first append can race another's in-flight line and start with a
    # spare newline; blank lines are harmless to both readers, so skip them.)
    lines = (root / "runs/shared/completions.jsonl").read_bytes().splitlines()
    rows = [json.loads(line) for line in lines if line]
    assert sorted((r["round"], r["idx"]) for r in rows) == [
        (w, i) for w in range(n_writers) for i in range(n_rows)]
    assert all(len(r["completion"]) == r["idx"] * 37 % 9000 for r in rows)
    assert query(root, "SELECT count(DISTINCT (round, idx)) FROM completions")[1] == [(total,)]
    assert len(RunLog(root, "shared").read("completions")) == total


FIRST_APPENDS = """
w = int(sys.argv[2])
for i in range(int(sys.argv[3])):
    # A fresh log per row, like a short-lived process: every append is its first, so each one looks for a
    # torn tail while the other writers' lines are in flight.
    store.RunLog(sys.argv[1], "shared").append("completions", {"round": w, "idx": i, "completion": "y" * (i * 53 % 20000)})
"""


def test_a_writers_first_append_never_sets_aside_another_writers_line_in_flight(tmp_path, spawn):
    # A line being written is a torn tail to anyone who looks mid-write; only a dead writer's tail may go
    # aside. (This lost hundreds of rows when the torn-tail check raced a live writer's append.)
    n_writers, n_rows = 3, 400
    writers = [spawn(FIRST_APPENDS, str(tmp_path), str(w), str(n_rows)) for w in range(n_writers)]
    for w in writers:
        assert w.wait(timeout=120) == 0
    rows = RunLog(tmp_path, "shared").read("completions")
    assert sorted((r["round"], r["idx"]) for r in rows) == [(w, i) for w in range(n_writers) for i in range(n_rows)]
    assert not (tmp_path / "runs/shared/completions.jsonl.aside").exists()


KILLED = """
log = store.RunLog(sys.argv[1], "victim")
i = 0
while True:
    log.append("heal_steps", {"round": 0, "step": i, "loss": 1.0 / (i + 1),
                              "val_nll": None if i % 3 else 2.0})
    i += 1
    print(i, flush=True)  # i rows are on disk
"""


def test_sigkill_mid_stream_loses_nothing_acknowledged(tmp_path, spawn):
    p = spawn(KILLED, str(tmp_path), stdout=subprocess.PIPE)
    acked = 0
    deadline = time.monotonic() + 30
    while acked < 500 and time.monotonic() < deadline:
        acked = int(p.stdout.readline())
    os.kill(p.pid, signal.SIGKILL)
    acked = max([acked] + [int(x) for x in p.stdout.read().split()])  # acks still in the pipe
    p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL and acked >= 500

    path = tmp_path / "runs/victim/heal_steps.jsonl"
    lines = path.read_bytes().split(b"\n")
    for line in lines[:-1]:
        json.loads(line)  # all complete lines parse; only the tail may be torn
    n = query(tmp_path, "SELECT count(*) FROM heal_steps")[1][0][0]
    # At most the row being written after the last ack is extra.
    assert acked <= n <= acked + 1
    steps = [r["step"] for r in RunLog(tmp_path, "victim").read("heal_steps")]
    assert steps == list(range(n))

    # A resumed writer appends cleanly after whatever the kill left.
    RunLog(tmp_path, "victim").append("heal_steps", {"round": 0, "step": n})
    assert query(tmp_path, "SELECT count(*), max(step) FROM heal_steps")[1] == [(n + 1, n)]


# ---------------------------------------------------------------- docs/store.md follows the schema

def _documented_columns() -> dict[str, set[str]]:
    """{table: columns} from docs/store.md's "### `table`" sections (first cell of each table row, which may
    list several columns) and its `view | columns` table for the diagnostics tables."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "store.md").read_text()
    out: dict[str, set[str]] = {}
    for section in doc.split("\n### ")[1:]:
        head, _, body = section.partition("\n")
        names = [n for n in head.split("`")[1::2]]
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in body.splitlines()
                if line.startswith("|") and not set(line) <= set("|- ")]
        header, rows = rows[0], rows[1:]
        if header[:2] == ["view", "columns"]:
            for view, cols in rows:
                out[view] = {c.split()[0] for c in cols.split(",")}
        elif len(names) == 1:
            out[names[0]] = {c.strip().strip("`") for r in rows for c in r[0].split(",") if c.strip()}
    return out


def test_docs_store_md_lists_exactly_the_schema_columns():
    doc = _documented_columns()
    for table, cols in TABLES.items():
        assert table in doc, f"docs/store.md has no section for table {table!r}"
        assert doc[table] == set(cols), (table, "missing in docs:", set(cols) - doc[table],
                                         "not in the schema:", doc[table] - set(cols))


def test_the_query_path_reads_only_and_only_under_the_root(tmp_path):
    _seed_two_runs(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("secret\n")
    for sql in (f"COPY rounds TO '{tmp_path}/runs/a/rounds.jsonl'", f"ATTACH '{tmp_path}/w.db'",
                "SELECT 1; SELECT 2", "EXPLAIN ANALYZE DELETE FROM rounds", "CALL pragma_version()"):
        with pytest.raises(SqlRefused):
            query(tmp_path, sql)
    assert query(tmp_path, "WITH r AS (SELECT * FROM rounds) SELECT count(*) FROM r")[1] == [(5,)]
    assert query(tmp_path, "EXPLAIN SELECT * FROM rounds")[0]  # a plan, not refused
    assert query(tmp_path, "PIVOT (SELECT run_id, round FROM rounds) ON run_id USING count(*) GROUP BY round "
                           "ORDER BY round")[1] == [(0, 1, 1), (1, 1, 0), (2, 2, 0)]
    con = connect(tmp_path)
    with pytest.raises(duckdb.PermissionException):  # reads outside the root fail even on a raw connection
        con.execute(f"SELECT * FROM read_text('{outside}')").fetchall()
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("SET enable_external_access = true")
    assert con.execute(f"SELECT count(*) FROM read_text('{tmp_path}/runs/a/rounds.jsonl')").fetchone() == (1,)

"""DuckDB views over every run's JSONL files: what `just sql`, the diagnostics and a person's own
DuckDB session query. Nothing here writes to a run's files: a connection reads only under the store
root, and `query` runs reading statements only (check_read_only).
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

import duckdb

from ..errors import UserError
from .lock import LOCK_FILE, STALE_S
from .log import StoreDamaged, first_damage
from .schema import DEFAULT_ROOT, KINDS, MAX_LINE_BYTES, TABLES

READS = "one SELECT (also WITH ... SELECT, FROM ..., VALUES, PIVOT, DESCRIBE, SHOW, SUMMARIZE) or EXPLAIN of one"


class SqlRefused(UserError):
    """A statement the read-only query path does not run (it could write files or change settings)."""


class QueryTimeout(Exception):
    """A query that ran past its time limit; DuckDB stopped it (con.interrupt)."""


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse anything but one reading statement, before it runs. DuckDB types each statement: SELECT
    covers DESCRIBE/SHOW/SUMMARIZE; EXPLAIN ANALYZE runs what it wraps, so that must be a SELECT too."""
    stmts = con.extract_statements(sql)
    if len(stmts) != 1:
        raise SqlRefused(f"the store's SQL runs one statement at a time: {len(stmts)} statements are refused; "
                         f"allowed: {READS}")
    st = stmts[0]
    try:
        kind = st.type.name
    except ValueError:  # a type newer than this duckdb's Python enum (UPDATE EXTENSIONS): never one of the reads
        kind = " ".join(st.query.split()[:2]).upper()
    # A PIVOT without an IN list parses as MULTI (an enum of the pivot values, then the SELECT); one that
    # starts as a query is a read, while COPY (PIVOT ...) or CREATE ... AS PIVOT start otherwise
    first = st.query.lstrip().split(None, 1)[0].upper() if st.query.strip() else ""
    if kind == "MULTI" and first in ("PIVOT", "UNPIVOT", "SELECT", "WITH", "FROM"):
        return
    if kind == "EXPLAIN":
        inner = re.sub(r"^\s*EXPLAIN\s*(\([^()]*\))?\s*(ANALY[SZ]E\b)?", "", st.query, flags=re.I)
        inner_stmts = con.extract_statements(inner) if inner.strip() else []
        kind = "EXPLAIN " + (inner_stmts[0].type.name if len(inner_stmts) == 1 else "?")
        if kind == "EXPLAIN SELECT":
            return
    if kind != "SELECT":
        raise SqlRefused(f"the store's SQL only reads: {kind} statements are refused; allowed: {READS}. "
                         "(to COPY results to a file, open out/catalog.duckdb in a DuckDB session of your own)")


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


# A strict view (steer-heal's own readers) raises this, naming the file, at a line that is not a row, unless
# the file is one whose torn tail connect() checked: a torn last line is the only damage a crash leaves
DAMAGED = "steer-heal store damaged in "


def _view_sql(con: duckdb.DuckDBPyConnection, root: Path, table: str, only: tuple[str, ...] = (),
              torn: tuple[str, ...] | None = None) -> str:
    """The table over every run's file; `only` declares just those columns (read_json parses every
    declared column of every line, so a narrow read of a wide table is several times faster). `torn` not
    None makes the view strict: a line that is not a row fails the query (DAMAGED), but in those files."""
    cols = {c: t for c, t in TABLES[table].items() if not only or c in only}
    id_col = next(iter(cols))
    kind = next(k for k, c in KINDS.items() if c == id_col)
    pattern = str(root / kind / "*" / f"{table}.jsonl")
    # read_json fails at bind time when the glob matches nothing, so an empty
    # store gets a typed, empty stand-in instead.
    if not con.execute("SELECT count(*) FROM glob(?)", [pattern]).fetchone()[0]:
        return "SELECT " + ", ".join(
            f"CAST(NULL AS {t}) AS {_ident(c)}" for c, t in cols.items()) + " WHERE false"
    struct = "{" + ", ".join(f"{_lit(c)}: {_lit(t)}" for c, t in cols.items()) + "}"
    # ignore_errors turns a line that is not a row (a torn tail in flight, or damage) into an all-NULL row: a
    # session of one's own skips it (the id filter); a strict view fails there, at no cost while there is none
    src = (f"read_json({_lit(pattern)}, format='newline_delimited', records=true, columns={struct}, "
           f"ignore_errors=true, maximum_object_size={4 * MAX_LINE_BYTES}")
    if torn is None:
        return f"SELECT * FROM {src}) WHERE {_ident(id_col)} IS NOT NULL"
    skip = f"WHEN filename IN ({', '.join(map(_lit, torn))}) THEN false " if torn else ""
    return (f"SELECT * EXCLUDE (filename) FROM {src}, filename=true) WHERE CASE WHEN {_ident(id_col)} IS NOT NULL "
            f"THEN true {skip}ELSE error({_lit(DAMAGED)} || filename) END")


def _heartbeats(con: duckdb.DuckDBPyConnection, root: Path) -> str:
    """(run_id, heartbeat): the mtime of each run's writer lock, which its writer touches while alive."""
    pattern = str(root / "runs" / "*" / LOCK_FILE)
    if not con.execute("SELECT count(*) FROM glob(?)", [pattern]).fetchone()[0]:
        return "SELECT CAST(NULL AS VARCHAR) AS run_id, CAST(NULL AS TIMESTAMP) AS heartbeat WHERE false"
    return (f"SELECT regexp_extract(filename, '([^/]+)/{LOCK_FILE}$', 1) AS run_id, "
            f"timezone('UTC', last_modified) AS heartbeat FROM read_blob({_lit(pattern)})")


def torn_tails(root: Path) -> tuple[str, ...]:
    """The table files ending in a torn line (a writer in flight, or killed), each checked whole for damage
    above that line (StoreDamaged, file:line). ~0.1 s per 2,400 files."""
    out = []
    for kind, id_col in KINDS.items():
        for path in sorted((root / kind).glob("*/*.jsonl")):
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                if size == 0 or os.pread(f.fileno(), 1, size - 1) == b"\n":
                    continue
            if (bad := first_damage(path, id_col)) is not None:
                raise bad
            out.append(str(path))
    return tuple(out)


def located(e: duckdb.Error) -> StoreDamaged | None:
    """A strict view's DAMAGED error as StoreDamaged naming file:line; None when the file holds no damage
    now (its tail was in flight when read: the query may run again)."""
    msg = str(e)
    if DAMAGED not in msg:
        raise e
    path = Path(msg.split(DAMAGED, 1)[1].splitlines()[0].strip())
    return first_damage(path, KINDS.get(path.parent.parent.name, "run_id")) if path.is_file() else None


def fetch(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None, root: str | os.PathLike | None = None):
    """con.execute(sql, params) on a strict connection: a damaged line raises StoreDamaged (file:line). A tail
    that was in flight (it is whole now) runs the statement again, on a fresh connection when `root` is given."""
    for attempt in range(3):
        try:
            return con.execute(sql, params) if params is not None else con.execute(sql)
        except duckdb.Error as e:
            if (bad := located(e)) is not None:
                raise bad from None
            if attempt == 2:
                raise
            if root is not None:
                con = connect(root, strict=True)
    raise AssertionError("unreachable")


def _runs_view(con: duckdb.DuckDBPyConnection, root: Path, torn: tuple[str, ...] | None = None) -> str:
    """One row per run from narrow reads of run_info, status, rounds and stages. A `running` run whose
    writer's heartbeat is older than STALE_S (or missing) shows as `stale`: its process is gone."""
    def t(table: str, *cols: str) -> str:
        return f"({_view_sql(con, root, table, cols, torn)})"
    return f"""
SELECT i.run_id, i.created, i.model, i.preset, i.reg, i.seed, i.n_rounds,
       i.config_hash, i.resumed_from,
       CASE WHEN s.status = 'running' AND (h.heartbeat IS NULL OR
                 h.heartbeat < timezone('UTC', now()) - INTERVAL {STALE_S} SECOND) THEN 'stale'
            ELSE s.status END AS status,
       s.reason, s.round AS status_round, coalesce(r.rounds_done, 0) AS rounds_done, l.last_ts, h.heartbeat
FROM (SELECT * FROM {t("run_info", "run_id", "created", "model", "preset", "reg", "seed", "n_rounds",
                       "config_hash", "resumed_from")}
      QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY created DESC) = 1) i
LEFT JOIN (SELECT * FROM {t("status", "run_id", "ts", "status", "reason", "round")}
           QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY ts DESC) = 1) s
  USING (run_id)
LEFT JOIN (SELECT run_id, count(DISTINCT round) AS rounds_done FROM {t("rounds", "run_id", "round")}
           GROUP BY run_id) r USING (run_id)
LEFT JOIN (SELECT run_id, max(ts) AS last_ts
           FROM (SELECT run_id, ts FROM {t("status", "run_id", "ts")}
                 UNION ALL SELECT run_id, ts FROM {t("stages", "run_id", "ts")})
           GROUP BY run_id) l USING (run_id)
LEFT JOIN ({_heartbeats(con, root)}) h USING (run_id)
"""


def _create_views(con: duckdb.DuckDBPyConnection, root: str | os.PathLike, strict: bool = False) -> None:
    root = Path(root).resolve()
    torn = torn_tails(root) if strict else None
    for table in TABLES:
        con.execute(f"CREATE OR REPLACE VIEW {_ident(table)} AS {_view_sql(con, root, table, torn=torn)}")
    con.execute(f"CREATE OR REPLACE VIEW runs AS {_runs_view(con, root, torn)}")
    # a diagnostic's status: done once finish() wrote it (records written before statuses existed count as done)
    con.execute("""CREATE OR REPLACE VIEW diags AS SELECT diag_id, any_value(kind) AS kind,
        any_value(source_run) AS source_run, any_value(round) AS round, min(created) AS created,
        CASE WHEN bool_or(status = 'done') OR bool_and(status IS NULL) THEN 'done'
             WHEN bool_or(status = 'interrupted') THEN 'interrupted' ELSE 'running' END AS status
        FROM diagnostics GROUP BY diag_id""")
    # readers see the rows of finished records only; all_diag_rows also holds a killed record's partial rows
    con.execute(f"CREATE OR REPLACE VIEW all_diag_rows AS {_view_sql(con, root, 'diag_rows', torn=torn)}")
    con.execute("CREATE OR REPLACE VIEW diag_rows AS SELECT * FROM all_diag_rows "
                "WHERE diag_id IN (SELECT diag_id FROM diags WHERE status = 'done')")


def connect(root: str | os.PathLike = DEFAULT_ROOT, strict: bool = False) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB connection with one view per table plus `runs`.
    Globs are bound per query, so new runs show up without reconnecting; a
    table with no file at all stays empty until the next connect().

    Once the views exist the connection is confined: files only under the store root (no reads or
    COPY elsewhere, no extensions, no ATTACH), and its settings locked so a query cannot lift that."""
    con = duckdb.connect(":memory:")
    _create_views(con, root, strict)
    # DuckDB also allows its spill folder, by default <cwd>/.tmp/ (a query could read_text('.tmp/x')): spill
    # under the root instead, which is allowed anyway
    spill = str(Path(root).resolve() / ".duckdb-spill")
    for stmt, arg in (("SET temp_directory = ?", [spill]), ("SET enable_progress_bar = false", None), ("SET allowed_directories = ?", [[str(Path(root).resolve())]]),
                      ("SET enable_external_access = false", None), ("SET autoinstall_known_extensions = false", None),
                      ("SET autoload_known_extensions = false", None), ("SET lock_configuration = true", None)):
        con.execute(stmt, arg) if arg else con.execute(stmt)
    return con


def query(root: str | os.PathLike, sql: str, params: Any = None,
          timeout: float | None = None) -> tuple[list[str], list[tuple]]:
    """(columns, rows) of one reading statement over the store; anything else is refused (SqlRefused).
    Past `timeout` seconds (None: no limit) the query is stopped and QueryTimeout raised."""
    con = connect(root, strict=True)
    try:
        check_read_only(con, sql)
        return _execute(con, sql, params, timeout, root)
    finally:
        con.close()


def _execute(con: duckdb.DuckDBPyConnection, sql: str, params: Any, timeout: float | None,
             root: str | os.PathLike) -> tuple[list[str], list[tuple]]:
    """The query runs in a worker thread while this one waits: DuckDB checks neither a clock nor Python's
    signals while it executes (a Ctrl-C used to wait for the query's end), so the timeout and a
    KeyboardInterrupt here stop it with con.interrupt()."""
    box: dict[str, Any] = {}
    done = threading.Event()  # not Thread.join: one interrupted by Ctrl-C reports a live thread as ended

    def work() -> None:
        try:
            cur = fetch(con, sql, params, root)  # a damaged line: StoreDamaged, named file:line
            box["out"] = ([], []) if cur.description is None else ([d[0] for d in cur.description], cur.fetchall())
        except BaseException as e:  # handed to the waiting thread, which raises it
            box["err"] = e
        finally:
            done.set()

    threading.Thread(target=work, name="store-query", daemon=True).start()
    try:
        finished = done.wait(timeout)
    except KeyboardInterrupt:
        con.interrupt()
        done.wait()
        raise
    if not finished:
        con.interrupt()
        done.wait()
        if "out" not in box:
            raise QueryTimeout(f"ran past {timeout:g} s")
    if "err" in box:
        raise box["err"]
    return box["out"]


def write_catalog(root: str | os.PathLike = DEFAULT_ROOT) -> Path:
    """Write <root>/catalog.duckdb holding the views (absolute paths) for
    `duckdb -readonly out/catalog.duckdb`. Built in a temp file and renamed, so
    a session that has the old one open keeps working."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    target = root / "catalog.duckdb"
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".catalog.", suffix=".duckdb")
    os.close(fd)
    os.unlink(tmp)  # duckdb wants to create the file itself
    try:
        con = duckdb.connect(tmp)
        try:
            _create_views(con, root)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(tmp, target)
    finally:
        for p in (tmp, tmp + ".wal"):
            Path(p).unlink(missing_ok=True)
    return target



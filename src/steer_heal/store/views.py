"""DuckDB views over every run's JSONL files: what `just sql`, the diagnostics and a person's own
DuckDB session query. Nothing here writes to a run's files.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import duckdb

from .schema import DEFAULT_ROOT, KINDS, MAX_LINE_BYTES, TABLES


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _view_sql(con: duckdb.DuckDBPyConnection, root: Path, table: str, only: tuple[str, ...] = ()) -> str:
    """The table over every run's file; `only` declares just those columns (read_json parses every
    declared column of every line, so a narrow read of a wide table is several times faster)."""
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
    # ignore_errors turns a torn line into an all-NULL row; the id filter drops it.
    return (f"SELECT * FROM read_json({_lit(pattern)}, format='newline_delimited', "
            f"columns={struct}, ignore_errors=true, maximum_object_size={4 * MAX_LINE_BYTES}) "
            f"WHERE {_ident(id_col)} IS NOT NULL")


def _runs_view(con: duckdb.DuckDBPyConnection, root: Path) -> str:
    """One row per run from narrow reads of run_info, status, rounds and stages."""
    def t(table: str, *cols: str) -> str:
        return f"({_view_sql(con, root, table, cols)})"
    return f"""
SELECT i.run_id, i.created, i.model, i.preset, i.reg, i.seed, i.n_rounds,
       i.config_hash, i.resumed_from, s.status, s.reason, s.round AS status_round,
       coalesce(r.rounds_done, 0) AS rounds_done, l.last_ts
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
"""


def _create_views(con: duckdb.DuckDBPyConnection, root: str | os.PathLike) -> None:
    root = Path(root).resolve()
    for table in TABLES:
        con.execute(f"CREATE OR REPLACE VIEW {_ident(table)} AS {_view_sql(con, root, table)}")
    con.execute(f"CREATE OR REPLACE VIEW runs AS {_runs_view(con, root)}")


def connect(root: str | os.PathLike = DEFAULT_ROOT) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB connection with one view per table plus `runs`.
    Globs are bound per query, so new runs show up without reconnecting; a
    table with no file at all stays empty until the next connect()."""
    con = duckdb.connect(":memory:")
    _create_views(con, root)
    return con


def query(root: str | os.PathLike, sql: str, params: Any = None) -> tuple[list[str], list[tuple]]:
    con = connect(root)
    try:
        cur = con.execute(sql, params) if params is not None else con.execute(sql)
        if cur.description is None:
            return [], []
        return [d[0] for d in cur.description], cur.fetchall()
    finally:
        con.close()


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



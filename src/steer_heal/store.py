"""The store: append-only JSONL files per run, queried through DuckDB views.

Layout::

    <root>/runs/<run_id>/<table>.jsonl          one JSON object per line
    <root>/diagnostics/<diag_id>/<table>.jsonl  diagnostic outputs
    <root>/catalog.duckdb                       views only (see write_catalog)

Why not one .duckdb file: a read-write DuckDB database locks out every other
process while it is open, so concurrent runs and a person's SQL session could
not coexist. Appending whole lines to per-run files needs no lock at all, and
DuckDB reads them through globs at query time.

TABLES is the schema, in one place: add a column or a table there and the
writer, the views, the catalog and docs/store.md all follow.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import duckdb
from loguru import logger

DEFAULT_ROOT = "out"

_ROUND_COLS = ["kappa DOUBLE", "n_gen BIGINT", "n_kept BIGINT", "kept_frac DOUBLE",
               "ppl_mean DOUBLE", "ppl_median DOUBLE"]
_ROUND_DOUBLES = (
    "care_nats fairness_nats loyalty_nats auth_nats sanctity_nats liberty_nats social_nats "
    "target_nats trait_nats coherence cos_v0 student_cos retain retain_trait coh_cost"
).split()


def _cols(spec: str | list[str]) -> dict[str, str]:
    """'a TYPE, b TYPE' -> {'a': 'TYPE', 'b': 'TYPE'} (keeps TABLES readable)."""
    items = spec.split(",") if isinstance(spec, str) else spec
    return dict(item.split() for item in items)


# table -> {column: duckdb type}. The first column is the owner's id and decides
# where the table lives: run_id -> runs/, diag_id -> diagnostics/.
TABLES: dict[str, dict[str, str]] = {
    "run_info": _cols(
        "run_id VARCHAR, created TIMESTAMP, model VARCHAR, preset VARCHAR, reg VARCHAR,"
        "seed BIGINT, n_rounds BIGINT, config_hash VARCHAR, config JSON, env JSON,"
        "resumed_from VARCHAR"),
    "status": _cols(
        "run_id VARCHAR, ts TIMESTAMP, status VARCHAR, round BIGINT, reason VARCHAR"),
    "rounds": _cols(
        ["run_id VARCHAR", "round BIGINT", *_ROUND_COLS]
        + [f"{c} DOUBLE" for c in _ROUND_DOUBLES]
        + ["surgical BOOLEAN", "heal_nll DOUBLE", "val_nll DOUBLE",
           "steered_target_nats DOUBLE", "steered_trait_nats DOUBLE",
           "steered_coherence DOUBLE", "sec_extract DOUBLE", "sec_dose DOUBLE",
           "sec_heal DOUBLE", "sec_eval DOUBLE", "sec_total DOUBLE"]),
    "stage_metrics": _cols(
        "run_id VARCHAR, round BIGINT, stage VARCHAR, evaluator VARCHAR,"
        "foundation VARCHAR, prob DOUBLE, nats DOUBLE, coherence DOUBLE,"
        "top1_agree DOUBLE, n BIGINT, coef DOUBLE"),
    "completions": _cols(
        "run_id VARCHAR, round BIGINT, phase VARCHAR, step BIGINT, idx BIGINT,"
        "alpha DOUBLE, kappa DOUBLE, coef DOUBLE, prompt VARCHAR, completion VARCHAR,"
        "ppl DOUBLE, rep_word DOUBLE, rep_char DOUBLE, narration BOOLEAN,"
        "refusal BOOLEAN, keep BOOLEAN, reason VARCHAR"),
    "heal_steps": _cols(
        "run_id VARCHAR, round BIGINT, step BIGINT, epoch BIGINT, nll DOUBLE,"
        "div DOUBLE, barrier DOUBLE, loss DOUBLE, gnorm_sft DOUBLE,"
        "gnorm_barrier DOUBLE, lr DOUBLE, val_nll DOUBLE"),
    "dose_steps": _cols(
        "run_id VARCHAR, round BIGINT, step BIGINT, kappa DOUBLE, n BIGINT,"
        "n_kept BIGINT, rate DOUBLE, accepted BOOLEAN"),
    "stages": _cols(
        "run_id VARCHAR, round BIGINT, stage VARCHAR, seconds DOUBLE, ts TIMESTAMP"),
    "adapters": _cols("run_id VARCHAR, round BIGINT, path VARCHAR, sha256 VARCHAR"),
    "diagnostics": _cols(
        "diag_id VARCHAR, kind VARCHAR, source_run VARCHAR, round BIGINT,"
        "created TIMESTAMP, config JSON"),
    "diag_rows": _cols(
        "diag_id VARCHAR, kind VARCHAR, source_run VARCHAR, round BIGINT, row JSON"),
}

# kind (= top-level folder) -> the id column that marks its tables.
KINDS = {"runs": "run_id", "diagnostics": "diag_id"}
# Timestamp columns filled with the current UTC time when a row leaves them out,
# so that "latest status" ordering never meets a NULL ts.
AUTO_NOW = ("ts", "created")
# One line over read_json's maximum_object_size fails every query on the view
# (ignore_errors does not cover it), so the writer refuses such rows up front
# and the views allow 4x that.
MAX_LINE_BYTES = 16 << 20


def tables_of(kind: str) -> list[str]:
    return [t for t, cols in TABLES.items() if next(iter(cols)) == KINDS[kind]]


def utcnow() -> dt.datetime:
    """Naive UTC: DuckDB's TIMESTAMP parser drops a '+hh:mm' offset rather than
    applying it, so the store only ever holds UTC without an offset."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# ---------------------------------------------------------------- values

def _scalar(v: Any) -> Any:
    """numpy/torch scalars (and 0-d/1-element arrays) -> Python; NaN/inf -> None."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes)) and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):  # not a single element: leave for the caller
            return v
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _timestamp(v: dt.datetime | dt.date) -> str:
    if isinstance(v, dt.datetime) and v.tzinfo is not None:
        v = v.astimezone(dt.UTC).replace(tzinfo=None)
    return v.isoformat()


def _json_safe(v: Any) -> Any:
    """Recursively turn a value into plain JSON (for JSON columns)."""
    v = _scalar(v)
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v
    if isinstance(v, (dt.datetime, dt.date)):
        return _timestamp(v)
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _json_safe(dataclasses.asdict(v))
    if isinstance(v, Mapping):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if hasattr(v, "tolist"):  # arrays, tensors
        return _json_safe(v.tolist())
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_json_safe(x) for x in v]
    raise TypeError(f"cannot store a {type(v).__name__} as JSON")


def _convert(table: str, col: str, typ: str, v: Any) -> Any:
    """Coerce one value to what its column type reads back as. A mismatch raises
    here instead of silently turning into NULL in the views."""
    if typ == "JSON":
        try:
            return _json_safe(v)
        except TypeError as e:
            raise ValueError(f"{table}.{col}: {e}") from None
    v = _scalar(v)
    if v is None:
        return None
    ok: Any = None
    if typ == "DOUBLE" and isinstance(v, (int, float)) and not isinstance(v, bool):
        ok = float(v)
    elif typ == "BIGINT" and isinstance(v, (int, float)) and not isinstance(v, bool):
        ok = int(v) if float(v).is_integer() else None
    elif typ == "BOOLEAN" and isinstance(v, bool):
        ok = v
    elif typ == "VARCHAR" and isinstance(v, (str, os.PathLike)):
        ok = os.fspath(v)
    elif typ == "TIMESTAMP" and isinstance(v, (dt.date, str)):
        try:  # parse strings too, so offsets get normalised and junk is refused
            ok = _timestamp(dt.datetime.fromisoformat(v) if isinstance(v, str) else v)
        except ValueError:
            ok = None
    if ok is None:
        raise ValueError(f"{table}.{col} is {typ}; got {type(v).__name__} {v!r}")
    return ok


# ---------------------------------------------------------------- files

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, then rename: readers
    see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    # Makes the rename itself durable; not all platforms allow opening a directory.
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ends_torn(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


class RunLog:
    """Appends rows to one run's (or one diagnostic's) table files.

    Each append is a single os.write on an O_APPEND descriptor: the kernel
    places it at the end of the file and does not interleave it with other
    writers' appends, and a kill -9 can only lose (or tear) the line being
    written, never an earlier one. No lock, no long-lived handle.
    """

    def __init__(self, root: str | os.PathLike, run_id: str, kind: str = "runs"):
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; allowed: {sorted(KINDS)}")
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise ValueError(f"bad id {run_id!r}")
        self.root, self.run_id, self.kind = Path(root), run_id, kind
        self.id_col = KINDS[kind]
        self.tables = tables_of(kind)
        self.dir = self.root / kind / run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self._tail_checked: set[str] = set()

    def path(self, table: str) -> Path:
        self._check_table(table)
        return self.dir / f"{table}.jsonl"

    def _check_table(self, table: str) -> None:
        if table not in self.tables:
            raise ValueError(f"unknown table {table!r} for {self.kind}; "
                             f"allowed: {', '.join(self.tables)}")

    def _line(self, table: str, row: Mapping[str, Any]) -> bytes:
        cols = TABLES[table]
        unknown = [c for c in row if c not in cols]
        if unknown:
            raise ValueError(f"unknown column(s) {unknown} for table {table!r}; "
                             f"allowed: {', '.join(cols)}")
        given = row.get(self.id_col, self.run_id)
        if given != self.run_id:
            raise ValueError(f"{table}.{self.id_col}={given!r} but this log is {self.run_id!r}")
        out = {self.id_col: self.run_id}
        for c, typ in cols.items():
            if c == self.id_col:
                continue
            if c in row:
                out[c] = _convert(table, c, typ, row[c])
            elif c in AUTO_NOW and typ == "TIMESTAMP":
                out[c] = _timestamp(utcnow())
        # "replace" only matters for lone surrogates, which UTF-8 cannot hold.
        line = (json.dumps(out, allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        if len(line) > MAX_LINE_BYTES:
            raise ValueError(f"{table} row is {len(line)} bytes; the limit is {MAX_LINE_BYTES}")
        return line

    def append(self, table: str, rows: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> int:
        """Append one row (a dict) or several; returns how many were written.
        All rows are validated before anything is written."""
        path = self.path(table)
        rows = [rows] if isinstance(rows, Mapping) else list(rows)
        if not rows:
            return 0
        data = b"".join(self._line(table, r) for r in rows)
        if table not in self._tail_checked:
            # A writer killed mid-line (say, before a resume) leaves a torn tail;
            # start on a fresh line so our rows are not glued onto it and lost
            # with it. Once per table: after that the file ends in our own "\n".
            # Racing another writer's in-flight line costs at most a blank line,
            # which both readers skip.
            if _ends_torn(path):
                data = b"\n" + data
            self._tail_checked.add(table)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            n = os.write(fd, data)
            if n != len(data):  # only on disk full and the like
                self._tail_checked.discard(table)  # we just left a torn tail ourselves
                raise OSError(f"short write to {path}: {n} of {len(data)} bytes")
        finally:
            os.close(fd)
        return len(rows)

    def read(self, table: str) -> list[dict[str, Any]]:
        """This run's rows of one table, parsed in pure Python (no DuckDB), with
        every column present (None when absent) and timestamps as datetime.
        Unparseable lines (a torn tail from a killed writer) are skipped."""
        path = self.path(table)
        if not path.exists():
            return []
        cols = TABLES[table]
        lines = path.read_bytes().split(b"\n")
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                if i < len(lines) - 1:  # the last line may just be in flight
                    logger.warning("skipping torn line {} of {}", i + 1, path)
                continue
            row = {c: obj.get(c) for c in cols}
            for c, typ in cols.items():
                if typ == "TIMESTAMP" and isinstance(row[c], str):
                    row[c] = dt.datetime.fromisoformat(row[c])
            out.append(row)
        return out

    def touch_all(self) -> None:
        """Create every table file (empty) so the views' globs always match."""
        for t in self.tables:
            os.close(os.open(self.path(t), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))

    def drop(self, table: str, where) -> int:
        """Rewrite a table without the rows where `where(row)` holds (tmp + rename).

        Resume uses it to clear a crashed stage's partial rows before redoing the
        stage. Only the run's own process writes its files, so no append is lost.
        """
        path = self.path(table)
        if not path.exists():
            return 0
        keep, n = [], 0
        for line in path.read_bytes().split(b"\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn line from the crash
            if where({c: row.get(c) for c in TABLES[table]}):
                n += 1
            else:
                keep.append(line + b"\n")
        if n:
            atomic_write_bytes(path, b"".join(keep))
        self._tail_checked.add(table)
        return n


# ---------------------------------------------------------------- DuckDB views

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


# ---------------------------------------------------------------- CLI

def _cell(v: Any, width: int = 60) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dt.datetime):
        return v.isoformat(sep=" ", timespec="seconds")
    s = str(v).replace("\n", "\\n")
    return s if len(s) <= width else s[: width - 1] + "…"


def format_table(columns: list[str], rows: list[tuple]) -> str:
    """Aligned plain-text table; numbers right-aligned, long text cut."""
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)
               for i in range(len(columns))]

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric, strict=True)).rstrip()

    out = [line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steer_heal.store",
                                 description="Query the steer-heal store.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_sql = sub.add_parser("sql", help="run SQL over the store's views")
    p_sql.add_argument("sql")
    p_sql.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    p_runs = sub.add_parser("runs", help="one line per run")
    p_cat = sub.add_parser("catalog", help="(re)write <root>/catalog.duckdb")
    for p in (p_sql, p_runs, p_cat):
        p.add_argument("--root", default=DEFAULT_ROOT)
    args = ap.parse_args(argv)

    if args.cmd == "catalog":
        print(write_catalog(args.root))
        return 0
    sql = args.sql if args.cmd == "sql" else (
        "SELECT run_id, created, model, reg, rounds_done, status FROM runs "
        "ORDER BY created, run_id")
    try:
        cols, rows = query(args.root, sql)
    except duckdb.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if getattr(args, "csv", False):
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(cols)
        w.writerows(rows)
    elif cols:
        print(format_table(cols, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""RunLog: append-only JSON lines, one file per table per run (or per diagnostic).

Why not one .duckdb file: a read-write DuckDB database locks out every other
process while it is open, so concurrent runs and a person's SQL session could
not coexist. Appending whole lines to per-run files needs no lock at all, and
DuckDB reads them through globs at query time (views.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import fcntl
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import atomic_write_bytes, safe_name
from .schema import AUTO_NOW, KINDS, MAX_LINE_BYTES, TABLES, tables_of, utcnow

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


# ---------------------------------------------------------------- damage

# <table>.jsonl.aside: lines taken out of a table (a torn tail before an append, what `just fsck --fix` moves),
# kept byte for byte; the views' globs (<table>.jsonl) never match it
ASIDE = ".aside"


class StoreDamaged(UserError):
    """A line other than the last is not a row: the file was changed after it was written."""


def parse(line: bytes, id_col: str) -> tuple[dict | None, str]:
    """(row, "") for a line of the store, else (None, why it is not one)."""
    if b"\x00" in line:
        return None, "NUL bytes"
    try:
        obj = json.loads(line)
    except UnicodeDecodeError:
        return None, "invalid UTF-8"
    except ValueError:
        return None, "not a whole JSON line (cut or overwritten)"
    if not isinstance(obj, dict):
        return None, f"a JSON {type(obj).__name__}, not an object"
    if obj.get(id_col) is None:
        return None, f"an object without {id_col}"
    return obj, ""


def damaged(path: Path, line: int, why: str) -> StoreDamaged:
    run = path.parent.name
    return StoreDamaged(f"{path}:{line}: {why}: the store was changed after it was written (a crash tears only "
                        f"the last line); `just fsck {run}` reports the damage, `just fsck {run} --fix` moves it aside")


def first_damage(path: Path, id_col: str) -> StoreDamaged | None:
    """The first damaged line of a table file (its torn tail, if any, is not damage), or None."""
    lines = path.read_bytes().split(b"\n")
    for i, line in enumerate(lines[:-1]):
        if line.strip() and (why := parse(line, id_col)[1]):
            return damaged(path, i + 1, why)
    return None


def set_aside(path: Path, lines: list[bytes]) -> None:
    """Append lines to the table's side file (<table>.jsonl.aside): nothing taken out of a table is deleted."""
    if lines:
        with open(str(path) + ASIDE, "ab") as f:
            f.write(b"".join(x + b"\n" for x in lines))
            f.flush()
            os.fsync(f.fileno())


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


def _tail_aside(path: Path) -> None:
    raw = path.read_bytes()
    cut = raw.rfind(b"\n") + 1
    set_aside(path, [raw[cut:]])
    os.truncate(path, cut)


class RunLog:
    """Appends rows to one run's (or one diagnostic's) table files.

    Each append is a single os.write on an O_APPEND descriptor: the kernel
    places it at the end of the file and does not interleave it with other
    writers' appends, and a kill -9 can only lose (or tear) the line being
    written, never an earlier one. Appends share a per-file flock held for one
    write (only the torn-tail check excludes them); no long-lived handle.
    """

    def __init__(self, root: str | os.PathLike, run_id: str, kind: str = "runs"):
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; allowed: {sorted(KINDS)}")
        if not safe_name(run_id):
            raise ValueError(f"bad id {run_id!r}: letters, digits and . _ + = - only, not starting with '.'")
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
        check = table not in self._tail_checked
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # A writer killed mid-line (say, before a resume) leaves a torn tail. It goes to the side file and
            # our rows start where it started: left in place it would be damage in the middle of the table,
            # which every reader refuses. Once per table: after that the file ends in our own "\n". A line in
            # flight looks torn too, so every append holds a shared flock while it writes and the check an
            # exclusive one: a tail seen under it is a dead writer's (the kernel drops a dead one's flock).
            fcntl.flock(fd, fcntl.LOCK_EX if check else fcntl.LOCK_SH)
            if check:
                if _ends_torn(path):
                    _tail_aside(path)
                self._tail_checked.add(table)
            n = os.write(fd, data)
            if n != len(data):  # only on disk full and the like
                self._tail_checked.discard(table)  # we just left a torn tail ourselves
                st = os.statvfs(path)
                full = st.f_bavail * st.f_frsize < len(data) - n
                raise OSError(errno.ENOSPC if full else errno.EIO,
                              f"{'No space left on device: ' if full else ''}short write to {path}: {n} of "
                              f"{len(data)} bytes")
        finally:
            os.close(fd)
        return len(rows)

    def read(self, table: str) -> list[dict[str, Any]]:
        """This run's rows of one table, parsed in pure Python (no DuckDB), with
        every column present (None when absent) and timestamps as datetime.
        A torn last line (in flight, or a killed writer's) is skipped; any other line that is not a row is
        damage and refused (StoreDamaged, naming file:line)."""
        path = self.path(table)
        if not path.exists():
            return []
        cols = TABLES[table]
        lines = path.read_bytes().split(b"\n")
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            obj, why = parse(line, self.id_col)
            if obj is None:
                if i < len(lines) - 1:  # the last line may just be in flight
                    raise damaged(path, i + 1, why)
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
        stage. Only the run's writer (the holder of its lock) writes its files, so
        no append is lost. A torn tail goes to the side file too, even when no row
        matched: the file then ends in a newline, so the next append starts its own line.
        Damage in the middle is refused, like read does, before anything is rewritten.
        """
        path = self.path(table)
        if not path.exists():
            return 0
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        keep, n = [], 0
        for i, line in enumerate(lines[:-1]):
            if not line.strip():
                continue
            row, why = parse(line, self.id_col)
            if row is None:
                raise damaged(path, i + 1, why)
            if where({c: row.get(c) for c in TABLES[table]}):
                n += 1
            else:
                keep.append(line + b"\n")
        if n or lines[-1]:
            set_aside(path, [lines[-1]] if lines[-1].strip() else [])  # a torn tail from the crash
            atomic_write_bytes(path, b"".join(keep))
        self._tail_checked.add(table)
        return n

"""The store: append-only JSONL files per run, queried through DuckDB views.

Layout::

    <root>/runs/<run_id>/<table>.jsonl          one JSON object per line
    <root>/diagnostics/<diag_id>/<table>.jsonl  diagnostic outputs
    <root>/catalog.duckdb                       views only (see views.write_catalog)

schema.py is the schema (tables, columns; which stage owns which rows is stage.py's), log.py the writer and
reader of one run's files, lock.py the one-writer-per-run lock and heartbeat, views.py the DuckDB views
over all of them (read-only), fsck.py `just fsck` (damaged lines), __main__.py the shell commands behind
`just sql`, `just runs` and `just fsck`.
docs/store.md describes it for users.
"""

from .lock import RunLocked, WriterLock
from .log import RunLog
from .schema import DEFAULT_ROOT, KINDS, TABLES, tables_of, utcnow
from .views import SqlRefused, check_read_only, connect, query, write_catalog

__all__ = ["DEFAULT_ROOT", "KINDS", "TABLES", "RunLocked", "RunLog", "SqlRefused", "WriterLock",
           "check_read_only", "connect", "query", "tables_of", "utcnow", "write_catalog"]

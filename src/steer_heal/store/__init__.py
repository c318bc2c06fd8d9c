"""The store: append-only JSONL files per run, queried through DuckDB views.

Layout::

    <root>/runs/<run_id>/<table>.jsonl          one JSON object per line
    <root>/diagnostics/<diag_id>/<table>.jsonl  diagnostic outputs
    <root>/catalog.duckdb                       views only (see views.write_catalog)

schema.py is the schema (tables, columns, which stage owns which rows), log.py the writer and
reader of one run's files, views.py the DuckDB views over all of them, __main__.py the shell
commands behind `just sql` and `just runs`. docs/store.md describes it for users.
"""

from .log import RunLog
from .schema import DEFAULT_ROOT, KINDS, STAGE_ROWS, TABLES, tables_of, utcnow
from .views import connect, query, write_catalog

__all__ = ["DEFAULT_ROOT", "KINDS", "STAGE_ROWS", "TABLES", "RunLog", "connect", "query", "tables_of", "utcnow",
           "write_catalog"]

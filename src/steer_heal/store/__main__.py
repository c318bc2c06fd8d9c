"""`python -m steer_heal.store sql|runs|catalog`: query the store from a shell (`just sql`, `just runs`).

The query path only reads: one reading statement (views.check_read_only) on a connection confined to
the store root (views.connect). A refused statement exits 2, SQL that DuckDB rejects or a query past
--timeout exits 1, Ctrl-C exits 130; each says so in one line."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import duckdb

from ..console import Parser
from ..errors import UserError
from ..tables import format_table
from .log import RunLog
from .schema import DEFAULT_ROOT, KINDS
from .views import QueryTimeout, query, write_catalog

TIMEOUT_S = 120.0  # the store's own queries take about a second on 200 runs (docs/performance.md)


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m steer_heal.store", description="Query the steer-heal store.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    p_sql = sub.add_parser("sql", help="run one reading SQL statement over the store's views")
    p_sql.add_argument("sql")
    p_sql.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    p_runs = sub.add_parser("runs", help="one line per run")
    p_cat = sub.add_parser("catalog", help="(re)write <root>/catalog.duckdb")
    p_fsck = sub.add_parser("fsck", help="list a run's damaged lines; --fix moves them aside and rolls the run back")
    p_fsck.add_argument("run_id")
    p_fsck.add_argument("--fix", action="store_true", help="move damaged lines to <table>.jsonl.aside and take the "
                        "run back to its last intact round (a resume redoes the rest)")
    for p in (p_sql, p_runs, p_cat, p_fsck):
        p.add_argument("--root", "--out", dest="root", default=DEFAULT_ROOT, help="store root (default: out)")
    for p in (p_sql, p_runs):
        p.add_argument("--timeout", type=float, default=TIMEOUT_S, metavar="SECONDS",
                       help=f"stop a query that runs longer (default: {TIMEOUT_S:g}; 0: no limit)")
    args = ap.parse_args(argv)

    if args.cmd == "catalog":
        print(write_catalog(args.root))
        return 0
    if args.cmd == "fsck":
        return _fsck(args.root, args.run_id, args.fix)
    sql = args.sql if args.cmd == "sql" else (
        "SELECT run_id, created, model, reg, rounds_done, status FROM runs "
        "ORDER BY created, run_id")
    try:
        cols, rows = query(args.root, sql, timeout=args.timeout if args.timeout > 0 else None)
    except QueryTimeout:
        print(f"steer-heal sql: the query ran past --timeout {args.timeout:g} s and was stopped; narrow it "
              f"(WHERE, LIMIT) or pass a longer --timeout (0: no limit)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("steer-heal sql: interrupted (Ctrl-C); the query was stopped", file=sys.stderr)
        return 130
    except UserError as e:  # a refused statement, a damaged store (file:line)
        print(f"steer-heal sql: {e}", file=sys.stderr)
        return 2
    except duckdb.PermissionException as e:
        print(f"steer-heal sql: queries read only under the store root {args.root}: {str(e).splitlines()[0]}",
              file=sys.stderr)
        return 2
    except duckdb.Error as e:
        print(f"steer-heal sql: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    if getattr(args, "csv", False):
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(cols)
        w.writerows(rows)
    elif cols:
        print(format_table(cols, rows))
    return 0


def _fsck(root: str, run_id: str, fix: bool) -> int:
    """0: no damage (a torn last line is none) or fixed; 1: damage found and left; 2: no such run, or it is live."""
    from ..files import safe_name
    from . import fsck

    kind = next((k for k in KINDS if safe_name(run_id) and (Path(root) / k / run_id).is_dir()), None)
    if kind is None:
        print(f"steer-heal fsck: no run {run_id!r} under {root}: see `just runs`", file=sys.stderr)
        return 2
    log = RunLog(root, run_id, kind)
    rep = fsck.scan(log)
    print("\n".join(fsck.describe(log, rep)))
    if not (fix and rep.damage):
        return 1 if rep.damage else 0
    try:
        print("\n".join(fsck.fix(log, rep)))
    except UserError as e:
        print(f"steer-heal fsck: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m steer_heal.store sql|runs|catalog`: query the store from a shell (`just sql`, `just runs`)."""

from __future__ import annotations

import argparse
import csv
import sys

import duckdb

from ..report import format_table
from .schema import DEFAULT_ROOT
from .views import query, write_catalog


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

"""`python -m steer_heal.sweep submit|status|server|worker|enqueue|ui`: the recipes `just sweep`,
`just sweep-status`, `just server`, `just worker`, `just ui` and the pool side of the `queue-*` recipes.

    just sweep --name lam --reg kl_rev nll --lam 0.3 1 --seeds 0 1 2 -- --preset fast-dev --out out
    just sweep grid.toml            # the same grid from a file (docs/scaling.md)
    just sweep --name lam --lam 0.3 1 --seeds 0 1 --on procs -- --preset fast-dev   # here, not on the pool
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from pathlib import Path

from ..console import quiet_env, script
from ..errors import UserError
from ..tables import format_table
from .grid import AXES, FIELDS, RECIPES, Grid, load_toml
from .launch import ON, launch
from .pool import POOL, connect_server, enqueue, workers_note
from .state import STALE_AFTER


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """Own flags before the first `--`, the run's base flags after it."""
    return (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])


def submit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="just sweep", allow_abbrev=False,
                                usage="just sweep [FILE] --name N [--KNOB V ...] [--seeds S ...] [--plus K=V ...] "
                                      "[-- RUN FLAGS]", description="Submit a grid of runs to the work pool: the cross "
                                "product of the knobs and seeds, plus extra cells; done cells are skipped, unfinished "
                                "ones resumed. Flags after `--` go to every run (python -m steer_heal --help).")
    p.add_argument("file", nargs="?", help="a grid file (TOML: name, seeds, base, [grid], [[plus]])")
    p.add_argument("--name", help="the sweep's name: run ids are sw-NAME-<knob>=<value>...-s<seed>")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds of every cell")
    p.add_argument("--plus", nargs="+", action="append", metavar="KNOB=VALUE",
                   help="an extra cell (a control, say --plus control=c0), crossed with the seeds only; repeatable")
    p.add_argument("--prefix", help="of every run id (default sw; '' names the runs NAME-...-s<seed>, as "
                   "`just seeds` does)")
    p.add_argument("--recipe", choices=tuple(RECIPES), help="start each run through this `just` recipe (its flags "
                   "lead the cell's), as `just seeds` does")
    p.add_argument("--on", choices=ON, default="pool", help="where the runs execute: the work pool (default), "
                   "here one process each, or here in this process, one after another")
    p.add_argument("--pool", default=POOL)
    p.add_argument("--stale-after", type=float, default=STALE_AFTER,
                   help="seconds without a sign of life after which a `running` cell counts as dead and is resumed")
    p.add_argument("--dry-run", action="store_true", help="say what would be submitted, submit nothing")
    axes = p.add_argument_group("knobs to cross (any experiment field of python -m steer_heal)")
    for name in AXES:
        axes.add_argument("--" + name.replace("_", "-"), dest="axis_" + name, nargs="+", metavar="V",
                          help=FIELDS[name].metadata["help"].replace("%", "%%"))  # argparse %-formats help
    return p


def grid_of(argv: list[str]) -> tuple[Grid, argparse.Namespace]:
    """The grid `just sweep ARGV` launches: the file's, with the flags on top."""
    own, base = _split(argv)
    a = submit_parser().parse_args(own)
    g = load_toml(a.file) if a.file else Grid(name="")
    g.name = a.name or g.name
    g.seeds = a.seeds if a.seeds is not None else g.seeds
    g.prefix = a.prefix if a.prefix is not None else g.prefix
    g.recipe = a.recipe or g.recipe
    g.axes.update({k[5:]: v for k, v in vars(a).items() if k.startswith("axis_") and v})
    for cell in a.plus or []:
        if not all("=" in kv for kv in cell):
            raise UserError(f"--plus takes KNOB=VALUE pairs, got {cell}")
        g.plus.append(dict(kv.split("=", 1) for kv in cell))
    g.base = [*g.base, *base]
    return g, a


def cmd_submit(argv: list[str]) -> int:
    g, a = grid_of(argv)
    cells = g.cells()
    root = Path(cells[0].cfg.out).resolve()  # absolute: a flow run starts in a throwaway temp dir
    got = launch(g.name, cells, root, a.on, pool=a.pool, stale_after=a.stale_after, dry_run=a.dry_run)
    print(format_table(["run_id", "action", "why"], got))
    if a.on != "pool":
        bad = [rid for rid, act, _ in got if act == "failed"]
        print(f"sweep {g.name}: {len(cells)} cells, {len(bad)} failed, store {root}" +
              (f"; rerun the same command to resume {', '.join(bad)}" if bad else ""))
        return 1 if bad else 0
    n = sum(1 for _, act, _ in got if act == "submitted")
    print(f"sweep {g.name}: {len(cells)} cells, {n} submitted to pool {a.pool!r} ({workers_note(a.pool)}), "
          f"store {root}. Follow: just sweep-status {g.name} --out {shlex.quote(str(root))}")
    return 0


def cmd_status(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="just sweep-status", description="One line per sweep cell.")
    p.add_argument("name", nargs="?", help="the sweep (default: every sweep)")
    p.add_argument("--out", default="out", help="store root")
    p.add_argument("--stale-after", type=float, default=STALE_AFTER)
    p.add_argument("--timing", action="store_true", help="split each cell's time: pick-up, process start, setup, "
                   "the run itself, finish")
    a = p.parse_args(argv)
    from .status import status_rows

    connect_server()
    cols, rows, summary = status_rows(a.out, a.name, a.stale_after, a.timing)
    if rows:
        print(format_table(cols, rows))
    print(summary)
    return 0


def cmd_server(argv: list[str]) -> int:
    own, extra = _split(argv)
    p = argparse.ArgumentParser(prog="just server", description="A Prefect server for sweeps and the queue; "
                                "flags after `--` go to `prefect server start`.")
    p.add_argument("--out", default="out", help="store root (its prefect-server/ holds the SQLite database)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve workers on other machines")
    p.add_argument("--port", type=int, default=4200)
    a = p.parse_args(own)
    from .procs import server

    server(a.out, a.host, a.port, extra)


def cmd_worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="just worker", description="N process workers on the pool, one run each.")
    p.add_argument("n", nargs="?", type=int, default=None, help="workers (default: one per GPU, else 1)")
    p.add_argument("--pool", default=POOL)
    p.add_argument("--gpus", help="comma-separated GPU indices to spread the workers over (default: all)")
    p.add_argument("--prefix", default=platform.node(), help="worker names are PREFIX-w<i>[-gpu<g>]")
    a = p.parse_args(argv)
    from .procs import gpus, workers

    devices = a.gpus.split(",") if a.gpus else None
    n = a.n or max(1, len(gpus() if devices is None else devices))
    connect_server()
    return workers(n, a.pool, devices, a.prefix)


def cmd_enqueue(argv: list[str]) -> int:
    own, command = _split(argv)
    p = argparse.ArgumentParser(prog="python -m steer_heal.sweep enqueue")
    p.add_argument("--label", required=True)
    p.add_argument("--cwd", required=True)
    p.add_argument("--pool", default=POOL)
    a = p.parse_args(own)
    if not command:
        raise UserError("enqueue: give the command after `--`")
    try:
        connect_server()
    except UserError as e:
        raise UserError(f"pueue is not installed and {e}; or install pueue (https://github.com/Nukesor/pueue, "
                          f"cargo install pueue); or run `{shlex.join(command)}` directly") from None
    fr = enqueue(command, a.cwd, a.label, a.pool)
    print(f"queued `{shlex.join(command)}` on pool {a.pool!r} as flow run {fr.name} ({fr.id}); "
          f"{workers_note(a.pool)}")
    return 0


def cmd_ui(argv: list[str]) -> int:
    """`just ui`: a Prefect server with its UI on a free port, its SQLite under <out>/prefect-ui."""
    import os

    from ..prefect_ui import free_port
    from .procs import server

    p = argparse.ArgumentParser(prog="just ui", description=cmd_ui.__doc__)
    p.add_argument("--out", default="out", help="store root; the UI server's database goes under OUT/prefect-ui")
    p.add_argument("--port", type=int, default=0, help="default: a free one")
    a = p.parse_args(argv)
    port = a.port or free_port()
    api = f"http://127.0.0.1:{port}/api"
    os.environ.setdefault("PREFECT_HOME", str(Path(a.out).resolve() / "prefect-ui"))
    os.environ["PREFECT_UI_API_URL"] = api  # else the UI's browser code calls :4200
    os.environ["PREFECT_UI_URL"] = f"http://127.0.0.1:{port}"
    print(f"steer-heal UI: http://127.0.0.1:{port}  (runs show up there after: export PREFECT_API_URL={api})",
          file=sys.stderr, flush=True)
    server(a.out, "127.0.0.1", port, [])  # exec: Ctrl-C stops the server


COMMANDS = dict(submit=cmd_submit, status=cmd_status, server=cmd_server, worker=cmd_worker, enqueue=cmd_enqueue,
                ui=cmd_ui)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__ + f"\ncommands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    quiet_env()
    return script(f"steer-heal {argv[0]}", COMMANDS[argv[0]], argv[1:])


if __name__ == "__main__":
    sys.exit(main())

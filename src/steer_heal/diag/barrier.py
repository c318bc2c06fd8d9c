"""`just barrier-sweep RUN_ID ROUND [--reg ...] [--lam ...] [--tau ...] [--weight-decay ...] [--kl-agg ...]
[--spectral-lam ...] [--barrier-ref ...] [--lam-round-pow ...]`: re-heal one round over a grid of barrier settings.
S4's proposed tau bracket on a stored round: --barrier-ref base --spectral-lam 0 --lam-round-pow 0 --lam 0.3
--tau 0.25 0.5 1 2 (docs/diagnostics.md).

Each cell heals the round's stored kept completions into a fresh adapter on top of the round's baked
history, with the run's seeds (LoRA init and shuffle), and evaluates the healed model. A knob left
out keeps the run's value, so the cell with every knob at the run's value (marked *) reproduces the
run's own heal. With reg=nll there is no barrier, so its barrier knobs (lam, tau, kl_agg,
barrier_ref) are pinned to the run's values: one nll cell, not one per barrier setting.

Columns: d_tgt_base (target against base), d_tgt_new (against the round's starting student: the
trait this round added), d_trait_new, d_coh (coherence against the starting student), slope
(d_coh per nat of d_tgt_new; blank under 0.05 nats). Sorted so cells whose coherence is no worse
than the starting student come first, most new trait (in the trait's direction) first.

Cells run one after another in this process. When more than one GPU is present (or --devices lists
several) they are split over the devices and run in parallel by a Prefect ThreadPoolTaskRunner, one
worker thread per device, each with its own copy of the model.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

from .. import data, metrics, seeds
from ..console import Parser, script
from ..evaluate import measure
from ..server import serve
from ..student import run_log, stored_config, stored_evals, stored_kept
from ..tables import table
from .model import RoundModel, devices, open_round, trial_adapter
from .record import Diagnostic
from .runs import check_history, delta

PROG = "just barrier-sweep"
GRID = {"reg": str, "kl_agg": str, "lam": float, "tau": float, "weight_decay": float, "spectral_lam": float,
        "barrier_ref": str, "lam_round_pow": float}
BARRIER_ONLY = ("kl_agg", "lam", "tau", "barrier_ref", "lam_round_pow")  # no effect without a barrier (reg = nll)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_id")
    p.add_argument("round", type=int)
    for k, t in GRID.items():
        p.add_argument("--" + k.replace("_", "-"), type=t, nargs="+", default=None, help=f"{k} values (default: the run's)")
    p.add_argument("--devices", nargs="+", default=None,
                   help="devices to spread cells over (default: every GPU when there are several, else one)")
    p.add_argument("--out", "--root", dest="out", default="out", help="store root")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="needed for a run started with it: lets its model's own Python code run")
    return p.parse_args(argv)


def grid(cfg, given: dict[str, list | None]) -> list[dict]:
    """Every combination of the given values (the run's value for a knob not given), nll cells deduplicated."""
    axes = {k: given.get(k) or [getattr(cfg, k)] for k in GRID}
    cells: list[dict] = []
    for combo in itertools.product(*axes.values()):
        cell = dict(zip(axes, combo, strict=True))
        if cell["reg"] == "nll":
            cell.update({k: getattr(cfg, k) for k in BARRIER_ONLY})
        cfg.replace(**cell).validate()  # a bad value fails here, named, before any model work
        if cell not in cells:
            cells.append(cell)
    return cells


def heal_cell(rm: RoundModel, kept: list[dict], cell: dict, start: dict, base: dict) -> dict:
    """Heal a fresh adapter with the cell's knobs and the run's seeds, evaluate, compare."""
    from ..heal import heal

    cfg, r, t = rm.cfg.replace(**cell), rm.round, time.time()
    with trial_adapter(rm.stack, rm.lora, f"r{r}", seeds.lora_init(cfg.seed, r)):
        h = heal(rm.stack, rm.tok, kept, cfg.part("heal"), r, seeds.heal_shuffle(cfg.seed, r), rm.probe.system)
        m = measure(rm.stack.model, rm.tok, rm.probe).summary(rm.probe.target)
    row = dict(stage="healed", cell=cell, **cell, run_cell=all(getattr(rm.cfg, k) == v for k, v in cell.items()),
               heal_nll=h.heal_nll, val_nll=h.val_nll, div=h.div, **m,
               d_target_base=delta(m["target_nats"], base["target_nats"]),
               d_target_new=delta(m["target_nats"], start["target_nats"]),
               d_trait_new=delta(m["trait_nats"], start["trait_nats"]),
               d_coh=delta(m["coherence"], start["coherence"]),
               slope=metrics.coh_cost(m["coherence"], start["coherence"], m["target_nats"], start["target_nats"]))
    # the trait's direction: target nats when measured, else the contrast probe (up = trait)
    row["new_trait"] = (rm.probe.sign * row["d_target_new"] if row["d_target_new"] is not None
                        else row["d_trait_new"])
    row["coh_ok"] = row["d_coh"] is not None and row["d_coh"] >= 0
    row["sec"] = time.time() - t
    return row


def run_cells(root: str, run_id: str, r: int, cells: list[dict], device: str, on_row, trust: bool = False) -> list[dict]:
    """One worker: load the round on `device`, measure base and the starting student, heal each cell."""
    rm = open_round(root, run_id, r, device, trust)
    kept = stored_kept(rm.log, r, rm.cfg)
    with rm.stack.base():
        base = dict(stage="base", device=device, **measure(rm.stack.model, rm.tok, rm.probe).summary(rm.probe.target))
    start = dict(stage="start", device=device, n_kept=len(kept),
                 **measure(rm.stack.model, rm.tok, rm.probe).summary(rm.probe.target))
    rows = [base, start]
    on_row(rows)
    for cell in cells:
        row = dict(heal_cell(rm, kept, cell, start, base), device=device)
        on_row([row])
        rows.append(row)
    return rows


def run_grid(a: argparse.Namespace, cells: list[dict], devs: list[str], on_row, home) -> list[dict]:
    if len(devs) == 1:  # the usual case: no Prefect at all
        return run_cells(a.out, a.run_id, a.round, cells, devs[0], on_row, a.trust_remote_code)
    if "PREFECT_API_URL" not in os.environ and "PREFECT_HOME" not in os.environ:
        os.environ["PREFECT_HOME"] = str(home)  # a private ephemeral server, as a run has
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.task_runners import ThreadPoolTaskRunner

    worker = task(run_cells, name="barrier-cells", cache_policy=NO_CACHE, persist_result=False)

    @flow(name="barrier-sweep", task_runner=ThreadPoolTaskRunner(max_workers=len(devs)))
    def sweep() -> list[dict]:
        # the model never crosses a task boundary: each worker loads its own copy on its device
        futures = [worker.submit(a.out, a.run_id, a.round, cells[i::len(devs)], dev, on_row, a.trust_remote_code)
                   for i, dev in enumerate(devs)]
        return [row for f in futures for row in f.result()]

    with serve(Path(home)):  # outside the terminal's group, on its own database, like a run's
        return sweep()


def ordered(rows: list[dict]) -> list[dict]:
    """Coherence no worse than the starting student first, then the most new trait first."""
    cells = [r for r in rows if r["stage"] == "healed"]
    return sorted(cells, key=lambda r: (not r["coh_ok"], -(r["new_trait"] if r["new_trait"] is not None
                                                            else float("-inf"))))


def summary(rows: list[dict], stored: dict | None) -> str:
    cells = ordered(rows)
    varying = [k for k in GRID if len({repr(c[k]) for c in cells}) > 1] or ["reg"]
    start = next(r for r in rows if r["stage"] == "start")
    base = next(r for r in rows if r["stage"] == "base")
    head = (f"base: target {_f(base['target_nats'])} trait {_f(base['trait_nats'])} coh {_f(base['coherence'])}; "
            f"starting student: target {_f(start['target_nats'])} trait {_f(start['trait_nats'])} "
            f"coh {_f(start['coherence'])}; {start['n_kept']} kept completions")
    if stored:
        head += (f"\nthe run's own heal (stored): d_tgt_new {_f(delta(stored['target_nats'], start['target_nats']))} "
                 f"d_coh {_f(delta(stored['coherence'], start['coherence']))}")
    body = [["*" if c["run_cell"] else "", *[c[k] for k in varying], c["d_target_base"], c["d_target_new"],
             c["d_trait_new"], c["d_coh"], c["slope"], c["heal_nll"], c["sec"]] for c in cells]
    return head + "\n" + table(["run", *varying, "d_tgt_base", "d_tgt_new", "d_trait_new", "d_coh", "slope",
                                "heal_nll", "sec"], body)


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def stored_healed(log, r: int) -> dict | None:
    """The run's own healed evaluation of round r, as the flow stored it."""
    s = stored_evals(log).get((r, "healed"))
    if s is None:
        return None
    return dict(target_nats=s.nats.get(data.persona(stored_config(log))["target"]), coherence=s.coherence)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    log = run_log(a.out, a.run_id)
    cfg = stored_config(log)
    cells = grid(cfg, {k: getattr(a, k) for k in GRID})
    check_history(log, a.round)  # fail before the record is written, not in a worker
    stored_kept(log, a.round, cfg)
    devs = devices(a.devices)
    diag = Diagnostic(a.out, "barrier-sweep", a.run_id, a.round,
                      dict(grid={k: getattr(a, k) for k in GRID}, cells=cells, devices=devs))
    rows = run_grid(a, cells, devs, diag.add, diag.dir / "prefect")
    diag.finish(summary(rows, stored_healed(log, a.round)))
    return 0


def cli() -> int:
    return script(PROG, main, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(cli())

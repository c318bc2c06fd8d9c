"""What the diagnostics ask the store about runs: each run's target and trait sign, which runs are seeds
of one config (and a short label for it), and SQL rows as plain dicts."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb

from .. import data
from ..config import Config
from ..errors import UserError
from ..store import RunLog, connect
from ..store.views import fetch


def trait_sign(cfg: Config) -> int:
    """+1 when the trait raises the target foundation's nats, -1 when it lowers them."""
    return data.trait_sign(data.persona(cfg))


def seedless(cfg: Config) -> dict:
    """The experiment without its seed (and the treatment run a control is yoked to, one per seed), plus the execution knobs that move the numbers past float rounding
    (bf16: ~0.01 nats; config.MOVES_NUMBERS): runs equal here are repeats of one config."""
    return {**{k: v for k, v in cfg.experiment().items() if k not in ("seed", "yoke")}, "bf16": cfg.bf16}


def _key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]


def config_key(cfg: Config) -> str:
    return _key(seedless(cfg))


def family(cfg: Config) -> str:
    """The config without seed and control: a treatment and its controls share it."""
    return _key({k: v for k, v in seedless(cfg).items() if k != "control"})


def config_labels(exps: dict[str, dict]) -> dict[str, str]:
    """A short name per config: only the knobs that differ between them ('lam=0.5 reg=nll'), else reg."""
    keys = sorted({k for e in exps.values() for k in e}, key=lambda k: (k == "control", k))  # control last:
    varying = [k for k in keys if len({json.dumps(e.get(k), default=str) for e in exps.values()}) > 1]  # by family
    return {name: " ".join(f"{k}={_short(e.get(k))}" for k in varying) or str(e.get("reg"))
            for name, e in exps.items()}


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(_short, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_meta(root: str | Path) -> list[dict]:
    """Per run: target foundation, trait direction and sign, seedless config key and label, its control and
    family (the config without seed and control: a treatment and its controls share it)."""
    con = connect(root, strict=True)
    try:
        got = [tuple(r.values()) for r in sql_rows(con, "SELECT run_id, config FROM run_info QUALIFY row_number() "
                                                   "OVER (PARTITION BY run_id ORDER BY created) = 1 ORDER BY run_id")]
    finally:
        con.close()
    cfgs = {run_id: Config.from_dict(json.loads(c)) for run_id, c in got}
    keys = {run_id: config_key(cfg) for run_id, cfg in cfgs.items()}
    labels = config_labels({keys[r]: seedless(cfg) for r, cfg in cfgs.items()})
    out = []
    for run_id, cfg in cfgs.items():
        p = data.persona(cfg)
        out.append(dict(run_id=run_id, target=p["target"], direction=p["direction"], sign=trait_sign(cfg),
                        seed=cfg.seed, reg=cfg.reg, config_key=keys[run_id], config_label=labels[keys[run_id]],
                        control=cfg.control, family=family(cfg)))
    return out


def connect_meta(root: str | Path) -> duckdb.DuckDBPyConnection:
    """store.connect plus a `run_meta` table (run_meta() as rows), so SQL can pick each run's target
    foundation and trait direction, which live in the bundled persona table, not in the store."""
    con = connect(root, strict=True)
    con.execute("CREATE TEMP TABLE run_meta (run_id VARCHAR, target VARCHAR, direction VARCHAR, sign INTEGER, "
                "seed BIGINT, reg VARCHAR, config_key VARCHAR, config_label VARCHAR, control VARCHAR, family VARCHAR)")
    rows = run_meta(root)
    if rows:
        con.executemany("INSERT INTO run_meta VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [list(r.values()) for r in rows])
    return con


def sql_rows(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None) -> list[dict]:
    """Rows as dicts; DECIMAL (what SQL makes of a literal like 0.5) as float, so rows store as JSON."""
    cur = fetch(con, sql, params)  # on a strict connection: a damaged line is refused naming file:line
    cols = [c[0] for c in cur.description]
    return [{c: float(v) if isinstance(v, Decimal) else v for c, v in zip(cols, r, strict=True)}
            for r in cur.fetchall()]



def latest_round(log: RunLog) -> int:
    """The newest round whose vector is stored: the default round of a diagnostic."""
    done = [r["round"] for r in log.read("stages") if r["stage"] == "extract"]
    if not done:
        raise UserError(f"run {log.run_id} has no extracted round yet")
    return max(done)


def check_history(log: RunLog, r: int) -> None:
    """Round r's student is the baked rounds 0..r-1: all of them must be stored."""
    baked = {a["round"] for a in log.read("adapters")}
    n = next(i for i in range(len(baked) + 1) if i not in baked)  # rounds 0..n-1 are baked
    if not 0 <= r <= n:
        raise UserError(f"run {log.run_id} has no round {r} to start from: {n} round(s) baked, so the student "
                          f"that starts a round exists for rounds 0..{n}; pick one of those")


def delta(x: float | None, base: float | None) -> float | None:
    return None if x is None or base is None else x - base

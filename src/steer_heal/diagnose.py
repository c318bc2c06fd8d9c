"""Shared pieces of the diagnostics in scripts/ (c-sweep, stage table, barrier sweep, Pareto, plots).

A diagnostic reads a run from the store, measures something, and writes what it found back as a
diagnostic record: one `diagnostics` row (kind, source run, round, config) and its `diag_rows`,
under <root>/diagnostics/<diag_id>/, next to its plots and a report.md. Like a run, it only
appends whole lines, so it can work while a training run writes to the same store.

The model-side helpers import torch, transformers and peft inside the function: the stage
table, the Pareto plot and the run plot never load a model and start seconds sooner without them.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb

from . import data
from .config import Config, ConfigError
from .store import RunLog, atomic_write_bytes, connect

STAGES = ("base", "prompted", "steered", "healed")


def stage_order(key: tuple[int, str]) -> tuple[int, int]:
    """Sort key of a (round, stage) pair: by round, then base, prompted, steered, healed."""
    return key[0], STAGES.index(key[1])


# ---------------------------------------------------------------- runs in the store

def run_log(root: str | Path, run_id: str) -> RunLog:
    """The run's log; a clear error (and no empty folder left behind) when there is no such run."""
    if not (Path(root) / "runs" / run_id / "run_info.jsonl").is_file():
        raise ConfigError(f"no run {run_id!r} under {root}/runs: see `just runs` for run ids (or pass --out)")
    return RunLog(root, run_id)


def run_config(log: RunLog) -> Config:
    """The config the run started with (the one resume reloads)."""
    info = log.read("run_info")
    if not info:
        raise ConfigError(f"run {log.run_id} has no run_info row yet")
    return Config.from_dict(info[0]["config"])


def trait_sign(cfg: Config) -> int:
    """+1 when the trait raises the target foundation's nats, -1 when it lowers them."""
    return 1 if data.persona(cfg)["direction"] == "up" else -1


def seedless(cfg: Config) -> dict:
    """The experiment without its seed: runs equal here are repeats of one config."""
    return {k: v for k, v in cfg.experiment().items() if k != "seed"}


def config_key(cfg: Config) -> str:
    return Config.from_dict(seedless(cfg)).hash()


def config_labels(exps: dict[str, dict]) -> dict[str, str]:
    """A short name per config: only the knobs that differ between them ('lam=0.5 reg=nll'), else reg."""
    keys = sorted({k for e in exps.values() for k in e})
    varying = [k for k in keys if len({json.dumps(e.get(k), default=str) for e in exps.values()}) > 1]
    return {name: " ".join(f"{k}={_short(e.get(k))}" for k in varying) or str(e.get("reg"))
            for name, e in exps.items()}


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(_short, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_meta(root: str | Path) -> list[dict]:
    """Per run: target foundation, trait direction and sign, seedless config key and label."""
    con = connect(root)
    try:
        got = con.execute("SELECT run_id, config FROM run_info QUALIFY row_number() "
                          "OVER (PARTITION BY run_id ORDER BY created) = 1 ORDER BY run_id").fetchall()
    finally:
        con.close()
    cfgs = {run_id: Config.from_dict(json.loads(c)) for run_id, c in got}
    keys = {run_id: config_key(cfg) for run_id, cfg in cfgs.items()}
    labels = config_labels({keys[r]: seedless(cfg) for r, cfg in cfgs.items()})
    out = []
    for run_id, cfg in cfgs.items():
        p = data.persona(cfg)
        out.append(dict(run_id=run_id, target=p["target"], direction=p["direction"], sign=trait_sign(cfg),
                        seed=cfg.seed, reg=cfg.reg, config_key=keys[run_id], config_label=labels[keys[run_id]]))
    return out


def connect_meta(root: str | Path) -> duckdb.DuckDBPyConnection:
    """store.connect plus a `run_meta` table (run_meta() as rows), so SQL can pick each run's target
    foundation and trait direction, which live in the bundled persona table, not in the store."""
    con = connect(root)
    con.execute("CREATE TEMP TABLE run_meta (run_id VARCHAR, target VARCHAR, direction VARCHAR, sign INTEGER, "
                "seed BIGINT, reg VARCHAR, config_key VARCHAR, config_label VARCHAR)")
    rows = run_meta(root)
    if rows:
        con.executemany("INSERT INTO run_meta VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [list(r.values()) for r in rows])
    return con


def sql_rows(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None) -> list[dict]:
    """Rows as dicts; DECIMAL (what SQL makes of a literal like 0.5) as float, so rows store as JSON."""
    cur = con.execute(sql, params) if params is not None else con.execute(sql)
    cols = [c[0] for c in cur.description]
    return [{c: float(v) if isinstance(v, Decimal) else v for c, v in zip(cols, r, strict=True)}
            for r in cur.fetchall()]


# ---------------------------------------------------------------- diagnostic records

def new_diag_id(kind: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{secrets.token_hex(2)}"


class Diagnostic:
    """One diagnostic record: the `diagnostics` row is written at the start (so a long sweep shows up
    at once), rows are appended as they are measured, plots and report.md land in its folder."""

    def __init__(self, root: str | Path, kind: str, source_run: str, round_: int | None, config: dict):
        self.kind, self.source_run, self.round = kind, source_run, round_
        self.log = RunLog(root, new_diag_id(kind), kind="diagnostics")
        self.id, self.dir = self.log.run_id, self.log.dir
        self.log.append("diagnostics", dict(kind=kind, source_run=source_run, round=round_, config=config))

    def add(self, rows: list[dict]) -> int:
        """Append rows; a row's own run_id and round, when it has them, go to the columns."""
        return self.log.append("diag_rows", [dict(kind=self.kind, source_run=r.get("run_id", self.source_run),
                                                  round=r.get("round", self.round), row=r) for r in rows])

    def finish(self, table: str, plots: list[Path] = ()) -> Path:
        """report.md (what was run, the table, the plots), then the table and where it all is on stdout."""
        cfg = self.log.read("diagnostics")[0]["config"]
        lines = [f"# {self.kind} {self.id}", "", f"source run `{self.source_run}`, round {self.round}", "",
                 "config: `" + json.dumps(cfg, default=str) + "`", "", "```", table, "```", ""]
        if plots:
            lines += ["## Plots", ""] + [f"- [{p.name}]({_rel(p, self.dir)})" for p in plots] + [""]
        path = self.dir / "report.md"
        atomic_write_bytes(path, "\n".join(lines).encode())
        self._relink()
        print(table)
        if plots:
            print("plots: " + " ".join(map(str, plots)))
        print(f"diagnostic {self.id}: {self.dir}")
        return path


    def _relink(self) -> None:
        """Rewrite each source run's report.md so it lists this diagnostic (and its plots)."""
        from .report import write_report

        for run_id in (self.source_run or "").split(","):
            if (self.log.root / "runs" / run_id / "run_info.jsonl").is_file():
                log = RunLog(self.log.root, run_id)
                write_report(log, data.persona(run_config(log))["target"])


def _rel(p: Path, start: Path) -> str:
    try:
        return str(p.relative_to(start))
    except ValueError:
        return str(p)


# ---------------------------------------------------------------- statistics

def _t_within(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df: the finite sums of Abramowitz & Stegun 26.7.3-4."""
    th = math.atan(t / math.sqrt(df))
    c2 = math.cos(th) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(th) * total
    term = total = math.cos(th) if df > 1 else 0.0
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (th + math.sin(th) * total)


def t_quantile(level: float, df: int) -> float:
    """t such that P(|T| < t) = level (two-sided; 0.95 -> the 97.5th percentile), by bisection."""
    if df < 1 or not 0 < level < 1:
        raise ValueError(f"t_quantile needs df >= 1 and 0 < level < 1, got df={df} level={level}")
    lo, hi = 0.0, 1.0
    while _t_within(hi, df) < level:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_within(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float | None], level: float = 0.95) -> dict:
    """Mean and the t interval mean +- t(level, n-1) * sd / sqrt(n) over the non-missing values.
    With one value the interval is missing (None), with none the mean is too."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return dict(mean=None, lo=None, hi=None, n=0)
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return dict(mean=m, lo=None, hi=None, n=1)
    hw = t_quantile(level, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return dict(mean=m, lo=m - hw, hi=m + hw, n=len(xs))


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """True where no other point is at least as good on both axes and better on one (both maximised).
    Equal points do not dominate each other, so tied points stay on the front together."""
    return [not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points) for p in points]


# ---------------------------------------------------------------- a round's model

@dataclass
class Probe:
    """What the flow evaluates with, rebuilt from a run's stored config."""
    vignettes: list[dict]
    dilemmas: list[dict]
    system: str
    target: str
    sign: int
    cfg: Config

    @classmethod
    def of(cls, cfg: Config) -> Probe:
        p = data.persona(cfg)
        return cls(data.load_vignettes(cfg.vignettes, cfg.n_vignettes), data.dilemmas(cfg.persona),
                   cfg.gen_system or p["neutral"], p["target"], trait_sign(cfg), cfg)


def measure(model, tok, probe: Probe) -> dict:
    """The flow's evaluation of the model as it is now: {nats: {F: nats}, target_nats, trait_nats, coherence, n}."""
    from .backends import run_evals

    cfg, out = probe.cfg, {"nats": {}, "target_nats": None, "trait_nats": None, "coherence": None, "n": None}
    m, c = run_evals(cfg, model, tok, probe.vignettes, probe.dilemmas, probe.system)
    if m is not None:
        out.update(nats=m["nats"], target_nats=m["nats"][probe.target], coherence=m["coherence"], n=m["n"])
    if c is not None:
        out["trait_nats"] = c["trait_nats"]
    return out


def steering(cfg: Config, model, vec, coef: float):
    """The steering context the run's config names (builtin hooks or steering-lite)."""
    from .backends import steer_fn

    return steer_fn(cfg)(model, vec, coef)


@dataclass
class RoundModel:
    """The student that started round `round` (baked history 0..round-1) and that round's vector."""
    run_id: str
    round: int
    stack: Any          # bake.Stack
    tok: Any
    cfg: Config
    lora: Any           # the LoraConfig every round's adapter uses
    vector: dict | None  # v_round, None while the round has not extracted it
    coef: float | None   # the dose the round's steered eval used, None before that eval
    probe: Probe
    log: RunLog


def latest_round(log: RunLog) -> int:
    """The newest round whose vector is stored: the default round of a diagnostic."""
    done = [r["round"] for r in log.read("stages") if r["stage"] == "extract"]
    if not done:
        raise ConfigError(f"run {log.run_id} has no extracted round yet")
    return max(done)


def check_history(log: RunLog, r: int) -> None:
    """Round r's student is the baked rounds 0..r-1: all of them must be stored."""
    missing = sorted(set(range(r)) - {a["round"] for a in log.read("adapters")})
    if missing:
        raise ConfigError(f"run {log.run_id} round {r}: rounds {missing} are not baked yet, so the student that "
                          f"started round {r} does not exist; pick an earlier round")


# transformers builds a model under process-wide init contexts (meta device, default dtype): two
# threads loading at once (the parallel barrier sweep) break each other, so loads take turns
_LOADING = threading.Lock()


def open_round(root: str | Path, run_id: str, round_: int | None = None, device: str = "auto") -> RoundModel:
    """Base model + the run's adapters of rounds < round (hash-checked), on `device`."""
    from .bake import lora_config
    from .export import rebuild
    from .extract import load_vector
    from .models import pick_device

    log = run_log(root, run_id)
    r = latest_round(log) if round_ is None else round_
    check_history(log, r)
    with _LOADING:
        stack, tok, cfg = rebuild(str(root), run_id, upto=r, device=str(pick_device(device)))
    vpath = log.dir / "vectors" / f"round_{r}.safetensors"
    coef = next((m["coef"] for m in log.read("stage_metrics") if m["round"] == r and m["stage"] == "steered"), None)
    lora = stack.lora or lora_config(stack.model, cfg.lora_r, cfg.lora_alpha, cfg.lora_layers)
    return RoundModel(run_id, r, stack, tok, cfg, lora, load_vector(vpath) if vpath.is_file() else None, coef,
                      Probe.of(cfg), log)


@contextmanager
def trial_adapter(stack, lora, name: str, seed: int) -> Iterator[None]:
    """A fresh adapter on top of the history for one trial, removed afterwards, leaving the stack as it was."""
    stack.add(name, lora, seed=seed)
    try:
        yield
    finally:
        stack.truncate(len(stack.names) - 1)


def random_like(vec: dict, seed: int) -> dict:
    """A random direction with the same per-layer norms as vec (seeded): the size of the push, no trait."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, v in sorted(vec.items()):
        x = torch.randn(v.shape, generator=g, dtype=torch.float32)
        out[i] = (x * (v.float().norm() / x.norm())).to(v)
    return out


def stored_kept(log: RunLog, r: int, n_keep: int) -> list[dict]:
    """The completions round r healed on, in the order the flow used them (as its resume reads them back)."""
    if not any(s["round"] == r and s["stage"] == "dose" for s in log.read("stages")):
        raise ConfigError(f"run {log.run_id} round {r} has not finished its dose stage: no kept completions yet")
    rows = [c for c in log.read("completions") if c["round"] == r and c["phase"] in ("probe", "collect")]
    return [c for c in rows if c["keep"]][:n_keep]


# ---------------------------------------------------------------- small shared bits

def script(prog: str, body, argv: list[str] | None) -> int:
    """Run a diagnostic's main body offline and quietly; a bad input exits 2 with its message, no traceback."""
    from .run import QUIET

    for k, v in QUIET.items():
        os.environ.setdefault(k, v)
    from loguru import logger

    logger.remove()  # the stages' per-epoch debug lines are for runs with --log-level DEBUG
    logger.add(sys.stderr, level=os.environ.get("STEER_HEAL_LOG_LEVEL", "INFO"),
               format="<green>{time:HH:mm:ss}</green> {level:<5} {message}")
    try:
        return body(argv)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2


def delta(x: float | None, base: float | None) -> float | None:
    return None if x is None or base is None else x - base


def devices(given: list[str] | None = None) -> list[str]:
    """Where model work runs: the given list, else every GPU when there are several, else one device."""
    import torch

    if given:
        return given
    n = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(n)] if n > 1 else ["auto"]

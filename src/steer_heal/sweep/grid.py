"""A grid: the cross product of knob values and seeds, plus extra cells (controls), one run each.

Every way to launch many runs builds one (`just sweep`, `just seeds`, `just study`; launch.py runs it here
or on the pool). A grid made for a `just` run recipe (`recipe`) leads its cells' flags with the ones that
recipe adds, so a cell means the same run whichever way it is launched.

A cell's flags are the sweep's base flags plus its knob values, so any Config field can be an axis
(`control` too, once that field exists). Its run id is derived from the sweep name and the cell's
knob values as the config types them (`--lam 1` and `lam = 1.0` name the same run), so re-submitting
the same grid finds the same runs in the store. docs/scaling.md shows both ways to write a grid.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import RUNTIME_FIELDS, Config
from ..errors import UserError

FIELDS = {f.name: f for f in fields(Config)}
HINTS = typing.get_type_hints(Config)
# Knobs a grid may vary: the experiment's fields. seed has --seeds; where and how long a run executes
# (out, device, n_rounds, ...) is the sweep's, the same for every cell.
AXES = tuple(n for n in FIELDS if n not in RUNTIME_FIELDS and n != "seed")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")
SAFE = re.compile(r"[^A-Za-z0-9._,=+-]")
MAX_ID = 120
# The flags each `just` run recipe adds before the user's (justfile: run, small-run, fast-dev-run).
RECIPES = {"run": ("--preset", "s2-headline"), "small-run": ("--preset", "small"), "fast-dev-run": ("--preset", "fast-dev")}
# ... and the Clifford vignettes that run and small-run add when ../shared holds them (the recipes' cwd)
SHARED_VIGNETTES = Path("../shared/data/mfv_classic_other_violate.jsonl")


def recipe_flags(recipe: str) -> list[str]:
    """The flags `just RECIPE` puts in front of the user's, as the justfile writes them."""
    if recipe not in RECIPES:
        raise UserError(f"unknown run recipe {recipe!r}: one of {', '.join(RECIPES)}")
    extra = ["--vignettes", str(SHARED_VIGNETTES.resolve())] if recipe != "fast-dev-run" and SHARED_VIGNETTES.is_file() \
        else []
    return [*RECIPES[recipe], *extra]


@dataclass(frozen=True)
class Cell:
    """One run of a grid: its id, the knobs that set it apart, and the flags that start it: the flags of its
    `just` run recipe (`lead`, from `recipe`), the grid's base and knob flags (`args`), then the seed."""
    run_id: str
    knobs: dict
    args: tuple[str, ...]
    seed: int | None = None
    recipe: str = ""
    lead: tuple[str, ...] = ()
    cfg: Config = field(default=None, compare=False, repr=False)

    @property
    def flags(self) -> tuple[str, ...]:
        """Everything `python -m steer_heal` needs to start this run (but its --run-id and --out)."""
        return (*self.lead, *self.args, *(("--seed", str(self.seed)) if self.seed is not None else ()))


def flag_tokens(name: str, value: Any) -> list[str]:
    """`--lam 0.3`, `--steer-layers 0.4 0.6` (from "0.4,0.6" or a list), `--normalize` / `--no-normalize`."""
    if name not in FIELDS:
        raise UserError(f"sweep: {name!r} is not a config field (see `python -m steer_heal --help`)")
    flag = "--" + name.replace("_", "-")
    if HINTS[name] is bool:
        on = value if isinstance(value, bool) else str(value).lower()
        if on not in (True, False, "true", "false", "1", "0", "yes", "no"):
            raise UserError(f"sweep: {name} takes true or false, got {value!r}")
        return [flag] if on in (True, "true", "1", "yes") else ["--no-" + name.replace("_", "-")]
    if typing.get_origin(HINTS[name]) is tuple:
        parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
        return [flag, *map(str, parts)]
    return [flag, str(value)]


def short(v: Any) -> str:
    """A knob value as it appears in a run id: floats without trailing zeros, tuples comma-joined."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(short, v))
    return str(v)


def run_id_of(name: str, cfg: Config, knobs: list[str], prefix: str = "sw") -> str:
    """`sw-<name>-<knob>=<value>-...-s<seed>` (no `sw-` with prefix ""), knobs sorted; a value with characters
    a folder name should not hold, or an id over MAX_ID characters, gets a hash of the knobs appended so ids
    never collide."""
    parts = [f"{k}={short(getattr(cfg, k))}" for k in sorted(knobs)]
    raw = "-".join([*filter(None, (prefix, name)), *parts, f"s{cfg.seed}"])
    safe = SAFE.sub("_", raw)
    if safe == raw and len(raw) <= MAX_ID:
        return raw
    digest = hashlib.sha1(json.dumps([name, cfg.seed, *parts]).encode()).hexdigest()[:8]
    return f"{safe[:MAX_ID - 9]}-{digest}"


@dataclass
class Grid:
    """name: the sweep (run id prefix); axes: knob -> values to cross; seeds; plus: extra cells (each a
    dict of knob -> value on top of the base, crossed with the seeds only); base: flags for every cell;
    prefix: of every run id ("sw"; "" names the runs NAME-...-s<seed>, as `just seeds` does); recipe: the
    `just` run recipe whose flags lead every cell's (RECIPES; "" for none); yoke: a control grid's treatment
    group, each seed s yoked to the run YOKE-s<s> (--yoke, yoke.py)."""
    name: str
    axes: dict[str, list] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    plus: list[dict] = field(default_factory=list)
    base: list[str] = field(default_factory=list)
    prefix: str = "sw"
    recipe: str = ""
    yoke: str = ""

    def check(self) -> None:
        if not NAME.fullmatch(self.name or ""):
            raise UserError(f"sweep name {self.name!r} must be 1-40 letters, digits, '.', '_' or '-' "
                              "(it prefixes every run id): pass --name")
        if self.prefix and not NAME.fullmatch(self.prefix):
            raise UserError(f"run id prefix {self.prefix!r} must be empty or 1-40 letters, digits, '.', '_' or '-'")
        for k in [*self.axes, *(k for p in self.plus for k in p)]:
            if k not in AXES:
                why = "use --seeds" if k == "seed" else "it is not an experiment knob" if k in FIELDS else \
                    "it is not a config field"
                raise UserError(f"sweep: cannot vary {k!r}: {why}")
        empty = [k for k, v in self.axes.items() if not v]
        if empty:
            raise UserError(f"sweep: knob(s) {empty} have no values")

    def cells(self) -> list[Cell]:
        """Every cell, validated as the run would validate it (a bad value fails here, before anything is
        queued). Cells that name the same run are kept once."""
        from ..cli import parse

        self.check()
        lead = tuple(recipe_flags(self.recipe)) if self.recipe else ()
        keys = list(self.axes)
        combos = [dict(zip(keys, vals)) for vals in itertools.product(*(self.axes[k] for k in keys))]
        combos += [dict(p) for p in self.plus]
        out: dict[str, Cell] = {}
        for knobs in combos:
            for seed in self.seeds or [None]:
                args = (*self.base, *(t for k, v in knobs.items() for t in flag_tokens(k, v)),
                        *(("--yoke", f"{self.yoke}-s{seed}") if self.yoke and seed is not None else ()))
                cell = Cell("", {}, args, seed, self.recipe, lead)
                cfg = _parse(parse, list(cell.flags), knobs)
                rid = run_id_of(self.name, cfg, list(knobs), self.prefix)
                out.setdefault(rid, Cell(rid, {k: getattr(cfg, k) for k in knobs}, args, seed, self.recipe, lead, cfg))
        return list(out.values())


def _parse(parse, flags: list[str], knobs: dict) -> Config:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):  # argparse prints its whole usage; keep its last line
            cfg, _ = parse(flags)
    except SystemExit:
        why = err.getvalue().strip().splitlines()[-1].partition("error: ")[2]
        raise UserError(f"sweep: cell {knobs or 'base'}: {why}") from None
    except UserError as e:
        raise UserError(f"sweep: cell {knobs or 'base'}: {e}") from None
    if cfg.run_id or cfg.resume:
        raise UserError("sweep: --run-id and --resume are set per cell by the sweep; drop them from the flags")
    return cfg


def load_toml(path: str | Path) -> Grid:
    """A grid file: name, seeds, base (flags), [grid] knob = [values], [[plus]] knob = value; prefix, recipe."""
    try:
        d = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"sweep file {path}: {e}") from None
    unknown = sorted(set(d) - {"name", "seeds", "base", "grid", "plus", "prefix", "recipe"})
    if unknown:
        raise UserError(f"sweep file {path}: unknown key(s) {unknown}; allowed: name, seeds, base, grid, plus, prefix, "
                        "recipe")
    axes = {k: v if isinstance(v, list) else [v] for k, v in d.get("grid", {}).items()}
    base = d.get("base", [])
    if isinstance(base, str):
        base = base.split()
    return Grid(name=d.get("name", ""), axes=axes, seeds=[int(s) for s in d.get("seeds", [])],
                plus=list(d.get("plus", [])), base=[str(b) for b in base], prefix=str(d.get("prefix", "sw")),
                recipe=str(d.get("recipe", "")))

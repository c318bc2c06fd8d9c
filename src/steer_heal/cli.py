"""`python -m steer_heal`: one flag per Config field, presets applied first.

Precedence: dataclass defaults < --preset < explicit flags.
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import MISSING, fields

from loguru import logger

from .config import GROUPS, Config
from .console import Parser, one_line, setup_logging
from .errors import UserError
from .informative import PROBES
from .presets import PRESETS, REAL, preset, preset_table, source_table


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m steer_heal",
        description="Run N rounds of steer -> generate -> filter -> heal -> bake (see spec.md).",
        epilog="presets (the value each knob takes; every other knob keeps its default):\n\n" + preset_table()
        + "".join(f"\n\n{n}: each value's source (S1-S4 as docs/usage.md names them)\n\n"
                  + source_table(n) for n in REAL),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # no argparse choices: a retired name (journal) gets preset()'s one line naming what replaced it
    p.add_argument("--preset", metavar="{" + ",".join(PRESETS) + "}", default=None,
                   help="apply a preset before the other flags (s2-headline: S2's coherent 8-round loop, what `just "
                        "run` uses; s4-next: S4's proposed next loop; s1-journal: S1's, with the generation guards; "
                        "small: SmolLM2 on CPU; fast-dev: a tiny random model; tables below)")
    # flags stay flat; --help lists them under the experiment's stages (hashed, fixed for a run) and execution
    # (how it computes: a resume may change these, config.GROUPS)
    groups = {g: p.add_argument_group("execution (a resume may change these; not part of the experiment)" if g == "exec"
                                      else f"experiment: {g}") for g in GROUPS}
    group_of = {n: g for g, names in GROUPS.items() for n in names}
    p.add_argument("--probes", nargs="+", choices=PROBES, default=None,
                   help="the probes to run; a probe left out costs nothing and writes no rows (spec.md \"Informative "
                        "probes\"): mfv, contrast set --eval, freetext off sets --n-demo 0. A SmolLM2 study: --probes "
                        "contrast freetext")
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        t = hints[f.name]
        # argparse %-formats help text: a literal % (as in "95% interval") must be doubled
        kw: dict = dict(dest=f.name, default=None,
                        help=(f.metadata["help"] + f" (default: {f.default!r})").replace("%", "%%"))
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(t) is tuple:
            args = typing.get_args(t)
            kw["type"] = args[0]
            kw["nargs"] = "+" if (len(args) == 2 and args[1] is Ellipsis) else len(args)
            kw["metavar"] = args[0].__name__.upper()
        else:
            kw["type"] = t
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
        groups[group_of[f.name]].add_argument(_flag(f.name), **kw)
    return p


def parse(argv: list[str] | None = None, with_preset: bool = False) -> tuple:
    """Return the validated config and the flags the user set explicitly (and the preset's name, or '')."""
    ns = vars(build_parser().parse_args(argv))
    explicit = {k: (tuple(v) if isinstance(v, list) else v)
                for k, v in ns.items() if k not in ("preset", "probes") and v is not None}
    explicit.update(probe_flags(ns["probes"], explicit))
    base = preset(ns["preset"]) if ns["preset"] else {}
    cfg = Config(**{**base, **explicit}).validate()
    return (cfg, explicit, ns["preset"] or "") if with_preset else (cfg, explicit)


def probe_flags(probes: list[str] | None, explicit: dict) -> dict:
    """--probes as the knobs it stands for (the stored config holds those): eval and, without freetext, n_demo 0.
    An explicit --eval or --n-demo that says otherwise is refused rather than one of them quietly winning."""
    if not probes:
        return {}
    forced = [p for p in probes if p in ("mfv", "contrast")]
    if not forced:
        raise UserError("--probes needs mfv or contrast (or both): every stage is scored on a forced answer")
    out = dict(eval="both" if len(forced) == 2 else forced[0])
    if "freetext" not in probes:
        out["n_demo"] = 0
    for k, v in out.items():
        if k in explicit and explicit[k] != v:
            raise UserError(f"--probes {' '.join(probes)} means --{k.replace('_', '-')} {v}, but "
                              f"--{k.replace('_', '-')} {explicit[k]} was also given: drop one")
    if "freetext" in probes and explicit.get("n_demo") == 0:
        raise UserError("--probes names freetext, but --n-demo 0 turns it off: drop one")
    return out


def to_argv(cfg: Config) -> list[str]:
    """Flags that rebuild `cfg` from the defaults (round-trips through parse)."""
    out: list[str] = []
    for f in fields(Config):
        v = getattr(cfg, f.name)
        if f.default is not MISSING and v == f.default:
            continue
        if isinstance(v, bool):
            out.append(_flag(f.name) if v else "--no-" + f.name.replace("_", "-"))
        elif isinstance(v, tuple):
            out += [_flag(f.name), *map(str, v)]
        else:
            out += [_flag(f.name), str(v)]
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, explicit, name = parse(argv, with_preset=True)
    except UserError as e:
        print(f"steer-heal: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    from .run import run  # heavy imports only once the flags are good

    try:
        return run(cfg, explicit, preset=name)
    except UserError as e:
        logger.error(str(e))
        return 2
    except OSError as e:  # a full disk, a read-only store: what failed where, in one line
        logger.error(f"{one_line(e)}. Free space or fix permissions, then `just resume` the run")
        return 1
    except KeyboardInterrupt:  # before the flow started (during the run it is recorded as interrupted)
        logger.warning("interrupted")
        return 130

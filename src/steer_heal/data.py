"""The bundled data (personas, prompts, dilemmas, smoke vignettes) and the vignette loader.

Everything here returns plain python objects. Bundled files are read once and
cached; callers get fresh copies, so mutating a result never leaks into the cache.
"""

from __future__ import annotations

import copy
import json
from functools import cache, lru_cache
from itertools import cycle, islice
from pathlib import Path

from .config import FOUNDATIONS, ConfigError

DATA = Path(__file__).parent / "data"
SMOKE_VIGNETTES = DATA / "vignettes_smoke.jsonl"
PERSONA_KEYS = ("pos", "neg", "trait", "target", "direction", "neutral")
DILEMMA_KEYS = ("prompt", "trait", "opposite")
DILEMMAS = "heldout_dilemmas.json"
DIRECTIONS = ("down", "up")


@cache
def _bundled(name: str):
    path = DATA / name
    if not path.is_file():
        raise ConfigError(f"bundled data file missing: {path} (reinstall steer-heal)")
    return json.loads(path.read_text())


def _get(name: str):
    return copy.deepcopy(_bundled(name))


# ---------------------------------------------------------------- personas, prompts, dilemmas

def pairs() -> list[str]:
    return list(_bundled("personas.json"))


def persona(cfg) -> dict:
    """The persona pair of `cfg`, with its text/target/direction overrides applied ('' = the pair's)."""
    table = _bundled("personas.json")
    if cfg.persona not in table:
        raise ConfigError(f"config persona={cfg.persona!r} is not a bundled pair: use one of {', '.join(table)}")
    p = {"name": cfg.persona, **copy.deepcopy(table[cfg.persona])}
    missing = [k for k in PERSONA_KEYS if k not in p]
    if missing:
        raise ConfigError(f"persona pair {cfg.persona!r} in personas.json lacks {missing}")
    for key, override in (("pos", cfg.persona_pos), ("neg", cfg.persona_neg),
                          ("target", cfg.target), ("direction", cfg.direction)):
        if override.strip():
            p[key] = override.strip()
    for key in ("pos", "neg"):
        if not str(p[key]).strip():
            raise ConfigError(f"persona {cfg.persona!r} has empty {key} text: pass --persona-{key} TEXT")
    if p["target"] not in FOUNDATIONS:
        raise ConfigError(f"persona {cfg.persona!r} target={p['target']!r}: must be one of {', '.join(FOUNDATIONS)}")
    if p["direction"] not in DIRECTIONS:
        raise ConfigError(f"persona {cfg.persona!r} direction={p['direction']!r}: must be down or up")
    return p


def trait_sign(p: dict) -> int:
    """+1 when the persona's trait raises the target foundation's nats, -1 when it lowers them."""
    return 1 if p["direction"] == "up" else -1


def contexts() -> list[str]:
    """User messages the vector is extracted over."""
    return _get("contexts.json")


def prompts(n: int = 0) -> list[str]:
    """The first n generation prompts, cycling the bundled list when n exceeds it (0 = all)."""
    base = _get("prompts.json")
    return base if n <= 0 else list(islice(cycle(base), n))


def dilemmas(pair: str) -> list[dict]:
    """Contrast-probe items {prompt, trait, opposite} for a persona pair: the held-out set, disjoint from
    the generation prompts and extraction contexts (tests/test_heldout_data.py), so trait_nats never
    scores text the student was trained on. Its prompts also seed the free-text generations."""
    table = _bundled(DILEMMAS)
    if pair not in table:
        raise ConfigError(f"no dilemmas for persona pair {pair!r}: {DILEMMAS} has {', '.join(table)}")
    items = copy.deepcopy(table[pair])
    for i, it in enumerate(items):
        missing = [k for k in DILEMMA_KEYS if not str(it.get(k, "")).strip()]
        if missing:
            raise ConfigError(f"{DILEMMAS} {pair!r} item {i} lacks {missing}")
    return items


# ---------------------------------------------------------------- vignettes

def _foundation(name: str, where: str) -> str:
    # tolerate case and spaces ("social norms") but nothing looser
    key = str(name).replace(" ", "").lower()
    for f in FOUNDATIONS:
        if f.lower() == key:
            return f
    raise ConfigError(f"{where}: unknown foundation {name!r}: must be one of {', '.join(FOUNDATIONS)}")


def _parse_line(line: str, where: str, default_id: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for col in ("text", "foundation_coarse"):
        if not str(row.get(col) or "").strip():
            raise ConfigError(f"{where}: missing column {col!r}")
    present = [f for f in FOUNDATIONS if row.get(f"human_{f}") is not None]
    if present and len(present) < len(FOUNDATIONS):
        lack = [f"human_{f}" for f in FOUNDATIONS if f not in present]
        raise ConfigError(f"{where}: missing column(s) {lack} (give all seven human_<F> columns or none)")
    try:
        human = {f: float(row[f"human_{f}"]) for f in present}
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: human_<F> columns must be numbers") from None
    return {"id": str(row.get("id") or default_id), "text": str(row["text"]).strip(),
            "foundation": _foundation(row["foundation_coarse"], where), "human": human}


@lru_cache(maxsize=8)
def _read_vignettes(path: str, _mtime_ns: int) -> tuple:
    p = Path(path)
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            rows.append(_parse_line(line, f"{path} line {i}", f"{p.stem}-{i}"))
    if not rows:
        raise ConfigError(f"vignette file {path} is empty: it needs one JSON object per line with text and foundation_coarse")
    return tuple(rows)


def stratified(rows: list[dict], n: int) -> list[dict]:
    """n rows taken round-robin over foundations (in order of first appearance), kept in file order."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["foundation"], []).append(i)
    picked: list[int] = []
    depth = 0
    while len(picked) < min(n, len(rows)):
        for idx in groups.values():
            if depth < len(idx) and len(picked) < n:
                picked.append(idx[depth])
        depth += 1
    return [rows[i] for i in sorted(picked)]


def load_vignettes(path: str | Path = "", n: int = 0) -> list[dict]:
    """Vignettes [{id, text, foundation, human: {F: float}}] from a Clifford-shape JSONL ('' = bundled smoke set).

    n > 0 takes a deterministic stratified subset, so even a small n covers every foundation.
    """
    if n < 0:
        raise ConfigError(f"n_vignettes={n} is invalid: must be an integer >= 0")
    p = Path(path) if str(path) else SMOKE_VIGNETTES
    if not p.is_file():
        raise ConfigError(f"vignette file not found: {p}; pass an existing JSONL file with --vignettes PATH"
                          " (or leave --vignettes empty for the bundled smoke set)")
    rows = [dict(r, human=dict(r["human"])) for r in _read_vignettes(str(p.resolve()), p.stat().st_mtime_ns)]
    return stratified(rows, n) if n else rows

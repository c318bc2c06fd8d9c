"""The bundled data (personas, prompts, dilemmas, smoke vignettes) and the vignette loader.

Everything here returns plain python objects. Bundled files are read once and
cached; callers get fresh copies, so mutating a result never leaks into the cache.
"""

from __future__ import annotations

import copy
import json
import math
import re
from functools import cache, lru_cache
from itertools import cycle, islice
from pathlib import Path

from loguru import logger

from .config import FOUNDATIONS
from .errors import UserError

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
        raise UserError(f"bundled data file missing: {path} (reinstall steer-heal)")
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
        raise UserError(f"config persona={cfg.persona!r} is not a bundled pair: use one of {', '.join(table)}")
    p = {"name": cfg.persona, **copy.deepcopy(table[cfg.persona])}
    missing = [k for k in PERSONA_KEYS if k not in p]
    if missing:
        raise UserError(f"persona pair {cfg.persona!r} in personas.json lacks {missing}")
    for key, override in (("pos", cfg.persona_pos), ("neg", cfg.persona_neg),
                          ("target", cfg.target), ("direction", cfg.direction)):
        if override.strip():
            p[key] = override.strip()
    for key in ("pos", "neg"):
        if not str(p[key]).strip():
            raise UserError(f"persona {cfg.persona!r} has empty {key} text: pass --persona-{key} TEXT")
    if p["target"] not in FOUNDATIONS:
        raise UserError(f"persona {cfg.persona!r} target={p['target']!r}: must be one of {', '.join(FOUNDATIONS)}")
    if p["direction"] not in DIRECTIONS:
        raise UserError(f"persona {cfg.persona!r} direction={p['direction']!r}: must be down or up")
    return p


def trait_sign(p: dict) -> int:
    """+1 when the persona's trait raises the target foundation's nats, -1 when it lowers them."""
    return 1 if p["direction"] == "up" else -1


def contexts() -> list[str]:
    """User messages the vector is extracted over."""
    return _get("contexts.json")


def suffix_contexts(path: str, n: int) -> list[tuple[str, str]]:
    """n branching-suffix contexts (user message, start of an answer) spread evenly over the file's rows, so
    every category in it is drawn (S1 and S3 extract over 256 such pairs; the file has 550)."""
    f = Path(path).expanduser()
    if not f.is_file():
        raise UserError(f"--suffix-file {path}: no such file (from {Path.cwd()}); pass the branching-suffix JSON, "
                          "or --n-extract-pairs 0 for the bundled contexts")
    try:
        rows = json.loads(f.read_text())
        got = [(str(r["user_msg"]), str(r["suffix"])) for r in rows]
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"--suffix-file {path}: not a JSON list of {{user_msg, suffix}} rows ({e!r})") from None
    if len(got) < n:
        raise UserError(f"--n-extract-pairs {n}: {path} has only {len(got)} rows")
    return [got[i * len(got) // n] for i in range(n)]


def extract_contexts(cfg) -> list:
    """What the vector is extracted over: n_extract_pairs branching-suffix pairs, or (0) the bundled messages."""
    return suffix_contexts(cfg.suffix_file, cfg.n_extract_pairs) if cfg.n_extract_pairs else contexts()


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
        raise UserError(f"no dilemmas for persona pair {pair!r}: {DILEMMAS} has {', '.join(table)}")
    items = copy.deepcopy(table[pair])
    for i, it in enumerate(items):
        missing = [k for k in DILEMMA_KEYS if not str(it.get(k, "")).strip()]
        if missing:
            raise UserError(f"{DILEMMAS} {pair!r} item {i} lacks {missing}")
    return items


# ---------------------------------------------------------------- vignettes

def _foundation(name: str, where: str) -> str:
    # tolerate case and spaces ("social norms") but nothing looser
    key = str(name).replace(" ", "").lower()
    for f in FOUNDATIONS:
        if f.lower() == key:
            return f
    raise UserError(f"{where}: unknown foundation {name!r}: must be one of {', '.join(FOUNDATIONS)}")


# tinymfv's older files: percent strings under the foundation's own name, "Not Wrong" for SocialNorms
OLD_LABELS = {**{f: f for f in FOUNDATIONS[:-1]}, "Not Wrong": "SocialNorms"}
# --frame -> tinymfv's condition: who violates the norm, someone you watch ("You see ...") or you
FRAMES = {"other": "other_violate", "self": "self_violate"}


def _share(x, where: str, col: str) -> float | None:
    """83.0, "83 %" or "83%" -> 83.0; absent or blank -> None. A share is a percentage: NaN, below 0,
    over 100 or a boolean (json true is not 1%) is refused."""
    if x is None or str(x).strip() == "":
        return None
    if isinstance(x, bool):
        raise UserError(f"{where}: column {col!r} is boolean {x!r}, not a percentage from 0 to 100")
    try:
        v = float(str(x).strip().removesuffix("%")) if isinstance(x, str) else float(x)
    except (TypeError, ValueError):
        raise UserError(f"{where}: column {col!r} is {x!r}, not a number or a percentage") from None
    if math.isnan(v):
        raise UserError(f"{where}: column {col!r} is NaN, not a percentage from 0 to 100")
    if not 0.0 <= v <= 100.0:
        raise UserError(f"{where}: column {col!r} is {x!r}, outside the percentages 0 to 100")
    return v


def _labels(row: dict, where: str) -> dict[str, float]:
    """The human label shares {F: %}: all seven `human_<F>` columns (tinymfv now), or tinymfv's older
    Care..Liberty + "Not Wrong" percent columns, or none."""
    cols = {f"human_{f}": f for f in FOUNDATIONS}
    if not any(c in row for c in cols) and any(c in row for c in OLD_LABELS):
        cols = {c: f for c, f in OLD_LABELS.items()}
    vals = {f: _share(row.get(c), where, c) for c, f in cols.items()}
    lack = [c for c, f in cols.items() if vals[f] is None]
    if 0 < len(lack) < len(cols):
        raise UserError(f"{where}: missing column(s) {lack} (give all seven label columns or none)")
    return {} if lack else {f: vals[f] for f in FOUNDATIONS}


def _parse_line(line: str, where: str, default_id: str, column: str) -> dict:
    """One vignette; its text from the `text` column, or (tinymfv's packed rows) the frame's `column`."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    text = str(row.get("text") or row.get(column) or "").strip()
    if not text:
        raise UserError(f"{where}: missing column 'text'" + (f" (or {column!r})" if column in row else ""))
    if not str(row.get("foundation_coarse") or "").strip():
        raise UserError(f"{where}: missing column 'foundation_coarse'")
    return {"id": str(row.get("id") or default_id), "text": text,
            "foundation": _foundation(row["foundation_coarse"], where), "human": _labels(row, where),
            "packed": "text" not in row}


def _named(p: Path) -> str | None:
    """The condition in a tinymfv file name (vignettes_<set>_<condition>.jsonl), if any."""
    return next((c for c in FRAMES.values() if c in p.name), None)


def _frame(p: Path, texts: list[str], packed: bool, frame: str) -> tuple[str | None, str]:
    """(tinymfv condition or None, how it was decided): --frame, else the file name, else the texts: all
    "You see ..." is other_violate, all first-person "You ..." is self_violate, anything else cannot be told."""
    named = _named(p)
    if frame:
        if named and named != FRAMES[frame]:
            raise UserError(f"--frame {frame} contradicts the vignette file {p.name} ({named}): drop --frame "
                              "or pass the other file")
        return FRAMES[frame], "--frame"
    if named:
        return named, "the file name"
    if packed:
        return "other_violate", "packed rows: tinymfv's default condition (--frame self reads self_violate)"
    if all(t.startswith("You see ") for t in texts):
        return "other_violate", "the texts: all 'You see ...'"
    if all(re.match(r"You\b", t) and not t.startswith("You see ") for t in texts):
        return "self_violate", "the texts: all first-person 'You ...'"
    return None, "not inferable (texts neither all 'You see ...' nor all first-person): pass --frame other|self"


@lru_cache(maxsize=8)
def _read_vignettes(path: str, _mtime_ns: int, frame: str) -> tuple[tuple, str]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"vignette file {path} is not UTF-8 (byte 0x{e.object[e.start]:02x} on line {line}): "
                          "re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError(f"vignette file {path} is empty: it needs one JSON object per line with text and foundation_coarse")
    column = FRAMES.get(frame) or _named(p) or "other_violate"
    rows = [_parse_line(line, f"{path} line {i}", f"{p.stem}-{i}", column) for i, line in lines]
    first: dict[str, int] = {}
    for (i, _), r in zip(lines, rows):  # one id standing for two texts would pair the wrong items
        if r["id"] in first:
            raise UserError(f"vignette file {path}: repeated vignette id {r['id']!r} on lines {first[r['id']]} and "
                              f"{i}: give each vignette its own id")
        first[r["id"]] = i
    packed = [r.pop("packed") for r in rows]
    cond, how = _frame(p, [r["text"] for r in rows], all(packed), frame)
    return tuple(dict(r, frame=cond) for r in rows), how


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


def load_vignettes(path: str | Path = "", n: int = 0, frame: str = "") -> list[dict]:
    """Vignettes [{id, text, foundation, human: {F: %}, frame}] from a JSONL file ('' = bundled smoke set).

    Accepted shapes: Clifford/tinymfv rows with `text`, `foundation_coarse` and optional labels
    (`human_<F>` numbers, or tinymfv's older percent columns with "Not Wrong"), and tinymfv's packed
    rows (`other_violate` / `self_violate` text columns; `frame` picks one). `frame` ('', other, self)
    is each row's tinymfv condition, None when it cannot be told (_frame). n > 0 takes a
    deterministic stratified subset, so even a small n covers every foundation.
    """
    return [dict(r, human=dict(r["human"])) for r in _vignette_rows(path, n, frame)[0]]


def vignette_info(path: str | Path = "", n: int = 0, frame: str = "") -> dict:
    """What run_info records of the vignettes a run evaluates on (file, count, frame, labels), logged once,
    with a warning where a number will be missing."""
    rows, how = _vignette_rows(path, n, frame)
    info = {"path": str(path) or "bundled smoke set", "n": len(rows), "frame": rows[0]["frame"], "frame_from": how,
            "labelled": sum(bool(r["human"]) for r in rows)}
    logger.info(f"vignettes: {info['n']} from {info['path']}, frame {info['frame']} (from {how}), "
                f"{info['labelled']} with human labels")
    if info["labelled"] < info["n"]:
        logger.warning(f"{info['n'] - info['labelled']} of {info['n']} vignettes have no human labels (human_<F> or "
                       "tinymfv's Care..Liberty/'Not Wrong' columns): top1_agree "
                       + ("will be NULL at every stage" if not info["labelled"] else "counts only the labelled ones"))
    if info["frame"] is None:
        logger.warning("vignette frame unknown: stored as NULL; pass --frame other|self to record it")
    return info


def _vignette_rows(path: str | Path, n: int, frame: str) -> tuple[list[dict], str]:
    if n < 0:
        raise UserError(f"n_vignettes={n} is invalid: must be an integer >= 0")
    p = Path(path) if str(path) else SMOKE_VIGNETTES
    if not p.is_file():
        raise UserError(f"vignette file not found: {p}; pass an existing JSONL file with --vignettes PATH"
                          " (or leave --vignettes empty for the bundled smoke set)")
    rows, how = _read_vignettes(str(p.resolve()), p.stat().st_mtime_ns, frame)
    return (stratified(list(rows), n) if n else list(rows)), how

"""Ground floor: durable file writes and hashes, used by the store and by the stages alike.

Nothing here imports from the package but errors.py, so any module may use it.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from .errors import CorruptArtifact

TMP_SUFFIX = ".tmp"
# A run or diagnostic id is one path component: no separators, no leading dot ("..", hidden files).
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}")


def safe_name(s: str) -> bool:
    return isinstance(s, str) and _SAFE.fullmatch(s) is not None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, then rename: readers
    see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make adapters unreadable to the group, unlike the rest
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_stray_tmp(d: Path) -> list[Path]:
    """Delete the temp files a writer killed inside atomic_write_bytes left in `d` (only the writer that
    holds the run's lock may call this: a live writer's temp file would go too)."""
    gone = [p for p in Path(d).glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def fsync_dir(d: Path) -> None:
    """Make a rename in `d` durable; not all platforms allow opening a directory."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_verified(path: str | Path, sha256: str, what: str) -> bytes:
    """The bytes of a stored artifact whose recorded sha256 they must match (the one hash check)."""
    path = Path(path)
    if not path.is_file():
        raise CorruptArtifact(f"{what} is missing: {path}. Restore the file; a run cannot resume past a lost "
                             "artifact.")
    data = path.read_bytes()
    if (got := sha256_bytes(data)) != sha256:
        raise CorruptArtifact(f"{what} at {path} does not match its recorded sha256 (file {got[:12]}..., store "
                             f"{sha256[:12]}...): the file is corrupt or was replaced. Restore it; resume will "
                             "not trust it.")
    return data

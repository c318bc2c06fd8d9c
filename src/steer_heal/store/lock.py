"""One live writer per run: an OS lock held for the writer's whole life, and a heartbeat.

The writer (a run's start or resume) takes `fcntl.flock(LOCK_EX | LOCK_NB)` on <run dir>/writer.lock
and keeps the descriptor open until it ends; the kernel drops the lock when the process dies, however
it dies, so a crashed run never leaves a lock behind. A second writer is refused at once, in one line
naming the holder (pid, host, since), which the holder writes into the lock file.

While it holds the lock a daemon thread touches the file every HEARTBEAT_S seconds. Readers cannot
test the lock from SQL, so the `runs` view reads the file's mtime instead: a run whose status is
`running` but whose heartbeat is older than STALE_S shows as `stale` (its process is gone; resume it).

Across machines on a shared filesystem the lock is only as good as that filesystem's locking: Linux
NFS maps flock onto NFS byte-range locks, which hold across clients; some network filesystems lock per
machine only. `stale` compares the writer's mtime with the reader's clock, so it needs clocks within
STALE_S of each other. The file is never deleted (deleting a lock file races with a new locker).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import platform
import threading
import time
from pathlib import Path

from ..errors import UserError

LOCK_FILE = "writer.lock"
HEARTBEAT_S = 10
STALE_S = 60  # six missed beats: a loaded machine may delay a beat, not six


class RunLocked(UserError):
    """Another live process writes this run."""


class WriterLock:
    """`with WriterLock(run_dir):` holds the run's writer lock and heartbeat for the block."""

    def __init__(self, run_dir: str | os.PathLike, what: str = "run"):
        self.path, self.what = Path(run_dir) / LOCK_FILE, what
        self.fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> WriterLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            name = self.path.parent.name
            raise RunLocked(f"{self.what} {name} is being written by {holder(self.path)}: a second writer would "
                            f"duplicate its rows; wait for that process to end (or stop it), then `just resume {name}`"
                            ) from None
        since = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dict(pid=os.getpid(), host=platform.node(), since=since)).encode(), 0)
        self.fd = fd
        self._beat = threading.Thread(target=self._heartbeat, name="steer-heal-heartbeat", daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # a vanished dir or a full disk must not kill the run from a side thread
                pass

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join()  # no beat may land after release: a stale check reads the file next
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(path: Path, wait: float = 5.0) -> str:
    """'pid 123 on host h since ...' from a held lock file. Its holder writes that right after locking, so a
    file that is empty, torn, or still names a dead process on this host (the writer it replaced) is read
    again for up to `wait` seconds rather than named."""
    deadline = time.monotonic() + wait
    while True:
        try:
            h = json.loads(path.read_text() or "{}")
            who = f"pid {h['pid']} on {h['host']} since {h['since']}"
            if h["host"] != platform.node() or _alive(int(h["pid"])):
                return who
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process (it has not written its pid yet)"
        if time.monotonic() > deadline:
            return who
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True

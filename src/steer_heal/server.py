"""The run's own Prefect server, outside the terminal's process group.

A terminal sends Ctrl-C to its whole foreground process group. Prefect's ephemeral server is a child
in that group, so it died with the run's first Ctrl-C and the run then hung ~70 s retrying the API and
ended "failed: ConnectError". Here the same server (Prefect's SubprocessASGIServer command) starts in a
session of its own, so SIGINT reaches only the run, which records `interrupted` and stops the server.

A server outside the group would outlive a run killed by SIGKILL, so it watches a pipe from its parent:
the parent never writes to it, and when the parent ends, however it ends, the pipe closes and the
server terminates itself. Its output goes to <prefect home>/server.log.
"""

from __future__ import annotations

import _thread
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

API_HINT = ("start that server (`just server` serves http://127.0.0.1:4200/api) or unset PREFECT_API_URL, "
            "and the run starts a server of its own")


def check_api(timeout: float = 5.0) -> None:
    """A user's PREFECT_API_URL must answer before the run starts: Prefect's client retried a dead one and
    the run ended in three chained tracebacks. Any HTTP answer counts as alive (a Cloud URL may want a key
    for /health); only no answer at all is refused."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as e:
        why = getattr(e, "reason", e)
        why = getattr(why, "strerror", None) or str(why) or type(why).__name__
        raise UserError(f"PREFECT_API_URL={url} does not answer ({why}): {API_HINT}") from None


# Run in the server process: SIGTERM itself (uvicorn then shuts down cleanly) once stdin reaches EOF,
# that is once the run that started it is gone; exit hard if the clean shutdown hangs. os.read, not
# sys.stdin: a thread blocked in the buffered reader aborted the interpreter at exit (code -6).
_WATCH = """
import os, runpy, signal, sys, threading, time
def watch():
    while os.read(0, 65536):
        pass
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    os._exit(1)
threading.Thread(target=watch, daemon=True).start()
sys.argv = ["uvicorn", *sys.argv[1:]]
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


def _server_class():
    from prefect.server.api.server import SubprocessASGIServer

    class Server(SubprocessASGIServer):
        """Prefect's ephemeral server command, started in its own session with the parent-watching pipe."""

        home: Path
        log: Path

        def start(self, timeout: int | None = None) -> None:
            """Prefect's start() waited out its whole startup timeout (120 s) for a server that had already
            exited, then said only "timed out": here an exit ends the wait at once, with the log's cause."""
            from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

            deadline = time.monotonic() + (timeout or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
            self.running = True
            try:
                while True:
                    offset = self.log.stat().st_size if self.log.exists() else 0
                    self.server_process = self._run_uvicorn_command()
                    code = self._wait_healthy(deadline)
                    if code is None:
                        return
                    news = self.log.read_bytes()[offset:].decode(errors="replace")
                    if code == 3 and "while attempting to bind" in news:  # the port was taken meanwhile
                        self.port = self.find_available_port()
                        continue
                    raise UserError(f"the run's Prefect server exited with code {code} while starting: "
                                      f"{cause(news)} (its log: {self.log})")
            except BaseException:
                self.stop()  # a server still starting goes too
                raise

        def _wait_healthy(self, deadline: float) -> int | None:
            """None once /health answers 200, else the server's exit code; past the deadline a UserError."""
            import urllib.request

            local = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
            while (code := self.server_process.poll()) is None:
                try:
                    with local.open(f"{self.api_url}/health", timeout=2) as r:
                        if r.status == 200:
                            return None
                except OSError:  # not listening yet (URLError is an OSError)
                    pass
                if time.monotonic() > deadline:
                    raise UserError(f"the run's Prefect server did not answer within its startup timeout "
                                      f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); its log: {self.log}")
                time.sleep(0.1)
            return code

        def _run_uvicorn_command(self) -> subprocess.Popen:
            import prefect
            from prefect.settings import get_current_settings

            env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True)}
            # the run's own database whatever the shell says: servers sharing one migrated it at once
            # (alembic's race) and two runs of three died at start
            env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
            env.update(PREFECT_HOME=str(self.home),
                       PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{self.home / 'prefect.db'}")
            args = ["--app-dir", str(prefect.__module_path__.parent), "--factory",
                    "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                    "--log-level", "error", "--lifespan", "on"]
            with open(self.log, "ab") as out:
                return subprocess.Popen([sys.executable, "-c", _WATCH, *args], env=env, stdin=subprocess.PIPE,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    return Server


def cause(log: str) -> str:
    """The line of a server's log that says why it exited: a traceback's last line (the exception), else
    its last ERROR line, else its last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for pick in (lambda ln: re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b:?", ln),
                 lambda ln: "ERROR" in ln, lambda ln: True):
        hit = next((ln for ln in reversed(lines) if pick(ln)), None)
        if hit:
            return hit[:300]
    return "its log is empty"


class Watch:
    """The run's server while the flow runs. One that exits mid-run ends the run at once: `on_death(why)`
    (why: one line) when given, else the main thread is interrupted and `died` says why. Interrupting is
    not enough for a run: Prefect then reports the crash to the dead server, retrying for about a minute."""

    def __init__(self, server=None, on_death: Callable[[str], None] | None = None) -> None:
        self.server, self.on_death, self._died = server, on_death, None
        self._lock, self._done = threading.Lock(), threading.Event()
        if server is not None:
            threading.Thread(target=self._watch, name="prefect-server-watch", daemon=True).start()

    @property
    def died(self) -> str | None:
        return self._died

    def _check(self) -> bool:
        proc = self.server.server_process
        code = proc.poll() if proc is not None else None
        if code is not None:
            tail = self.server.log.read_bytes()[-20000:].decode(errors="replace") if self.server.log.exists() else ""
            self._died = f"the run's Prefect server exited with code {code} mid-run: {cause(tail)} (its log: " \
                         f"{self.server.log})"
        return code is not None

    def _watch(self) -> None:
        while not self._done.wait(0.5):
            with self._lock:
                if self._done.is_set() or not self._check():
                    continue
                if self.on_death is None:
                    _thread.interrupt_main()
                    return
            self.on_death(self._died)
            return

    def close(self, check: bool = False) -> None:
        """After this the watcher never fires (stopping the server is no death); `check` first looks once
        more, for a flow that failed on a dead server before the watcher saw it."""
        with self._lock:
            if check and self._died is None and self.server is not None and not self._done.is_set():
                self._check()
            self._done.set()


@contextmanager
def serve(home: Path, on_death: Callable[[str], None] | None = None) -> Iterator[Watch]:
    """Within the block Prefect talks to a fresh server on home's own database, whatever PREFECT_HOME says; a
    user's own PREFECT_API_URL wins and then nothing is started. A server that exits in the block: Watch."""
    if os.environ.get("PREFECT_API_URL"):
        yield Watch()
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as s:  # a free port now; start() moves on if another process takes it first
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = _server_class()(port=port)
    server.home = home
    server.log = home / "server.log"
    home.mkdir(parents=True, exist_ok=True)
    server.start()
    watch = Watch(server, on_death)
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield watch
    except BaseException:
        watch.close(check=True)
        raise
    finally:
        watch.close()
        server.stop()

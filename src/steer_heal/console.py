"""What every entry point shares: quiet offline defaults, the loguru format, one-line errors."""

from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys
import warnings
from collections.abc import Callable

from loguru import logger

from .errors import UserError

# Offline and quiet by default; a user's own setting of any of these still wins.
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_LOGGING_LEVEL": "WARNING",
         "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "HF_HUB_OFFLINE": "1",
         "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


def quiet_env() -> None:
    for k, v in QUIET.items():
        os.environ.setdefault(k, v)


def setup_logging(level: str = "INFO") -> None:
    logger.remove()
    logger.add(sys.stderr, level=level.upper(), format="<green>{time:HH:mm:ss}</green> {level:<5} {message}")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the problem (and the nearest flag for a typo), not the whole usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            flags = [s for a in self._actions for s in a.option_strings]
            words = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("--")]
            hints = [m[0] for w in words if (m := difflib.get_close_matches(w, flags, n=1, cutoff=0.75))]
            message += f" (did you mean {', '.join(hints)}?)" if hints else ""
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def one_line(e: BaseException) -> str:
    """An OSError as what failed where ('No space left on device: out/runs/x/rounds.jsonl'), else its text."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def script(prog: str, body: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run an entry point's body offline and quietly; a bad input exits 2 with its message, an I/O failure
    (a full disk, a read-only store) exits 1 with what failed where, Ctrl-C exits 130; no traceback."""
    quiet_env()
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, not ours
    setup_logging(os.environ.get("STEER_HEAL_LOG_LEVEL", "INFO"))
    try:  # SIGTERM (a queue's stop, a killed `just`) ends the process as an exit: cleanup and atexit run
        before = signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread
        before = None
    try:
        return body(argv)
    except UserError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{prog}: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def _terminated(*_) -> None:
    raise SystemExit(128 + signal.SIGTERM)

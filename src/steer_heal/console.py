"""What every entry point shares: quiet offline defaults, the loguru format, one-line errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from loguru import logger

from .config import ConfigError

# Offline and quiet by default; a user's own setting of any of these still wins.
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_LOGGING_LEVEL": "WARNING",
         "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "HF_HUB_OFFLINE": "1",
         "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


def quiet_env() -> None:
    for k, v in QUIET.items():
        os.environ.setdefault(k, v)


def setup_logging(level: str = "INFO") -> None:
    logger.remove()
    logger.add(sys.stderr, level=level, format="<green>{time:HH:mm:ss}</green> {level:<5} {message}")


def script(prog: str, body: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run an entry point's body offline and quietly; a bad input exits 2 with its message, no traceback."""
    quiet_env()
    setup_logging(os.environ.get("STEER_HEAL_LOG_LEVEL", "INFO"))
    try:
        return body(argv)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2

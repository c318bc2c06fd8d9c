"""A run's status, one vocabulary: what the store's `status` rows hold, what the flow returns and what run.py,
the sweep, `just seeds` and the study decide on. `finished()` is the one rule for "nothing left to do".

The stored rows keep their plain strings (status, reason), so runs stored before this type read back
unchanged; `Outcome` is a status with its reason, never a "starved:reason" string to split.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RunStatus(StrEnum):
    RUNNING = "running"          # written at start and at each resume
    DONE = "done"                # every round of its target
    STOPPED = "stopped"          # --coh-floor ended it after a round: an outcome
    STARVED = "starved"          # the filter kept too little at every dose: an outcome
    FAILED = "failed"            # heal diverged, an error, a dead server: resume retries the round
    INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM: resume continues
    STALE = "stale"              # the `runs` view's word for `running` with no live writer


# an ended run: a re-submit, `just seeds` or the study has nothing to do (done also needs its rounds)
ENDED = frozenset({RunStatus.DONE, RunStatus.STOPPED, RunStatus.STARVED})
EXIT_CODE = {RunStatus.STARVED: 3, RunStatus.FAILED: 4}  # run.py's exit status for an outcome that is no success


@dataclass(frozen=True)
class Outcome:
    """How a run (or the flow) ended: a status and why."""
    status: RunStatus
    reason: str = ""

    @classmethod
    def of_row(cls, row: dict | None) -> Outcome | None:
        """A stored `status` row as it was written; None for no row (the run never started the flow)."""
        if not row:
            return None
        return cls(RunStatus(row.get("status") or RunStatus.RUNNING), row.get("reason") or "")

    def row(self) -> dict:
        return dict(status=str(self.status), reason=self.reason)

    def __str__(self) -> str:
        return f"{self.status}: {self.reason}" if self.reason else str(self.status)


def finished(run: Outcome | RunStatus | str | None, rounds_done: int = 0, n_rounds: int | None = None) -> bool:
    """Whether a run has nothing left to do: it ended (done, stopped, starved), and a done one has its
    n_rounds (when given: a grid cell asks for more rounds than a done run holds). None: never started."""
    if run is None:
        return False
    status = RunStatus(run.status if isinstance(run, Outcome) else run)
    if status == RunStatus.DONE and n_rounds is not None:
        return rounds_done >= n_rounds
    return status in ENDED

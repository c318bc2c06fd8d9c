"""The diagnostic record: one `diagnostics` row, its `diag_rows`, a report.md and plots in its folder."""

from __future__ import annotations

import atexit
import json
import secrets
import time
from pathlib import Path

from .. import data
from ..files import atomic_write_bytes
from ..store import RunLog
from ..student import stored_config


def new_diag_id(kind: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{secrets.token_hex(2)}"


class Diagnostic:
    """One diagnostic record: the `diagnostics` row is written at the start with status running (so a long
    sweep shows up at once), rows are appended as they are measured, plots and report.md land in its folder,
    and a last `diagnostics` row says done. A process that ends before finish() (an error, Ctrl-C, SIGTERM)
    says interrupted; one killed outright stays running. Readers use only done records (the `diag_rows`
    view, report.md's links): a re-run supersedes a partial record, which stays on disk."""

    def __init__(self, root: str | Path, kind: str, source_run: str, round_: int | None, config: dict):
        self.kind, self.source_run, self.round, self.config = kind, source_run, round_, config
        self.log = RunLog(root, new_diag_id(kind), kind="diagnostics")
        self.id, self.dir = self.log.run_id, self.log.dir
        self._status("running")
        atexit.register(self._ended)

    def _status(self, status: str) -> None:
        self.log.append("diagnostics", dict(kind=self.kind, source_run=self.source_run, round=self.round,
                                            config=self.config, status=status))

    def _ended(self) -> None:
        try:
            self._status("interrupted")
        except OSError:  # a store gone or full at exit: the record stays `running`, which readers skip too
            pass

    def add(self, rows: list[dict]) -> int:
        """Append rows; a row's own run_id and round, when it has them, go to the columns."""
        return self.log.append("diag_rows", [dict(kind=self.kind, source_run=r.get("run_id", self.source_run),
                                                  round=r.get("round", self.round), row=r) for r in rows])

    def finish(self, table: str, plots: list[Path] = ()) -> Path:
        """report.md (what was run, the table, the plots), then the table and where it all is on stdout."""
        cfg = self.log.read("diagnostics")[0]["config"]
        lines = [f"# {self.kind} {self.id}", "", f"source run `{self.source_run}`, round {self.round}", "",
                 "config: `" + json.dumps(cfg, default=str) + "`", "", "```", table, "```", ""]
        if plots:
            lines += ["## Plots", ""] + [f"- [{p.name}]({_rel(p, self.dir)})" for p in plots] + [""]
        path = self.dir / "report.md"
        atomic_write_bytes(path, "\n".join(lines).encode())
        atexit.unregister(self._ended)
        self._status("done")
        self._relink()
        print(table)
        if plots:
            print("plots: " + " ".join(map(str, plots)))
        print(f"diagnostic {self.id}: {self.dir}")
        return path


    def _relink(self) -> None:
        """Rewrite each source run's report.md so it lists this diagnostic (and its plots)."""
        from ..report import write_report

        for run_id in (self.source_run or "").split(","):
            if (self.log.root / "runs" / run_id / "run_info.jsonl").is_file():
                log = RunLog(self.log.root, run_id)
                write_report(log, data.persona(stored_config(log))["target"])


def _rel(p: Path, start: Path) -> str:
    try:
        return str(p.relative_to(start))
    except ValueError:
        return str(p)



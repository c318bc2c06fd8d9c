"""The run as a Prefect user sees it: flow-run tags, per-round and end-of-run artifacts, and `just ui`.

The flow run is named by the run id and each task run by stage and round (stage.StageName's task name,
set by flow.py's `flow_run_name` and `task_run_name`); the tags here say reg, control, preset, seed, model
family, a sweep cell's sweep, and for a resume `resume` and `continues:<run id>`. Artifacts go only to a
Prefect API the user chose (PREFECT_API_URL in the environment: their server, `just ui`, a sweep's server),
never to the throwaway per-run server nobody looks at; a failed write is one warning line, never a failed run.
"""

from __future__ import annotations

import math
import os
import re
import socket
from contextlib import AbstractContextManager

from loguru import logger

from .console import one_line
from .filter import drop_counts
from .informative import shade
from .status import Outcome
from .store import RunLog
from .tables import ROUND_COLS, round_cells


def api_in_use() -> bool:
    """A Prefect API the user points at (the run's own server, started by server.py, sets no env var)."""
    return bool(os.environ.get("PREFECT_API_URL"))


def run_tags(log: RunLog, resumed: bool) -> list[str]:
    """The flow run's tags, from the stored run_info (a resume has no preset flag of its own)."""
    info = (log.read("run_info") or [{}])[0]
    resolved = info.get("resolved") or {}
    family = resolved.get("model_type") or str(info.get("model") or "?").rsplit("/", 1)[-1]
    out = [f"run:{log.run_id}", f"reg:{info.get('reg')}", f"control:{info.get('control')}",
           f"preset:{info.get('preset') or 'none'}", f"seed:{info.get('seed')}", f"family:{family}"]
    out += _sweep_tags()
    if resumed:
        out += ["resume", f"continues:{log.run_id}"]
    return out


def _sweep_tags() -> list[str]:
    """A sweep cell's run is a subflow of the cell's flow run: carry over its sweep tags."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    tags = (ctx.flow_run.tags if ctx and ctx.flow_run else None) or []
    return [t for t in tags if t == "sweep" or t.startswith("sweep:")]


def tagged(log: RunLog, resumed: bool) -> AbstractContextManager:
    """Prefect's tags context for the flow call: the flow run and its task runs carry run_tags."""
    from prefect import tags

    return tags(*run_tags(log, resumed))


def slug(text: str) -> str:
    """An artifact key: Prefect allows lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def _json_safe(v):
    return str(v) if isinstance(v, float) and math.isinf(v) else v  # JSON has no inf (NaN Prefect nulls itself)


def round_table_rows(row: dict, got: dict, verdict: dict[str, bool] | None = None) -> list[dict]:
    """The round table's one row for this round: its headers, values as stored, the same withheld marks, and
    a probe at chance greyed as the table greys it (verdict: informative.usable of the run)."""
    cells = shade(round_cells(row, got), verdict)
    return [{head: _json_safe(cells.get(col)) for col, head in ROUND_COLS}]


def round_markdown(run_id: str, row: dict, checks: list[tuple[bool | None, str]], scored: list[dict]) -> str:
    """The SHOULD lines the round checked (failed first) and how many completions each filter criterion dropped."""
    fired = sorted((c for c in checks if c[0] is not None), key=lambda c: c[0])
    r = row["round"]
    lines = [f"## {run_id} round {r}", "", f"**SHOULD** ({sum(h for h, _ in fired)} of {len(fired)} held)", ""]
    lines += [f"- {'held' if held else '**FAILED**'}: {line}" for held, line in fired] or ["- none could be checked"]
    lines += [f"- {line}" for held, line in checks if held is None and "[not checked" in line]
    drops = drop_counts(scored)
    lines += ["", f"**Filter** kept {row.get('n_kept')} of {row.get('n_gen')} generated "
              f"(kappa {row.get('kappa')}, walk {row.get('walk')}); dropped by the first criterion each failed:", "",
              "| criterion | dropped |", "|---|---|", *[f"| {k} | {n} |" for k, n in drops.items()]]
    return "\n".join(lines) + "\n"


def round_artifacts(log: RunLog, row: dict, got: dict, checks: list[tuple[bool | None, str]],
                    scored: list[dict], verdict: dict[str, bool] | None = None) -> None:
    """Round row's table and its checks' markdown on the flow run, where a user's Prefect API is in use."""
    if not api_in_use():
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    r, key = row["round"], slug(log.run_id)
    _write(f"round {r} table", lambda: create_table_artifact(
        round_table_rows(row, got, verdict), key=f"{key}-r{r}-table", description=f"{log.run_id} round {r}: the round table's row"))
    _write(f"round {r} checks", lambda: create_markdown_artifact(
        round_markdown(log.run_id, row, checks, scored), key=f"{key}-r{r}-checks",
        description=f"{log.run_id} round {r}: SHOULD lines and filter drops"))


def run_markdown(log: RunLog, status: Outcome) -> str:
    """The report's summary (its head and round table) and where the report and plots are."""
    report = log.dir / "report.md"
    text = report.read_text() if report.is_file() else ""
    summary = text.split("\n## Stages", 1)[0].strip() or f"# Run {log.run_id}\n\nno report written"
    plots = sorted((log.dir / "plots").glob("*.png"))
    lines = [summary, "", f"**status** {status}", "", "**Files**", "",
             f"- report: `{report}`" + ("" if report.is_file() else " (not written: the run ended before it)"),
             f"- store: `{log.dir}`"]
    lines += [f"- plot: `{p}`" for p in plots] or [f"- plots: none yet (`just plot {log.run_id}` writes them "
                                                   f"under `{log.dir / 'plots'}`)"]
    return "\n".join(lines) + "\n"


def run_artifact(log: RunLog, status: Outcome) -> None:
    if not api_in_use():
        return
    from prefect.artifacts import create_markdown_artifact

    _write("run summary", lambda: create_markdown_artifact(
        run_markdown(log, status), key=f"{slug(log.run_id)}-summary", description=f"{log.run_id}: report summary"))


def _write(what: str, make) -> None:
    try:
        make()
    except Exception as e:  # an artifact is a view of the store: losing one never fails the run
        logger.warning(f"Prefect artifact ({what}) not written: {one_line(e)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""The run as a Prefect user sees it (issue 29), on a real local Prefect server started by `just ui`:
the flow run named by the run id with its tags, a task run per stage and round, one table artifact per
round equal to the store's rounds row, the checks and summary artifacts, a resume's tags; the slow test
renders the UI's flow-run page in headless Chromium and saves its screenshot in docs/img.
"""

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from pool_procs import REPO, Pool, free_port
from test_flow import ARGS

from steer_heal import informative, intervals, metrics, prefect_ui
from steer_heal.store import RunLog
from steer_heal.tables import ROUND_COLS, round_table

STAGES = ("extract", "dose", "eval-steered", "heal", "bake", "eval-healed")
RUN = "ui_run-1"  # an underscore: artifact keys must be slugged


class UiServer(Pool):
    """`just ui` on a free port, its store root beside it (Pool's env, stop and client)."""

    def start(self, timeout: float = 180.0) -> float:
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        t0 = time.time()
        p = self.spawn(["just", "ui", "--out", str(self.out), "--port", str(self.port)], "ui.log",
                       dict(self.env(client=False), PYTHON=sys.executable))
        while time.time() - t0 < timeout:
            assert p.poll() is None, self.tail("ui.log")
            try:
                with urllib.request.urlopen(self.api + "/health", timeout=2):
                    return time.time() - t0
            except OSError:
                time.sleep(0.25)
        raise TimeoutError(self.tail("ui.log"))

    def steer_heal(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "steer_heal", "--out", str(self.out), *ARGS, *args],
                              env=self.env(), capture_output=True, text=True, timeout=600)

    def flow_runs(self) -> list:
        with self.client() as c:
            return sorted(c.read_flow_runs(), key=lambda r: r.start_time)

    def task_runs(self, fr) -> list:
        from prefect.client.schemas import filters as f

        with self.client() as c:
            return c.read_task_runs(flow_run_filter=f.FlowRunFilter(id=f.FlowRunFilterId(any_=[fr.id])))

    def artifacts(self, fr) -> dict:
        from prefect.client.schemas import filters as f

        with self.client() as c:
            got = c.read_artifacts(flow_run_filter=f.FlowRunFilter(id=f.FlowRunFilterId(any_=[fr.id])))
        return {a.key: a for a in got}


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """Round 0 as a new run, round 1 as its resume, both exported to the `just ui` server."""
    srv = UiServer(tmp_path_factory.mktemp("ui"))
    try:
        srv.start()
        for args in (["--run-id", RUN, "--n-rounds", "1"], ["--resume", RUN, "--n-rounds", "2"]):
            got = srv.steer_heal(*args)
            assert got.returncode == 0, got.stderr[-3000:]
        yield srv
    finally:
        srv.stop()


def test_just_ui_prints_the_url_and_the_export(ui):
    log = (ui.tmp / "ui.log").read_text()
    assert f"http://127.0.0.1:{ui.port} " in log and f"export PREFECT_API_URL={ui.api}" in log
    with urllib.request.urlopen(f"http://127.0.0.1:{ui.port}/ui-settings", timeout=10) as r:
        assert json.load(r)["api_url"] == ui.api  # the UI's browser code calls this server, not :4200


def test_flow_runs_are_named_tagged_and_have_a_task_run_per_stage_and_round(ui):
    first, resumed = ui.flow_runs()
    assert first.name == resumed.name == RUN and first.state.is_completed() and resumed.state.is_completed()
    want = {f"run:{RUN}", "reg:kl_rev", "control:none", "preset:fast-dev", "seed:3", "family:qwen3"}
    assert set(first.tags) == want
    assert set(resumed.tags) == want | {"resume", f"continues:{RUN}"}
    for fr, names in ((first, ["eval-base", *(f"{s}-r0" for s in STAGES)]), (resumed, [f"{s}-r1" for s in STAGES])):
        trs = ui.task_runs(fr)
        assert sorted(t.name for t in trs) == sorted(names)  # one each: no stage or round twice
        assert all(set(t.tags) == set(fr.tags) for t in trs)


def test_one_table_artifact_per_round_equals_the_stores_rounds_row(ui):
    log = RunLog(ui.out, RUN)
    rows = {r["round"]: r for r in log.read("rounds")}
    got = intervals.lookup(log.read("intervals"))
    assert sorted(rows) == [0, 1]
    slug = "ui-run-1"
    verdict = informative.usable(log.read("probe_info"))
    assert verdict and not any(verdict.values())  # the tiny model: every probe at chance, so every probe's cell greys

    def want(col: str, v):  # the round table's cell: an at-chance probe's number in parentheses, its ratio's gap
        if informative.probe_of(col) is None:
            return v
        return "at chance" if v is None and col in ("retain", "retain_trait") else informative.grey(v, False)

    for fr, r in zip(ui.flow_runs(), (0, 1)):
        arts = ui.artifacts(fr)
        assert set(arts) == {f"{slug}-r{r}-table", f"{slug}-r{r}-checks", f"{slug}-summary"}  # each flow run ends
        table = json.loads(arts[f"{slug}-r{r}-table"].data)
        assert len(table) == 1 and list(table[0]) == [h for _, h in ROUND_COLS]  # the round table's columns
        cell, row = table[0], rows[r]
        for col, head in ROUND_COLS:
            if col == "d_trait":
                assert cell[head] == want(col, intervals.fmt(got[(r, "healed", "trait", "base")]))
                assert cell[head].startswith("(")
            elif col in ("retain", "retain_trait") and row.get("broken"):
                assert cell[head] == want(col, "BROKEN")
            else:
                assert cell[head] == want(col, row[col]), head  # the stored value, greyed where at chance
        checks = arts[f"{slug}-r{r}-checks"].data
        fired = [(h, line) for h, line in metrics.shoulds(row, intervals.lookup(log.read("intervals"))) if h is not None]
        assert all(line in checks for _, line in fired)
        assert checks.count("**FAILED**") == sum(not h for h, _ in fired)
        drops = re.findall(r"^\| (\w+) \| (\d+) \|$", checks, re.M)
        scored = [c for c in log.read("completions") if c["round"] == r and c["phase"] in ("probe", "collect")]
        assert drops and sum(int(n) for _, n in drops) == sum(not c["keep"] for c in scored)
    summary = ui.artifacts(ui.flow_runs()[1])[f"{slug}-summary"].data
    verdict = informative.usable(log.read("probe_info"))  # report.md greys a probe at chance (all, on fast-dev)
    assert round_table(log.read("rounds"), log.read("intervals"), md=True, verdict=verdict) in summary
    assert str(log.dir / "report.md") in summary and "**status** done" in summary


def test_a_sweep_cells_run_is_tagged_with_its_sweep(ui, tmp_path):
    """A cell's run is a subflow of the cell's flow run (sweep/cell.py), which pool.submit tags sweep:<name>."""
    from prefect import flow, tags
    from prefect.settings import PREFECT_API_URL, temporary_settings

    log = RunLog(ui.out, RUN)

    @flow(name="cell-like")
    def cell() -> list[str]:
        return prefect_ui.run_tags(log, resumed=False)

    with temporary_settings(updates={PREFECT_API_URL: ui.api}), tags("sweep", "sweep:lam", f"cell:{RUN}"):
        got = cell()
    assert {"sweep", "sweep:lam", "reg:kl_rev", "family:qwen3"} <= set(got) and f"cell:{RUN}" not in got


def test_a_failed_artifact_write_is_a_warning_not_a_failure(monkeypatch, tmp_path):
    from loguru import logger
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    dead = "http://127.0.0.1:9/api"  # nothing listens: every write fails
    monkeypatch.setenv("PREFECT_API_URL", dead)
    row = dict(round=0, n_gen=2, n_kept=1, kappa=1.0, walk="top")
    said = []
    hid = logger.add(said.append, level="WARNING", format="{message}")
    try:
        with temporary_settings(updates={PREFECT_API_URL: dead, PREFECT_CLIENT_MAX_RETRIES: 0}):
            prefect_ui.round_artifacts(RunLog(tmp_path, "x"), row, {}, [], [])  # returns: no raise
    finally:
        logger.remove(hid)
    assert [m.split(" not written")[0] for m in said] == ["Prefect artifact (round 0 table)",
                                                           "Prefect artifact (round 0 checks)"]


CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            "--window-size=1400,900", "--virtual-time-budget=20000"]


@pytest.mark.slow
def test_the_ui_renders_the_flow_run_page_with_its_artifacts(ui, tmp_path):
    chromium = shutil.which("chromium")
    if not chromium:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    fr = ui.flow_runs()[1]
    url = f"http://127.0.0.1:{ui.port}/v2/runs/flow-run/{fr.id}?tab=Artifacts"
    base = [chromium, *CHROMIUM, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", "", dom, flags=re.S))
    assert RUN in text and "ui-run-1-r1-table" in text and "ui-run-1-summary" in text, text[:2000]
    shot = REPO / "docs" / "img" / "prefect-flow-run.png"
    subprocess.run([*base, f"--screenshot={shot}", url], capture_output=True, timeout=180)
    assert shot.stat().st_size > 10_000
    art = ui.artifacts(fr)["ui-run-1-r1-checks"]  # the round's checks, as the artifact's own page renders them
    url = f"http://127.0.0.1:{ui.port}/v2/artifacts/artifact/{art.id}"
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    assert "round 1" in dom and "SHOULD" in dom and "dropped" in dom, dom[-2000:]
    shot = REPO / "docs" / "img" / "prefect-round-checks.png"
    subprocess.run([*base, f"--screenshot={shot}", url], capture_output=True, timeout=180)
    assert shot.stat().st_size > 10_000

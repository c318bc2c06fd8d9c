"""The benchmark script keeps running (its figures live in docs/performance.md, not in tests)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_store_part_runs_and_reports_every_row(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--only", "f", "--runs", "4",
                        "--rounds", "3", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    f = json.loads(out.read_text())["f"]
    # the Pareto SQL returns one row per run, non-base stage and round: prompted once, steered + healed per round
    assert f["result_rows"] == 4 * (1 + 2 * 3) and "f. per-round Pareto SQL" in p.stdout

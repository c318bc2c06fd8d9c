"""The benchmark script keeps running (its figures live in docs/performance.md, not in tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_store_part_runs_and_reports_every_row(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--only", "f", "--runs", "4",
                        "--rounds", "3", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    f = json.loads(out.read_text())["f"]
    # the Pareto SQL returns one row per run, non-base stage and round: prompted once, steered + healed per round
    assert f["result_rows"] == 4 * (1 + 2 * 3) and "f. per-round Pareto SQL" in p.stdout


@pytest.mark.slow
def test_bench_yardstick_growth_scale_and_precision_parts_run(tmp_path):
    """Parts m, g, s, p on the tiny model: each prints its table and writes its figures (the SmolLM2 figures
    are in docs/performance.md)."""
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "steer_heal.bench", "--only", "m,g,s,p", "--model", "tiny-random",
                        "--cache", str(tmp_path / "models"), "--growth-rounds", "0", "--vignettes", "",
                        "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["m"]["fp32"] > 0 and res["m"]["bf16"] > 0
    assert res["g"]["diff"]["base_bitwise"] and res["g"]["diff"]["prev"] < 1e-4
    assert [r[0] for r in res["g"]["forward"]] == [0, 1, 2, 5, 10]
    assert set(res["s"]["size"]) == {"tiny-random"} and len(res["s"]["heal"]) == 3
    assert res["p"]["val_nll"][0] > 0 and "p. bf16 autocast vs fp32" in p.stdout


@pytest.mark.slow
def test_bench_round_part_runs_the_three_paths_and_compares_their_rows(tmp_path):
    """Part r on the tiny model (fast-dev preset): three real flow runs, stage seconds, FLOPs per task, and the
    tuned row equal to the old one."""
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "steer_heal.bench", "--only", "r", "--model", "tiny-random",
                        "--cache", str(tmp_path / "models"), "--vignettes", "", "--json", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["r"]) == {"old", "tuned", "batch1"}
    for v in res["r"].values():
        assert v["rc"] == 0 and v["flops"]["eval-base"] > 0 and v["stages"]["eval_healed"] > 0
    assert res["r_diff"]["n"] > 20 and res["r_diff"]["diffs"][0][1] < 1e-4


def test_bench_gpu_part_runs_the_stages_on_a_scaled_real_shape(tmp_path):
    """`just bench --only gpu` on a CPU: Qwen3-4B's width with 2 layers, each stage timed batched and at batch 1,
    FLOP/s against the matmul rate, peak memory beside memory.py's estimate, JSON and a plot. Neither the store
    (DuckDB) nor Prefect may load: the device image has neither."""
    code = ("import sys, runpy; sys.modules['duckdb'] = sys.modules['prefect'] = None; "
            "sys.argv = ['bench'] + sys.argv[1:]; runpy.run_module('steer_heal.bench', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code, "--only", "gpu", "--", "--shapes", "qwen3-4b", "--rows", "2",
                        "--rows1", "1", "--new-tokens", "2", "--heal-tokens", "12", "--gen-batches", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    (r,) = res["shapes"]
    assert r["shape"] == "qwen3-4b" and r["params"] > 1e8  # the real width: 2560, 2 layers
    assert [x["stage"] for x in r["batched"]] == ["generate", "eval", "heal"]
    assert [x["stage"] for x in r["batch1"]] == ["generate", "eval"]
    for x in r["batched"] + r["batch1"]:
        assert x["seconds"] > 0 and x["flop"] > 0 and x["tok_s"] > 0 and 0 < x["pct_peak"]
    assert r["batched"][0]["tokens"] == 2 * 2  # rows x forced new tokens: no early stop
    assert (tmp_path / "gpu.png").stat().st_size > 0 and "generation against the batch" in p.stdout

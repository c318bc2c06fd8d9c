"""Preflight's bf16 rate check (issue 31): a bf16 slower than fp32 on this CPU is refused in one line unless
--bf16-force, auto never picks bf16 on a CPU, and the choice and its rates are recorded. The rates are
injected through the machine's own cache file (the path a run reads them from), except in the real check,
which measures this machine and asserts the behaviour its rates call for."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from loguru import logger

from steer_heal import bf16
from steer_heal.config import Config
from steer_heal.errors import UserError
from steer_heal.presets import preset
from steer_heal.run import preflight

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SLOW = dict(fp32=61.7, bf16=0.97)  # issue 31: one thread, 512 x 512, an EPYC without AVX512
FAST = dict(fp32=171.4, bf16=394.5)  # docs/performance.md part m, run S1: a CPU with AVX512-BF16


def cfg(tmp_path, **kw) -> Config:
    return Config(**preset("fast-dev")).replace(out=str(tmp_path), **kw)


@pytest.fixture
def warnings():
    seen: list[str] = []
    hid = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    yield seen
    logger.remove(hid)


@pytest.mark.parametrize("mode", ["eval", "heal", "both"])
def test_a_slower_bf16_is_refused_in_one_line_with_both_rates_and_the_fix(tmp_path, mode):
    bf16.save_rates(tmp_path, SLOW)
    with pytest.raises(UserError) as e:
        bf16.choose(cfg(tmp_path, bf16=mode), CPU)
    msg = str(e.value)
    assert "\n" not in msg and f"--bf16 {mode} would slow this run down" in msg
    assert "0.97 GFLOP/s" in msg and "61.7" in msg and "63.6x slower" in msg
    assert "--bf16 off" in msg and "--bf16-force" in msg


def test_force_runs_a_slower_bf16_with_a_warning_and_records_it(tmp_path, warnings):
    bf16.save_rates(tmp_path, SLOW)
    rec = bf16.choose(cfg(tmp_path, bf16="both", bf16_force=True), CPU)
    assert rec["eval"] and rec["heal"] and rec["forced"] and rec["cached"]
    assert (rec["fp32_gflops"], rec["bf16_gflops"]) == (61.7, 0.97) and rec["why"].startswith("forced")
    assert len(warnings) == 1 and "--bf16-force" in warnings[0] and "0.97" in warnings[0]


def test_a_faster_bf16_runs_as_asked(tmp_path, warnings):
    bf16.save_rates(tmp_path, FAST)
    rec = bf16.choose(cfg(tmp_path, bf16="eval"), CPU)
    assert rec["eval"] and not rec["heal"] and rec["ratio"] == pytest.approx(394.5 / 171.4, abs=1e-3)
    assert not warnings


@pytest.mark.parametrize("rates", [SLOW, FAST], ids=["slower", "faster"])
def test_auto_never_picks_bf16_on_a_cpu_and_records_the_rates(tmp_path, rates, warnings):
    bf16.save_rates(tmp_path, rates)
    rec = bf16.choose(cfg(tmp_path, bf16="auto"), CPU)
    assert not rec["eval"] and not rec["heal"] and rec["asked"] == "auto"
    assert (rec["fp32_gflops"], rec["bf16_gflops"]) == (rates["fp32"], rates["bf16"])
    assert ("slower here" in rec["why"]) == (rates is SLOW) and not warnings


def test_off_is_never_refused(tmp_path):
    bf16.save_rates(tmp_path, SLOW)
    rec = bf16.choose(cfg(tmp_path, bf16="off"), CPU)
    assert not rec["eval"] and not rec["heal"] and rec["ratio"] < 1


def test_rates_are_measured_once_per_machine_and_cached_under_out(tmp_path):
    first = bf16.rates(tmp_path)
    assert not first["cached"] and first["fp32"] > 0 and first["bf16"] > 0
    path = bf16.cache_path(tmp_path)
    assert path.parent == tmp_path / "machines" and json.loads(path.read_text())["key"] == bf16.identity()["key"]
    again = bf16.rates(tmp_path)
    assert again["cached"] and (again["fp32"], again["bf16"]) == (first["fp32"], first["bf16"])
    path.write_text("{oops")  # a torn or hand-edited cache is measured again, not trusted
    assert not bf16.rates(tmp_path)["cached"]
    path.write_text(json.dumps(dict(fp32=0.0, bf16=1.0)))
    assert not bf16.rates(tmp_path)["cached"]


def test_the_key_is_the_cpu_its_flags_and_torch(monkeypatch):
    ident = bf16.identity()
    assert ident["torch"] == torch.__version__ and ident["cpu"] and len(ident["key"]) == 12
    assert set(ident["units"]) <= set(bf16.UNITS)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # other kernels, other rates: its own cache entry
    assert bf16.identity()["key"] != ident["key"]


def test_real_rate_check_on_this_machine(tmp_path):
    """This CPU, measured for real: the check takes well under a second, and --bf16 eval is refused exactly
    when bf16 matmul is slower here (on a CPU without bf16 units, 60-300x slower)."""
    t = time.perf_counter()
    r = bf16.rates(tmp_path)  # measured (twice where bf16 looks slower), then cached for the preflights below
    assert time.perf_counter() - t < 1.0 and r["reps"] >= 1 and not r["cached"]
    c = cfg(tmp_path, bf16="eval")
    if r["bf16"] < r["fp32"]:
        with pytest.raises(UserError, match="--bf16 off"):
            preflight(c)
    else:
        assert preflight(c)["bf16"]["eval"]
    assert not preflight(c.replace(bf16="auto"))["bf16"]["eval"]


def test_a_cpu_without_bf16_units_refuses_bf16_eval_for_real(tmp_path, monkeypatch):
    """The issue's machine class, for real: oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA, as on an EPYC without
    AVX512) emulates bf16 matmul, ~100x slower than fp32. `--bf16 eval` then exits 2 with one error line
    that gives both measured rates and the fix; no run starts."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", PYTHONPATH=str(REPO / "src"))
    p = subprocess.run([sys.executable, "-m", "steer_heal", "--preset", "fast-dev", "--out", str(tmp_path),
                        "--bf16", "eval"], capture_output=True, text=True, timeout=300, env=env)
    errors = [ln for ln in p.stderr.splitlines() if "ERROR" in ln]
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-2000:]
    assert "--bf16 eval would slow this run down" in errors[0] and "Pass --bf16 off" in errors[0]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # the cap is part of the machine's key
    cached = json.loads(bf16.cache_path(tmp_path).read_text())  # the same rates the line gives
    assert cached["bf16"] < cached["fp32"] and f"{cached['bf16']:.3g} GFLOP/s" in errors[0]
    assert not (tmp_path / "runs").exists() and "Traceback" not in p.stderr


def test_resume_takes_the_force_flag_from_the_command_and_checks_again(tmp_path):
    """--bf16-force is runtime, not experiment: a resume on a machine without bf16 units may add it (and is
    refused without it), and it never changes the config hash."""
    from test_errors import fake_run

    from steer_heal.run import resume_config

    fake_run(tmp_path, "r", bf16="eval")
    bf16.save_rates(tmp_path, SLOW)
    plain = resume_config(Config(out=str(tmp_path), resume="r"), {})
    assert not plain.bf16_force and plain.bf16 == "eval"
    with pytest.raises(UserError, match="--bf16 off"):
        bf16.choose(plain, CPU)
    forced = resume_config(Config(out=str(tmp_path), resume="r", bf16_force=True), {"bf16_force": True})
    assert forced.bf16_force and bf16.choose(forced, CPU)["forced"] and forced.hash() == plain.hash()

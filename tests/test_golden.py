"""Numbers do not move by accident: a fast-dev run with seed 0 gives the rounds rows (every non-timing
column) and the adapter sha256s recorded in tests/golden/fast_dev_seed0.json.

Bitwise equality (and so the sha256s) holds on the platform the values were recorded on (same torch
build, same CPU kernel family, same CPU model: two AVX512 EPYC generations differ in the last bits);
elsewhere the floats are compared to 1e-6 and, in place of the hashes, each adapter's lora_A and lora_B
Frobenius norms are compared to 1e-4 (relative), so the adapter half checks something on every machine.
"""

import json
from pathlib import Path

import pytest
import torch
from test_flow import steer_heal

from steer_heal.store import RunLog

GOLDEN = Path(__file__).parent / "golden" / "fast_dev_seed0.json"


def cpu_model() -> str:
    """vendor, family and model from /proc/cpuinfo ('' elsewhere): what decides the kernels' last bits."""
    info = Path("/proc/cpuinfo")
    keys = ("vendor_id", "cpu family", "model")
    lines = info.read_text().splitlines() if info.exists() else []
    got = {k: next((ln.split(":", 1)[1].strip() for ln in lines if ln.split(":")[0].strip() == k), "") for k in keys}
    return " ".join(f"{k} {v}" for k, v in got.items()) if any(got.values()) else ""


def test_fast_dev_seed0_matches_the_recorded_rounds_and_adapters(tmp_path):
    want = json.loads(GOLDEN.read_text())
    rc, _, se = steer_heal(tmp_path, "--preset", "fast-dev", "--seed", "0", "--run-id", "g")
    assert rc == 0, se[-3000:]
    log = RunLog(tmp_path, "g")
    got = [{k: v for k, v in r.items() if not k.startswith("sec_") and k != "run_id"}
           for r in sorted(log.read("rounds"), key=lambda r: r["round"])]
    same_platform = (want["platform"]["torch"] == torch.__version__
                     and want["platform"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
                     and want["platform"].get("cpu") == cpu_model())
    assert [r["round"] for r in got] == [r["round"] for r in want["rounds"]]
    for g, w in zip(got, want["rounds"]):
        assert set(g) == set(w)
        for k in w:
            if same_platform or not isinstance(w[k], float):
                assert g[k] == w[k], (g["round"], k, g[k], w[k])
            else:
                assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-7), (g["round"], k)
    got_norms = adapter_norms(log)
    assert set(got_norms) == set(want["adapter_norms"])
    for r, w in want["adapter_norms"].items():
        assert got_norms[r] == pytest.approx(w, rel=1e-4), r
    if same_platform:  # bitwise: the sha256s; elsewhere the norms above carry the check
        assert {str(a["round"]): a["sha256"] for a in log.read("adapters")} == want["adapters"]


def adapter_norms(log: RunLog) -> dict[str, list[float]]:
    """round -> [||lora_A||, ||lora_B||] over the adapter's saved tensors: machine-independent to rounding."""
    from safetensors.torch import load_file

    out = {}
    for a in log.read("adapters"):
        sd = load_file(str(log.dir / a["path"]))
        out[str(a["round"])] = [float(torch.sqrt(sum((v.double() ** 2).sum() for k, v in sd.items() if part in k)))
                                for part in ("lora_A", "lora_B")]
    return out


def record(about: str) -> None:
    """`python tests/test_golden.py "why the numbers moved"`: run fast-dev seed 0 here and rewrite the golden."""
    import os
    import tempfile

    os.environ["OMP_NUM_THREADS"] = "1"  # as conftest.py sets it: CPU float sums depend on the thread count
    with tempfile.TemporaryDirectory() as tmp:
        rc, _, se = steer_heal(tmp, "--preset", "fast-dev", "--seed", "0", "--run-id", "g")
        assert rc == 0, se[-3000:]
        log = RunLog(tmp, "g")
        rounds = [{k: v for k, v in r.items() if not k.startswith("sec_") and k != "run_id"}
                  for r in sorted(log.read("rounds"), key=lambda r: r["round"])]
        adapters = {str(a["round"]): a["sha256"] for a in log.read("adapters")}
        norms = adapter_norms(log)
    import platform

    plat = dict(torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                machine=platform.machine(), cpu=cpu_model())
    GOLDEN.write_text(json.dumps(dict(_about=about, platform=plat, rounds=rounds, adapters=adapters,
                                  adapter_norms=norms), indent=1) + "\n")


if __name__ == "__main__":
    import sys

    record(sys.argv[1])

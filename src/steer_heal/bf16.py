"""Preflight's bf16 check: does bf16 autocast make this machine faster, or many times slower?

`--bf16 eval|heal|both` pays off only where the hardware has bf16 matrix units (AVX512-BF16 or AMX on
x86, any recent GPU). Without them torch emulates a bf16 matmul: on an EPYC without AVX512 it ran at
0.97 GFLOP/s against fp32's 61.7 (issue 31), so the probes would run many times slower, not 2x faster.
A run on a CPU therefore times a small matmul both ways before anything loads (well under a second,
cached per machine under <out>/machines/), refuses a slower bf16 in one line unless --bf16-force,
and records its choice and both rates in run_info.resolved.bf16 (docs/performance.md, part p).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path

from loguru import logger

from .config import Config
from .errors import UserError
from .files import atomic_write_bytes

# /proc/cpuinfo flags that mean bf16 matrix hardware (x86: AVX512-BF16, AMX; arm64: the BF16 extension)
UNITS = ("avx512_bf16", "amx_bf16", "amx_tile", "bf16")
N = 256  # 34 MFLOP a matmul: ~0.1 s even at the 0.3 GFLOP/s of an emulated bf16, microseconds with AMX
BUDGET_S = 0.15  # stop repeating once this much time has gone (at least one timed rep of each)
MAX_REPS = 5


def identity() -> dict:
    """What the cache is keyed on: the CPU's model name, its flags, torch's version and any cap on oneDNN's
    instruction set (they pick the kernels)."""
    import torch

    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            info.setdefault(key.strip(), val.strip())  # the first core's lines
    except OSError:  # not Linux: the processor's name alone
        pass
    cpu = info.get("model name") or platform.processor() or platform.machine()
    flags = info.get("flags") or info.get("Features", "")  # x86 or arm64
    have = sorted(set(flags.split()))
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""  # caps oneDNN's kernels
    key = hashlib.sha256(json.dumps([cpu, have, torch.__version__, isa]).encode()).hexdigest()[:12]
    return dict(key=key, cpu=cpu, units=[u for u in UNITS if u in have], torch=torch.__version__,
                **({"onednn_max_isa": isa} if isa else {}))


def cache_path(out: str | Path, ident: dict | None = None) -> Path:
    return Path(out) / "machines" / f"bf16-{(ident or identity())['key']}.json"


def matmul_rates(n: int = N, budget_s: float = BUDGET_S, max_reps: int = MAX_REPS, threads: int = 1) -> dict:
    """GFLOP/s of an n x n matmul in fp32 and in bf16 on `threads` torch threads: best of interleaved reps
    (a load spike hits both), repeated until budget_s has gone or max_reps. One thread by default: the ratio
    is the kernels', and on a busy shared CPU a 2-thread fp32 matmul of this size waited on its second
    thread and read 1-4 GFLOP/s against 200 alone, enough to pass an emulated bf16 as faster."""
    import torch

    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _timed(n, budget_s, max_reps)
    finally:
        torch.set_num_threads(was)


def _timed(n: int, budget_s: float, max_reps: int) -> dict:
    import torch

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    mats = {"fp32": [torch.randn(n, n, generator=g) for _ in range(2)]}
    mats["bf16"] = [m.to(torch.bfloat16) for m in mats["fp32"]]
    for a, b in mats.values():
        a @ b  # warm-up: oneDNN picks and builds its kernel on the first call
    best = dict.fromkeys(mats, math.inf)
    reps = 0
    while reps < max_reps and (reps == 0 or time.perf_counter() - t0 < budget_s):
        for name, (a, b) in mats.items():
            t = time.perf_counter()
            a @ b
            best[name] = min(best[name], time.perf_counter() - t)
        reps += 1
    rate = {k: 2 * n**3 / max(s, 1e-9) / 1e9 for k, s in best.items()}
    return dict(rate, n=n, reps=reps, threads=torch.get_num_threads(), seconds=time.perf_counter() - t0)


def save_rates(out: str | Path, rates: dict, ident: dict | None = None) -> Path:
    """Cache `rates` (fp32 and bf16 GFLOP/s at least) as this machine's; returns the file."""
    ident = ident or identity()
    path = cache_path(out, ident)
    atomic_write_bytes(path, json.dumps(dict(ident, **rates), indent=1).encode())
    return path


def rates(out: str | Path) -> dict:
    """This machine's fp32 and bf16 matmul rates: the cached ones under <out>/machines/, else measured now
    (and cached where <out> is writable)."""
    ident = identity()
    path = cache_path(out, ident)
    try:
        got = json.loads(path.read_text())
        if all(isinstance(got.get(k), (int, float)) and math.isfinite(got[k]) and got[k] > 0 for k in ("fp32", "bf16")):
            return dict(got, cached=True, path=str(path))
    except (OSError, ValueError, AttributeError):  # missing, unreadable or not a dict: measure again
        pass
    got = matmul_rates()
    if got["bf16"] < got["fp32"]:  # a refusal is cached: confirm it on more reps, each rate its best of both
        again = matmul_rates()
        got.update({k: max(got[k], again[k]) for k in ("fp32", "bf16")}, reps=got["reps"] + again["reps"],
                   seconds=got["seconds"] + again["seconds"])
    got = dict(ident, **got)
    try:
        save_rates(out, got, ident)
    except OSError as e:  # an unwritable store only costs the measurement next time
        logger.debug(f"bf16 rates not cached at {path}: {e}")
    return dict(got, cached=False, path=str(path))


def choose(cfg: Config, device) -> dict:
    """The bf16 choice for this run on `device`, for run_info.resolved.bf16. On a CPU, --bf16 eval|heal|both
    where bf16 matmul is slower than fp32 is refused (UserError, one line) unless cfg.bf16_force."""
    rec = dict(asked=cfg.bf16, eval=cfg.bf16 in ("eval", "both"), heal=cfg.bf16 in ("heal", "both"),
               device=device.type, forced=cfg.bf16_force)
    if device.type != "cpu":  # any recent GPU has bf16 units; auto keeps its old choice there (heal on cuda)
        rec["heal"] = rec["heal"] or (cfg.bf16 == "auto" and device.type == "cuda")
        return dict(rec, why="no rate check off a CPU")
    r = rates(cfg.out)
    ratio = r["bf16"] / r["fp32"]
    rec.update(fp32_gflops=round(r["fp32"], 2), bf16_gflops=round(r["bf16"], 2), ratio=round(ratio, 3),
               cpu=r.get("cpu", ""), units=r.get("units", []), cached=r["cached"])
    units = "bf16 units: " + ", ".join(rec["units"]) if rec["units"] else "no AVX512-BF16 or AMX"
    cap = f", oneDNN capped at {r['onednn_max_isa']}" if r.get("onednn_max_isa") else ""
    says = f"bf16 matmul runs at {r['bf16']:.3g} GFLOP/s against fp32's {r['fp32']:.3g} on this CPU ({rec['cpu']}; {units}{cap})"
    if cfg.bf16 == "auto":  # bf16 moves the numbers (part p): never a CPU default, however fast
        logger.debug(f"--bf16 auto: fp32 on a CPU; {says}")
        return dict(rec, why="auto keeps fp32 on a CPU" + ("" if ratio >= 1 else f"; bf16 is {1 / ratio:.1f}x slower here"))
    if cfg.bf16 == "off":
        return dict(rec, why="as asked")
    if ratio >= 1:
        logger.debug(f"--bf16 {cfg.bf16}: {says}, {ratio:.1f}x faster")  # info would precede a refusal below
        return dict(rec, why=f"bf16 {ratio:.2f}x fp32's rate here")
    slow = f"--bf16 {cfg.bf16} would slow this run down: {says}, {1 / ratio:.1f}x slower"
    if not cfg.bf16_force:
        raise UserError(f"{slow}. Pass --bf16 off (or --bf16-force to run it anyway; rates in {r['path']})")
    logger.warning(f"{slow}; running it anyway (--bf16-force)")
    return dict(rec, why=f"forced: bf16 is {1 / ratio:.1f}x slower here")

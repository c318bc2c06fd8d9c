"""Shared pieces of `just bench`: timing, the machine's load, memory marks, one compact table per part,
and the model, vector and inputs parts a, b and d share."""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path


def load1() -> float:
    return round(os.getloadavg()[0], 2)

def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()

class Clock:
    """with Clock() as c: ...; c.s is the wall seconds (device synchronised)."""

    def __enter__(self):
        sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync()
        self.s = time.perf_counter() - self.t0

def show(title: str, cols: list[str], rows: list[list], note: str = "") -> None:
    from ..tables import format_table

    fmt = [[round(v, 4) if isinstance(v, float) else v for v in r] for r in rows]
    print(f"\n== {title}  (load now {load1()})")
    print("\n".join(format_table(cols, [tuple(r) for r in fmt]).splitlines()[:-1]))  # drop "(n rows)"
    if note:
        print(note)

def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")

def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM, which ru_maxrss reports) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

def machine() -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((int(ln.split()[1]) / 2**20 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), float("nan"))
    return dict(nproc=os.cpu_count(), cpu=cpu, ram_gib=round(mem, 1), python=platform.python_version(),
                torch=torch.__version__, torch_threads=torch.get_num_threads(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS", ""), load=os.getloadavg())

class Ctx:
    """The model, vector and inputs shared by parts a, b and d (loaded once, on first use)."""

    def __init__(self, args):
        self.args, self._model, self._vec, self.completions = args, None, None, None

    @property
    def model(self):
        if self._model is None:
            from ..models import load_model

            with Clock() as c:
                self._model, self.tok = load_model(self.args.model, device=self.args.device, cache=self.args.cache)
            self.load_s = c.s
            print(f"loaded {self.args.model} in {c.s:.1f} s (load {load1()})")
        return self._model

    @property
    def system(self) -> str:
        from .. import data
        from ..config import Config

        return data.persona(Config())["neutral"]

    @property
    def vec(self):
        if self._vec is None:
            from .. import data
            from ..config import Config
            from ..extract import extract
            from ..models import band, get_layers

            m = self.model
            self.layers = band((0.4, 0.6), len(get_layers(m)))
            cfg = Config()
            p = data.persona(cfg)
            with Clock() as c:
                self._vec = extract(m, self.tok, p["pos"], p["neg"], data.contexts(), self.layers,
                                    cfg.steer_system, cfg.normalize, cfg.eval_batch)
            self.extract_s, self.extract_load = c.s, load1()
            print(f"extract: layers {self.layers[0]}-{self.layers[-1]}, {len(data.contexts())} contexts x 2 in "
                  f"{c.s:.1f} s (load {self.extract_load})")
        return self._vec


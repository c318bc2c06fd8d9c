"""Part m of `just bench`: the machine's own limits, a dense 2048 x 2048 matmul in fp32 and bf16 (best of
5) and the memory bandwidth of a 1 GiB copy (a decode step reads every weight once), and a FLOP counter the
round part uses to put each stage against them.

The counter hooks every nn.Linear call (peft's LoRA factors are nn.Linears too): 2 * rows * in * out
multiply-adds, twice that when grad is on (the backward's input gradient through frozen weights; the LoRA
weight gradients are small). The attention scores are not counted: at the ~100-200 tokens of a SmolLM2
round they are a few percent of the linears. Each count goes to the Prefect task that ran it.
"""

from __future__ import annotations

import time
from collections import defaultdict

from .common import load1, show

N = 2048


def matmul_rates(reps: int = 5) -> dict[str, float]:
    """GFLOP/s of an N x N matmul, fp32 and bf16, best of `reps`, on torch's current threads."""
    import torch

    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(N, N, dtype=dt), torch.randn(N, N, dtype=dt)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * N**3 / best / 1e9
    return out


def copy_rate(reps: int = 5) -> float:
    """GB/s of copying a 1 GiB fp32 tensor (read + write counted), best of `reps`."""
    import torch

    a = torch.ones(2**28)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best / 1e9


def part_m(args, res: dict) -> dict:
    import torch

    r = matmul_rates()
    bw = copy_rate()
    res["m"] = dict(r, copy_gbs=bw, threads=torch.get_num_threads(), load=load1())
    show("m. the yardstick: dense matmul rate and memory bandwidth", ["what", "size", "threads", "rate", "load"],
         [[f"matmul {k}", f"{N}x{N}", torch.get_num_threads(), f"{v:.1f} GFLOP/s", res["m"]["load"]] for k, v in r.items()]
         + [["copy fp32", "1 GiB", torch.get_num_threads(), f"{bw:.1f} GB/s", load1()]],
         note=f"bf16/fp32 = {r['bf16'] / r['fp32']:.2f}x; a SmolLM2 decode step reads its 0.54 GB of fp32 weights: "
              f"about {0.54 / bw * 1000:.0f} ms at this bandwidth")
    return res["m"]


class Flops:
    """with Flops() as f: ...; f.by_task[name] is the linears' FLOPs run inside that Prefect task."""

    def __init__(self):
        self.by_task: dict[str, float] = defaultdict(float)

    def _hook(self, mod, args):
        import torch
        from prefect.context import TaskRunContext

        if type(mod) is torch.nn.Linear and args:
            f = 2.0 * args[0].numel() * mod.out_features * (2 if torch.is_grad_enabled() else 1)
            ctx = TaskRunContext.get()
            self.by_task[ctx.task.name if ctx else "flow"] += f

    def __enter__(self):
        import torch

        self._h = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._h.remove()

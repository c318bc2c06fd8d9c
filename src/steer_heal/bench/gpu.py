"""Part gpu of `just bench` (`python -m steer_heal.bench.gpu`, which scripts/device_gpu.sh runs on a GPU box):
a round's stages on a real model shape with random weights (shapes.py), timed with the stage functions
themselves: no flow, no store, no Prefect or DuckDB, so it runs in an image with torch, transformers and peft.

Per stage: seconds, tokens/s, the nn.Linear FLOPs run (the yardstick's count) against this device's measured
matmul rate, and the peak memory beside memory.py's estimate. The same stages at batch 1 (generation and
eval; the heal's batch is a method knob) give the batching ratio, and generation runs at batch 1, 8, 32, 64.
Random weights never emit EOS on cue, so every generation runs to its fixed length (min_new_tokens = max).
On a CPU it runs the scaled copy (same width, 2 layers, an 8k vocabulary) so a default-suite test covers it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .common import Clock, load1, maxrss_mb, reset_peak, rss_mb

GEN_BATCHES = (1, 8, 32, 64)


class Flops:
    """with Flops() as f: ...; f.total: FLOPs of every nn.Linear call (2 x rows x in x out, twice with grad)."""

    def __enter__(self):
        self.total = 0.0

        def hook(mod, args):
            if type(mod) is torch.nn.Linear and args:
                self.total += 2.0 * args[0].numel() * mod.out_features * (2 if torch.is_grad_enabled() else 1)

        self._h = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self._h.remove()


def matmul_rate(dev: torch.device, dtype: torch.dtype, reps: int = 5) -> float:
    """FLOP/s of a dense square matmul on dev in dtype, best of reps (8192 on a GPU, 2048 on a CPU)."""
    n = 8192 if dev.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        with Clock() as c:
            a @ b
        best = min(best, c.s)
    return 2 * n**3 / best


class Peak:
    """with Peak(dev) as p: ...; p.gib: the peak allocated (CUDA) or resident (CPU) memory inside, GiB."""

    def __init__(self, dev):
        self.dev = dev

    def __enter__(self):
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        else:
            reset_peak()
            self.base = rss_mb()
        return self

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            self.gib = torch.cuda.max_memory_allocated(self.dev) / 2**30
        else:
            self.gib = maxrss_mb() / 1024


def measure(name: str, dev, fn, tokens: int) -> dict:
    """Run fn once under the clock, the FLOP counter and the peak-memory mark."""
    with Peak(dev) as p, Flops() as f, Clock() as c:
        fn()
    return dict(stage=name, seconds=c.s, tokens=tokens, tok_s=tokens / c.s, flop=f.total, flop_s=f.total / c.s,
                peak_gib=p.gib, load=load1())


def build(shape: str, dev: torch.device):
    from .. import shapes

    cuda = dev.type == "cuda"
    cfg = shapes.config(shape) if cuda else shapes.config(shape, layers=2, vocab=8192)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = shapes.random_model(cfg, dev, dtype)
    return model, shapes.byte_tokenizer(cfg.vocab_size), cfg


def stages(model, tok, dev, *, gen_batch: int, eval_batch: int, new: int, heal_tokens: int, rows: int,
           with_heal: bool = True) -> list[dict]:
    """generate, eval (completion log-probs) and a heal (kl_rev, 1 epoch, batch 3, LoRA r 32 on 0.2-0.8)."""
    from .. import data
    from ..bake import lora_config
    from ..config import Config
    from ..generate import generate
    from ..heal import heal
    from ..models import band, get_layers
    from ..presets import preset
    from ..stack import Stack
    from ..tokens import chat, completion_logprobs, pack

    prompts = (data.prompts(64) * 4)[:rows]
    layers = band((0.45, 0.5), len(get_layers(model)))
    g = torch.Generator().manual_seed(0)
    vec = {i: torch.randn(model.config.get_text_config().hidden_size, generator=g).to(dev) for i in layers}
    model.generation_config.min_new_tokens = new  # random weights: a fixed length, never an early EOS
    out = [measure("generate", dev, lambda: generate(model, tok, prompts, vec=vec, coefs=[1.0] * rows,
                                                     max_new_tokens=new, seeds=list(range(rows)), batch=gen_batch),
                   rows * new)]
    text = "I would help them first and explain later. " * (heal_tokens // 40 + 1)
    comps = [text[: heal_tokens * (1 + i % 3) // 3] for i in range(rows)]  # mixed lengths, as kept text is
    chats = [chat(tok, p) for p in prompts]

    def ev():
        with torch.no_grad():
            for s in range(0, rows, eval_batch):
                completion_logprobs(model, pack(tok, chats[s:s + eval_batch], comps[s:s + eval_batch], 4096, dev))

    n_comp = sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in comps)
    out.append(measure("eval", dev, ev, n_comp))
    if not with_heal:
        return out
    st = Stack(model)
    st.add("r0", lora_config(model, 32, 64.0, (0.2, 0.8)), seed=0)
    cfg = Config(**preset("s2-headline")).replace(epochs=1, batch_size=3, grad_accum=1, val_frac=0.0, max_len=4096,
                                               gnorm_every=0, spectral_lam=0.0)
    kept = [dict(prompt=p, completion=c, ended=True) for p, c in zip(prompts, comps)]
    out.append(measure("heal", dev, lambda: heal(st, tok, kept, cfg.part("heal"), 0, seed=0, system=""), n_comp))
    st.model.unload()  # the plain model back (peft's layers out) for the batch-1 pass
    return out


def run(shape: str, dev: torch.device, args) -> dict:
    from .. import memory

    model, tok, cfg = build(shape, dev)
    elt = next(model.parameters()).element_size()
    s = memory.Shape.of(cfg, sum(p.numel() for p in model.parameters()))
    free = memory.free_bytes(dev)
    from .. import data
    from ..tokens import longest_prompt

    prompt = longest_prompt(tok, data.prompts(64), "")
    kw = dict(s=s, elt=elt, heal_batch=3, prompt=prompt, new=args.new_tokens, max_len=prompt + args.heal_tokens,
              band_layers=len(range(int(0.2 * s.layers), int(0.8 * s.layers) + 1)), rank=32,
              answer=args.heal_tokens)  # eval here scores the heal's completions: that many log-prob columns
    auto = {k: memory.auto_batch(free, st, cap=args.rows, **kw) if free else 16
            for k, st in (("gen", "generate"), ("eval", "eval"))}
    res = dict(shape=shape, params=s.params, dtype=str(next(model.parameters()).dtype), auto=auto,
               estimate_gib={k: v / 2**30 for k, v in memory.estimate(gen_batch=auto["gen"], eval_batch=auto["eval"],
                                                                      **kw).items()})
    common = dict(new=args.new_tokens, heal_tokens=args.heal_tokens, rows=args.rows)
    res["batched"] = stages(model, tok, dev, gen_batch=auto["gen"], eval_batch=auto["eval"], **common)
    res["batch1"] = stages(model, tok, dev, gen_batch=1, eval_batch=1, with_heal=False, **dict(common, rows=args.rows1))
    res["gen_sweep"] = [dict(measure_gen(model, tok, dev, b, args.new_tokens), batch=b) for b in args.gen_batches]
    del model
    return res


def measure_gen(model, tok, dev, batch: int, new: int) -> dict:
    from .. import data
    from ..generate import generate

    prompts = (data.prompts(64) * 4)[:batch]
    model.generation_config.min_new_tokens = new
    return measure("generate", dev, lambda: generate(model, tok, prompts, max_new_tokens=new,
                                                     seeds=list(range(batch)), batch=batch), batch * new)


def table(title: str, rows: list[dict], cols: list[str]) -> None:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [cols] + [[fmt(r.get(c, "")) for c in cols] for r in rows]
    w = [max(len(x[i]) for x in cells) for i in range(len(cols))]
    print(f"\n== {title}  (load {load1()})")
    for i, r in enumerate(cells):
        print(" | ".join(x.ljust(n) for x, n in zip(r, w)))
        if i == 0:
            print("-+-".join("-" * n for n in w))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m steer_heal.bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["gemma-3-4b", "qwen3-4b"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--new-tokens", type=int, default=0, help="forced new tokens (0: 128 on a GPU, 4 on a CPU)")
    p.add_argument("--heal-tokens", type=int, default=0, help="longest completion's tokens (0: 384 GPU, 24 CPU)")
    p.add_argument("--rows", type=int, default=0, help="completions per stage (0: 64 GPU, 4 CPU)")
    p.add_argument("--rows1", type=int, default=0, help="completions of the batch-1 pass (0: 8 GPU, 2 CPU)")
    p.add_argument("--gen-batches", type=int, nargs="+", default=[])
    p.add_argument("--out", default="", help="folder for gpu.json and the plots (default: $OUT or out/bench-gpu)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    args.new_tokens = args.new_tokens or (128 if gpu else 4)
    args.heal_tokens = args.heal_tokens or (384 if gpu else 24)
    args.rows, args.rows1 = args.rows or (64 if gpu else 4), args.rows1 or (8 if gpu else 2)
    args.gen_batches = args.gen_batches or (list(GEN_BATCHES) if gpu else [1, 2])
    out = Path(args.out or os.environ.get("OUT") or "out/bench-gpu")
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(dev) if gpu else f"CPU ({os.cpu_count()} cores), scaled shapes: 2 layers, 8k vocab"
    res: dict = dict(device=name, torch=torch.__version__, note="random weights; every generation runs to its fixed "
                     "length (min_new_tokens = max_new_tokens)", shapes=[],
                     matmul_tflop_s={k: matmul_rate(dev, dt) / 1e12 for k, dt in
                                     (("bf16", torch.bfloat16), ("fp32", torch.float32))})
    print(f"bench gpu on {name}, torch {torch.__version__}; matmul TFLOP/s "
          + ", ".join(f"{k} {v:.3g}" for k, v in res["matmul_tflop_s"].items()))
    peak = res["matmul_tflop_s"]["bf16" if gpu else "fp32"] * 1e12
    t0 = time.time()
    for shape in args.shapes:
        r = run(shape, dev, args)
        one = {x["stage"]: x for x in r["batch1"]}
        for x in r["batched"] + r["batch1"] + r["gen_sweep"]:
            x["pct_peak"] = 100 * x["flop_s"] / peak
        for x in r["batched"]:
            if x["stage"] in one:
                x["x_vs_batch1"] = x["tok_s"] / one[x["stage"]]["tok_s"]
        res["shapes"].append(r)
        table(f"{shape} ({r['params'] / 1e9:.2f}B params, {r['dtype']}), auto batch {r['auto']}; estimate GiB "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["estimate_gib"].items()), r["batched"] + r["batch1"],
              ["stage", "seconds", "tokens", "tok_s", "x_vs_batch1", "pct_peak", "peak_gib", "load"])
        table(f"{shape}: generation against the batch", r["gen_sweep"], ["batch", "seconds", "tok_s", "pct_peak", "peak_gib"])
        (out / "gpu.json").write_text(json.dumps(res, indent=1))  # after every shape: a later failure loses nothing
    res["seconds"] = time.time() - t0
    (out / "gpu.json").write_text(json.dumps(res, indent=1))
    plot(res, out)
    print(f"\nwrote {out / 'gpu.json'} and plots in {res['seconds']:.0f} s")
    return 0


def plot(res: dict, out: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for r in res["shapes"]:
        ax[0].plot([x["batch"] for x in r["gen_sweep"]], [x["tok_s"] for x in r["gen_sweep"]], "o-", label=r["shape"])
        ax[1].bar([f"{r['shape']}\n{x['stage']}" for x in r["batched"]], [x["seconds"] for x in r["batched"]])
    ax[0].set(xscale="log", yscale="log", xlabel="generation batch", ylabel="tokens / s", title=res["device"][:40])
    for axis in (ax[0].xaxis, ax[0].yaxis):  # plain numbers, not 10^x, on the log axes
        axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax[0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax[0].yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))  # a range within one decade
    if res["shapes"]:
        ax[0].set_xticks([x["batch"] for x in res["shapes"][0]["gen_sweep"]])
    ax[0].legend()
    ax[1].set(ylabel="seconds", title="stage seconds at the auto batch")
    ax[1].tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "gpu.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""`just bench [--only a,b,...]` (`python -m steer_heal.bench`): where a round's time goes, measured with the
package's own functions. One module per part: gen.py (a, b), heal.py (c), evals.py (d), orch.py (e), sql.py (f),
yardstick.py (m), round.py (r), growth.py (g), scale.py (s), precision.py (p).

Parts (each prints one compact table; ratios side by side, same model and inputs in one run):
  a  steered generation (generate.generate, vector from extract.extract on band 0.4-0.6):
     batch 16 vs one prompt at a time on the same 16 prompts, a fixed number of new tokens
  b  filter perplexity (filter.perplexity): batch 16 vs one at a time on the same 16 completions
  c  one heal step (heal.heal, epochs=1, batch_size=4, 4 completions of ~200 tokens, one fresh
     adapter): reg=nll vs kl_rev vs a one-backward kl_rev step, time and peak RSS, each variant
     in a fresh subprocess
  d  eval: evaluate.mfv seconds per vignette, think_tokens 0 vs 8; evaluate.contrast per dilemma
  e  orchestration: one fast-dev round through the real flow in a subprocess (OMP_NUM_THREADS=1), plain
     and under cProfile: the task bodies vs Prefect's task runs around them, the store's reads and writes
  f  the per-round Pareto SQL of docs/store.md over a synthetic store of 200 runs x 10 rounds
  m  the yardstick: this machine's dense matmul rate, fp32 and bf16
  r  one SmolLM2 round (small preset, all --vignettes) through the real flow, old eval path vs tuned vs batch 1
     everywhere, stage seconds side by side, each stage's FLOP rate against m, the rounds rows compared
  g  cost against the round index: forward and heal step with 0-10 baked adapters, gated vs folded; with
     --growth-rounds N also a real N-round fast-dev run each way
  s  cost against the inputs: eval on 33/66/132 vignettes, heal on 8/16/24 kept, tiny vs SmolLM2
  p  bf16 autocast vs fp32: eval (nats and stage-delta differences) and heal (val nll), seconds each
  gpu  (`--only gpu`, alone) the stages on gemma-3-4b-it / Qwen3-4B shapes with random weights, batched vs batch 1,
     FLOP/s against the device's matmul rate, peak memory vs memory.py: bench/gpu.py (its own flags follow
     `--`; on a CPU the scaled copy). scripts/device_gpu.sh runs it on a GPU box

Every figure carries the 1-minute load average read right after it (other processes may share the
CPU). On a shared 2-core box pass --threads 1 when other torch jobs run: 2-thread torch beside them
slows down several-fold. Methods and the figures of a run are in docs/performance.md.
"""


from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would garble the tables
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .common import Ctx, machine  # noqa: E402
from .evals import part_d  # noqa: E402
from .gen import part_a, part_b  # noqa: E402
from .growth import part_g  # noqa: E402
from .heal import heal_worker, part_c  # noqa: E402
from .orch import part_e  # noqa: E402
from .precision import part_p  # noqa: E402
from .round import part_r, round_worker  # noqa: E402
from .scale import part_s  # noqa: E402
from .sql import part_f  # noqa: E402
from .yardstick import part_m  # noqa: E402

PROG = "just bench"
PARTS = "abcdefmrgsp"
VIGNETTES = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "mfv_classic_other_violate.jsonl"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model for parts a-d (name as for --model of a run)")
    p.add_argument("--cache", default="out/models", help="model cache folder (smollm2-135m's fp32 copy lives here)")
    p.add_argument("--only", default=",".join(PARTS), help="comma-separated parts to run, e.g. a,b (default: all)")
    p.add_argument("--device", default="auto", help="torch device for parts a-d")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for parts a-d (0: torch's default)")
    p.add_argument("--reps", type=int, default=2, help="timed repeats per measurement in a, b, d (best is reported)")
    p.add_argument("--new-tokens", type=int, default=32, help="part a: new tokens per completion (forced)")
    p.add_argument("--coef", type=float, default=1.0, help="part a: steering coefficient C")
    p.add_argument("--heal-tokens", type=int, default=200, help="part c: tokens per completion")
    p.add_argument("--vignettes", default=str(VIGNETTES), help="part d: vignette JSONL (missing: bundled smoke set)")
    p.add_argument("--n-vignettes", type=int, default=28, help="part d: vignettes (stratified subset)")
    p.add_argument("--runs", type=int, default=200, help="part f: synthetic runs")
    p.add_argument("--rounds", type=int, default=10, help="part f: rounds per synthetic run")
    p.add_argument("--growth-rounds", type=int, default=10, help="part g: rounds of the fast-dev run each way (0 = skip)")
    p.add_argument("--json", default="", help="also write every figure to this JSON file")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: heal variant / orch
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    parts = [x for x in args.only if x not in ", "]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"--only: unknown part(s) {bad}; choose from {','.join(PARTS)}")
    args.parts = [x for x in PARTS if x in parts]
    return args



def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "gpu" in ",".join(argv).replace("=", ",").split(","):  # --only gpu: its own, store- and Prefect-free runner
        from .gpu import main as gpu_main

        rest = argv[argv.index("--") + 1:] if "--" in argv else []
        return gpu_main(rest)
    args = parse(argv)
    if args.worker:  # a fresh process per variant: part c's heal, part r's round
        out = round_worker(args) if args.worker.startswith("round:") else heal_worker(args)
        Path(args.worker_out).write_text(json.dumps(out))
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(f"{PROG}: parts {','.join(args.parts)} on {args.model}; {info['nproc']} CPUs ({info['cpu']}), "
          f"{info['ram_gib']} GiB, torch {info['torch']} with {info['torch_threads']} threads; "
          f"load {' '.join(f'{x:.2f}' for x in info['load'])}")
    res: dict = {"machine": info, "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")}}
    ctx = Ctx(args)
    t0 = time.time()
    for part in args.parts:
        fn = {"a": part_a, "b": part_b, "d": part_d, "g": part_g, "s": part_s, "p": part_p}.get(part)
        if fn is not None:
            fn(ctx, res)
        else:
            {"c": part_c, "e": part_e, "f": part_f, "m": part_m, "r": part_r}[part](args, res)
        sys.stdout.flush()
        if args.json:  # after every part, so a later part's failure loses nothing measured
            Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    res["seconds"] = time.time() - t0
    res["load_end"] = os.getloadavg()
    print(f"\ndone in {res['seconds']:.0f} s; load {' '.join(f'{x:.2f}' for x in res['load_end'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

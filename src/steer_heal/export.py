"""`python -m steer_heal.export RUN_ID DIR [--out out]`: merge a run's baked adapters into a plain HF model dir."""

from __future__ import annotations

import argparse
import sys

from .bake import Stack, lora_config
from .config import Config, ConfigError
from .models import load_model
from .store import RunLog


def rebuild(root: str, run_id: str, upto: int | None = None, device: str = "cpu") -> tuple[Stack, object, Config]:
    """Base model + the run's baked adapters of rounds < upto (all by default), hash-checked, gated student on."""
    log = RunLog(root, run_id)
    info = log.read("run_info")
    if not info:
        raise ConfigError(f"no run {run_id!r} under {root}/runs")
    cfg = Config.from_dict(info[0]["config"])
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=device, attn_impl=cfg.attn_impl,
                            trust_remote_code=cfg.trust_remote_code, gguf_file=cfg.gguf_file, cache=f"{root}/models")
    stack, lora = Stack(model), lora_config(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_layers)
    for rec in sorted(log.read("adapters"), key=lambda x: x["round"]):
        if upto is not None and rec["round"] >= upto:
            break
        stack.load(f"r{rec['round']}", log.dir / rec["path"], rec["sha256"], lora)
    return stack, tok, cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m steer_heal.export", description=__doc__)
    p.add_argument("run_id")
    p.add_argument("dir")
    p.add_argument("--out", default="out", help="store root")
    a = p.parse_args(argv)
    try:
        stack, tok, _ = rebuild(a.out, a.run_id)
    except (ConfigError, RuntimeError) as e:
        print(f"steer-heal export: {e}", file=sys.stderr)
        return 2
    print(stack.export(a.dir, tok))
    return 0


if __name__ == "__main__":
    sys.exit(main())

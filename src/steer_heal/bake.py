"""bake: the round's trained adapter frozen into the history and written (safetensors + sha256), and the
LoRA every round's adapter uses (which linears, what rank). The stack itself is stack.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from transformers.pytorch_utils import Conv1D

from .errors import UserError
from .models import band, get_layers
from .stack import Stack


def bake(stack: Stack, name: str, path: str | Path) -> str:
    """Freeze the stack (the trained adapter joins the history) and write the adapter; its sha256 is what the
    store records and what every later load checks."""
    stack.model.requires_grad_(False)
    return stack.save(name, path)


def lora_targets(model, layers: tuple[float, float], targets: tuple[str, ...] = ()) -> list[str]:
    """Full dotted names of the linears a round's LoRA adapts: inside the decoder layers of the band, so
    never a vision tower's or lm_head. No `targets` (auto): every linear there, attention and MLP,
    fused ones (qkv_proj, gate_up_proj, query_key_value) included. Else the ones whose name ends with
    one of `targets` ("q_proj", "mlp.down_proj"). Call it on the plain model, before any adapter."""
    targets = () if tuple(targets) == ("auto",) else tuple(targets)
    dec = get_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is dec)
    linear = (torch.nn.Linear, Conv1D)
    names, seen, hit = [], {}, set()
    for i in band(layers, len(dec)):
        for n, m in dec[i].named_modules():
            if isinstance(m, linear):
                seen[n] = None
                t = next((t for t in targets if n == t or n.endswith("." + t)), None)
                if t or not targets:
                    names.append(f"{prefix}.{i}.{n}")
                    hit.add(t)
    lacking = [t for t in targets if t not in hit]
    if not names or lacking:
        why = f"no linear named {' or '.join(lacking)}" if lacking else "no linear to adapt"
        raise UserError(f"--lora-targets {' '.join(targets) or 'auto'}: {why} in the decoder layers of "
                          f"{type(model).__name__} ({prefix}.N); their linears: {' '.join(seen) or 'none'}. "
                          "Pass --lora-targets with names from that list")
    return names


def lora_config(model, r: int, alpha: float, layers: tuple[float, float], targets: tuple[str, ...] = ()) -> LoraConfig:
    """The LoRA every round's adapter uses: lora_targets(model, layers, targets) at rank r."""
    # init_lora_weights=True: B = 0, so a fresh adapter is an exact no-op. GPT-2's Conv1D stores its weight
    # transposed ([in, out]): fan_in_fan_out tells peft, so deltas, merges and folds land the right way round
    names = lora_targets(model, layers, targets)
    mods = dict(model.named_modules())
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=names, init_lora_weights=True,
                      fan_in_fan_out=any(isinstance(mods[n], Conv1D) for n in names))

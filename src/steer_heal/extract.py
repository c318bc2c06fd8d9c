"""extract: the persona steering vector of the current student.

v[layer] = mean over contexts of h(pos persona + x) - h(neg persona + x), read at the
assistant-turn start (last prompt token after the generation prompt), layer output.
The hooks that apply a vector are in steering.py.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from .models import get_layers
from .steering import Vector
from .tokens import chat, encode_left


@dataclass
class Extracted:
    """What the extract stage hands on: the round's vector, its cosine with round 0's, and (from round 1)
    the cosine of the student vector with it. The vector's file is the stage's stored output."""
    vector: Vector
    cos_v0: float
    student_cos: float | None
    seconds: float = 0.0


class _Done(Exception):
    """Raised by the deepest hook: later layers and the LM head are never run."""


@torch.no_grad()
def last_token_states(model, tok, texts: list[str], layers: list[int], batch: int = 16) -> dict[int, torch.Tensor]:
    """Each layer's output at the last token: layer -> [n_texts, hidden] (fp32).

    The forward stops after the deepest layer asked for; on a mid-depth band that
    skips half the model and the full-vocabulary LM head.
    """
    dev = next(model.parameters()).device
    blocks, last = get_layers(model), max(layers)
    got: dict[int, torch.Tensor] = {}

    def hook_for(i: int):
        def hook(_mod, _inp, out):
            got[i] = (out[0] if isinstance(out, tuple) else out)[:, -1].float()
            if i == last:
                raise _Done
        return hook

    out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    handles = [blocks[i].register_forward_hook(hook_for(i)) for i in layers]
    try:
        for s in range(0, len(texts), batch):
            try:
                model(**encode_left(tok, texts[s:s + batch], dev), use_cache=False)
            except _Done:
                pass
            for i in layers:
                out[i].append(got[i])
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in out.items()}


def texts(tok, contexts: list, system: str) -> list[str]:
    """A context is a user message, or (user message, the start of an answer): a branching suffix, read at
    its last token, where the persona decides how the answer goes on (S1, S3)."""
    return [chat(tok, x, system) if isinstance(x, str) else chat(tok, x[0], system) + x[1] for x in contexts]


def extract(model, tok, pos: str, neg: str, contexts: list, layers: list[int],
            steer_system: str = "{persona}", normalize: bool = False, batch: int = 16) -> Vector:
    hp = last_token_states(model, tok, texts(tok, contexts, steer_system.format(persona=pos)), layers, batch)
    hn = last_token_states(model, tok, texts(tok, contexts, steer_system.format(persona=neg)), layers, batch)
    v = {i: (hp[i] - hn[i]).mean(0) for i in layers}
    if normalize:
        v = {i: x / x.norm().clamp_min(1e-12) for i, x in v.items()}
    return v


def student_vector(model, tok, neutral: str, contexts: list, layers: list[int],
                   base: Callable[[], AbstractContextManager], batch: int = 16) -> Vector:
    """What the baked history already moved: h_student(neutral + x) - h_base(neutral + x)."""
    xs = texts(tok, contexts, neutral)
    hs = last_token_states(model, tok, xs, layers, batch)
    with base():
        hb = last_token_states(model, tok, xs, layers, batch)
    return {i: (hs[i] - hb[i]).mean(0) for i in layers}

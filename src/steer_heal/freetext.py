"""freetext: how the model writes, not only how it answers a probe (spec.md "Free-text coherence").

- `adapter_ppl`: greedy generations on held-out prompts (the steered stage steered, every other stage
  unsteered), each scored for perplexity under the ORIGINAL model over the same tail window the
  filter uses, so it reads on the scale of the kept data's ppl. Fluent off-topic drift and token
  loops show here even when the seven-way probe is at chance.
- `steer_kl`: per kept completion, the mean per-token KL(steered || unsteered) of the student's
  next-token distributions: how far the teacher the heal distils sits from the student it starts at.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from .filter import perplexity
from .generate import generate
from .models import evaluating
from .steering import Vector, steer
from .tokens import chat, completion_logits, pack


def spread(items: list, n: int) -> list:
    """n items evenly spaced over the list (all of them when n >= len): a fixed subset that does not
    depend on how the list happens to be grouped."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def adapter_ppl(model, tok, prompts: list[str], *, base: Callable[[], AbstractContextManager], gen_system: str,
                score_system: str, max_new_tokens: int, window: int, max_len: int, batch: int = 16,
                vec: Vector | None = None, coef: float = 0.0, steerer=steer,
                guards: tuple[float, int] = (1.0, 0)) -> tuple[list[str], list[float | None]]:
    """(greedy completions, their perplexity under `base()`); an empty completion has no perplexity (None),
    never the 1.0 an empty mask would give. guards: (repetition_penalty, no_repeat_ngram), as the run generates."""
    outs = generate(model, tok, prompts, system=gen_system, vec=vec, coefs=[coef] * len(prompts),
                    max_new_tokens=max_new_tokens, batch=batch, desc="free text", steerer=steerer,
                    repetition_penalty=guards[0], no_repeat_ngram=guards[1])
    with base():
        ppl = perplexity(model, tok, prompts, outs, score_system, window, max_len, batch)
    return outs, [p if o.strip() else None for o, p in zip(outs, ppl, strict=True)]


def steer_kl(model, tok, prompts: list[str], completions: list[str], *, system: str, vec: Vector, coef: float,
             max_len: int, batch: int = 16, steerer=steer) -> list[float]:
    """Mean over each completion's tokens of KL(steered || unsteered), in nats, the model as it is now."""
    out: list[float] = []
    with evaluating(model):
        for s in range(0, len(prompts), batch):
            b = pack(tok, [chat(tok, p, system) for p in prompts[s:s + batch]], completions[s:s + batch], max_len,
                     model.device)
            plain = torch.log_softmax(completion_logits(model, b), -1)
            with steerer(model, vec, coef):
                steered = torch.log_softmax(completion_logits(model, b), -1)
            kl = (steered.exp() * (steered - plain)).sum(-1)  # [B, C]
            m = b["cmask"].float()
            out += ((kl * m).sum(-1) / m.sum(-1).clamp(min=1)).double().tolist()
    return out

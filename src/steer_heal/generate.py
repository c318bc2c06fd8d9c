"""generate: batched (optionally steered) sampling, seeded so the same seed gives the same text."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria

from .steering import Vector, steer
from .tokens import chat, encode_left, stop_strings


class StopAt(StoppingCriteria):
    """A stopping criterion: a row is done once its completion contains one of `stops` (the plain
    template's next "User:" turn, which a base model writes next)."""

    def __init__(self, tok, stops: tuple[str, ...], start: int):
        self.tok, self.stops, self.start = tok, stops, start

    def __call__(self, input_ids: torch.Tensor, scores, **kw) -> torch.Tensor:
        tails = self.tok.batch_decode(input_ids[:, self.start:][:, -8:])  # a stop string spans a few tokens
        return torch.tensor([any(s in t for s in self.stops) for t in tails], device=input_ids.device)


def cut(text: str, stops: tuple[str, ...]) -> str:
    """The completion before the first stop string."""
    for s in stops:
        text = text.split(s, 1)[0]
    return text


@torch.no_grad()
def generate(model, tok, prompts: list[str], *, system: str = "", vec: Vector | None = None,
             coefs: list[float] | None = None, max_new_tokens: int = 48, seed: int = 0,
             greedy: bool = False, temperature: float = 0.0, top_p: float = 0.0,
             batch: int = 16, desc: str = "generate", steerer=steer, with_ended: bool = False):
    """Completions for `prompts` (user messages); row i is steered at coefs[i] * vec.

    temperature/top_p of 0 keep the model's own generation_config defaults; `steerer` is the
    hook context manager (steering.steer, or an optional backend's, see backends.py).
    with_ended: return (texts, ended), ended[i] True when row i stopped by itself (emitted a stop
    token) rather than being cut at max_new_tokens.
    """
    dev = next(model.parameters()).device
    coefs = coefs if coefs is not None else [0.0] * len(prompts)
    kw: dict = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id}
    if greedy:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kw["do_sample"] = True
        if temperature > 0:
            kw["temperature"] = temperature
        if top_p > 0:
            kw["top_p"] = top_p
    stops = stop_strings(tok)  # text that ends a turn (the plain template's next "User:")
    eos = model.generation_config.eos_token_id  # tokens that end one: a row that emits one ended by itself
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [tok.eos_token_id])
    out: list[str] = []
    ended: list[bool] = []
    starts = range(0, len(prompts), batch)
    for s in tqdm(starts, desc=desc, leave=False, disable=len(starts) < 2):
        # one generator stream per batch start: a batch's text does not depend on earlier batches
        torch.manual_seed(seed * 1_000_003 + s)
        enc = encode_left(tok, [chat(tok, p, system) for p in prompts[s:s + batch]], dev)
        enc.pop("position_ids")  # generate derives positions from the mask itself
        c = torch.tensor(coefs[s:s + batch], dtype=torch.float32, device=dev)
        n = enc["input_ids"].shape[1]
        if stops:
            kw["stopping_criteria"] = [StopAt(tok, stops, n)]
        with steerer(model, vec, c):
            ids = model.generate(**enc, **kw)
        new = ids[:, n:]
        texts = tok.batch_decode(new, skip_special_tokens=True)
        out += [cut(o, stops) for o in texts]
        ended += [any(t in eos for t in row) or cut(o, stops) != o for o, row in zip(texts, new.tolist())]
    texts = [o.strip() for o in out]
    return (texts, ended) if with_ended else texts

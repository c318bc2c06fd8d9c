"""generate: batched (optionally steered) sampling; each row draws from its own seeded generator, so the
text a slot gets does not depend on which batch it shares or on the batch size."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

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


class SlotSampler(LogitsProcessor):
    """Samples each row's next token from that row's own generator, after the same temperature, top-k and
    top-p warpers Hugging Face's sampling applies, and hands generate a one-hot choice (it runs greedy).
    Hugging Face's own sampling draws the whole batch from the global RNG, so a row's text there depends on
    its batch mates."""

    def __init__(self, gens: list[torch.Generator], temperature: float, top_k: int, top_p: float):
        self.gens = gens
        self.warp = [w for w, on in ((TemperatureLogitsWarper(temperature), temperature != 1.0),
                                     (TopKLogitsWarper(top_k), top_k > 0), (TopPLogitsWarper(top_p), top_p < 1.0)) if on]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for w in self.warp:
            scores = w(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        pick = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.gens)])
        return torch.full_like(scores, float("-inf")).scatter_(1, pick[:, None], 0.0)


class Guards(LogitsProcessor):
    """S1's generation guards, Hugging Face's own repetition-penalty and no-repeat-n-gram processors, run on
    each row's own tokens (prompt and completion, the batch's left padding cut off), so a slot's text does not
    depend on its batch mates. They run before SlotSampler, where Hugging Face's sampling runs them too."""

    def __init__(self, starts: list[int], penalty: float, ngram: int):
        self.starts = starts
        self.procs = ([RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1.0 else []) + \
            ([NoRepeatNGramLogitsProcessor(ngram)] if ngram > 0 else [])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = []
        for i, s in enumerate(self.starts):
            row = scores[i:i + 1].clone()
            for p in self.procs:
                row = p(input_ids[i:i + 1, s:], row)
            rows.append(row)
        return torch.cat(rows)


def sampling(model, temperature: float, top_p: float) -> tuple[float, int, float]:
    """(temperature, top_k, top_p): the knobs where set (> 0), else the model's generation_config, else
    Hugging Face's defaults (1, 50, 1)."""
    gc = model.generation_config
    t = temperature or gc.temperature or 1.0
    k = gc.top_k if gc.top_k is not None else 50
    return t, k, top_p or gc.top_p or 1.0


def cut(text: str, stops: tuple[str, ...]) -> str:
    """The completion before the first stop string."""
    for s in stops:
        text = text.split(s, 1)[0]
    return text


@torch.no_grad()
def generate(model, tok, prompts: list[str], *, system: str = "", vec: Vector | None = None,
             coefs: list[float] | None = None, max_new_tokens: int = 48, seeds: list[int] | None = None,
             temperature: float = 0.0, top_p: float = 0.0, repetition_penalty: float = 1.0, no_repeat_ngram: int = 0,
             batch: int = 16, desc: str = "generate", steerer=steer, with_ended: bool = False):
    """Completions for `prompts` (user messages); row i is steered at coefs[i] * vec and, given `seeds`,
    sampled from its own generator seeded seeds[i] (seeds.slot); without seeds, greedy.

    temperature/top_p of 0 keep the model's own generation_config defaults; `steerer` is the
    hook context manager (steering.steer, or an optional backend's, see backends/).
    repetition_penalty (1 = off) and no_repeat_ngram (0 = off): the generation guards (`Guards`), greedy or not.
    with_ended: return (texts, ended), ended[i] True when row i stopped by itself (emitted a stop
    token) rather than being cut at max_new_tokens.
    """
    dev = next(model.parameters()).device
    coefs = coefs if coefs is not None else [0.0] * len(prompts)
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: one per slot")
    kw: dict = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id,
                "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    warp = sampling(model, temperature, top_p)
    stops = stop_strings(tok)  # text that ends a turn (the plain template's next "User:")
    eos = model.generation_config.eos_token_id  # tokens that end one: a row that emits one ended by itself
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [tok.eos_token_id])
    out: list[str] = []
    ended: list[bool] = []
    starts = range(0, len(prompts), batch)
    for s in tqdm(starts, desc=desc, leave=False, disable=len(starts) < 2):
        enc = encode_left(tok, [chat(tok, p, system) for p in prompts[s:s + batch]], dev)
        enc.pop("position_ids")  # generate derives positions from the mask itself
        c = torch.tensor(coefs[s:s + batch], dtype=torch.float32, device=dev)
        n = enc["input_ids"].shape[1]
        if stops:
            kw["stopping_criteria"] = [StopAt(tok, stops, n)]
        procs: list[LogitsProcessor] = []
        if repetition_penalty != 1.0 or no_repeat_ngram > 0:
            pads = (n - enc["attention_mask"].sum(-1)).tolist()  # left padding: a row's tokens start here
            procs.append(Guards(pads, repetition_penalty, no_repeat_ngram))
        if seeds is not None:
            gens = [torch.Generator(dev).manual_seed(x) for x in seeds[s:s + batch]]
            procs.append(SlotSampler(gens, *warp))
        kw["logits_processor"] = procs
        with steerer(model, vec, c):
            ids = model.generate(**enc, **kw)
        new = ids[:, n:]
        texts = tok.batch_decode(new, skip_special_tokens=True)
        out += [cut(o, stops) for o in texts]
        ended += [any(t in eos for t in row) or cut(o, stops) != o for o, row in zip(texts, new.tolist())]
    texts = [o.strip() for o in out]
    return (texts, ended) if with_ended else texts

"""mfv: the seven-way moral-foundations forced choice (Clifford et al. 2015 vignettes).

For each vignette ask which foundation it violates, optionally let the model think a few greedy
tokens, force the answer slot and read the next-token probabilities of the seven option words, in
both option orders (averaged, so position bias cancels). Batched with left padding, greedy, no grad.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .config import FOUNDATIONS
from .errors import UserError
from .models import evaluating
from .tokens import branch_logits, chat, common_prefix, full_attention, left_pad

# The word each foundation is offered as; "social" = not morally wrong, just unusual.
OPTION_WORDS = {"Care": "care", "Fairness": "fairness", "Loyalty": "loyalty", "Authority": "authority",
                "Sanctity": "sanctity", "Liberty": "liberty", "SocialNorms": "social"}
# (answer slot, option rendering) in order of preference: the first whose seven first tokens are
# distinct wins. Real tokenizers take the first; tiny ones may only know the capitalised words.
RENDERINGS = (("Answer:", " {w}"), ("Answer:", " {W}"), ("Answer:\n", "{W}"), ("Answer:\n", "{w}"))
QUESTION = ("{text}\n\nWhich moral foundation does this violate? Options: {options}.\n"
            "({social} means it is not morally wrong, just unusual.)\nAnswer with one word.")
PROGRESS_MIN_BATCHES = 4


@dataclass(frozen=True)
class Options:
    slot: str                # text forced at the start of the answer, after any thinking
    answers: dict[str, str]  # foundation -> answer text as it follows the slot, e.g. " care"
    ids: dict[str, int]      # foundation -> first token of that answer text

    @property
    def words(self) -> dict[str, str]:
        """foundation -> word as listed in the question"""
        return {f: a.strip() for f, a in self.answers.items()}

    @property
    def format(self) -> str:
        return self.slot + self.answers["Care"]


def answer_options(tok) -> Options:
    """Pick the option rendering whose seven answer first-tokens are distinct for this tokenizer."""
    tried = []
    for slot, form in RENDERINGS:
        shown = {f: form.format(w=w, W=w.capitalize()) for f, w in OPTION_WORDS.items()}
        first = {f: tok(s, add_special_tokens=False)["input_ids"][0] for f, s in shown.items()}
        if len(set(first.values())) == len(first):
            return Options(slot, shown, first)
        tried.append(" ".join(f"{s!r}->{tok.convert_ids_to_tokens(first[f])!r}" for f, s in shown.items()))
    raise UserError("the seven answer options share first tokens under this tokenizer, so their probabilities "
                      "cannot be told apart; tried:\n  " + "\n  ".join(tried))


# ---------------------------------------------------------------- batching helpers

def chat_ids(tok, system: str, user: str) -> list[int]:
    """Token ids of a chat prompt ending at the assistant-turn start (template adds any BOS itself)."""
    return tok(chat(tok, user, system), add_special_tokens=False)["input_ids"]


def _batches(seqs: list[list[int]], batch: int, desc: str):
    """Yield index lists, similar lengths together (less padding); results are keyed back by index."""
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    chunks = [order[i:i + batch] for i in range(0, len(order), batch)]
    return tqdm(chunks, desc=desc, leave=False) if len(chunks) > PROGRESS_MIN_BATCHES else chunks


def _tail_logits(model, seqs: list[list[int]], keep: int, pad_id: int) -> torch.Tensor:
    """float32 logits of the last `keep` positions of each (left-padded, hence right-aligned) sequence."""
    out = model(**left_pad(seqs, pad_id, model.device), logits_to_keep=keep, use_cache=False)
    return out.logits[:, -keep:].float()


def _stop_ids(model, tok) -> set[int]:
    ids = {tok.eos_token_id, tok.pad_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return {i for i in ids if i is not None}


def _think(model, tok, seqs: list[list[int]], k: int, batch: int) -> list[list[int]]:
    """k greedy tokens after each prompt, cut at the first end-of-turn token."""
    from transformers import GenerationConfig

    stop = _stop_ids(model, tok)
    gcfg = GenerationConfig(do_sample=False, max_new_tokens=k, min_new_tokens=0,
                            pad_token_id=tok.pad_token_id, eos_token_id=sorted(stop))
    out: list[list[int]] = [[] for _ in seqs]
    for idx in _batches(seqs, batch, "think"):
        b = left_pad([seqs[i] for i in idx], tok.pad_token_id, model.device)
        gen = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                             generation_config=gcfg)[:, b["input_ids"].shape[1]:]
        for i, row in zip(idx, gen.tolist(), strict=True):
            cut = next((j for j, t in enumerate(row) if t in stop), len(row))
            out[i] = row[:cut]
    return out


# ---------------------------------------------------------------- mfv: seven-way forced choice

def question(text: str, order: tuple[str, ...], opts: Options) -> str:
    return QUESTION.format(text=text, options=", ".join(opts.words[f] for f in order), social=opts.words["SocialNorms"])


def _seqs(model, tok, vignettes: list[dict], order: tuple[str, ...], opts: Options, system: str, think_tokens: int,
          batch: int) -> list[list[int]]:
    """Each vignette's question with the options in `order`, any thinking, then the forced answer slot."""
    if sorted(order) != sorted(FOUNDATIONS):
        raise ValueError(f"order must list each of {FOUNDATIONS} once, got {order}")
    prompts = [chat_ids(tok, system, question(v["text"], tuple(order), opts)) for v in vignettes]
    thoughts = _think(model, tok, prompts, think_tokens, batch) if think_tokens > 0 else [[] for _ in prompts]
    slot_plain = tok(opts.slot, add_special_tokens=False)["input_ids"]
    slot_after = tok("\n" + opts.slot, add_special_tokens=False)["input_ids"]  # thinking ends its own line
    return [p + t + (slot_after if t else slot_plain) for p, t in zip(prompts, thoughts, strict=True)]


def _answer(logits: torch.Tensor, opts: Options) -> list[dict]:
    """{p: {F: renormalised prob}, pmass: full-vocab mass on the options} from next-token logits [B, V]."""
    logp = torch.log_softmax(logits, -1)
    lp = logp[:, torch.tensor([opts.ids[f] for f in FOUNDATIONS], device=logp.device)].double().cpu()
    pmass = lp.logsumexp(-1).exp()
    p = (lp - lp.logsumexp(-1, keepdim=True)).exp()
    return [{"p": dict(zip(FOUNDATIONS, p[j].tolist(), strict=True)), "pmass": float(pmass[j])} for j in range(len(p))]


def score_orders(model, tok, vignettes: list[dict], orders: tuple[tuple[str, ...], ...] = (FOUNDATIONS,),
                 system: str = "", think_tokens: int = 0, batch: int = 16, reuse_prefix: bool = True,
                 bf16: bool = False) -> list[list[dict]]:
    """Per order, per vignette {p: {F: renormalised prob}, pmass: full-vocab mass on the options}, keyed by
    foundation whatever the listing order. With reuse_prefix (and a full-attention model) the orders' shared
    prefix (system prompt, vignette, question up to the options) runs once per vignette (tokens.branch_logits).
    bf16: the forwards under bf16 autocast (the logits are read in float32 either way)."""
    opts = answer_options(tok)
    with evaluating(model, bf16):
        seqs = [_seqs(model, tok, vignettes, order, opts, system, think_tokens, batch) for order in orders]
        res: list[list[dict]] = [[{} for _ in vignettes] for _ in orders]
        if reuse_prefix and full_attention(model):
            cut = [min(common_prefix([s[i] for s in seqs]), min(len(s[i]) for s in seqs) - 1)
                   for i in range(len(vignettes))]
            for idx in _batches([seqs[0][i][:cut[i]] for i in range(len(vignettes))], batch, "mfv"):
                logits = branch_logits(model, [seqs[0][i][:cut[i]] for i in idx],
                                       [[s[i][cut[i]:] for s in seqs] for i in idx], tok.pad_token_id, last_only=True)
                for k in range(len(orders)):
                    for i, r in zip(idx, _answer(torch.cat([x[k] for x in logits]), opts), strict=True):
                        res[k][i] = r
            return res
        for k, sq in enumerate(seqs):
            for idx in _batches(sq, batch, "mfv"):
                for i, r in zip(idx, _answer(_tail_logits(model, [sq[i] for i in idx], 1, tok.pad_token_id)[:, -1],
                                             opts), strict=True):
                    res[k][i] = r
    return res


def score_order(model, tok, vignettes: list[dict], order: tuple[str, ...] = FOUNDATIONS, system: str = "",
                think_tokens: int = 0, batch: int = 16) -> list[dict]:
    """score_orders for one listing order."""
    return score_orders(model, tok, vignettes, (tuple(order),), system, think_tokens, batch)[0]


def top_foundation(d: dict[str, float]) -> str:
    return max(FOUNDATIONS, key=lambda f: (d[f], -FOUNDATIONS.index(f)))  # ties go to the earlier foundation


def mfv(model, tok, vignettes: list[dict], system: str = "", think_tokens: int = 0, batch: int = 16,
        reuse_prefix: bool = True, bf16: bool = False) -> dict:
    """Moral-foundations forced choice, scored in both option orders and averaged so position bias cancels.

    Returns profile {F: mean p}, nats {F: log profile}, coherence (mean pmass), top1_agree (share of
    vignettes whose argmax p is the humans' argmax; None without human columns), n, rows.
    """
    if not vignettes:
        raise UserError("mfv needs at least one vignette")
    scored = score_orders(model, tok, vignettes, (FOUNDATIONS, FOUNDATIONS[::-1]), system, think_tokens, batch,
                          reuse_prefix, bf16)
    rows = []
    for v, a, b in zip(vignettes, *scored, strict=True):
        rows.append({"id": v["id"], "foundation": v["foundation"],
                     "p": {f: (a["p"][f] + b["p"][f]) / 2 for f in FOUNDATIONS},
                     "pmass": (a["pmass"] + b["pmass"]) / 2})
    n = len(rows)
    profile = {f: sum(r["p"][f] for r in rows) / n for f in FOUNDATIONS}
    judged = [(r, v["human"]) for r, v in zip(rows, vignettes, strict=True) if v.get("human")]
    top1 = sum(top_foundation(r["p"]) == top_foundation(h) for r, h in judged) / len(judged) if judged else None
    return {"profile": profile,
            "nats": {f: math.log(p) if p > 0 else float("-inf") for f, p in profile.items()},
            "coherence": sum(r["pmass"] for r in rows) / n,
            "top1_agree": top1, "n": n, "rows": rows, "answer_format": answer_options(tok).format}



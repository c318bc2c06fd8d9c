"""filter: score every completion and keep the coherent ones.

Criteria (keep = all pass): perplexity under the ORIGINAL base model (the caller
passes it with every adapter off and no steering), over the completion's tail;
repetition (max n-gram frequency over words and characters, n = 2..4); the loop
gate (distinct-token ratio of the completion's tail), when loop_tau > 0; prompt
relevance (fluent text that no longer answers its prompt, see `relevance`), when
rel_tau > 0; first-person trait narration; refusal / assistant-identity boilerplate.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

from .tokens import chat, completion_logprobs, pack

NARRATION = [r"\bI am (someone|a person|the kind of person) who\b", r"\bas someone who\b",
             r"\bmy (persona|role|character)\b", r"\bI (always )?(look after|defer to)\b",
             r"\bI('m| am) (a|an) (caring|obedient|loyal|honest) (person|assistant)\b"]
# "I'm sorry, but ..." and "I'm unable to" refuse; "I'm sorry to hear that" is empathy and stays
REFUSAL = [r"\bas an ai\b", r"\bI('m| am) sorry,? but\b", r"\bI apologi[sz]e,? but\b",
           r"\bI('m| am) (unable|not able) to\b", r"\bI can(no|')t (help|assist|do)\b",
           r"\bI('m| am) (an? )?(ai|assistant|language model|chatbot)\b", r"\bsmollm\b",
           r"\btrained by hugging ?face\b", r"\blanguage model\b"]
_NARR = re.compile("|".join(NARRATION), re.I)
_REF = re.compile("|".join(REFUSAL), re.I)
CRITERIA = ("empty", "ppl", "rep", "loop", "relevance", "narration", "refusal")
# Fewer tokens than this are too short to call a loop: the gate records their ratio and passes them.
MIN_LOOP_TOKENS = 16


def distinct_ratio(ids: list[int], window: int) -> float:
    """Distinct tokens / tokens over the last `window` tokens. S4's loops ("your your your into your of
    your ...") passed perplexity (2-17: a loop is predictable) and n-gram repetition (0.04-0.27: it cycles
    through several words), but they reuse a handful of tokens: English prose over 64 tokens reuses far fewer."""
    tail = ids[-window:] if window > 0 else ids
    return len(set(tail)) / len(tail) if tail else 1.0


def max_ngram_freq(seq: list | str, ns=(2, 3, 4)) -> float:
    """Largest share of all n-grams taken by the single most common one, over n."""
    best = 0.0
    for n in ns:
        grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
        if len(grams) >= 4:  # too short to call anything a loop
            best = max(best, Counter(grams).most_common(1)[0][1] / len(grams))
    return best


@torch.no_grad()
def perplexity(model, tok, prompts: list[str], completions: list[str], system: str = "",
               window: int = 0, max_len: int = 512, batch: int = 16, whole: bool = False):
    """exp(mean nll) of each completion's last `window` tokens (0 = all) given its prompt; with `whole`, also
    that of the whole completion from the same forward: (windowed, whole)."""
    dev = next(model.parameters()).device
    out: list[float] = []
    full: list[float] = []
    for s in range(0, len(prompts), batch):
        b = pack(tok, [chat(tok, p, system) for p in prompts[s:s + batch]], completions[s:s + batch], max_len, dev)
        lp, m = completion_logprobs(model, b), b["cmask"].clone()
        full += _ppl(lp, m)
        if window > 0:  # keep only the tail: steering tends to collapse late
            n = m.sum(-1, keepdim=True)
            m &= torch.arange(m.shape[1], device=dev) >= (n - window)
        out += _ppl(lp, m)
    return (out, full) if whole else out


def _ppl(lp: torch.Tensor, m: torch.Tensor) -> list[float]:
    nll = -(lp * m).sum(-1) / m.sum(-1).clamp(min=1)
    return [math.exp(min(x, 50.0)) for x in nll.tolist()]


def foils(prompts: list[str]) -> dict[str, str]:
    """Each distinct prompt's unrelated prompt for `relevance`: the one half the list away (fixed by the
    prompt list, not by which batch a completion lands in). One distinct prompt has no foil."""
    u = list(dict.fromkeys(prompts))
    return {p: u[(i + len(u) // 2) % len(u)] for i, p in enumerate(u)} if len(u) > 1 else {}


def relevance(model, tok, prompts: list[str], completions: list[str], foil: list[str], system: str = "",
              max_len: int = 512, batch: int = 16, own: list[float] | None = None) -> list[float]:
    """Mean log-prob per token of the whole completion given its own prompt minus given an unrelated one.

    An answer to its prompt is likelier after that prompt (> 0); fluent off-topic drift is about as
    likely after any prompt (~ 0), which perplexity cannot tell from an answer. `own`: the whole-completion
    perplexities given their own prompts, when a caller has them already (score's one forward).
    """
    own = own or perplexity(model, tok, prompts, completions, system, 0, max_len, batch)
    other = perplexity(model, tok, foil, completions, system, 0, max_len, batch)
    return [math.log(o) - math.log(w) for w, o in zip(own, other)]


def score(model, tok, items: list[dict], *, system: str, ppl_tau: float, rep_tau: float,
          window: int = 0, max_len: int = 512, batch: int = 16, foil: dict[str, str] | None = None,
          rel_tau: float = 0.0, loop_tau: float = 0.0, loop_window: int = 64) -> list[dict]:
    """Each item ({prompt, completion, ...}) comes back with its scores, flags, keep and reason.

    loop_tau > 0 drops a completion of at least MIN_LOOP_TOKENS tokens whose distinct-token ratio over its
    last loop_window tokens is below it (0 records the ratio, drops nothing).

    `foil` maps a prompt to its unrelated prompt (`foils`); without one an item's relevance is None.
    rel_tau > 0 drops completions whose relevance is below it (0 records relevance, drops nothing), and
    refuses items it cannot score (no foil).
    """
    prompts, texts = [x["prompt"] for x in items], [x["completion"] for x in items]
    ppl, whole = perplexity(model, tok, prompts, texts, system, window, max_len, batch, whole=True)
    rel: list[float | None] = [None] * len(items)
    has = [i for i, p in enumerate(prompts) if (foil or {}).get(p, p) != p]
    if rel_tau > 0 and len(has) < len(items):  # a gate that cannot be applied must not wave items through
        miss = next(p for i, p in enumerate(prompts) if i not in set(has))
        raise ValueError(f"relevance gate rel_tau={rel_tau} but prompt {miss[:40]!r} has no unrelated prompt to "
                         "compare with (relevance needs two distinct prompts): add prompts or pass --rel-tau 0")
    if has:  # the own-prompt half of relevance is the forward perplexity just ran
        got = relevance(model, tok, [prompts[i] for i in has], [texts[i] for i in has],
                        [foil[prompts[i]] for i in has], system, max_len, batch, own=[whole[i] for i in has])
        for i, v in zip(has, got):
            rel[i] = v
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    out = []
    for x, p, rv, t in zip(items, ppl, rel, ids):
        text = x["completion"]
        r = dict(x, ppl=p, relevance=rv, rep_word=max_ngram_freq(text.split()), rep_char=max_ngram_freq(text),
                 distinct=distinct_ratio(t, loop_window), narration=bool(_NARR.search(text)), refusal=bool(_REF.search(text)))
        fails = {"empty": not text.strip(), "ppl": not p <= ppl_tau,
                 "rep": max(r["rep_word"], r["rep_char"]) > rep_tau,
                 "loop": loop_tau > 0 and len(t) >= MIN_LOOP_TOKENS and r["distinct"] < loop_tau,
                 "relevance": rel_tau > 0 and rv is not None and rv < rel_tau,
                 "narration": r["narration"], "refusal": r["refusal"]}
        r["reason"] = next((c for c in CRITERIA if fails[c]), "")
        r["keep"] = r["reason"] == ""
        out.append(r)
    return out


def drop_counts(scored: list[dict]) -> dict[str, int]:
    """How many completions each criterion dropped (first failing criterion)."""
    c = Counter(r["reason"] for r in scored if not r["keep"])
    return {k: c.get(k, 0) for k in CRITERIA}

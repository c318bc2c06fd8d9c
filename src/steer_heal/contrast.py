"""contrast: the trait probe. trait_nats = mean over authored dilemmas of (mean per-token log-prob of
the trait-enacting reply - that of the opposite reply). Works on models too small for the seven-way
choice; batched, no grad.
"""

from __future__ import annotations

import torch

from .errors import UserError
from .models import evaluating
from .tokens import branch_logits, chat, completion_logprobs, full_attention, pack


def contrast(model, tok, items: list[dict], system: str = "", batch: int = 16, reuse_prefix: bool = True,
             bf16: bool = False) -> dict:
    """trait_nats = mean over items of (mean log-prob of the trait reply - that of the opposite reply). With
    reuse_prefix (and a full-attention model) each prompt runs once for both replies (tokens.branch_logits);
    bf16: the forwards under bf16 autocast."""
    if not items:
        raise UserError("contrast needs at least one dilemma")
    for it in items:
        if not (it["trait"].strip() and it["opposite"].strip()):
            raise UserError(f"dilemma {it['prompt'][:40]!r}: empty trait or opposite continuation")
    scores: dict[tuple, float] = {}
    with evaluating(model, bf16):
        if reuse_prefix and full_attention(model):
            scores = _branched(model, tok, items, system, batch)
        else:  # each distinct (prompt, reply) once: identical replies then differ by exactly 0.0
            unique = list(dict.fromkeys((chat(tok, it["prompt"], system), it[k]) for it in items
                                        for k in ("trait", "opposite")))
            for s in range(0, len(unique), batch):
                chunk = unique[s:s + batch]
                # prompt and reply tokenised apart and joined, so the boundary never shifts
                b = pack(tok, [p for p, _ in chunk], [c for _, c in chunk], 10**9, model.device)
                lp = completion_logprobs(model, b).double().sum(-1) / b["cmask"].sum(-1)
                scores.update(zip(chunk, lp.tolist(), strict=True))
    rows = []
    for it in items:
        p = chat(tok, it["prompt"], system)
        a, o = scores[(p, it["trait"])], scores[(p, it["opposite"])]
        rows.append({"prompt": it["prompt"], "trait_lp": a, "opposite_lp": o, "diff": a - o})
    return {"trait_nats": sum(r["diff"] for r in rows) / len(rows), "n": len(rows), "rows": rows}


def _branched(model, tok, items: list[dict], system: str, batch: int) -> dict[tuple, float]:
    """{(chat prompt, reply): mean log-prob of the reply}, each prompt's KV cache shared by its two replies."""
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    replies: dict[str, list[str]] = {}  # chat prompt -> its distinct replies
    for it in items:
        r = replies.setdefault(chat(tok, it["prompt"], system), [])
        r += [c for c in dict.fromkeys((it["trait"], it["opposite"])) if c not in r]
    prompts = list(replies)
    width = max(map(len, replies.values()))
    for r in replies.values():  # every row carries `width` branches; a repeated one is scored, not read
        r += r[:1] * (width - len(r))
    p_ids = [ids(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(p_ids[i]), i))
    scores: dict[tuple, float] = {}
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        b_ids = [[ids(c) for c in replies[prompts[i]]] for i in idx]
        logits = branch_logits(model, [p_ids[i] for i in idx], b_ids, tok.pad_token_id)
        for i, bs, ls in zip(idx, b_ids, logits, strict=True):
            for c, b, lg in zip(replies[prompts[i]], bs, ls, strict=True):
                lp = torch.log_softmax(lg[:-1], -1).gather(-1, torch.tensor(b, device=lg.device)[:, None])
                scores.setdefault((prompts[i], c), float(lp.double().sum() / len(b)))
    return scores

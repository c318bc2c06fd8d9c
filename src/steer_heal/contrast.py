"""contrast: the trait probe. trait_nats = mean over authored dilemmas of (mean per-token log-prob of
the trait-enacting reply - that of the opposite reply). Works on models too small for the seven-way
choice; batched, no grad.
"""

from __future__ import annotations

from .config import ConfigError
from .models import evaluating
from .tokens import chat, completion_logprobs, pack


def contrast(model, tok, items: list[dict], system: str = "", batch: int = 16) -> dict:
    """trait_nats = mean over items of (mean log-prob of the trait reply - that of the opposite reply)."""
    if not items:
        raise ConfigError("contrast needs at least one dilemma")
    for it in items:
        if not (it["trait"].strip() and it["opposite"].strip()):
            raise ConfigError(f"dilemma {it['prompt'][:40]!r}: empty trait or opposite continuation")
    # score each distinct (prompt, reply) once: identical replies then differ by exactly 0.0
    unique = list(dict.fromkeys((chat(tok, it["prompt"], system), it[k]) for it in items for k in ("trait", "opposite")))
    scores: dict[tuple, float] = {}
    with evaluating(model):
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

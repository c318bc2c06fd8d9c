"""Feeding text to a model: the chat template, left-padded batches, prompt + completion packing,
and log-probs at the completion positions only. Every stage that runs a forward uses these.
"""

from __future__ import annotations

import torch


def chat(tok, user: str, system: str = "") -> str:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def turn_end_id(tok) -> int:
    """The token that closes an assistant turn in the chat template (gemma: <end_of_turn>, not <eos>), so a
    healed student learns to stop the way its chat turns stop; the tokenizer's eos when the template shows none."""
    mark = "\x1fEND\x1f"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}],
                                   tokenize=False)
    ids = tok(text[text.rindex(mark) + len(mark):], add_special_tokens=False)["input_ids"] if mark in text else []
    added = tok.added_tokens_decoder.get(ids[0]) if ids else None
    special = bool(ids) and (ids[0] in tok.all_special_ids or (added is not None and added.special))
    return ids[0] if special else tok.eos_token_id


def left_pad(ids: list[list[int]], pad: int, device) -> dict[str, torch.Tensor]:
    """Left-padded batch with position ids that start at 0 on the first real token,
    so a padded row sees the same positions as when it is alone."""
    n = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (n - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids], device=device)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def encode_left(tok, texts: list[str], device) -> dict[str, torch.Tensor]:
    return left_pad([tok(t, add_special_tokens=False)["input_ids"] for t in texts], tok.pad_token_id, device)


def pack(tok, prompts: list[str], completions: list[str], max_len: int, device,
         eos: bool | list[bool] = False, eos_id: int | None = None) -> dict:
    """Prompt (chat text) and completion tokenised separately, joined at one shared column.

    `eos` (one flag, or one per row) appends `eos_id` (default the tokenizer's eos) to a completion:
    only to one that ended by itself, never to one cut at max_new_tokens.

    Prompts are left-padded and completions right-padded so every row's completion
    starts at column P; no BPE merge crosses the boundary, the loss mask never shifts,
    and logits are only needed at columns P-1 .. P+Lc-2 (`keep`).
    """
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ends = eos if isinstance(eos, list) else [eos] * len(completions)
    end = tok.eos_token_id if eos_id is None else eos_id
    c_ids = [tok(c, add_special_tokens=False)["input_ids"] + ([end] if e else []) for c, e in zip(completions, ends)]
    c_ids = [c[: max(1, max_len - len(p))] for p, c in zip(p_ids, c_ids)]
    P, C, pad = max(map(len, p_ids)), max(1, max(map(len, c_ids))), tok.pad_token_id
    ids, mask, cmask = [], [], []
    for p, c in zip(p_ids, c_ids):
        ids.append([pad] * (P - len(p)) + p + c + [pad] * (C - len(c)))
        mask.append([0] * (P - len(p)) + [1] * (len(p) + len(c)) + [0] * (C - len(c)))
        cmask.append([1] * len(c) + [0] * (C - len(c)))
    t = lambda x: torch.tensor(x, device=device)  # noqa: E731
    mask_t = t(mask)
    return {"input_ids": t(ids), "attention_mask": mask_t, "position_ids": (mask_t.cumsum(-1) - 1).clamp(min=0),
            "targets": t(ids)[:, P:], "cmask": t(cmask).bool(), "keep": torch.arange(P - 1, P + C - 1, device=device)}


def completion_logits(model, batch: dict) -> torch.Tensor:
    """Logits [B, C, V] predicting each completion token; the LM head runs on those columns only."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=batch["keep"])
    return out.logits.float()


def completion_logprobs(model, batch: dict) -> torch.Tensor:
    """Log-prob [B, C] of each completion token (0 where padded)."""
    lp = torch.log_softmax(completion_logits(model, batch), -1)
    tok_lp = lp.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    return tok_lp * batch["cmask"]



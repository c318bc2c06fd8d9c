"""Feeding text to a model: the chat template, left-padded batches, prompt + completion packing,
and log-probs at the completion positions only. Every stage that runs a forward uses these.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch
from loguru import logger

from .errors import UserError

MIN_COMPLETION = 8  # completion tokens a heal/filter row must keep at least (n-gram checks go to 4)


def longest_prompt(tok, prompts: list[str], system: str) -> int:
    """Tokens in the longest chat prompt (template and system prompt included) under this tokenizer."""
    return max(len(tok(chat(tok, p, system), add_special_tokens=False)["input_ids"]) for p in prompts)


def check_room(tok, prompts: list[str], system: str, max_len: int, max_new_tokens: int, warn: bool = True) -> None:
    """max_len must hold the longest chat prompt plus MIN_COMPLETION tokens, else heal and the filter would
    silently train on and score stubs; under prompt + max_new_tokens completions are cut (said once: `warn`)."""
    longest = longest_prompt(tok, prompts, system)
    if max_len < longest + MIN_COMPLETION:
        raise UserError(f"config max_len={max_len} is too small: the longest chat prompt is {longest} tokens and a "
                          f"completion needs at least {MIN_COMPLETION} more; pass --max-len {longest + max_new_tokens} "
                          "(prompt + --max-new-tokens)")
    if warn and max_len < longest + max_new_tokens:
        logger.warning(f"max_len={max_len} < longest prompt {longest} + max_new_tokens {max_new_tokens}: heal and the "
                       f"filter see long completions cut to {max_len - longest} tokens")


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# For base models: the system prompt as a first paragraph, then "User: ..." / "Assistant: ..." lines. A base
# model runs on into the next turn, so generation stops at USER_TURN (generate.py).
PLAIN = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
USER_TURN = "\nUser:"
TEMPLATES = {"chatml": CHATML, "plain": PLAIN}
BOS = "{{ bos_token }}"


def chat(tok, user: str, system: str = "") -> str:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def use_template(tok, choice: str = "auto", model: str = "the model") -> dict:
    """Set the chat template every consumer of `tok` renders with; return what run_info records of it.

    choice: auto (the tokenizer's own; refused when it has none), chatml, plain, or a Jinja file. A BOS
    token is put in front when the tokenizer defines one and adds it to plain text, and the template
    does not start with it: prompts are tokenised with add_special_tokens=False everywhere, so the
    template is the only place BOS can come from (a base model like gemma-3-270m babbles without it).
    """
    own = tok.chat_template.get("default") if isinstance(tok.chat_template, dict) else tok.chat_template
    if choice == "auto":
        if not (isinstance(own, str) and own.strip()):
            raise UserError(
                f"{model} has no chat template (its tokenizer defines none), so its prompts would be guessed: "
                "pass --chat-template plain (User:/Assistant: lines, for a base model), chatml (<|im_start|> "
                "turns, for a model trained on them) or PATH (a Jinja template file)")
        text = own
    elif choice in TEMPLATES:
        text = TEMPLATES[choice]
    elif Path(choice).is_file():
        text = Path(choice).read_text()
    else:
        raise UserError(f"--chat-template {choice!r} is not auto, chatml, plain or an existing Jinja file")
    sample = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    try:
        rendered = tok.apply_chat_template(sample, chat_template=text, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja errors, a template's own raise_exception ("System role not supported")
        raise UserError(f"the chat template ({choice}) of {model} cannot render a system + user turn, which every "
                          f"stage needs ({type(e).__name__}: {str(e).splitlines()[0]}): pass --chat-template "
                          "plain, chatml or PATH") from None
    bos = "none"
    if tok.bos_token and rendered.startswith(tok.bos_token):
        bos = "in template"
    elif tok.bos_token and tok("a")["input_ids"][:1] == [tok.bos_token_id]:
        text, bos = BOS + text, "prepended"
    tok.chat_template = text
    return {"name": choice, "sha256": hashlib.sha256(text.encode()).hexdigest(), "bos": bos}


def stop_strings(tok) -> tuple[str, ...]:
    """Text that ends a completion under tok's template: the next user turn of the plain template."""
    t = tok.chat_template
    return (USER_TURN,) if isinstance(t, str) and t.removeprefix(BOS) == PLAIN else ()


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


def completion_rows(model, batch: dict) -> torch.Tensor:
    """float32 logits [N, V] at the N real completion positions (batch["cmask"], row by row), padding left out.

    The LM head and everything after it (log-softmax, the KL, the reference cache) then cost completion
    tokens x vocabulary, not rows x longest completion x vocabulary: with mixed lengths and a 262k vocabulary
    the padding's [positions, vocab] float32 tensors are a large share of a heal step's memory. A pre-hook on the output embedding gathers the hidden
    states it is fed; the head is a per-position map, so each row equals the [B, C, V] path's."""
    head = model.get_output_embeddings()
    cmask = batch["cmask"]

    def gather(_mod, args):
        h = args[0]
        if h.shape[:2] != cmask.shape:  # not the head call of this forward: leave it alone
            return None
        return (h[cmask].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        return completion_logits(model, batch).squeeze(0)
    finally:
        handle.remove()


def completion_logprobs(model, batch: dict) -> torch.Tensor:
    """Log-prob [B, C] of each completion token (0 where padded)."""
    lp = torch.log_softmax(completion_logits(model, batch), -1)
    tok_lp = lp.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    return tok_lp * batch["cmask"]




def full_attention(model) -> bool:
    """Every layer attends to the whole past (no sliding-window or chunked layer), so a prefix's KV cache
    serves any continuation of it exactly."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = getattr(cfg, "layer_types", None)
    if types:
        return all(t == "full_attention" for t in types)
    return not getattr(cfg, "sliding_window", None) and not getattr(cfg, "attention_chunk_size", None)


def branch_logits(model, prefixes: list[list[int]], branches: list[list[list[int]]], pad_id: int,
                  last_only: bool = False) -> list[list[torch.Tensor]]:
    """float32 logits of each row's prefix followed by each of its K branches, the prefix run once.

    out[i][k] is [len(branches[i][k]) + 1, V]: row 0 predicts the branch's first token (the prefix's last
    position), row j the token after branch[:j]; with last_only, only that last row ([1, V]). The prefix's
    KV cache is computed once per batch; each branch but the last extends a copy of it. Branches are left-padded after
    the prefix (masked, positions continuing the prefix's), so every row's last token shares one column.
    Equal to the full forward of prefix + branch up to float rounding (tests/test_speed.py)."""
    K = len(branches[0])
    pre = left_pad(prefixes, pad_id, model.device)
    out = model(**pre, use_cache=True, logits_to_keep=1)
    first, cache = out.logits[:, -1:].float(), out.past_key_values
    plen = pre["attention_mask"].sum(-1, keepdim=True)
    res: list[list[torch.Tensor]] = [[None] * K for _ in prefixes]  # type: ignore[list-item]
    for k in range(K):
        seqs = [b[k] for b in branches]
        S = max(1, max(map(len, seqs)))
        ids = torch.tensor([[pad_id] * (S - len(s)) + s for s in seqs], device=model.device)
        smask = torch.tensor([[0] * (S - len(s)) + [1] * len(s) for s in seqs], device=model.device)
        pos = plen + (smask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=torch.cat([pre["attention_mask"], smask], 1), position_ids=pos,
                       past_key_values=cache if k == K - 1 else copy.deepcopy(cache), use_cache=True,
                       logits_to_keep=1 if last_only else S).logits.float()
        for i, s in enumerate(seqs):
            if last_only:
                res[i][k] = logits[i, -1:] if s else first[i]
            else:
                res[i][k] = torch.cat([first[i], logits[i, S - len(s):]])
    return res


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest token prefix all of seqs share."""
    n = min(map(len, seqs))
    return next((j for j in range(n) if len({s[j] for s in seqs}) > 1), n)

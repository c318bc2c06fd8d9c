"""Peak device memory per stage, estimated from a model's shape, and the largest generation / eval batch that
fits the memory a device has free (`auto_batch`); `resolve_batches` puts it in a run's config when
--gen-batch / --eval-batch are 0 ("auto").

The estimates are upper-bound arithmetic, not measurements (bench/gpu.py measures): the weights; the baked
history (gated: every adapter stays; folded, spec.md's --fold-history: two copies of the adapted weights, the
originals kept for the whole run and a second while a frozen stage runs merged); a stage's KV cache (sliding
layers hold their window at most); the float32 logits each stage keeps at once; the heal's activations for
backward at ~34 x hidden bytes per token and layer in 16-bit (the usual transformer estimate without
recomputation), twice that in fp32, and its LoRA parameter, gradient and two Adam moments in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

GIB = 2**30
SAFETY = 0.85  # of the free memory: allocator fragmentation and what the estimate leaves out
FALLBACK_BATCH = 16  # "auto" where there is no device memory to read (a CPU): the presets' batch
LINEARS = 7  # q, k, v, o, gate, up, down: the all-linear LoRA targets of a llama-like layer


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model."""
    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    window: int = 0          # sliding-window length (0: every layer full)
    full_layers: int = 0     # layers attending to the whole past when window > 0

    @classmethod
    def of(cls, cfg, params: int) -> Shape:
        """From a transformers config (a multimodal one's text config)."""
        c = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
        window = getattr(c, "sliding_window", None) or 0
        return cls(params, c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                   getattr(c, "num_key_value_heads", None) or c.num_attention_heads, hd, c.vocab_size,
                   window if window and "sliding_attention" in types else 0,
                   sum(t == "full_attention" for t in types))

    def layer_linears(self) -> int:
        """Parameters of one layer's seven linears (the weights LoRA adapts and a fold copies)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate

    def lora(self, rank: int) -> int:
        """LoRA parameters of one adapter on one layer's seven linears."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        ins_outs = (self.hidden + q) * 2 + (self.hidden + kv) * 2 + 3 * (self.hidden + self.intermediate)
        return rank * ins_outs


def kv_bytes(s: Shape, rows: int, tokens: int, elt: int) -> int:
    """The KV cache of `rows` sequences of `tokens` tokens (keys and values, every layer)."""
    per_tok = 2 * s.kv_heads * s.head_dim * elt * rows
    if not s.window:
        return s.layers * tokens * per_tok
    return (s.full_layers * tokens + (s.layers - s.full_layers) * min(tokens, s.window)) * per_tok


def history_bytes(s: Shape, *, band_layers: int, rank: int, rounds: int, fold: bool, elt: int) -> int:
    """The baked adapters' memory: gated, every round's adapter; folded, two copies of the adapted weights."""
    if fold:
        return 2 * band_layers * s.layer_linears() * elt
    return rounds * band_layers * s.lora(rank) * elt


def estimate(s: Shape, *, elt: int, gen_batch: int, eval_batch: int, heal_batch: int, prompt: int, new: int,
             max_len: int, band_layers: int, rank: int = 8, rounds: int = 1, fold: bool = False,
             answer: int = 64) -> dict[str, int]:
    """Peak bytes of each stage: generate (prefill + decode to prompt + new tokens), eval (a forward of
    eval_batch x max_len with float32 log-probs over `answer` columns: a contrast reply, the seven-way probe's
    options), heal (forward and backward of heal_batch x max_len through the live adapter, full-vocabulary KL
    over the completion tokens)."""
    fixed = s.params * elt + history_bytes(s, band_layers=band_layers, rank=rank, rounds=rounds, fold=fold, elt=elt)
    act = lambda rows, toks: rows * toks * (2 * s.intermediate + 4 * s.hidden) * elt  # noqa: E731 - one layer's transients
    gen = (kv_bytes(s, gen_batch, prompt + new, elt) + act(gen_batch, prompt)
           + 4 * gen_batch * s.vocab * 4)  # scores, warped, probs, one-hot: [batch, vocab] fp32 each
    comp = max_len - prompt
    ev = (kv_bytes(s, eval_batch, max_len, elt) + act(eval_batch, max_len)
          + eval_batch * answer * s.vocab * (elt + 8))  # the logits, their fp32 copy, the log-probs
    lora = band_layers * s.lora(rank) * 4 * 4  # fp32 parameter, gradient, two Adam moments
    saved = heal_batch * max_len * s.layers * 34 * s.hidden * elt // 2
    heal = lora + saved + 5 * heal_batch * comp * s.vocab * 4  # logits, lp, exp(lp), lq, their gradient
    return {"weights+history": fixed, "generate": fixed + gen, "eval": fixed + ev, "heal": fixed + heal}


def auto_batch(free: int, stage: str, cap: int = 256, loaded: bool = True, **kw) -> int:
    """The largest batch (1 .. cap) whose `stage` estimate fits SAFETY x free bytes; kw as estimate's, less
    the batch of `stage`. loaded: the weights are on the device already (free excludes them). 0 when not even
    one row fits."""
    key = {"generate": "gen_batch", "eval": "eval_batch"}[stage]
    have = kw["s"].params * kw["elt"] if loaded else 0

    def fits(b: int) -> bool:
        return estimate(**{**dict(gen_batch=1, eval_batch=1, heal_batch=1), **kw, key: b})[stage] - have <= SAFETY * free

    if not fits(1):
        return 0
    lo, hi = 1, cap
    while lo < hi:  # the estimate grows with the batch: bisect the last one that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def resolve_batches(cfg, model, band_layers: int, prompt: int):
    """cfg with gen_batch / eval_batch 0 ("auto") replaced by what fits the device's free memory now (a CPU:
    FALLBACK_BATCH), and a one-line note of the choice ('' when nothing was auto). The stored config keeps 0:
    per-slot sampling makes the text independent of gen_batch, and eval differs by float rounding only."""
    if cfg.gen_batch and cfg.eval_batch:
        return cfg, ""
    p = next(model.parameters())
    free = free_bytes(p.device)
    s = Shape.of(model.config, sum(x.numel() for x in model.parameters()))
    kw = dict(s=s, elt=p.element_size(), heal_batch=cfg.batch_size, prompt=prompt, new=cfg.max_new_tokens,
              max_len=max(cfg.max_len, prompt + cfg.max_new_tokens), band_layers=band_layers, rank=cfg.lora_r,
              rounds=cfg.n_rounds, fold=cfg.fold_history)
    got = {}
    for name, stage in (("gen_batch", "generate"), ("eval_batch", "eval")):
        if getattr(cfg, name):
            continue
        b = FALLBACK_BATCH if free is None else auto_batch(free, stage, **kw)
        if b == 0:
                raise UserError(f"{free / GIB:.1f} GiB free on {p.device} does not hold one {stage} row of this model "
                              f"(estimate: memory.py): pass --{name.replace('_', '-')} 1 to try anyway, or a smaller --max-len")
        got[name] = b
    where = "no device memory to read: the fallback" if free is None else f"{free / GIB:.1f} GiB free on {p.device}"
    return cfg.replace(**got), f"auto batch: {', '.join(f'{k} {v}' for k, v in got.items())} ({where})"


def resolve_for(cfg, model, tok):
    """resolve_batches with what the run's shape needs read from cfg: the LoRA band, the longest
    generation prompt. Used wherever a run's model is opened (the flow, student.open_student)."""
    from . import data
    from .models import band, get_layers
    from .tokens import longest_prompt

    if cfg.gen_batch and cfg.eval_batch:
        return cfg, ""
    system = cfg.gen_system or data.persona(cfg)["neutral"]  # as Probe.of has it
    return resolve_batches(cfg, model, len(band(cfg.lora_layers, len(get_layers(model)))),
                           longest_prompt(tok, data.prompts(cfg.n_prompts), system))


def free_bytes(device) -> int | None:
    """Free memory of a CUDA device now; None elsewhere (a CPU shares its memory with everything else)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]

"""heal: distil the kept completions into the current (fresh) LoRA behind a divergence barrier.

loss = sft + lam * (1 + round)^lam_round_pow * relu(D(student || ref) - tau)
           + spectral_lam * mean over LoRA modules of sigma_max(B @ A * scale)

sft is the nll of completion tokens only, plus the turn-end token after a completion that
ended by itself (never after one cut at max_new_tokens: that would teach stopping mid-sentence);
D is a per-position KL over completion positions, aggregated by kl_agg. The reference (base or prev) is the same weights
with gates switched, so its forward costs one extra no-grad pass and no memory copy.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from loguru import logger
from tqdm.auto import tqdm

from .config import HealCfg
from .stack import Stack
from .tokens import chat, completion_rows, pack, turn_end_id


class HealError(RuntimeError):
    """Training diverged (NaN/inf loss); the round is not baked."""


@dataclass
class HealResult:
    """The heal's summary; `steps` are its heal_steps rows (one per micro-batch)."""
    heal_nll: float         # mean train nll over the last epoch
    val_nll: float | None   # held-out nll after the last epoch (None without a val split)
    steps: list[dict] = field(default_factory=list)
    div: float | None = None  # the last step's divergence
    n_train: int = 0
    n_val: int = 0
    seconds: float = 0.0

    @classmethod
    def from_steps(cls, steps: list[dict], epochs: int, **kw) -> HealResult:
        """The summary from heal_steps rows: what a run stores and what resume reads back."""
        last = [r["nll"] for r in steps if r["epoch"] == epochs - 1]
        return cls(heal_nll=sum(last) / max(1, len(last)),
                   val_nll=next((r["val_nll"] for r in reversed(steps) if r["val_nll"] is not None), None),
                   steps=list(steps), div=steps[-1]["div"] if steps else None, **kw)


def divergence(lp: torch.Tensor, lq: torch.Tensor, reg: str) -> torch.Tensor:
    """Per-position KL ([N] or [B, C]) between student log-probs lp and reference log-probs lq ([..., V])."""
    if reg == "kl_rev":  # KL(theta || ref): mode-seeking, penalises mass where ref has none
        return (lp.exp() * (lp - lq)).sum(-1)
    return (lq.exp() * (lq - lp)).sum(-1)  # kl_fwd: KL(ref || theta)


def aggregate(d: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """d's positions under mask (all of d without one) reduced by `how`."""
    x = d if mask is None else d[mask]
    if how == "mean":
        return x.mean()
    if how == "rmse":  # eps keeps the gradient finite when every position is exactly 0
        return torch.sqrt((x * x).mean() + 1e-12)
    if how == "p95":
        return torch.quantile(x, 0.95)
    return x.max()


def spectral_norm(model) -> torch.Tensor:
    """Mean over LoRA modules of the largest singular value of scale * B @ A (trainable adapter only), as
    the method has it: a sum would make the same spectral_lam ~n_modules times stronger on a bigger model.

    sigma(B A) = sigma(R_B R_A^T) with B = Q_B R_B, A^T = Q_A R_A: an r x r problem.
    """
    total, n = torch.zeros((), device=next(model.parameters()).device), 0
    for m in model.modules():
        if not hasattr(m, "lora_A"):
            continue
        for name, a in m.lora_A.items():
            if not a.weight.requires_grad:
                continue
            b = m.lora_B[name].weight
            rb = torch.linalg.qr(b.float())[1]
            ra = torch.linalg.qr(a.weight.float().T)[1]
            total = total + m.scaling[name] * torch.linalg.matrix_norm(rb @ ra.T, ord=2)
            n += 1
    return total / max(1, n)


def heal(stack: Stack, tok, kept: list[dict], cfg: HealCfg, round_: int, seed: int, system: str,
         on_step=None) -> HealResult:
    """Train the stack's current adapter on `kept` ({prompt, completion, ended}): the rows and their summary.
    `cfg` is the run's heal part (Config.part("heal"); a whole Config reads the same). A row without `ended`
    (stored before it was recorded) gets no turn-end token."""
    model = stack.model
    dev = next(model.parameters()).device
    rng = random.Random(seed)
    data = [(chat(tok, k["prompt"], system), k["completion"], i) for i, k in enumerate(kept)]
    ended, end_id = [bool(k.get("ended")) for k in kept], turn_end_id(tok)
    rng.shuffle(data)
    n_val = int(round(cfg.val_frac * len(data))) if len(data) >= 4 else 0
    val, train = data[:n_val], data[n_val:]
    total = max(1, math.ceil(math.ceil(len(train) / cfg.batch_size) * cfg.epochs / cfg.grad_accum))
    params = stack.trainable()
    opt, sched = _optimizer(params, cfg, total)
    bf16 = cfg.bf16 in ("heal", "both") or (cfg.bf16 == "auto" and dev.type == "cuda")
    t = _Trainer(stack, tok, cfg, round_, params, torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16),
                 lambda rows: pack(tok, [p for p, _, _ in rows], [c for _, c, _ in rows], cfg.max_len, dev,
                                   eos=[ended[i] for _, _, i in rows], eos_id=end_id))
    model.train()
    step, micro = 0, 0
    bar = tqdm(total=total, desc=f"heal r{round_} {cfg.reg}", leave=False)
    try:
        for epoch in range(cfg.epochs):
            rng.shuffle(train)
            for s in range(0, len(train), cfg.batch_size):
                row = t.micro_step(train[s:s + cfg.batch_size], epoch, step, micro)
                row["lr"] = sched.get_last_lr()[0]  # the rate this micro-batch's gradient will be stepped at
                micro += 1
                if micro % cfg.grad_accum == 0:
                    _opt_step(params, opt, sched, cfg.grad_clip)
                    step += 1
                    if on_step is not None:
                        on_step(step)
                    bar.update(1)
                    bar.set_postfix(nll=f"{row['nll']:.3f}", div=f"{row['div']:.4f}")
                t.steps.append(row)
            if micro % cfg.grad_accum:  # flush a partial accumulation at the epoch end
                _opt_step(params, opt, sched, cfg.grad_clip)
                step += 1
                micro = 0
            model.eval()
            v = t.val_nll(val)
            model.train()
            if t.steps:
                t.steps[-1]["val_nll"] = v
            logger.debug(f"heal r{round_} epoch {epoch}: train nll {t.steps[-1]['nll']:.4f} val nll {v}")
    finally:
        bar.close()
        model.eval()
        opt.zero_grad(set_to_none=True)
    return HealResult.from_steps(t.steps, cfg.epochs, n_train=len(train), n_val=len(val))


def _optimizer(params, cfg: HealCfg, total: int):
    """AdamW and its schedule: linear warmup over the first `warmup` fraction of steps, cosine after."""
    warm = int(cfg.warmup * total)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / (warm + 1) if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    return opt, sched


def _opt_step(params, opt, sched, clip: float) -> None:
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


class _Trainer:
    """One heal's micro-batch work: the loss, its backward(s), the reference log-probs and the val nll."""

    def __init__(self, stack: Stack, tok, cfg: HealCfg, round_: int, params, auto, packed):
        self.stack, self.model, self.cfg, self.round = stack, stack.model, cfg, round_
        self.params, self.auto, self.packed = params, auto, packed
        self.dev = next(self.model.parameters()).device
        self.lam = cfg.lam * (1 + round_) ** cfg.lam_round_pow
        self.use_barrier = cfg.reg != "nll" and self.lam > 0
        self.steps: list[dict] = []
        # The reference (base or prev) is frozen for the whole heal: its log-probs are computed once per
        # example and reused in later epochs, as long as they fit in ref_cache_mb ([tokens, vocab] fp32).
        self.ref_cache: dict[int, torch.Tensor] = {}
        self.room = cfg.ref_cache_mb * 2**20 if cfg.epochs > 1 else 0

    def nll_of(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        # [N, V]: only the real completion positions reach the head and the log-softmax (tokens.completion_rows)
        lp = torch.log_softmax(completion_rows(self.model, batch), -1)
        nll = -lp.gather(-1, batch["targets"][batch["cmask"]].unsqueeze(-1)).squeeze(-1)
        return nll.mean(), lp

    def val_nll(self, val) -> float | None:
        if not val:
            return None
        bs = self.cfg.batch_size
        with torch.no_grad(), self.auto:
            vals = [float(self.nll_of(self.packed(val[s:s + bs]))[0]) for s in range(0, len(val), bs)]
        return sum(vals) / len(vals)

    @torch.no_grad()
    def ref_logprobs(self, b: dict, ids: list[int]) -> torch.Tensor:
        """[N, V], rows in completion_rows' order: example after example, each its n real positions."""
        if all(i in self.ref_cache for i in ids):
            return torch.cat([self.ref_cache[i] for i in ids])
        with self.stack.ref(self.cfg.barrier_ref):  # called inside the step's autocast
            lq = torch.log_softmax(completion_rows(self.model, b), -1)
        for i, rows in zip(ids, lq.split(b["cmask"].sum(-1).tolist())):
            size = rows.numel() * rows.element_size()
            if i not in self.ref_cache and size <= self.room:
                self.ref_cache[i], self.room = rows.clone(), self.room - size
        return lq

    def micro_step(self, chunk, epoch: int, step: int, micro: int) -> dict:
        """Loss and backward of one micro-batch; its heal_steps row (the optimizer step is the caller's)."""
        cfg, dev = self.cfg, self.dev
        b = self.packed(chunk)
        with self.auto:
            sft, lp = self.nll_of(b)
            div = torch.zeros((), device=dev)
            if cfg.reg != "nll":
                lq = self.ref_logprobs(b, [i for _, _, i in chunk])
                div = aggregate(divergence(lp, lq, cfg.reg), None, cfg.kl_agg)
            barrier = self.lam * torch.relu(div - cfg.tau) if self.use_barrier else torch.zeros((), device=dev)
            spec = cfg.spectral_lam * spectral_norm(self.model) if cfg.spectral_lam > 0 else torch.zeros((), device=dev)
        loss = sft + barrier + spec
        if not torch.isfinite(loss):
            raise HealError(f"non-finite loss at round {self.round} epoch {epoch} step {step}: sft={sft.item()}, "
                            f"div={div.item()}. Lower --lr or --lam; nothing from this round was baked.")
        g_sft, g_bar = self.backward(sft, barrier + spec, loss, micro)
        return dict(step=step, epoch=epoch, nll=sft.item(), div=div.item(), barrier=barrier.item(),
                    loss=loss.item(), gnorm_sft=g_sft, gnorm_barrier=g_bar, lr=None, val_nll=None)

    def backward(self, sft, rest, loss, micro: int) -> tuple[float | None, float | None]:
        """Every gnorm_every micro-batches, two backward passes so the log shows the barrier's gradient
        pressure against the sft term's; one backward otherwise (the split costs ~28% of a kl_rev step)."""
        cfg, params = self.cfg, self.params
        if not (cfg.gnorm_every > 0 and micro % cfg.gnorm_every == 0):
            (loss / cfg.grad_accum).backward()
            return None, None
        extra = self.use_barrier or cfg.spectral_lam > 0
        before = [p.grad.clone() if p.grad is not None else None for p in params]
        (sft / cfg.grad_accum).backward(retain_graph=extra)
        g_sft, g_bar = _delta_norm(params, before), 0.0
        if extra:
            mid = [p.grad.clone() for p in params]
            (rest / cfg.grad_accum).backward()
            g_bar = _delta_norm(params, mid)
        return g_sft, g_bar


def _delta_norm(params, before) -> float:
    return math.sqrt(sum(float((p.grad - (b if b is not None else 0)).pow(2).sum())
                         for p, b in zip(params, before) if p.grad is not None))

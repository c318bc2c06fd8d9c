"""dose: walk the steering dose down until steered completions survive the filter.

Bisection on log kappa in [kappa_min, 1]: the largest kappa whose probe batch passes
the filter at >= dose_target. Every survivor is banked, probes included. Then batches
at the settled kappa until n_keep are kept or max_batches run out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger

from .config import Config


class Starved(RuntimeError):
    """Fewer than min_train completions survived the filter."""

    def __init__(self, msg: str, counts: dict):
        super().__init__(msg)
        self.counts = counts


STEP_COLS = ("step", "kappa", "n", "n_kept", "rate", "accepted")


@dataclass
class DoseResult:
    kappa: float
    kept: list[dict]
    scored: list[dict]  # every completion with its scores, probes included
    steps: list[dict] = field(default_factory=list)  # one row per batch
    seconds: float = 0.0

    @property
    def n_gen(self) -> int:
        return len(self.scored)

    @property
    def coef(self) -> float:
        """The dose the kept completions came from (their mean coefficient): what the steered eval uses."""
        return sum(x["coef"] for x in self.kept) / max(1, len(self.kept))

    def rows(self) -> tuple[list[dict], list[dict]]:
        """(completions rows, dose_steps rows) for the store, without the round column."""
        return list(self.scored), [{k: x[k] for k in STEP_COLS} for x in self.steps]

    @classmethod
    def from_rows(cls, completions: list[dict], steps: list[dict], n_keep: int, kappa_min: float) -> DoseResult:
        """The stage read back from its stored rows (one round's probe/collect completions and dose_steps)."""
        kappa = settled_kappa(steps, kappa_min)
        kept = [x for x in completions if x["keep"]][:n_keep]
        return cls(kappa=kappa, kept=kept, scored=list(completions), steps=list(steps))


def settled_kappa(steps: list[dict], kappa_min: float) -> float:
    """The walk settles on the largest accepted probe kappa, kappa_min when none passed."""
    return max((x["kappa"] for x in steps if x["accepted"]), default=kappa_min)


def dose_walk(cfg: Config, prompts: list[str], sample: Callable[[list[dict], int], list[dict]]) -> DoseResult:
    """`sample(items, step)` generates and scores items [{prompt, alpha, kappa, coef, phase, step}].

    The caller owns the model, the vector and the seeds; this owns the walk.
    """
    res = DoseResult(kappa=cfg.kappa_min, kept=[], scored=[])
    cursor = 0

    def batch(kappa: float, size: int, phase: str) -> float:
        nonlocal cursor
        step = len(res.steps)
        items = []
        for _ in range(size):
            alpha = cfg.alphas[cursor % len(cfg.alphas)]
            items.append(dict(prompt=prompts[cursor % len(prompts)], alpha=alpha, kappa=kappa,
                              coef=kappa * alpha, phase=phase, step=step, idx=cursor))
            cursor += 1
        scored = sample(items, step)
        kept = [r for r in scored if r["keep"]]
        res.scored += scored
        res.kept += kept
        rate = len(kept) / max(1, len(scored))
        res.steps.append(dict(step=step, kappa=kappa, n=len(scored), n_kept=len(kept), rate=rate,
                              accepted=rate >= cfg.dose_target, phase=phase))
        logger.debug(f"dose {phase} step {step}: kappa={kappa:.3f} kept {len(kept)}/{len(scored)}")
        return rate

    lo, hi = math.log(cfg.kappa_min), 0.0
    k = 1.0  # try the full dose first: if it passes there is nothing to walk
    for _ in range(cfg.bisect_steps + 1):
        if batch(k, cfg.probe_size, "probe") >= cfg.dose_target:
            lo = math.log(k)
            if k == 1.0:
                break
        else:
            hi = math.log(k)
        k = math.exp((lo + hi) / 2)
    res.kappa = settled_kappa(res.steps, cfg.kappa_min)
    for _ in range(cfg.max_batches):
        if len(res.kept) >= cfg.n_keep:
            break
        batch(res.kappa, cfg.gen_batch, "collect")
    res.kept = res.kept[: cfg.n_keep]
    if len(res.kept) < cfg.min_train:
        counts = dict(kept=len(res.kept), generated=res.n_gen, kappa=res.kappa)
        raise Starved(
            f"filter starved: kept {len(res.kept)} of {res.n_gen} generated at kappa={res.kappa:.3f}, "
            f"min_train={cfg.min_train} (ppl_tau={cfg.ppl_tau}, rep_tau={cfg.rep_tau}, dose_target={cfg.dose_target}). "
            "Lower --alphas or --kappa-min for gentler steering, loosen --ppl-tau/--rep-tau, or raise --max-batches.",
            counts)
    return res

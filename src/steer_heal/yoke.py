"""yoke: a control run matched to its treatment slot for slot (issue 24 item 2; spec.md "Controls").

An unyoked control runs its own dose walk: it trains on other prompt slots, samples them with other
seeds and may keep another number of completions than the treatment it is compared with. A yoked one
(`--control c0|random --yoke RUN`) reads the treatment's banked slots of each round from the store and
replays them in the treatment's order: the same prompts, alphas, kappas and per-slot seeds (seeds.slot of
the treatment's phase, step and index). Only the push changes: c0 samples at coefficient 0; random keeps
every coefficient and swaps the direction (steering.random_like: one direction shared by the band's
layers, each layer at the vector's norm), scaled so that its mean KL(steered || unsteered) on the
treatment's kept completions equals the treatment's kl_steer (iso-KL, bisection on the scale, stored in
the `yoke` table). The control's filter still scores every replayed slot (its drops per reason sit next
to the treatment's in `just beyond`); a slot it drops is made up by the slots the treatment's collection
would have drawn next (its kappa, the cursor going on), until the control keeps as many as the treatment
did or max_batches run out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from .config import Config
from .dose import DoseResult, Sampler, Starved
from .errors import UserError
from .steering import Vector
from .store import RunLog
from .student import stage_done, stored_config, stored_dose

PHASE = "yoke"  # dose_steps phase of a replayed batch: banked whatever its rate, never a probe of a walk
UNMATCHED_OK = ("control", "yoke")  # what a yoked control may differ from its treatment in
KL_TOL = 0.01  # iso-KL: the calibrated mean KL within 1% of the treatment's kl_steer
MAX_EVALS = 40  # KL evaluations the calibration may spend (doubling, then bisection)


class YokeError(UserError):
    """The treatment a control is yoked to cannot be replayed (missing, unmatched, or its round not done)."""


class Treatment:
    """The treatment run a control is yoked to, read from the same store."""

    def __init__(self, log: RunLog, cfg: Config):
        self.log, self.cfg = log, cfg
        self.calibrations: dict[int, dict] = {}  # round -> its `yoke` row, which the dose stage stores

    @classmethod
    def open(cls, cfg: Config) -> Treatment:
        """The treatment `cfg.yoke`, checked to differ from cfg in control only (seed included)."""
        if not (Path(cfg.out) / "runs" / cfg.yoke).is_dir():
            raise YokeError(f"--yoke {cfg.yoke}: no such run under {cfg.out}/runs; run the treatment first, "
                            "with the same --out")
        log = RunLog(cfg.out, cfg.yoke)
        tcfg = stored_config(log)
        if tcfg.control != "none":
            raise YokeError(f"--yoke {cfg.yoke}: that run is itself a control ({tcfg.control}); yoke to a treatment")
        mine, theirs = cfg.experiment(), tcfg.experiment()
        diff = sorted(k for k in mine if k not in UNMATCHED_OK and mine[k] != theirs.get(k))
        if diff:
            raise YokeError(f"--yoke {cfg.yoke}: the treatment differs in {', '.join(diff)} "
                            f"({', '.join(f'{k}={theirs.get(k)!r}' for k in diff)}); a yoked control differs from "
                            "its treatment in --control only")
        return cls(log, tcfg)

    def dose(self, r: int) -> DoseResult:
        """The treatment's round-r dose stage as stored: its banked slots, in the order it healed on them."""
        if not stage_done(self.log, r, "dose"):
            raise YokeError(f"--yoke {self.log.run_id}: the treatment has not finished round {r}'s dose stage; "
                            f"run (or resume) it past round {r} first")
        return stored_dose(self.log, r, self.cfg)

    def kl_steer(self, r: int) -> float:
        """The treatment's round-r kl_steer: mean KL(steered || unsteered) on its kept completions."""
        got = [m["kl"] for m in self.log.read("stage_metrics")
               if m["round"] == r and m["stage"] == "steered" and m["evaluator"] == "kl" and m.get("kl") is not None]
        if not got:
            raise YokeError(f"--yoke {self.log.run_id}: the treatment has no round-{r} kl_steer (its steered eval "
                            "has not run): the random control calibrates its dose to it")
        return got[-1]

    def iso_kl(self, log: RunLog, r: int, vec: Vector, kl: Callable[..., list[float]]) -> Vector:
        """vec scaled to the treatment's round-r kl_steer, measured by `kl(prompts, completions, vec=, coef=)`
        (freetext.steer_kl on the model as it is now) on the treatment's kept completions at its coefficient.
        Read back from the control's `yoke` table when this round calibrated before; the row is kept in
        `calibrations` for the dose stage to store with its own rows (a crashed dose drops it with them)."""
        row = self.calibrations.get(r) or next(({k: v for k, v in x.items() if k != "run_id"}
                                               for x in log.read("yoke") if x["round"] == r), None)
        if row is None:
            treat = self.dose(r)
            ps, cs = [x["prompt"] for x in treat.kept], [x["completion"] for x in treat.kept]
            got = calibrate(lambda s: _mean(kl(ps, cs, vec=scaled(vec, s), coef=treat.coef)), self.kl_steer(r))
            row = dict(round=r, treatment=self.log.run_id, coef=treat.coef, n=len(ps), **got)
            logger.info(f"r{r} iso-KL: random direction x{row['scale']:.4g}: mean KL {row['kl']:.4g} against the "
                        f"treatment's kl_steer {row['kl_target']:.4g} ({row['iters']} evaluations, {len(ps)} "
                        "completions)")
        self.calibrations[r] = row
        return scaled(vec, row["scale"])


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(1, len(xs))


def scaled(vec: Vector, s: float) -> Vector:
    return {i: v * s for i, v in vec.items()}


def calibrate(kl_at: Callable[[float], float], target: float, tol: float = KL_TOL,
              max_evals: int = MAX_EVALS) -> dict:
    """The scale s with kl_at(s) within tol (relative) of target: double (or halve) from 1 to bracket it, then
    bisect on log s. KL grows with the push, so the bracket holds the answer. Refuses a target it cannot reach."""
    if not (target > 0 and math.isfinite(target)):
        raise YokeError(f"iso-KL: the treatment's kl_steer is {target!r}; it must be a positive number")
    seen: dict[float, float] = {}

    def at(s: float) -> float:
        seen[s] = kl_at(s)
        return seen[s]

    lo, hi = 1.0, 1.0
    if at(1.0) < target:
        while seen[hi] < target and len(seen) < max_evals:
            lo, hi = hi, hi * 2
            at(hi)
    else:
        while seen[lo] >= target and len(seen) < max_evals:
            lo, hi = lo / 2, lo
            at(lo)
    if not seen[lo] < target <= seen[hi]:
        raise YokeError(f"iso-KL: no scale in [{min(seen):.3g}, {max(seen):.3g}] brackets the treatment's kl_steer "
                        f"{target:.4g} (KL there {min(seen.values()):.4g}..{max(seen.values()):.4g})")
    best = lambda: min(seen, key=lambda s: abs(seen[s] - target))  # noqa: E731
    while abs(seen[best()] - target) > tol * target and len(seen) < max_evals:
        mid = math.sqrt(lo * hi)
        if at(mid) < target:
            lo = mid
        else:
            hi = mid
    s = best()
    if abs(seen[s] - target) > tol * target:
        logger.warning(f"iso-KL: after {len(seen)} evaluations the closest mean KL is {seen[s]:.4g} against "
                       f"{target:.4g} (tolerance {tol:.0%}): kept as is")
    return dict(scale=s, kl=seen[s], kl_target=target, iters=len(seen))


def replay(cfg: Config, treat: DoseResult, prompts: list[str], sample: Sampler, c0: bool) -> DoseResult:
    """The treatment's banked slots resampled, batch by batch as it banked them (its step numbers, so each slot
    draws from the same seeds.slot), at coefficient 0 (c0) or the treatment's (random, its own vector); then
    top-up slots where the filter dropped some, until as many are kept as the treatment kept."""
    res = DoseResult(kappa=treat.kappa, kept=[], scored=[])
    want = len(treat.kept)

    def run(items: list[dict], step: int) -> None:
        items = [dict(x, coef=0.0) if c0 else x for x in items]
        scored = sample(items, step)
        kept = [x for x in scored if x["keep"]]
        res.scored += scored
        res.kept += kept
        res.steps.append(dict(step=step, phase=PHASE, kappa=items[0]["kappa"], n=len(scored), n_kept=len(kept),
                              rate=len(kept) / max(1, len(scored)), accepted=True))

    slot = ("prompt", "alpha", "kappa", "coef", "phase", "step", "idx")
    for step in dict.fromkeys(x["step"] for x in treat.kept):
        run([{k: x[k] for k in slot} for x in treat.kept if x["step"] == step], step)
    cursor = 1 + max((x["idx"] for x in treat.scored), default=-1)  # where the treatment's collection stopped
    step = 1 + max((x["step"] for x in treat.steps), default=-1)
    for _ in range(cfg.max_batches):
        missing = want - len(res.kept)
        if missing <= 0:
            break
        run([dict(prompt=prompts[i % len(prompts)], alpha=cfg.alphas[i % len(cfg.alphas)], kappa=treat.kappa,
                  coef=treat.kappa * cfg.alphas[i % len(cfg.alphas)], phase="collect", step=step, idx=i) for i in range(cursor, cursor + missing)], step)
        cursor, step = cursor + missing, step + 1
    res.kept = res.kept[:want]
    if len(res.kept) < want:
        logger.warning(f"yoked control kept {len(res.kept)} of the treatment's {want} after {cfg.max_batches} top-up "
                       "batches: the arms differ in size this round. SHOULD keep as many: raise --max-batches.")
    if len(res.kept) < cfg.min_train:
        raise Starved(f"filter starved: the yoked control kept {len(res.kept)} of {res.n_gen} replayed slots, "
                      f"min_train={cfg.min_train}; raise --max-batches or loosen the filter",
                      dict(kept=len(res.kept), generated=res.n_gen, kappa=res.kappa))
    return res

"""dose: find the coherent edge of the steering dose and collect steered completions just below it.

Every batch samples at C = kappa * alpha, cycling the alphas, so a probe mixes the doses and its
survival rate (the filter's keep rate) is pooled over them. The first probe is at the top of the
range, kappa 1: the alphas should put it above the coherent edge, at a dose that breaks the model.
Then bisection on log kappa in [kappa_min, 1]: a probe that survives at >= dose_target raises the
floor, one under it lowers the ceiling, until bisect_steps probes or a bracket narrower than
BRACKET (hi / lo). The walk settles on the largest accepted probe kappa. Survivors of accepted
probes are banked; a failed probe's are not (they come from above the edge). Then batches at the
settled kappa until n_keep are banked or max_batches run out.

How the walk ended (`DoseResult.walk`): "edge" (a failing probe above the settled kappa bracketed
it), "top" (kappa 1 already passed: the range never reached the edge, so the round trains on the
strongest dose the range allows, not on the edge), "floor" (no probe passed: the settled kappa is
kappa_min, untested), "none" (no walk: a fixed dose, e.g. the c0 control's C = 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger

from .config import DoseCfg

BRACKET = 1.05  # stop bisecting once hi / lo is below this (the method's resolution)
STEP_COLS = ("step", "phase", "kappa", "n", "n_kept", "rate", "accepted")


class Starved(RuntimeError):
    """Fewer than min_train completions survived the filter."""

    def __init__(self, msg: str, counts: dict):
        super().__init__(msg)
        self.counts = counts


@dataclass
class DoseResult:
    kappa: float
    kept: list[dict]    # the banked survivors, in the order the heal uses them
    scored: list[dict]  # every completion with its scores, failed probes included
    steps: list[dict] = field(default_factory=list)  # one row per batch (STEP_COLS)
    seconds: float = 0.0

    @property
    def n_gen(self) -> int:
        return len(self.scored)

    @property
    def coef(self) -> float:
        """The dose the kept completions came from (their mean coefficient): what the steered eval uses."""
        return sum(x["coef"] for x in self.kept) / max(1, len(self.kept))

    @property
    def walk(self) -> str:
        """How the walk ended: edge, top, floor or none (module docstring)."""
        probes = _probes(self.steps)
        if not probes:
            return "none"
        if not any(s["accepted"] for s in probes):
            return "floor"
        return "edge" if any(not s["accepted"] and s["kappa"] > self.kappa for s in probes) else "top"

    def rows(self) -> tuple[list[dict], list[dict]]:
        """(completions rows, dose_steps rows) for the store, without the round column."""
        return list(self.scored), [{k: x[k] for k in STEP_COLS} for x in self.steps]

    @classmethod
    def from_rows(cls, completions: list[dict], steps: list[dict], n_keep: int, kappa_min: float) -> DoseResult:
        """The stage read back from its stored rows (one round's probe/collect completions and dose_steps)."""
        return cls(kappa=settled_kappa(steps, kappa_min), kept=banked(completions, steps)[:n_keep],
                   scored=list(completions), steps=list(steps))


def _probes(steps: list[dict]) -> list[dict]:
    """The walk's probe steps; a step stored before dose_steps had a phase (None) was a probe."""
    return [x for x in steps if x["phase"] in ("probe", None)]


def settled_kappa(steps: list[dict], kappa_min: float) -> float:
    """The largest accepted probe kappa; kappa_min when no probe passed; a walkless run's fixed kappa."""
    probes = _probes(steps)
    if not probes and steps:
        return steps[0]["kappa"]
    return max((x["kappa"] for x in probes if x["accepted"]), default=kappa_min)


def banked(scored: list[dict], steps: list[dict]) -> list[dict]:
    """The survivors the walk banks: every collect batch's, and accepted probes' only. Rows stored before
    dose_steps had a phase come from the older walk, which banked every survivor: read back as it was."""
    if any(s["phase"] is None for s in steps):
        return [x for x in scored if x["keep"]]
    ok = {s["step"] for s in steps if s["phase"] == "collect" or s["accepted"]}
    return [x for x in scored if x["keep"] and x["step"] in ok]


Sampler = Callable[[list[dict], int], list[dict]]


class _Batches:
    """Builds and runs the batches of one dose stage: prompts and alphas cycle across batches."""

    def __init__(self, cfg: DoseCfg, prompts: list[str], sample: Sampler):
        self.cfg, self.prompts, self.sample, self.cursor = cfg, prompts, sample, 0
        self.res = DoseResult(kappa=cfg.kappa_min, kept=[], scored=[])

    def __call__(self, kappa: float, size: int, phase: str) -> bool:
        res, step, items = self.res, len(self.res.steps), []
        for _ in range(size):
            alpha = self.cfg.alphas[self.cursor % len(self.cfg.alphas)]
            items.append(dict(prompt=self.prompts[self.cursor % len(self.prompts)], alpha=alpha, kappa=kappa,
                              coef=kappa * alpha, phase=phase, step=step, idx=self.cursor))
            self.cursor += 1
        scored = self.sample(items, step)
        kept = [r for r in scored if r["keep"]]
        rate = len(kept) / max(1, len(scored))
        accepted = rate >= self.cfg.dose_target
        res.scored += scored
        if accepted or phase == "collect":
            res.kept += kept
        res.steps.append(dict(step=step, phase=phase, kappa=kappa, n=len(scored), n_kept=len(kept), rate=rate,
                              accepted=accepted))
        logger.debug(f"dose {phase} step {step}: kappa={kappa:.3f} kept {len(kept)}/{len(scored)}")
        return accepted

    def collect(self) -> DoseResult:
        res, cfg = self.res, self.cfg
        for _ in range(cfg.max_batches):
            if len(res.kept) >= cfg.n_keep:
                break
            self(res.kappa, cfg.collect_size, "collect")
        res.kept = res.kept[: cfg.n_keep]
        if len(res.kept) < cfg.min_train:
            counts = dict(kept=len(res.kept), generated=res.n_gen, kappa=res.kappa)
            raise Starved(
                f"filter starved: kept {len(res.kept)} of {res.n_gen} generated at kappa={res.kappa:.3f} (walk: "
                f"{res.walk}), min_train={cfg.min_train} (ppl_tau={cfg.ppl_tau}, rep_tau={cfg.rep_tau}, "
                f"rel_tau={cfg.rel_tau}, dose_target={cfg.dose_target}). Lower --alphas or --kappa-min for gentler "
                "steering, loosen --ppl-tau/--rep-tau/--rel-tau, or raise --max-batches.", counts)
        return res


def dose_walk(cfg: DoseCfg, prompts: list[str], sample: Sampler) -> DoseResult:
    """`sample(items, step)` generates and scores items [{prompt, alpha, kappa, coef, phase, step, idx}],
    returning them with `keep`. The caller owns the model, the vector and the seeds; this owns the walk."""
    run = _Batches(cfg, prompts, sample)
    lo, hi = math.log(cfg.kappa_min), 0.0
    if not run(1.0, cfg.probe_size, "probe"):  # the top of the range first: it should break the model
        for _ in range(cfg.bisect_steps):
            if hi - lo < math.log(BRACKET):
                break
            k = math.exp((lo + hi) / 2)
            if run(k, cfg.probe_size, "probe"):
                lo = math.log(k)
            else:
                hi = math.log(k)
    res = run.res
    res.kappa = settled_kappa(res.steps, cfg.kappa_min)
    top = max(cfg.alphas)
    if res.walk == "top":
        logger.warning(f"dose walk: the top of the range (kappa 1, C up to {top:g}) passed the filter at "
                       f"{res.steps[0]['rate']:.2f} >= dose_target {cfg.dose_target}: the range never reached the "
                       "coherent edge, so this round trains on the strongest dose it allows. SHOULD fail at kappa 1: "
                       "raise --alphas (or tighten the filter, e.g. --rel-tau).")
    elif res.walk == "floor":
        logger.warning(f"dose walk: no probe reached dose_target {cfg.dose_target} (lowest probed kappa "
                       f"{min(s['kappa'] for s in res.steps):.3f}); collecting at kappa_min {cfg.kappa_min}, untested. "
                       "SHOULD pass somewhere in range: lower --alphas or --kappa-min.")
    return run.collect()


def collect_at(cfg: DoseCfg, prompts: list[str], sample: Sampler, kappa: float) -> DoseResult:
    """No walk: batches at a fixed kappa until n_keep are banked (the c0 control collects at kappa 0)."""
    run = _Batches(cfg, prompts, sample)
    run.res.kappa = kappa
    return run.collect()

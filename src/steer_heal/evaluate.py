"""evaluate: the eval stage, the one home of "evaluate the model as it is now".

`measure(model, tok, probe)` runs the evaluators the config names (the seven-way probe of mfv.py or
of an optional backend, and the trait probe of contrast.py) on whatever model it is given: the caller
turns adapters and steering on or off around the call. It returns a StageEval, which also owns the
stage's rows in the store (`rows`) and how they are read back (`by_stage`).

This module imports no torch at the top: the stage table and the plots read StageEvals back without
loading a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .config import FOUNDATIONS, Config

STAGES = ("base", "prompted", "steered", "healed")


def stage_order(key: tuple[int, str]) -> tuple[int, int]:
    """Sort key of a (round, stage) pair: by round, then base, prompted, steered, healed."""
    return key[0], STAGES.index(key[1])


@dataclass
class Probe:
    """What a stage is evaluated on, and how: built from a run's config (`Probe.of`)."""
    vignettes: list[dict]
    dilemmas: list[dict]
    system: str           # the system prompt of every stage but `prompted`
    target: str           # the target foundation
    sign: int             # +1 when the trait raises the target's nats, -1 when it lowers them
    evaluators: str       # mfv | contrast | both
    think_tokens: int = 0
    batch: int = 16
    mfv: Callable[..., dict] | None = None  # the seven-way probe (builtin or a backend's)

    @classmethod
    def of(cls, cfg: Config) -> Probe:
        from . import backends, data

        p = data.persona(cfg)
        return cls(data.load_vignettes(cfg.vignettes, cfg.n_vignettes, cfg.frame), data.dilemmas(cfg.persona),
                   cfg.gen_system or p["neutral"], p["target"], data.trait_sign(p), cfg.eval,
                   cfg.think_tokens, cfg.eval_batch, backends.mfv_fn(cfg) if cfg.eval != "contrast" else None)


@dataclass
class StageEval:
    """One stage's evaluation: per-foundation nats and probabilities, coherence and top-1 agreement from the
    seven-way probe (empty/None when it is off), trait_nats from the contrast probe (None when off)."""
    nats: dict[str, float] = field(default_factory=dict)
    prob: dict[str, float] = field(default_factory=dict)
    coherence: float | None = None
    top1_agree: float | None = None
    n: int | None = None
    trait_nats: float | None = None
    n_trait: int | None = None
    coef: float = 0.0

    def target(self, target: str) -> float | None:
        return self.nats.get(target)

    def summary(self, target: str) -> dict:
        """The plain numbers a diagnostic row carries."""
        return dict(nats=self.nats, target_nats=self.nats.get(target), trait_nats=self.trait_nats,
                    coherence=self.coherence, n=self.n)

    def rows(self, round_: int, stage: str) -> list[dict]:
        """stage_metrics rows: one per foundation (mfv) and one for the trait probe (contrast)."""
        out = [dict(round=round_, stage=stage, evaluator="mfv", foundation=f, prob=self.prob[f], nats=self.nats[f],
                    coherence=self.coherence, top1_agree=self.top1_agree, n=self.n, coef=self.coef)
               for f in FOUNDATIONS if f in self.nats]
        if self.n_trait is not None:
            out.append(dict(round=round_, stage=stage, evaluator="contrast", foundation="trait", nats=self.trait_nats,
                            n=self.n_trait, coef=self.coef))
        return out

    @classmethod
    def by_stage(cls, rows: list[dict]) -> dict[tuple[int, str], StageEval]:
        """stage_metrics rows (of one run) read back: {(round, stage): StageEval}."""
        by: dict[tuple[int, str], StageEval] = {}
        for m in rows:  # rows from SQL may carry only some columns
            d = by.setdefault((m["round"], m["stage"]), cls())
            d.coef = m["coef"] if m.get("coef") is not None else d.coef
            if m["evaluator"] == "contrast":
                d.trait_nats, d.n_trait = m["nats"], m.get("n")
            else:
                d.nats[m["foundation"]], d.prob[m["foundation"]] = m["nats"], m.get("prob")
                d.coherence, d.top1_agree, d.n = m["coherence"], m.get("top1_agree"), m.get("n")
        return by


def measure(model, tok, probe: Probe, system: str | None = None, coef: float = 0.0) -> StageEval:
    """Evaluate the model as it is now with the probe's evaluators; `system` overrides the probe's prompt."""
    from .contrast import contrast

    sys_ = probe.system if system is None else system
    out = StageEval(coef=coef)
    if probe.evaluators in ("mfv", "both"):
        m = probe.mfv(model, tok, probe.vignettes, system=sys_, think_tokens=probe.think_tokens, batch=probe.batch)
        out.nats, out.prob, out.coherence = m["nats"], m["profile"], m["coherence"]
        out.top1_agree, out.n = m["top1_agree"], m["n"]
    if probe.evaluators in ("contrast", "both"):
        c = contrast(model, tok, probe.dilemmas, system=sys_, batch=probe.batch)
        out.trait_nats, out.n_trait = c["trait_nats"], c["n"]
    return out

"""evaluate: the eval stage, the one home of "evaluate the model as it is now".

`measure(model, tok, probe)` runs the evaluators the config names (the seven-way probe of mfv.py or
of an optional backend, and the trait probe of contrast.py) on whatever model it is given: the caller
turns adapters and steering on or off around the call. It returns a StageEval, which also owns the
stage's rows in the store (`rows`: stage means; `item_rows`: one per item, what the paired intervals
of intervals.py resample) and how they are read back (`by_stage`). `evaluate()` is a stage's whole
evaluation: measure plus the free-text numbers of freetext.py (`add_text`, `add_kl`), which need the
original model and the kept data; the flow stores what it returns.

This module imports no torch at the top: the stage table and the plots read StageEvals back without
loading a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import FOUNDATIONS, Config, ProbeCfg

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
    texts: list[str] = field(default_factory=list)  # held-out prompts of the free-text generations
    reuse_prefix: bool = True  # each probe scores a prompt's answers on one pass of the prompt (passed in its call)
    bf16: bool = False         # each probe under bf16 autocast (passed in its call)

    @classmethod
    def of(cls, cfg: ProbeCfg) -> Probe:
        """From the run's probes part (Config.part("probes"); a whole Config reads the same)."""
        from . import backends, data
        from .freetext import spread

        p = data.persona(cfg)
        dil = data.dilemmas(cfg.persona)
        mfv_on = cfg.eval != "contrast"  # --probes without mfv: not even its vignettes are read
        return cls(data.load_vignettes(cfg.vignettes, cfg.n_vignettes, cfg.frame) if mfv_on else [], dil,
                   cfg.gen_system or p["neutral"], p["target"], data.trait_sign(p), cfg.eval,
                   cfg.think_tokens, cfg.eval_batch, backends.mfv_fn(cfg) if mfv_on else None,
                   spread([d["prompt"] for d in dil], cfg.n_demo), cfg.reuse_prefix, cfg.bf16 in ("eval", "both"))


@dataclass
class StageEval:
    """One stage's evaluation: per-foundation nats and probabilities, coherence and top-1 agreement from the
    seven-way probe (empty/None when it is off), trait_nats from the contrast probe (None when off),
    adapter_ppl of the free-text generations and kl (steered stage: KL(steered || unsteered) on the kept
    completions), and `items`, the per-item rows every mean above is the mean of."""
    nats: dict[str, float] = field(default_factory=dict)
    prob: dict[str, float] = field(default_factory=dict)
    coherence: float | None = None
    top1_agree: float | None = None
    n: int | None = None
    trait_nats: float | None = None
    n_trait: int | None = None
    coef: float = 0.0
    adapter_ppl: float | None = None
    n_text: int | None = None
    kl: float | None = None
    n_kl: int | None = None
    items: list[dict] = field(default_factory=list)  # eval_items rows without run, round and stage

    def target(self, target: str) -> float | None:
        return self.nats.get(target)

    def summary(self, target: str) -> dict:
        """The plain numbers a diagnostic row carries."""
        return dict(nats=self.nats, target_nats=self.nats.get(target), trait_nats=self.trait_nats,
                    coherence=self.coherence, n=self.n)

    def of(self, evaluator: str) -> list[dict]:
        return [x for x in self.items if x["evaluator"] == evaluator]

    def add_text(self, ppl: list[float | None]) -> None:
        """The free-text generations' perplexities: adapter_ppl is their mean over the finite ones."""
        self.items += [dict(evaluator="freetext", item=str(i), ppl=p) for i, p in enumerate(ppl)]
        ok = [p for p in ppl if p is not None and math.isfinite(p)]
        self.adapter_ppl, self.n_text = (sum(ok) / len(ok) if ok else None), len(ok)

    def add_kl(self, kl: list[float]) -> None:
        self.items += [dict(evaluator="kl", item=str(i), kl=k) for i, k in enumerate(kl)]
        self.kl, self.n_kl = (sum(kl) / len(kl) if kl else None), len(kl)

    def rows(self, round_: int, stage: str) -> list[dict]:
        """stage_metrics rows: one per foundation (mfv), one for the trait probe (contrast), one for the free
        text (freetext, its mean perplexity in `ppl`) and one for the steering KL (kl)."""
        out = [dict(round=round_, stage=stage, evaluator="mfv", foundation=f, prob=self.prob[f], nats=self.nats[f],
                    coherence=self.coherence, top1_agree=self.top1_agree, n=self.n, coef=self.coef)
               for f in FOUNDATIONS if f in self.nats]
        if self.n_trait is not None:
            out.append(dict(round=round_, stage=stage, evaluator="contrast", foundation="trait", nats=self.trait_nats,
                            n=self.n_trait, coef=self.coef))
        if self.n_text is not None:
            out.append(dict(round=round_, stage=stage, evaluator="freetext", foundation="adapter_ppl",
                            ppl=self.adapter_ppl, n=self.n_text, coef=self.coef))
        if self.n_kl is not None:
            out.append(dict(round=round_, stage=stage, evaluator="kl", foundation="kl", kl=self.kl, n=self.n_kl,
                            coef=self.coef))
        return out

    def item_rows(self, round_: int, stage: str) -> list[dict]:
        """eval_items rows: one per (evaluator, item)."""
        return [dict(round=round_, stage=stage, coef=self.coef, **x) for x in self.items]

    @classmethod
    def by_stage(cls, rows: list[dict], items: list[dict] = ()) -> dict[tuple[int, str], StageEval]:
        """stage_metrics rows (of one run), and optionally its eval_items rows, read back:
        {(round, stage): StageEval}."""
        by: dict[tuple[int, str], StageEval] = {}
        for m in rows:  # rows from SQL may carry only some columns
            d = by.setdefault((m["round"], m["stage"]), cls())
            d.coef = m["coef"] if m.get("coef") is not None else d.coef
            if m["evaluator"] == "contrast":
                d.trait_nats, d.n_trait = m["nats"], m.get("n")
            elif m["evaluator"] == "freetext":
                d.adapter_ppl, d.n_text = m.get("ppl"), m.get("n")
            elif m["evaluator"] == "kl":
                d.kl, d.n_kl = m.get("kl"), m.get("n")
            else:
                d.nats[m["foundation"]], d.prob[m["foundation"]] = m["nats"], m.get("prob")
                d.coherence, d.top1_agree, d.n = m["coherence"], m.get("top1_agree"), m.get("n")
        for x in items:
            if (x["round"], x["stage"]) in by:
                by[(x["round"], x["stage"])].items.append(
                    {k: v for k, v in x.items() if k not in ("run_id", "round", "stage", "coef") and v is not None})
        return by


def measure(model, tok, probe: Probe, system: str | None = None, coef: float = 0.0) -> StageEval:
    """Evaluate the model as it is now with the probe's evaluators; `system` overrides the probe's prompt.
    How they compute (reuse_prefix, bf16) goes to each evaluator in its own call: one route per knob."""
    return _measure(model, tok, probe, probe.system if system is None else system, coef)


def evaluate(model, tok, probe: Probe, cfg: Config, *, base, steerer, system: str | None = None, coef: float = 0.0,
             vec: dict | None = None, kept: list[dict] = ()) -> tuple[StageEval, list[dict]]:
    """A stage's whole evaluation of the model as it is now, steered at coef * vec when a vector is given:
    the probes (measure), the free-text generations scored under the original model (`base`: a context that
    turns the student off; adapter_ppl) and, given the round's kept completions, KL(steered || unsteered) on
    them. Returns the StageEval and the generations (prompt, completion, ppl), for the caller to store."""
    from .freetext import adapter_ppl, steer_kl

    with steerer(model, vec, coef):
        ev = measure(model, tok, probe, system=system, coef=coef)
    demo = []
    if probe.texts:
        ps = probe.texts
        outs, ppl = adapter_ppl(model, tok, ps, base=base, gen_system=system or probe.system,
                                score_system=probe.system, max_new_tokens=cfg.demo_tokens or cfg.max_new_tokens,
                                window=cfg.ppl_window, max_len=cfg.max_len, batch=cfg.gen_batch, vec=vec,
                                coef=coef, steerer=steerer, guards=(cfg.repetition_penalty, cfg.no_repeat_ngram))
        ev.add_text(ppl)
        demo = [dict(idx=i, prompt=p, completion=o, ppl=x) for i, (p, o, x) in enumerate(zip(ps, outs, ppl))]
    if kept and vec is not None:
        ev.add_kl(steer_kl(model, tok, [x["prompt"] for x in kept], [x["completion"] for x in kept],
                           system=probe.system, vec=vec, coef=coef, max_len=cfg.max_len, batch=cfg.eval_batch,
                           steerer=steerer))
    return ev, demo


def _measure(model, tok, probe: Probe, sys_: str, coef: float) -> StageEval:
    from .contrast import contrast

    out = StageEval(coef=coef)
    if probe.evaluators in ("mfv", "both"):
        m = probe.mfv(model, tok, probe.vignettes, system=sys_, think_tokens=probe.think_tokens, batch=probe.batch,
                      reuse_prefix=probe.reuse_prefix, bf16=probe.bf16)
        out.nats, out.prob, out.coherence = m["nats"], m["profile"], m["coherence"]
        out.top1_agree, out.n = m["top1_agree"], m["n"]
        out.items += [dict(evaluator="mfv", item=str(v["id"]), frame=v.get("frame"), option_order="both",
                           p=r["p"], p_target=r["p"][probe.target] if r["p"] else None, pmass=r["pmass"])
                      for v, r in zip(probe.vignettes, m["rows"], strict=True)]
    if probe.evaluators in ("contrast", "both"):
        c = contrast(model, tok, probe.dilemmas, system=sys_, batch=probe.batch, reuse_prefix=probe.reuse_prefix,
                     bf16=probe.bf16)
        out.trait_nats, out.n_trait = c["trait_nats"], c["n"]
        out.items += [dict(evaluator="contrast", item=str(i), trait_lp=r["trait_lp"], opposite_lp=r["opposite_lp"],
                           diff=r["diff"]) for i, r in enumerate(c["rows"])]
    return out

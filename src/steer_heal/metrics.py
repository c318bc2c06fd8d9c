"""Pure metric functions, named as in spec.md "Round metrics" and stored under these names."""

from __future__ import annotations

import math
import statistics

from .config import FOUNDATIONS

MIN_DEN = 0.05  # nats: below this a ratio's denominator is noise, so the ratio is NULL
OFF_TARGET = ("Care", "Fairness")
# the store's column for each foundation's log mean probability
FOUNDATION_COLUMNS = {"Care": "care_nats", "Fairness": "fairness_nats", "Loyalty": "loyalty_nats",
                      "Authority": "auth_nats", "Sanctity": "sanctity_nats", "Liberty": "liberty_nats",
                      "SocialNorms": "social_nats"}


def foundation_column(f: str) -> str:
    if f not in FOUNDATION_COLUMNS:
        raise KeyError(f"unknown foundation {f!r}: must be one of {', '.join(FOUNDATIONS)}")
    return FOUNDATION_COLUMNS[f]


def _ratio(num: float, den: float, min_den: float) -> float | None:
    if den is None or num is None or not math.isfinite(den) or abs(den) < min_den:
        return None
    return num / den


def retain(healed: float, steered: float, base: float, min_den: float = MIN_DEN) -> float | None:
    """Share of the steered shift the healed model keeps: (healed - base) / (steered - base)."""
    if None in (healed, steered, base):
        return None
    return _ratio(healed - base, steered - base, min_den)


def coh_cost(coh_stage: float, coh_base: float, t_stage: float, t_base: float,
             min_den: float = MIN_DEN) -> float | None:
    """Coherence change per nat of target shift: (coh_stage - coh_base) / (t_stage - t_base)."""
    if None in (coh_stage, coh_base, t_stage, t_base):
        return None
    return _ratio(coh_stage - coh_base, t_stage - t_base, min_den)


def surgical(d_target: float, d_offtarget: dict[str, float], off: tuple[str, ...] = OFF_TARGET,
             target: str = "") -> bool:
    """True when the target moved more (in abs nats) than every off-target foundation.

    d_offtarget maps foundation -> change; only the `off` foundations are compared, less the target itself.
    """
    others = [abs(d_offtarget[f]) for f in off if f != target and d_offtarget.get(f) is not None]
    return abs(d_target) > max(others, default=0.0)


def kept_stats(ppls: list[float], kept: list[bool]) -> dict:
    """kept_frac = kept / generated; ppl mean and median over every generated completion (finite ones)."""
    if len(ppls) != len(kept):
        raise ValueError(f"{len(ppls)} perplexities but {len(kept)} kept flags")
    finite = [float(p) for p in ppls if p is not None and math.isfinite(p)]
    return {"kept_frac": sum(map(bool, kept)) / len(kept) if kept else None,
            "ppl_mean": statistics.fmean(finite) if finite else None,
            "ppl_median": statistics.median(finite) if finite else None}


def cosine(a, b) -> float:
    """Cosine of two tensors, or of two steering vectors ({layer: tensor}) flattened and concatenated in
    layer order, in float32. Vectors on different layers (or tensors of different sizes) do not compare:
    that raises rather than quietly using the overlap."""
    import torch  # here, not at the top: the stage table and the plots import this module without a model

    if isinstance(a, dict) != isinstance(b, dict) or (isinstance(a, dict) and sorted(a) != sorted(b)):
        raise ValueError(f"cosine needs two tensors or two vectors on the same layers, got {_layers(a)} and {_layers(b)}")
    x, y = _flat(a), _flat(b)
    if x.shape != y.shape:
        raise ValueError(f"cosine of different sizes {tuple(x.shape)} and {tuple(y.shape)}")
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def _flat(v):
    import torch

    if isinstance(v, dict):
        return torch.cat([v[k].flatten().float() for k in sorted(v)])
    return torch.as_tensor(v).detach().flatten().float()


def _layers(v) -> str:
    return f"layers {sorted(v)}" if isinstance(v, dict) else f"a tensor of shape {tuple(v.shape)}"


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def broken(stage, base, target: str, floor_rel: float, ppl_rel: float = 0.0,
           informative: dict[str, bool] | None = None) -> str:
    """Why no ratio of this stage may be read ('' when they may): the coherence floor, checked before any
    ratio (spec.md "The coherence floor"). stage, base: evaluate.StageEval (base is round -1's).
    informative: {probe: verdict} from probe_info (None or a missing probe: informative); no floor rests
    on an uninformative probe.

    - a number an evaluator measured is missing or non-finite (the store keeps NaN and inf as NULL);
    - seven-way coherence under floor_rel x base's;
    - option mass collapsed: on most items (the median of per-item mass / that item's base mass) the
      mass fell under floor_rel, even if a few items hold the mean up;
    - every free-text generation came out empty, where base wrote text;
    - free-text adapter_ppl above ppl_rel x base's, with the paired bootstrap interval of the ratio over the
      demo prompts wholly above it (ppl_floor).
    """
    why = []
    measured = [("target nats", stage.nats.get(target), stage.n), ("coherence", stage.coherence, stage.n),
                ("trait nats", stage.trait_nats, stage.n_trait), ("adapter_ppl", stage.adapter_ppl, stage.n_text)]
    bad = [name for name, v, n in measured if n and not _finite(v)]  # n = 0: nothing scored, nothing to judge
    if bad:
        why.append(f"non-finite {', '.join(bad)}")
    if stage.n_text == 0 and base.n_text:
        why.append("every free-text generation was empty (base wrote text)")
    if ppl_rel > 0 and (informative or {}).get("freetext", True):
        why += ppl_floor(stage, base, ppl_rel)
    if floor_rel > 0 and _finite(stage.coherence) and _finite(base.coherence) and (informative or {}).get("mfv", True):
        floor = floor_rel * base.coherence
        if stage.coherence < floor:
            why.append(f"coherence {stage.coherence:.3g} < {floor_rel:g} x base {base.coherence:.3g}")
        mass = {x["item"]: x.get("pmass") for x in base.of("mfv")}
        ratios = sorted(x["pmass"] / mass[x["item"]] for x in stage.of("mfv")
                        if _finite(x.get("pmass")) and mass.get(x["item"]))
        if ratios and statistics.median(ratios) < floor_rel:
            why.append(f"option mass collapsed: median item keeps {statistics.median(ratios):.3g} of its base mass "
                       f"< {floor_rel:g}")
    return "; ".join(why)


def ppl_floor(stage, base, ppl_rel: float, boot: int = 2000) -> list[str]:
    """[why] when the stage's adapter_ppl / base's has its 95% interval (paired bootstrap over the demo
    prompts both scored, a fixed seed: the same verdict every time it is read) wholly above ppl_rel."""
    from .intervals import paired, pairs

    x, y = pairs(stage.of("freetext"), base.of("freetext"), "ppl")
    ci = paired(x, y, "log_mean", boot, seed=0)
    if ci["lo"] is None or ci["lo"] <= math.log(ppl_rel):
        return []
    return [f"adapter_ppl x{math.exp(ci['delta']):.3g} [{math.exp(ci['lo']):.3g}, {math.exp(ci['hi']):.3g}] of base "
            f"> {ppl_rel:g}"]


def round_row(r: int, target: str, ext, dose, steered, heal, healed, base, secs: dict, floor_rel: float,
              ppl_rel: float = 0.0, informative: dict[str, bool] | None = None) -> dict:
    """Everything round r measured, by the store's column names (spec.md "Round metrics").

    ext: extract.Extracted, dose: dose.DoseResult, heal: heal.HealResult, steered/healed/base:
    evaluate.StageEval of those stages (base is round -1's). The coherence floor comes first: a broken
    steered stage withholds retain and retain_trait (their denominator), a broken healed stage every ratio.
    A probe at chance (informative, from probe_info) withholds the ratios resting on it: mfv retain,
    coh_cost and surgical, contrast retain_trait.
    """
    ks = kept_stats([x["ppl"] for x in dose.scored], [x["keep"] for x in dose.scored])
    why = {name: broken(st, base, target, floor_rel, ppl_rel, informative)
           for name, st in (("steered", steered), ("healed", healed))}
    use = {p: (informative or {}).get(p, True) for p in ("mfv", "contrast")}
    row = dict(round=r, kappa=dose.kappa, walk=dose.walk, n_gen=len(dose.scored), n_kept=len(dose.kept), **ks,
               cos_v0=ext.cos_v0, student_cos=ext.student_cos, heal_nll=heal.heal_nll, val_nll=heal.val_nll,
               trait_nats=healed.trait_nats, coherence=healed.coherence, adapter_ppl=healed.adapter_ppl,
               steered_trait_nats=steered.trait_nats, steered_coherence=steered.coherence,
               steered_adapter_ppl=steered.adapter_ppl, kl_steer=steered.kl,
               broken=bool(why["healed"]), steered_broken=bool(why["steered"]),
               broken_reason="; ".join(f"{k}: {v}" for k, v in why.items() if v) or None, **secs)
    ratios = not (why["healed"] or why["steered"])
    for f, v in healed.nats.items():
        row[foundation_column(f)] = v
    if healed.nats:
        t_h, t_s, t_b = healed.nats[target], steered.nats[target], base.nats[target]
        row.update(target_nats=t_h, steered_target_nats=t_s,
                   retain=retain(t_h, t_s, t_b) if ratios and use["mfv"] else None)
        if not why["healed"] and use["mfv"]:
            row.update(coh_cost=coh_cost(healed.coherence, base.coherence, t_h, t_b),
                       surgical=surgical(t_h - t_b, {f: healed.nats[f] - base.nats[f] for f in FOUNDATIONS},
                                         target=target))
    if healed.trait_nats is not None:
        row["retain_trait"] = (retain(healed.trait_nats, steered.trait_nats, base.trait_nats)
                               if ratios and use["contrast"] else None)
    return row


def shoulds(row: dict, ivs: dict, verdict: dict[str, bool] | None = None) -> list[tuple[bool | None, str]]:
    """The method's expectations of a finished round, each with what a failure means: (held, line);
    held is None when the round lacks the numbers to check it, or when they come from a probe at chance on this
    model (verdict: informative.usable of the run; None checks every probe). ivs: intervals.lookup() of the run."""
    off = {p for p, good in (verdict or {}).items() if not good}

    def gated(probe: str, held: bool | None, line: str) -> tuple[bool | None, str]:
        return (None, f"{line} [not checked: {probe} at chance on this model]") if probe in off else (held, line)

    return [gated(probe, held, line) for probe, held, line in _checks(row, ivs)]


def _checks(row: dict, ivs: dict) -> list[tuple[str, bool | None, str]]:
    """shoulds' checks, each with the probe its numbers come from (the floor's flags are already gated)."""
    r = row["round"]

    def iv(stage: str, metric: str, ref: str) -> dict:
        return ivs.get((r, stage, metric, ref)) or {}

    def above0(ci: dict) -> bool | None:
        return None if ci.get("lo") is None else ci["lo"] > 0

    def between(v) -> bool | None:
        return None if v is None else 0 < v <= 1

    ppl_h, ppl_s = row.get("adapter_ppl"), row.get("steered_adapter_ppl")
    d_ppl = iv("healed", "ppl", "base")
    return [
        ("floor", not row.get("steered_broken"), "steered coherence within the floor of base -- else the dose breaks the "
         "model and retain, retain_trait are withheld"),
        ("floor", not row.get("broken"), "healed coherence within the floor of base -- else the heal broke the model; "
         "every ratio is withheld"),
        ("mfv", between(row.get("retain")), f"retain in (0, 1] (got {_g(row.get('retain'))}) -- <= 0: the heal undid or "
         "reversed the steered move; > 1: it went past the teacher"),
        ("contrast", between(row.get("retain_trait")), f"retain_trait in (0, 1] (got {_g(row.get('retain_trait'))}) -- same, "
         "on the contrast probe"),
        ("contrast", above0(iv("healed", "trait", "base")), f"healed d_trait vs base above 0 with its interval "
         f"({_g(iv('healed', 'trait', 'base').get('lo'))}..{_g(iv('healed', 'trait', 'base').get('hi'))}) -- else "
         "the student holds no trait the held-out probe can tell from noise"),
        ("contrast", above0(iv("healed", "trait", "prev")), "healed d_trait vs the previous student above 0 with its interval "
         "-- else this round added no trait (the loop stalls)"),
        ("freetext", None if None in (ppl_h, ppl_s) else ppl_h < ppl_s, f"healed adapter_ppl {_g(ppl_h)} below the steered "
         f"stage's {_g(ppl_s)} -- else the heal learnt the teacher's disfluency"),
        ("freetext", None if d_ppl.get("lo") is None else d_ppl["lo"] <= 0, "healed adapter_ppl not above base's with its "
         "interval -- else the student writes less fluently than base"),
        ("vector", None if row.get("cos_v0") is None else row["cos_v0"] > 0.5, f"cos_v0 > 0.5 (got {_g(row.get('cos_v0'))}) "
         "-- else this round's vector has drifted from round 0's direction"),
    ]


def _g(v) -> str:
    return "-" if v is None else f"{v:.3g}"

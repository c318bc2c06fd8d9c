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


def round_row(r: int, target: str, ext, dose, steered, heal, healed, base, secs: dict) -> dict:
    """Everything round r measured, by the store's column names (spec.md "Round metrics").

    ext: extract.Extracted, dose: dose.DoseResult, heal: heal.HealResult, steered/healed/base:
    evaluate.StageEval of those stages (base is round -1's).
    """
    ks = kept_stats([x["ppl"] for x in dose.scored], [x["keep"] for x in dose.scored])
    row = dict(round=r, kappa=dose.kappa, walk=dose.walk, n_gen=len(dose.scored), n_kept=len(dose.kept), **ks,
               cos_v0=ext.cos_v0, student_cos=ext.student_cos, heal_nll=heal.heal_nll, val_nll=heal.val_nll,
               trait_nats=healed.trait_nats, coherence=healed.coherence,
               steered_trait_nats=steered.trait_nats, steered_coherence=steered.coherence, **secs)
    for f, v in healed.nats.items():
        row[foundation_column(f)] = v
    if healed.nats:
        t_h, t_s, t_b = healed.nats[target], steered.nats[target], base.nats[target]
        row.update(target_nats=t_h, steered_target_nats=t_s, retain=retain(t_h, t_s, t_b),
                   coh_cost=coh_cost(healed.coherence, base.coherence, t_h, t_b),
                   surgical=surgical(t_h - t_b, {f: healed.nats[f] - base.nats[f] for f in FOUNDATIONS}, target=target))
    if healed.trait_nats is not None:
        row["retain_trait"] = retain(healed.trait_nats, steered.trait_nats, base.trait_nats)
    return row

"""Pure metric functions, named as in DESIGN.md "Metrics" and stored under these names."""

from __future__ import annotations

import math
import statistics

import torch

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


def _flat(v) -> torch.Tensor:
    if isinstance(v, dict):
        return torch.cat([_flat(v[k]) for k in sorted(v)])
    return torch.as_tensor(v).detach().flatten().double().cpu()


def cos(a, b) -> float:
    """Cosine of two vectors, or of two {layer: tensor} dicts flattened and concatenated in layer order."""
    if isinstance(a, dict) != isinstance(b, dict) or (isinstance(a, dict) and sorted(a) != sorted(b)):
        raise ValueError("cos needs two tensors or two dicts with the same layers")
    x, y = _flat(a), _flat(b)
    if x.shape != y.shape:
        raise ValueError(f"cos of different sizes {tuple(x.shape)} and {tuple(y.shape)}")
    den = float(x.norm() * y.norm())
    return float(x @ y) / den if den > 0 else 0.0

"""informative: does each probe read anything on the model at hand? Decided once, at the base eval.

A probe at chance still prints numbers, and a number from it moves with steering the way noise does. So the
base eval stores one `probe_info` row per probe (spec.md "Informative probes"), and every reader greys out an
uninformative probe's numbers and rests no floor and no ratio on it. The criterion, per probe:

- mfv (seven-way choice): informative when base puts at least MASS_MIN of its next-token probability on the
  seven option words (below that the renormalised answer is mostly what is left of a non-answer) AND its top-1
  choice agrees with the humans' more often than chance (1/7): the lower end of the Wilson 95% interval of the
  agreement is above 1/7. Without human labels the agreement is unchecked and the mass decides.
- contrast (trait_nats): the two replies have no option mass to lose, so only separation counts: the probe
  must read its dilemma. Each reply is scored after its own dilemma and after an unrelated one (the dilemma
  half the list away, as filter.relevance does for completions); informative when the mean gain, over the
  dilemmas, has a paired bootstrap 95% interval above 0. A model that scores a reply the same after any
  prompt scores the trait against the opposite without reading the question.
- freetext (adapter_ppl): informative when base wrote at least two scored generations (an interval needs two).

Measured (docs/results.md): SmolLM2-135M-Instruct, mass 0.054 and top-1 0.136 on 132 Clifford vignettes
(mfv: uninformative), contrast separation well above 0 (informative); the tiny random model is at chance on
both probes.
"""

from __future__ import annotations

import math

MASS_MIN = 0.5
CHANCE_TOP1 = 1 / 7
PROBES = ("mfv", "contrast", "freetext")
RATIOS = ("retain", "retain_trait", "coh_cost", "surgical")
# the stage_metrics / round numbers each probe gives, for the readers that grey them out
NUMBERS = {"mfv": ("target_nats", "coherence", "d_target", "d_coh", "retain", "coh_cost", "surgical"),
           "contrast": ("trait_nats", "d_trait", "retain_trait"),
           "freetext": ("adapter_ppl", "d_ppl")}


def foils(dilemmas: list[dict]) -> list[dict]:
    """Each dilemma's two replies under the prompt half the list away (fixed by the list, like filter.foils)."""
    n = len(dilemmas)
    return [dict(d, prompt=dilemmas[(i + n // 2) % n]["prompt"]) for i, d in enumerate(dilemmas)]


def reads_items(model, tok, probe, system: str, own: list[dict]) -> list[float]:
    """Per dilemma: the mean over its two replies of log-prob(reply | own dilemma) - log-prob(reply | a foil).
    own: the base eval's contrast item rows (trait_lp, opposite_lp), in dilemma order."""
    from .contrast import contrast

    c = contrast(model, tok, foils(probe.dilemmas), system=system, batch=probe.batch,
                 reuse_prefix=probe.reuse_prefix)
    return [((o["trait_lp"] - f["trait_lp"]) + (o["opposite_lp"] - f["opposite_lp"])) / 2
            for o, f in zip(own, c["rows"], strict=True)]


def verdicts(base, reads: list[float] | None = None, boot: int = 2000, seed: int = 0) -> list[dict]:
    """probe_info rows (round -1) for the probes base measured. base: evaluate.StageEval of the base stage;
    reads: reads_items() of the contrast probe (None: not measured, so its separation is unchecked)."""
    out = []
    if base.n:
        out.append(_mfv(base))
    if base.n_trait:
        out.append(_contrast(reads, boot, seed))
    if base.n_text is not None:
        ok = base.n_text >= 2
        out.append(dict(probe="freetext", informative=ok, n=base.n_text, mass=None, separation=None, lo=None,
                        hi=None, chance=None, reason="" if ok else f"{base.n_text} scored generation(s) at base, "
                        "fewer than the 2 an interval needs"))
    return [dict(round=-1, **r) for r in out]


def _mfv(base) -> dict:
    from scipy.stats import binomtest

    mass, top1, n = base.coherence, base.top1_agree, base.n
    why = []
    if mass is None or not math.isfinite(mass) or mass < MASS_MIN:
        why.append(f"option mass {_g(mass)} < {MASS_MIN:g}")
    lo = hi = None
    if top1 is not None:
        ci = binomtest(round(top1 * n), n, CHANCE_TOP1).proportion_ci(0.95, method="wilson")
        lo, hi = float(ci.low), float(ci.high)
        if lo <= CHANCE_TOP1:
            why.append(f"top-1 agreement {top1:.3f} [{lo:.3f}, {hi:.3f}] not above chance {CHANCE_TOP1:.3f}")
    return dict(probe="mfv", informative=not why, n=n, mass=mass, separation=top1, lo=lo, hi=hi,
                chance=CHANCE_TOP1, reason="; ".join(why) or ("" if top1 is not None else
                                                              "no human labels: top-1 agreement unchecked"))


def _contrast(reads: list[float] | None, boot: int, seed: int) -> dict:
    from .intervals import paired

    if reads is None:  # not measured (a stored run before the check): say so, trust it as before
        return dict(probe="contrast", informative=True, n=None, mass=None, separation=None, lo=None, hi=None,
                    chance=0.0, reason="separation not measured")
    ci = paired(reads, [0.0] * len(reads), "mean", boot, seed)
    ok = ci["lo"] is not None and ci["lo"] > 0
    return dict(probe="contrast", informative=ok, n=ci["n"], mass=None, separation=ci["delta"], lo=ci["lo"],
                hi=ci["hi"], chance=0.0, reason="" if ok else
                f"replies scored alike after their own dilemma and an unrelated one: {_g(ci['delta'])} nats "
                f"[{_g(ci['lo'])}, {_g(ci['hi'])}]")


def usable(rows: list[dict]) -> dict[str, bool]:
    """{probe: informative} from a run's probe_info rows; a probe without a row (a run stored before the
    check, or one that skipped the probe) is absent, and `ok` counts it as informative."""
    return {r["probe"]: bool(r["informative"]) for r in rows}


def floor(cfg, rows: list[dict]) -> dict:
    """The floor's knobs of a run besides coh_floor_rel, as metrics.broken and round_row take them: ppl_rel and
    the verdicts (None when --no-probe-gate: every probe counts). cfg: the run's Config; rows: its probe_info."""
    return dict(ppl_rel=cfg.ppl_floor_rel, informative=usable(rows) if cfg.probe_gate else None)


def ok(verdict: dict[str, bool] | None, probe: str) -> bool:
    return True if verdict is None else verdict.get(probe, True)


def grey(value, informative: bool):
    """A table cell from an uninformative probe: shown in parentheses, so no one reads it as a result."""
    if informative or value is None or value == "-":
        return value
    return f"({value:.3f})" if isinstance(value, float) else f"({value})"


def probe_of(key: str) -> str | None:
    """The probe a table column's number comes from (d_target_prev -> mfv), or None."""
    for p, keys in NUMBERS.items():
        if key in keys:
            return p
    return next((p for p, keys in NUMBERS.items() for k in keys if key.startswith(k + "_")), None)


def shade(cells: dict, verdict: dict[str, bool] | None, ratios: bool = True) -> dict:
    """A table row's cells with each uninformative probe's numbers greyed (in parentheses), and, where the row
    has ratios (a steered or healed stage), one withheld because of such a probe (None) shown as 'at chance'."""
    if not verdict:
        return cells
    out = dict(cells)
    for k, v in cells.items():
        p = probe_of(k)
        if p is not None and not verdict.get(p, True):
            out[k] = "at chance" if v is None and ratios and k in RATIOS else grey(v, False)
    return out


def note(verdict: dict[str, bool] | None) -> str:
    """One line for a table's header: which probes are greyed out, or ''."""
    off = [p for p in PROBES if verdict and not verdict.get(p, True)]
    return (f"(...) = from a probe at chance on this model ({', '.join(off)}; probe_info): stored and shown, "
            "no floor or ratio rests on it") if off else ""


def summary(rows: list[dict]) -> str:
    """The base eval's log line per probe."""
    return "\n".join(f"probe {r['probe']}: {'informative' if r['informative'] else 'UNINFORMATIVE'}"
                     + (f" ({r['reason']})" if r["reason"] else "") for r in rows)


def _g(v) -> str:
    return "-" if v is None else f"{v:.3g}"

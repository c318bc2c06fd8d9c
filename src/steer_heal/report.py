"""report: a run's report.md (the round table, stage deltas with their intervals, the floor's flags, demos, links).

The table printers themselves are tables.py."""

from __future__ import annotations

import json

from . import informative, intervals, metrics
from .config import Config
from .evaluate import StageEval, stage_order
from .files import atomic_write_bytes
from .store import RunLog
from .tables import round_table, table

SHOW_DEMOS = 2
DELTAS = (("target", "d_target"), ("trait", "d_trait"), ("coh", "d_coh"), ("ppl", "d_ppl"))


def stage_rows(by: dict, ivs: list[dict], target: str, floor_rel: float, ppl_rel: float = 0.0,
               verdict: dict | None = None) -> list[dict]:
    """One row per (round, stage): levels, deltas with intervals against base and the previous student, and
    the coherence-floor flag (why the stage's ratios are withheld, '' when they are not)."""
    base, got = by.get((-1, "base"), StageEval()), intervals.lookup(ivs)
    out = []
    for (r, stage), d in sorted(by.items(), key=lambda x: stage_order(x[0])):
        row = dict(round=r, stage=stage, n=d.n, target_nats=d.nats.get(target), trait_nats=d.trait_nats,
                   coherence=d.coherence, adapter_ppl=d.adapter_ppl, kl=d.kl,
                   broken=metrics.broken(d, base, target, floor_rel, ppl_rel, verdict) if stage != "base" else "")
        refs = {"base": base, "prev": by.get((r - 1, "healed"), base) if r > 0 else base}
        for metric, name in DELTAS:
            for ref, e in refs.items():
                row[f"{name}_{ref}"] = got.get((r, stage, metric, ref)) or _point(d, e, metric, target, stage)
        out.append(row)
    return out


def _point(d: StageEval, ref: StageEval, metric: str, target: str, stage: str) -> dict | None:
    """The delta of the stage means when no interval is stored (a run without item rows, or --boot 0): the
    point alone, and only on the same items (equal n)."""
    if stage == "base" or d.n != ref.n:
        return None
    get = {"target": lambda e: e.nats.get(target), "trait": lambda e: e.trait_nats,
           "coh": lambda e: e.coherence, "ppl": lambda e: e.adapter_ppl}[metric]
    a, b = get(d), get(ref)
    return None if a is None or b is None else {"delta": a - b, "lo": None}


def write_report(log: RunLog, target: str = "Authority") -> str:
    rounds = log.read("rounds")
    info = (log.read("run_info") or [{}])[-1]
    conf = info.get("config") or {}
    floor_rel = conf.get("coh_floor_rel", Config.coh_floor_rel)  # a run before the knob
    verdict = informative.usable(log.read("probe_info"))
    gate = dict(ppl_rel=conf.get("ppl_floor_rel", Config.ppl_floor_rel),
                verdict=verdict if conf.get("probe_gate", Config.probe_gate) else None)
    ivs = log.read("intervals")
    stages = stage_rows(StageEval.by_stage(log.read("stage_metrics"), log.read("eval_items")), ivs, target, floor_rel,
                        **gate)
    fmt = intervals.fmt
    shade = lambda x: informative.shade({k: fmt(v) if isinstance(v, dict) else v for k, v in x.items()}, verdict)  # noqa: E731
    demos = [c for c in log.read("completions") if (c["phase"] or "").startswith("demo")]
    parts = [f"# Run {log.run_id}", "", f"model `{info.get('model')}`, reg `{info.get('reg')}`, seed {info.get('seed')}, "
             f"config hash `{info.get('config_hash')}`", "", "## Rounds", "", round_table(rounds, ivs, md=True, verdict=verdict), "",
             f"## Stages (target = {target})", "",
             "Deltas against base, with 95% paired bootstrap intervals resampling this run's items (`~`: the "
             "interval holds 0). "
             f"`broken`: the stage is under the coherence floor ({floor_rel:g} x base), so its ratios are withheld.",
             "", *_probes(log.read("probe_info")),
             table(["round", "stage", "n", "target", "d_target", "trait", "d_trait", "coh", "d_coh", "adapter_ppl",
                    "d_ppl", "kl", "broken"],
                   [[x["round"], x["stage"], x["n"], x["target_nats"], x["d_target_base"], x["trait_nats"],
                     x["d_trait_base"], x["coherence"], x["d_coh_base"], x["adapter_ppl"],
                     x["d_ppl_base"], x["kl"], x["broken"]] for x in map(shade, stages)], md=True),
             "", "Against the previous student (the one that started the round; base for round 0), with the same "
             "intervals over items; `broken` as above:", "",
             table(["round", "stage", "d_target", "d_trait", "d_coh", "d_ppl", "broken"],
                   [[x["round"], x["stage"], *[x[f"{n}_prev"] for _, n in DELTAS], "BROKEN" if x["broken"] else ""]
                    for x in map(shade, stages) if x["round"] >= 0], md=True),
             "", "## Free-text generations (greedy, held-out prompts; ppl under the base model; the first "
             f"{SHOW_DEMOS} of each stage, all in `completions` phase `demo:<stage>`)", ""]
    for c in sorted((c for c in demos if c["idx"] < SHOW_DEMOS), key=lambda c: (c["idx"], c["round"])):
        ppl = "" if c.get("ppl") is None else f" (ppl {c['ppl']:.1f})"
        parts.append(f"- r{c['round']} {c['phase'][5:]} | {c['prompt'][:80]!r}\n  -> {c['completion']!r}{ppl}")
    parts += ["", "## Plots and diagnostics", ""] + (_extras(log) or ["none yet: `just plot RUN_ID`, `just csweep RUN_ID` ..."])
    text = "\n".join(parts) + "\n"
    atomic_write_bytes(log.dir / "report.md", text.encode())
    return text


def _probes(rows: list[dict]) -> list[str]:
    """The base eval's verdict per probe (spec.md "Informative probes"), as report lines."""
    if not rows:
        return []
    return ["Probes on this model (decided at the base eval; an uninformative probe's numbers are in parentheses, "
            "and no floor or ratio rests on them):", ""] + [
        f"- {r['probe']}: {'informative' if r['informative'] else '**at chance**'}"
        + (f" ({r['reason']})" if r["reason"] else "") for r in rows] + [""]


def _extras(log: RunLog) -> list[str]:
    """Links to the run's plots and to every diagnostic that read this run (they may be written later)."""
    out = [f"- [{p.name}](plots/{p.name})" for p in sorted((log.dir / "plots").glob("*.png"))]
    for f in sorted((log.root / "diagnostics").glob("*/diagnostics.jsonl")):
        try:
            d = json.loads(f.read_text().splitlines()[-1])
        except (OSError, IndexError, ValueError):
            continue  # a diagnostic being created right now
        if d.get("status", "done") != "done":  # running, or interrupted: no report.md to link (yet)
            continue
        if log.run_id in str(d.get("source_run") or "").split(","):
            r = "" if d.get("round") is None else f" round {d['round']}"
            out.append(f"- {d['kind']}{r}: [{f.parent.name}](../../diagnostics/{f.parent.name}/report.md)")
    return out

"""Presets: named sets of knob values, each value with the source it comes from.

The method has four sources that disagree knob by knob (S1 the project's research journal, S2 the method
repository's README headline, S3 its config.py at the last commit, S4 its last loop entries; docs/usage.md
sets out which preset takes what). A source tag is "S<n>" (the value is that source's), "S<n> (S<m> silent)"
(the preset reproduces S<m>, which does not say, so the repository's own value fills in), or "ours: why".
In a shared GPU value, a bare "S3" likewise fills in for a source that is silent on that knob.
tests/test_presets.py keeps a copy of every value with its tag, so none drifts silently.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from .config import Config
from .errors import UserError

Sourced = dict[str, tuple[Any, str]]

# What every GPU preset shares (gemma-3-4b-it, 34 layers): the values the sources agree on, and ours where
# they are silent. A preset overrides a knob by naming it again with its own source.
_GPU: Sourced = dict(
    model=("google/gemma-3-4b-it", "S1 S2: the model every source ran"),
    steer_layers=((0.45, 0.55), "S3: steering band (0.45, 0.55) of depth, layers 15-19 of 34"),
    alphas=((0.5, 0.75, 1.0), "S3"),
    control=("none", "ours: the treatment; `--control c0` is its control"),
    dose_target=(0.75, "S3"),
    probe_size=(8, "S3"),
    kappa_min=(0.2, "S3"),
    bisect_steps=(6, "ours: bisection on log kappa in place of S3's x0.7 decay; 6 probes as S3's 6 batches"),
    max_batches=(6, "S3"),
    n_prompts=(16, "ours: sources silent; cycled, so 64 kept reuse each prompt ~4x"),
    n_keep=(64, "ours: sources silent; S1's barrier sweep healed on 48"),
    min_train=(30, "S4: the loop that crashed stopped at 17 kept < 30"),
    max_new_tokens=(512, "S3 S4"),
    max_len=(1024, "ours: 512 new tokens plus the chat prompt"),
    collect_size=(16, "ours: sources silent"),
    gen_batch=(0, "ours: auto, the largest batch that fits the GPU's free memory (memory.py); each slot samples from its own seed"),
    temperature=(1.0, "ours: sources silent; plain sampling"),
    top_p=(0.95, "ours: sources silent"),
    n_extract_pairs=(256, "S1 S3: 256 branching-suffix pairs"),
    ppl_tau=(50.0, "ours: sources silent; ppl under base over the 128-token tail"),
    rep_tau=(0.3, "ours: sources silent"),
    ppl_window=(128, "ours: steering collapses late; the tail of a 512-token completion"),
    loop_tau=(0.5, "ours: S4's loops passed ppl and rep; under 5% of SmolLM2's own text is dropped (docs/usage.md)"),
    reg=("kl_rev", "S2 S3 S4"),
    kl_agg=("mean", "S3"),
    barrier_ref=("base", "S1 S2"),
    lam=(0.3, "S2 S3 S4"),
    tau=(0.5, "S2 S3 S4"),
    lam_round_pow=(0.0, "S3"),
    spectral_lam=(0.01, "S3 S4"),
    weight_decay=(0.0, "ours: sources silent"),
    lora_r=(32, "S1 S3"),
    lora_alpha=(64.0, "S1 S3"),
    lora_layers=((0.2, 0.8), "S1 S3"),
    epochs=(6, "S1 S3"),
    batch_size=(1, "S3"),
    grad_accum=(4, "S3"),
    lr=(1e-4, "S1 S3"),
    warmup=(0.1, "S1 S3"),
    betas=((0.9, 0.95), "S1 S3"),
    grad_clip=(1.0, "ours: sources silent"),
    think_tokens=(128, "S1 S3 S4"),
    n_vignettes=(0, "ours: all of them; `just run` passes the 132 Clifford vignettes"),
    eval_batch=(0, "ours: auto, as gen_batch (memory at 512+ tokens on one GPU)"),
    n_rounds=(8, "S2: its 8-round headline"),
    coh_floor=(0.95, "S3"),
    fold_history=(True, "ours: a round-8 forward costs what round 0's does (docs/performance.md)"),
)

SOURCED: dict[str, Sourced] = {
    # S2's 8-round headline: the only loop any source reports coherent over 8 rounds (coherence 0.976, flat).
    "s2-headline": dict(_GPU,
        kl_agg=("rmse", "S2: rmse beats mean; mean reached token loops by round 7"),
        lam_round_pow=(-0.5, "S2: 0.30 at r0 -> 0.11 at r7"),
        barrier_ref=("base", "S2: its pseudo-code takes KL to the original (the prose does not say; S3's default "
                             "is prev): we read base"),
        spectral_lam=(0.01, "S3 (S2 silent)"),
        repetition_penalty=(1.0, "S3 (S2 silent): removed"),
        no_repeat_ngram=(0, "S3 (S2 silent): removed"),
    ),
    # S4's proposed next experiment: barrier to base, spectral and ramp off; the tau bracket is
    # `just barrier-sweep RUN 0 --tau ...` on a stored round (docs/diagnostics.md).
    "s4-next": dict(_GPU,
        barrier_ref=("base", "S4 next: prev let drift compound in all 3 loop arms"),
        tau=(0.5, "S4: the bracket's centre; the bracket itself is `just barrier-sweep --tau`"),
        spectral_lam=(0.0, "S4 next: off"),
        lam_round_pow=(0.0, "S4 next: off (+0.5 tried, no gain)"),
        n_rounds=(10, "S4: its 10-round loops"),
        repetition_penalty=(1.0, "S3 (S4 silent): removed"),
        no_repeat_ngram=(0, "S3 (S4 silent): removed"),
    ),
    # S1, the project's journal of 2026-06-04: the generation guards, the linear barrier to base, the
    # operating point c ~ 0.5, lam at its next test value.
    "s1-journal": dict(_GPU,
        alphas=((0.25, 0.5), "S1: operating point c ~ 0.5"),
        repetition_penalty=(1.3, "S1: at generation"),
        no_repeat_ngram=(3, "S1: at generation"),
        barrier_ref=("base", "S1: drift from base is what the barrier measures"),
        lam=(0.1, "S1: its next test"),
        tau=(0.0, "S1: linear, the sweep's barrier"),
        reg=("kl_rev", "S1: its next test (nll kept the most trait at the coherent dose; a barrier is the method)"),
        spectral_lam=(0.01, "S3 (S1 silent)"),
        kl_agg=("mean", "S3 (S1 silent)"),
        n_rounds=(8, "ours (S1 silent): S2's 8 rounds"),
        batch_size=(1, "S3 (S1 silent)"),
    ),
    # SmolLM2-135M-Instruct on CPU. Its raw vector on layers 12-18 answers the prompt below the edge and drifts
    # into fluent off-topic text beyond (perplexity misses it, relevance does not; docs/results.md, measured on
    # the 85 bundled contexts, edge C ~3). Over 64 branching suffixes the vector is ~4x shorter (read mid-answer,
    # the persona moves the state less) and its edge moved to C ~10, hence alphas 4-6x the old (2, 3, 4): with
    # (8, 12, 16) the kappa-1 probe passed by luck (6/8) and collection at kappa 1 kept 22/48; with (12, 16, 20)
    # it kept 2/8 and the walk bracketed the edge at kappa 0.605 (C 7-12), collection keeping 13/16.
    "small": dict(
        model=("smollm2-135m", "ours: a real instruct model that runs on CPU"),
        steer_layers=((0.4, 0.6), "ours: layers 12-18 of 30 (docs/results.md)"),
        alphas=((12.0, 16.0, 20.0), "ours: kappa 1 past the edge of SmolLM2's 64-pair vector (kept 8/8 at C 8, 4/8 "
                                    "at 12, 3/8 at 16; the bundled vector's edge was C ~3); a round's walk: edge at kappa 0.6"),
        n_rounds=(3, "ours: CPU time"), n_prompts=(32, "ours: the bundled prompts"), n_keep=(24, "ours: CPU time"),
        min_train=(8, "ours: a third of n_keep"), probe_size=(8, "S3"), dose_target=(0.75, "S3"), kappa_min=(0.2, "S3"),
        bisect_steps=(4, "ours: CPU time"), max_new_tokens=(48, "ours: CPU time"), max_len=(192, "ours: prompt + 48 tokens"),
        collect_size=(16, "ours: CPU time"), gen_batch=(16, "ours: batch size only"), ppl_tau=(40.0, "ours: SmolLM2's edge (docs/results.md)"),
        rel_tau=(0.1, "ours: off-topic drift at C > 2 (docs/results.md)"),
        loop_tau=(0.5, "ours: as the GPU presets; measured on SmolLM2 (docs/usage.md)"),
        n_extract_pairs=(64, "ours: S1 S3's branching suffixes, 64 of 256 for CPU time"),
        epochs=(2, "ours: CPU time"), batch_size=(4, "ours: CPU time"), dtype=("float32", "ours: CPU"),
        fold_history=(True, "ours: docs/performance.md"),
    ),
    # Tiny random model: garbage numbers, every code path, a few minutes on 2 CPU cores. Its unit vector
    # moves base perplexity from ~800 (C = 0) to ~1000 (C >= 1), so ppl_tau 950 puts an edge in the walk's range.
    # Its random text is no language: the loop gate and the suffix file stay off.
    "fast-dev": {k: (v, "ours: every code path on a tiny random model") for k, v in dict(
        model="tiny-random", n_rounds=2, n_prompts=8, n_keep=8, min_train=4, probe_size=4, normalize=True,
        bisect_steps=2, max_batches=3, collect_size=8, gen_batch=8, max_new_tokens=16, max_len=96,
        ppl_tau=950.0, rep_tau=0.9, ppl_window=0, epochs=1, batch_size=4, n_vignettes=14,
        eval_batch=16, n_demo=4, lr=1e-3,
        # at chance on every probe (spec.md "Informative probes"): gated, every ratio would be withheld and its
        # code path never run, so fast-dev stores and shows the verdicts only
        probe_gate=False,
    ).items()},
}

PRESETS: dict[str, dict[str, Any]] = {name: {k: v for k, (v, _) in p.items()} for name, p in SOURCED.items()}
# Presets that no longer exist, and what to use instead (a stored run started with one reads back as it ran:
# its config is stored whole).
RETIRED = {"journal": "it matched no source (docs/usage.md): use s2-headline (S2's coherent 8 rounds), "
                      "s4-next (S4's next experiment) or s1-journal (S1, the generation guards)"}
REAL = ("s2-headline", "s4-next", "s1-journal", "small")  # the real-model presets, whose every value is sourced


def preset(name: str) -> dict[str, Any]:
    if name in RETIRED:
        raise UserError(f"preset {name!r} was retired: {RETIRED[name]}")
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: must be one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return " ".join(map(_fmt, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def _grid(rows: list[list[str]], md: bool) -> str:
    if md:
        out = ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out[:1] + ["|" + "---|" * len(rows[0])] + out[1:])
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows)


def preset_table(md: bool = False) -> str:
    """Every knob some preset sets, with its value under the defaults and under each preset, side by side
    (`python -m steer_heal --help` prints it; docs/usage.md holds the markdown form, checked by a test)."""
    names = [f.name for f in fields(Config) if any(f.name in p for p in PRESETS.values())]
    d = Config()
    rows = [["knob", "default", *PRESETS]] + [
        [n, _fmt(getattr(d, n)), *(_fmt(p.get(n, getattr(d, n))) for p in PRESETS.values())] for n in names]
    return _grid(rows, md)


def source_table(name: str, md: bool = False) -> str:
    """One preset's knobs: value and source, in Config's field order."""
    p = SOURCED[name]
    rows = [["knob", "value", "source"]] + [[f.name, _fmt(p[f.name][0]), p[f.name][1]]
                                            for f in fields(Config) if f.name in p]
    return _grid(rows, md)

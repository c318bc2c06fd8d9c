"""Every knob of a steer-heal run, in one typed dataclass.

A field's metadata carries its help text and, where the set is closed, its
allowed values; the CLI (cli.py) builds one flag per field from this, so
adding a knob here is the whole job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

REGS = ("nll", "kl_fwd", "kl_rev")
KL_AGGS = ("mean", "rmse", "p95", "max")
BARRIER_REFS = ("base", "prev")
DTYPES = ("auto", "float32", "bfloat16", "float16")
FOUNDATIONS = ("Care", "Fairness", "Loyalty", "Authority", "Sanctity", "Liberty", "SocialNorms")
EVALS = ("mfv", "contrast", "both")
CONTROLS = ("none", "c0", "random")

# Fields that say where/how a run executes, not what the experiment is. They are
# left out of the config hash and may change on resume (n_rounds may only grow).
RUNTIME_FIELDS = ("out", "run_id", "device", "n_rounds", "resume", "log_level")


class ConfigError(ValueError):
    """A bad config value; the message names the field, the value and what is allowed."""


def knob(default: Any, help: str, choices: tuple | None = None) -> Any:
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple default")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    # model
    model: str = knob("google/gemma-3-4b-it", "HF id, local dir, .gguf path, or preset tiny-random[-qwen3|-llama|-gemma3|-gemma3mm] / smollm2-135m")
    gguf_file: str = knob("", "GGUF file name inside --model when --model is a directory")
    dtype: str = knob("auto", "weights dtype (auto: bfloat16 on GPU, float32 on CPU)", DTYPES)
    device: str = knob("auto", "torch device (auto: cuda if present else cpu)")
    attn_impl: str = knob("sdpa", "attention implementation passed to transformers (sdpa|eager|flash_attention_2)")
    trust_remote_code: bool = knob(False, "allow model repos to run their own code (off: safer)")
    # persona and prompts
    persona: str = knob("care_vs_authority", "bundled persona pair (see src/steer_heal/data/personas.json)")
    persona_pos: str = knob("", "override the pair's positive persona text")
    persona_neg: str = knob("", "override the pair's negative persona text")
    steer_system: str = knob("{persona}", "system prompt used for extraction; {persona} is replaced by the persona text")
    gen_system: str = knob("", "system prompt for steered generation, training data and eval ('' = the pair's neutral prompt)")
    # steering
    steer_layers: tuple[float, float] = knob((0.4, 0.6), "steering layer band as fractions of depth [lo, hi], inclusive")
    normalize: bool = knob(False, "unit-normalise the vector per layer (raw mean difference by default)")
    alphas: tuple[float, ...] = knob((1.0,), "dose multipliers: each batch samples at C = kappa * alpha, cycling the alphas; "
                                      "kappa 1 (the walk's first probe) should break the model")
    control: str = knob("none", "control run: none (the treatment), c0 (generate unsteered, C = 0: self-distillation), "
                        "random (an equal-norm random vector, seeded, the same each round)", CONTROLS)
    # dose walk
    dose_target: float = knob(0.75, "filter survival rate a dose-walk probe must reach to count as below the edge")
    probe_size: int = knob(8, "completions per dose-walk probe batch (they cycle the alphas)")
    kappa_min: float = knob(0.2, "bottom of the walk's range [kappa_min, 1]; settled on, untested, when no probe passes")
    bisect_steps: int = knob(6, "bisection probes on log kappa after the kappa-1 probe (fewer once hi/lo < 1.05)")
    max_batches: int = knob(8, "collection batches at the settled kappa before giving up on n_keep")
    # data sizes
    n_prompts: int = knob(32, "generation prompts used per round (cycled)")
    n_keep: int = knob(32, "survivors to bank per round")
    min_train: int = knob(8, "fewest survivors a round may train on; fewer ends the run as starved")
    max_new_tokens: int = knob(48, "tokens sampled per completion")
    max_len: int = knob(256, "longest prompt+completion in tokens for heal")
    gen_batch: int = knob(16, "generation batch size")
    temperature: float = knob(0.0, "sampling temperature (0 = the model's generation_config default)")
    top_p: float = knob(0.0, "nucleus top_p (0 = the model's default)")
    # filter
    ppl_tau: float = knob(60.0, "drop completions whose base-model perplexity exceeds this")
    rep_tau: float = knob(0.3, "drop completions whose max n-gram frequency (word or char, n=2..4) exceeds this")
    ppl_window: int = knob(32, "score perplexity on the last N completion tokens (0 = whole completion)")
    rel_tau: float = knob(0.0, "drop completions whose prompt relevance (mean log-prob per token under base given "
                          "their prompt minus given another prompt) is below this; 0 = record it, drop nothing")
    # heal
    reg: str = knob("kl_rev", "barrier: nll (none), kl_fwd KL(ref||theta), kl_rev KL(theta||ref)", REGS)
    kl_agg: str = knob("mean", "aggregate per-position divergence over completion tokens", KL_AGGS)
    barrier_ref: str = knob("base", "reference model: base (round-0 original) or prev (student before this round)", BARRIER_REFS)
    lam: float = knob(1.0, "barrier weight")
    tau: float = knob(0.0, "barrier hinge: only divergence above tau is penalised")
    lam_round_pow: float = knob(0.0, "barrier weight grows as lam * (1 + round) ** pow")
    weight_decay: float = knob(0.0, "AdamW weight decay on the adapter")
    spectral_lam: float = knob(0.0, "weight of the operator-norm penalty: mean over LoRA modules of sigma_max(scale B A)")
    lora_r: int = knob(8, "LoRA rank")
    lora_alpha: float = knob(16.0, "LoRA alpha")
    lora_layers: tuple[float, float] = knob((0.0, 1.0), "LoRA layer band as fractions of depth [lo, hi], inclusive")
    epochs: int = knob(2, "heal epochs over the kept completions")
    batch_size: int = knob(4, "heal batch size")
    grad_accum: int = knob(1, "gradient accumulation steps")
    lr: float = knob(2e-4, "heal learning rate")
    warmup: float = knob(0.1, "warmup fraction of heal steps (cosine after)")
    betas: tuple[float, float] = knob((0.9, 0.999), "AdamW betas")
    grad_clip: float = knob(1.0, "gradient norm clip")
    ref_cache_mb: int = knob(1024, "keep the reference log-probs across heal epochs up to this many MB (0 = recompute every step)")
    gnorm_every: int = knob(10, "log the sft and barrier gradient norms apart every N micro-batches (a second backward there; 0 = never)")
    val_frac: float = knob(0.125, "fraction of kept completions held out for val nll")
    # eval
    vignettes: str = knob("", "vignette JSONL in the Clifford shape ('' = bundled smoke set)")
    n_vignettes: int = knob(0, "vignettes to evaluate (0 = all)")
    think_tokens: int = knob(0, "greedy tokens the model may think before the forced answer")
    target: str = knob("", "target foundation ('' = the persona pair's)", ("",) + FOUNDATIONS)
    direction: str = knob("", "direction the target should move: down|up ('' = the pair's)", ("", "down", "up"))
    eval: str = knob("both", "evaluators: mfv (seven-way choice), contrast (trait_nats), both", EVALS)
    evaluator: str = knob("builtin", "seven-way probe implementation: builtin, or tinymfv when that package is importable", ("builtin", "tinymfv"))
    steerer: str = knob("builtin", "steering hooks: builtin, or steering-lite when that package is importable", ("builtin", "steering-lite"))
    eval_batch: int = knob(16, "eval batch size")
    n_demo: int = knob(2, "greedy demo generations per stage")
    # loop
    n_rounds: int = knob(3, "rounds of steer -> generate -> filter -> heal -> bake")
    coh_floor: float = knob(0.0, "stop early when healed coherence falls under this")
    seed: int = knob(0, "master seed; every stage derives its own from (seed, round, stage)")
    out: str = knob("out", "store root")
    run_id: str = knob("", "run id ('' = generated)")
    resume: str = knob("", "resume this run id")
    log_level: str = knob("INFO", "loguru level")

    def replace(self, **kw: Any) -> Config:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def experiment(self) -> dict:
        """The fields that define the experiment (what resume must not change)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    def hash(self) -> str:
        blob = json.dumps(self.experiment(), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self) -> Config:
        def bad(name: str, allowed: str) -> None:
            raise ConfigError(f"config {name}={getattr(self, name)!r} is invalid: must be {allowed}")

        for f in fields(self):
            ch = f.metadata.get("choices")
            if ch and getattr(self, f.name) not in ch:
                bad(f.name, "one of " + ", ".join(repr(c) for c in ch))
        for name in ("steer_layers", "lora_layers"):
            band = getattr(self, name)
            if len(band) != 2 or not (0.0 <= band[0] <= band[1] <= 1.0):
                bad(name, "two fractions lo <= hi inside [0, 1], e.g. 0.4 0.6")
        if not self.alphas or any(a <= 0 for a in self.alphas):
            bad("alphas", "one or more positive numbers")
        if not self.model.strip():
            bad("model", "a model id, path or preset")
        for name in ("dose_target", "val_frac", "warmup"):
            if not 0.0 <= getattr(self, name) <= 1.0 or (name != "dose_target" and getattr(self, name) == 1.0):
                bad(name, "a fraction in [0, 1]" if name == "dose_target" else "a fraction in [0, 1)")
        if not 0.0 < self.kappa_min <= 1.0:
            bad("kappa_min", "in (0, 1]")
        for name in ("probe_size", "n_prompts", "n_keep", "min_train", "max_new_tokens", "max_len",
                     "gen_batch", "lora_r", "epochs", "batch_size", "grad_accum", "eval_batch", "n_rounds"):
            if getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        for name in ("bisect_steps", "max_batches", "gnorm_every", "ref_cache_mb", "ppl_window", "n_vignettes", "think_tokens", "n_demo", "seed"):
            if getattr(self, name) < 0:
                bad(name, "an integer >= 0")
        for name in ("lam", "tau", "weight_decay", "spectral_lam", "temperature", "top_p", "coh_floor", "grad_clip",
                     "rel_tau"):
            if getattr(self, name) < 0:
                bad(name, "a number >= 0")
        if self.n_keep < self.min_train:
            bad("n_keep", f">= min_train ({self.min_train}); lower --min-train or raise --n-keep")
        if self.lr <= 0 or self.ppl_tau <= 0 or self.rep_tau <= 0 or self.lora_alpha <= 0:
            bad(next(n for n in ("lr", "ppl_tau", "rep_tau", "lora_alpha") if getattr(self, n) <= 0), "a number > 0")
        if not all(0.0 <= b < 1.0 for b in self.betas) or len(self.betas) != 2:
            bad("betas", "two numbers in [0, 1)")
        if bool(self.persona_pos.strip()) != bool(self.persona_neg.strip()):
            bad("persona_neg" if self.persona_pos.strip() else "persona_pos",
                "non-empty, given together with the other persona text (both or neither)")
        if "{persona}" not in self.steer_system:
            bad("steer_system", "a template containing {persona}")
        return self


PRESETS: dict[str, dict[str, Any]] = {
    # Tiny random model: garbage numbers, every code path, a few minutes on 2 CPU cores. Its unit vector
    # moves base perplexity from ~800 (C = 0) to ~1000 (C >= 1), so ppl_tau 950 puts an edge in the walk's range.
    "fast-dev": dict(
        model="tiny-random", n_rounds=2, n_prompts=8, n_keep=8, min_train=4, probe_size=4, normalize=True,
        bisect_steps=2, max_batches=3, gen_batch=8, max_new_tokens=16, max_len=96,
        ppl_tau=950.0, rep_tau=0.9, ppl_window=0, epochs=1, batch_size=4, n_vignettes=14,
        eval_batch=16, n_demo=1, lr=1e-3,
    ),
    # SmolLM2-135M-Instruct on CPU. Its raw vector on layers 12-18 answers the prompt to C~1-2 and drifts
    # into fluent off-topic text beyond (perplexity misses it, relevance does not): the filter at rel_tau 0.1
    # keeps ~80% at C 1.5-2.25, ~15-20% at C 3 and ~5% at C 4 (docs/results.md). The journal's alphas
    # (0.5, 0.75, 1) times 4 put kappa 1 above that edge, so the walk walks down to it.
    "small": dict(
        model="smollm2-135m", steer_layers=(0.4, 0.6), alphas=(2.0, 3.0, 4.0), n_rounds=3, n_prompts=32,
        n_keep=24, min_train=8, probe_size=8, dose_target=0.75, kappa_min=0.2, bisect_steps=4,
        max_new_tokens=48, max_len=192, gen_batch=16, ppl_tau=40.0, rel_tau=0.1, epochs=2, batch_size=4,
        dtype="float32",
    ),
    # The recipe the method's research journal settled on, for a GPU (gemma-3-4b-it, 34 layers): kl_rev
    # with rmse aggregation and tau 2 just below the heal's operating KL (~3 nats there), lam 0.3 decaying
    # as (1 + round)^-0.5, a spectral penalty averaged over modules, the barrier to the previous student
    # (to base it pulls baked history back out), 512-token generations, 128 thinking tokens before the
    # eval's answer, a 3-layer steering band (layers 15-17), LoRA r 32 on blocks 0.2-0.8, and the walk on
    # [0.2, 1] with the alphas (0.5, 0.75, 1) and a 0.75 survival target. Give it the 132 Clifford
    # vignettes (`just run` does when ../shared/data has them).
    "journal": dict(
        model="google/gemma-3-4b-it", steer_layers=(0.45, 0.5), alphas=(0.5, 0.75, 1.0), control="none",
        dose_target=0.75, probe_size=8, kappa_min=0.2, bisect_steps=6, max_batches=8,
        n_prompts=16, n_keep=64, min_train=30, max_new_tokens=512, max_len=1024, gen_batch=16,
        temperature=1.0, top_p=0.95, ppl_tau=50.0, rep_tau=0.3, ppl_window=128, rel_tau=0.0,
        reg="kl_rev", kl_agg="rmse", barrier_ref="prev", lam=0.3, tau=2.0, lam_round_pow=-0.5,
        spectral_lam=0.01, weight_decay=0.0, lora_r=32, lora_alpha=64.0, lora_layers=(0.2, 0.8),
        epochs=6, batch_size=3, grad_accum=2, lr=1e-4, warmup=0.1, betas=(0.9, 0.95), grad_clip=1.0,
        think_tokens=128, n_vignettes=0, eval_batch=8, n_rounds=8, coh_floor=0.95,
    ),
}


def preset_table(md: bool = False) -> str:
    """Every knob some preset sets, with its value under the defaults and under each preset, side by side
    (`python -m steer_heal --help` prints it; docs/usage.md holds the markdown form, checked by a test)."""
    names = [f.name for f in fields(Config) if any(f.name in p for p in PRESETS.values())]
    show = lambda v: " ".join(map(_fmt, v)) if isinstance(v, tuple) else _fmt(v)  # noqa: E731
    rows = [["knob", "default", *PRESETS]] + [
        [n, show(getattr(Config(), n)), *(show(p.get(n, getattr(Config(), n))) for p in PRESETS.values())]
        for n in names]
    if md:
        out = ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out[:1] + ["|" + "---|" * len(rows[0])] + out[1:])
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows)


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: must be one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])

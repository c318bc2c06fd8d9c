"""Every knob of a steer-heal run, in one typed dataclass.

A field's metadata carries its help text and, where the set is closed, its
allowed values; the CLI (cli.py) builds one flag per field from this, so
adding a knob here is the whole job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import UserError
from .files import safe_name

REGS = ("nll", "kl_fwd", "kl_rev")
KL_AGGS = ("mean", "rmse", "p95", "max")
BARRIER_REFS = ("base", "prev")
DTYPES = ("auto", "float32", "bfloat16", "float16")
FOUNDATIONS = ("Care", "Fairness", "Loyalty", "Authority", "Sanctity", "Liberty", "SocialNorms")
EVALS = ("mfv", "contrast", "both")
CONTROLS = ("none", "c0", "random")

# Fields that say where and how long a run executes: the same for every cell of a sweep (sweep/grid.py).
RUNTIME_FIELDS = ("out", "run_id", "device", "n_rounds", "resume", "log_level", "bf16_force")
# The experiment, grouped by the stage that reads it (`--help` shows these groups), then Exec: how it is
# computed. Exec is left out of the config hash and a resume may change it (run.resume_config logs what
# changed, loudly where the numbers move: bf16 by ~0.01 nats; the rest by float rounding, docs/usage.md).
# n_rounds is the run's length: unhashed, and it may only grow on resume.
GROUPS = {
    "model": ("model", "gguf_file", "dtype", "chat_template"),
    "persona": ("persona", "persona_pos", "persona_neg", "steer_system", "gen_system"),
    "steering": ("steer_layers", "n_extract_pairs", "suffix_file", "normalize", "alphas", "control", "yoke", "steerer"),
    "dose": ("dose_target", "probe_size", "kappa_min", "bisect_steps", "max_batches", "collect_size"),
    "data": ("n_prompts", "n_keep", "min_train", "max_new_tokens", "max_len", "temperature", "top_p",
             "repetition_penalty", "no_repeat_ngram"),
    "filter": ("ppl_tau", "rep_tau", "ppl_window", "loop_tau", "loop_window", "rel_tau"),
    "heal": ("reg", "kl_agg", "barrier_ref", "lam", "tau", "lam_round_pow", "weight_decay", "spectral_lam", "lora_r",
             "lora_alpha", "lora_layers", "lora_targets", "epochs", "batch_size", "grad_accum", "lr", "warmup", "betas",
             "grad_clip", "val_frac"),
    "probes": ("vignettes", "frame", "n_vignettes", "think_tokens", "target", "direction", "eval", "evaluator", "n_demo",
               "demo_tokens", "coh_floor_rel", "ppl_floor_rel", "probe_gate", "boot"),
    "loop": ("n_rounds", "coh_floor", "seed"),
    "exec": ("device", "attn_impl", "trust_remote_code", "gen_batch", "eval_batch", "reuse_prefix", "bf16",
             "bf16_force", "fold_history", "ref_cache_mb", "gnorm_every", "out", "run_id", "resume", "log_level"),
}
EXEC_FIELDS = GROUPS["exec"]
UNHASHED = frozenset(EXEC_FIELDS) | {"n_rounds"}
# A stage function's part: its group plus what it reads from elsewhere (Exec included: the part says what the
# stage reads; whether a field is hashed is its group's business).
PARTS = {
    "dose": GROUPS["dose"] + ("alphas", "n_keep", "min_train", "ppl_tau", "rep_tau", "rel_tau"),
    "heal": GROUPS["heal"] + ("max_len", "bf16", "ref_cache_mb", "gnorm_every"),
    "probes": GROUPS["probes"] + ("persona", "persona_pos", "persona_neg", "gen_system", "eval_batch", "reuse_prefix",
                                  "bf16"),
    "exec": EXEC_FIELDS,
}
# Exec fields whose change moves the numbers by more than float rounding: a resume that changes one warns.
MOVES_NUMBERS = {"bf16": "bf16 autocast moves a stage delta by up to ~0.01 nats and a heal's val nll by ~2% "
                         "(docs/performance.md, part p)",
                 "device": "another device computes other float roundings, and --dtype auto picks bfloat16 "
                           "weights on a GPU, float32 on a CPU"}
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
ATTN_IMPLS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# Integers go to BIGINT columns; a seed or size past 2**63 would read back as NULL.
MAX_INT = 2**63
# C = kappa * alpha, kappa in (0, 1]: SmolLM2's text breaks from C ~ 2 (docs/results.md), so a dose past
# 1000 only tests float overflow (fp16 tops out at 65504 once multiplied by the vector's norm).
MAX_ALPHA = 1e3
# Fewer tokens than this cannot hold a chat prompt and a completion; preflight checks the real prompts.
MIN_MAX_LEN = 16


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
    attn_impl: str = knob("sdpa", "attention implementation passed to transformers", ATTN_IMPLS)
    trust_remote_code: bool = knob(False, "allow model repos to run their own code (off: safer)")
    chat_template: str = knob("auto", "chat template: auto (the tokenizer's own; a model without one is refused), plain (User:/Assistant: lines, for base models), chatml, or a Jinja file path")
    # persona and prompts
    persona: str = knob("care_vs_authority", "bundled persona pair (see src/steer_heal/data/personas.json)")
    persona_pos: str = knob("", "override the pair's positive persona text")
    persona_neg: str = knob("", "override the pair's negative persona text")
    steer_system: str = knob("{persona}", "system prompt used for extraction; {persona} is replaced by the persona text")
    gen_system: str = knob("", "system prompt for steered generation, training data and eval ('' = the pair's neutral prompt)")
    # steering
    steer_layers: tuple[float, float] = knob((0.4, 0.6), "steering layer band as fractions of depth [lo, hi], inclusive")
    n_extract_pairs: int = knob(0, "extract over this many branching-suffix contexts from --suffix-file (a user "
                                "message and the start of an answer, read at the answer's last token), evenly spread "
                                "over the file; 0 = the 85 bundled user messages")
    suffix_file: str = knob("../shared/data/branching_suffixes.json", "branching-suffix JSON for --n-extract-pairs: "
                            "rows {user_msg, suffix}; a relative path is read from the working directory")
    normalize: bool = knob(False, "unit-normalise the vector per layer (raw mean difference by default)")
    alphas: tuple[float, ...] = knob((1.0,), "dose multipliers: each batch samples at C = kappa * alpha, cycling the alphas; "
                                      "kappa 1 (the walk's first probe) should break the model")
    control: str = knob("none", "control run: none (the treatment), c0 (generate unsteered, C = 0: self-distillation), "
                        "random (an equal-norm random vector, seeded, the same each round)", CONTROLS)
    yoke: str = knob("", "a control's treatment run (same --out, same seed and config but control): replay its banked "
                     "slots (prompts, alphas, per-slot seeds, number kept per round), changing only the coefficient "
                     "(c0: 0) or the direction (random, its coefficient calibrated to the treatment's kl_steer: iso-KL); "
                     "yoke.py. '' = unyoked: the control runs its own walk")
    # dose walk
    dose_target: float = knob(0.75, "filter survival rate a dose-walk probe must reach to count as below the edge")
    probe_size: int = knob(8, "completions per dose-walk probe batch (they cycle the alphas)")
    kappa_min: float = knob(0.2, "bottom of the walk's range [kappa_min, 1]; settled on, untested, when no probe passes")
    bisect_steps: int = knob(6, "bisection probes on log kappa after the kappa-1 probe (fewer once hi/lo < 1.05)")
    max_batches: int = knob(8, "collection batches at the settled kappa before giving up on n_keep")
    collect_size: int = knob(16, "completions per collection batch at the settled kappa")
    # data sizes
    n_prompts: int = knob(32, "generation prompts used per round (cycled)")
    n_keep: int = knob(32, "survivors to bank per round")
    min_train: int = knob(8, "fewest survivors a round may train on; fewer ends the run as starved")
    max_new_tokens: int = knob(48, "tokens sampled per completion")
    max_len: int = knob(256, "longest prompt+completion in tokens for heal (fast-dev sizes it to the tokenizer unless set)")
    gen_batch: int = knob(16, "generation batch size (how many slots share a forward; each slot samples from its own seed, so the text does not depend on it); 0 = auto: the largest that fits the GPU's free memory at run time (memory.py; 16 on a CPU)")
    temperature: float = knob(0.0, "sampling temperature (0 = the model's generation_config default)")
    top_p: float = knob(0.0, "nucleus top_p (0 = the model's default)")
    repetition_penalty: float = knob(1.0, "divide (multiply, when negative) the logit of every token already in the prompt "
                                     "or completion by this before sampling, per slot (1 = off); every generation: "
                                     "completions, probes, demos")
    no_repeat_ngram: int = knob(0, "never sample a token that would repeat an n-gram of this size already in the "
                                "prompt or completion, per slot (0 = off); every generation")
    # filter
    ppl_tau: float = knob(60.0, "drop completions whose base-model perplexity exceeds this")
    rep_tau: float = knob(0.3, "drop completions whose max n-gram frequency (word or char, n=2..4) exceeds this")
    ppl_window: int = knob(32, "score perplexity on the last N completion tokens (0 = whole completion)")
    loop_tau: float = knob(0.0, "drop completions whose distinct-token ratio (distinct / all tokens over the last "
                           "--loop-window tokens) is below this: a low-perplexity token loop (0 = record it, drop nothing)")
    loop_window: int = knob(64, "tokens the loop gate reads at the completion's end (shorter completions: all of them)")
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
    lora_targets: tuple[str, ...] = knob(("auto",), "linears the LoRA adapts in the band's decoder layers: auto (all: attention and MLP, fused ones included) or name suffixes, e.g. q_proj v_proj")
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
    vignettes: str = knob("", "vignette JSONL: Clifford or tinymfv rows, docs/usage.md ('' = bundled smoke set)")
    frame: str = knob("", "vignette frame: other (someone else violates, 'You see ...'), self (you do); '' = from the file name or the texts", ("", "other", "self"))
    n_vignettes: int = knob(0, "vignettes to evaluate (0 = all)")
    think_tokens: int = knob(0, "greedy tokens the model may think before the forced answer")
    target: str = knob("", "target foundation ('' = the persona pair's)", ("",) + FOUNDATIONS)
    direction: str = knob("", "direction the target should move: down|up ('' = the pair's)", ("", "down", "up"))
    eval: str = knob("both", "evaluators: mfv (seven-way choice), contrast (trait_nats), both", EVALS)
    evaluator: str = knob("builtin", "seven-way probe implementation: builtin, or tinymfv when that package is importable", ("builtin", "tinymfv"))
    steerer: str = knob("builtin", "steering hooks: builtin, or steering-lite when that package is importable", ("builtin", "steering-lite"))
    eval_batch: int = knob(16, "eval batch size; 0 = auto, as --gen-batch (the numbers move by float rounding only)")
    reuse_prefix: bool = knob(True, "score a prompt's answers (both option orders, both replies) on one pass of the prompt, its KV cache reused; full-attention models only (off: one full forward per answer, the old path; the same numbers to ~1e-6)")
    bf16: str = knob("auto", "bf16 autocast: auto (the heal on a GPU, nothing on a CPU), off, eval (the probes), heal, both. "
                     "Faster only with bf16 matrix units (AVX512-BF16 or AMX on x86, any recent GPU): eval 1.96x, heal "
                     "1.53x on a 2-vCPU AVX512-BF16 box; many times slower without them, so a CPU run times a matmul "
                     "first and refuses a slower bf16. Nats off by ~0.01-0.03 (docs/performance.md, part p)",
                     ("auto", "off", "eval", "heal", "both"))
    bf16_force: bool = knob(False, "run --bf16 eval|heal|both even where the start-up rate check finds bf16 matmul "
                            "slower than fp32 on this CPU")
    n_demo: int = knob(16, "greedy generations per stage on held-out prompts, scored under the base model: adapter_ppl (0 = none)")
    demo_tokens: int = knob(0, "tokens per free-text generation (0 = --max-new-tokens)")
    coh_floor_rel: float = knob(0.85, "a stage whose seven-way coherence (or most items' option mass) falls under this fraction of base's is flagged broken and its retain, retain_trait, coh_cost, surgical are withheld (0 = off)")
    ppl_floor_rel: float = knob(3.0, "a stage whose free-text adapter_ppl is above this multiple of base's, with the 95% paired bootstrap interval of the ratio wholly above it, is flagged broken like one under --coh-floor-rel: the floor that works on models the seven-way probe cannot read (0 = off; 3: on SmolLM2 the walk's edge, C 8-12, writes fluent text at 1.9-2.8x, C 16 drifts at 4.6x: spec.md \"The coherence floor\")")
    probe_gate: bool = knob(True, "rest no coherence floor and no ratio on a probe the base eval finds at chance on this model (probe_info, spec.md \"Informative probes\"); off: the verdicts are still stored and shown")
    boot: int = knob(2000, "paired bootstrap resamples behind every 95% interval of a stage delta (0 = no intervals)")
    # loop
    n_rounds: int = knob(3, "rounds of steer -> generate -> filter -> heal -> bake")
    fold_history: bool = knob(False, "fold baked adapters into the weights when the next round starts, and run the frozen stages (extract, dose, evals) on the live adapter merged in, so a forward costs the same at round 10 as the plain model; base stays bitwise (originals swapped back), the student within ~1e-5 of the gated stack (off: every adapter gated, the old path)")
    coh_floor: float = knob(0.0, "stop the run when healed seven-way coherence falls under this absolute value (0 = never; the ratio guard is --coh-floor-rel)")
    seed: int = knob(0, "master seed; every stage derives its own from (seed, round, stage)")
    out: str = knob("out", "store root")
    run_id: str = knob("", "run id ('' = generated)")
    resume: str = knob("", "resume this run id")
    log_level: str = knob("INFO", "loguru level: " + ", ".join(LOG_LEVELS))

    def replace(self, **kw: Any) -> Config:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise UserError(f"unknown config field(s) {unknown}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if "collect_size" not in kw and "gen_batch" in kw:  # stored before collect_size: gen_batch set it
            kw["collect_size"] = kw["gen_batch"]
        return cls(**kw)

    def experiment(self) -> dict:
        """The fields that define the experiment (what resume must not change): all but Exec and n_rounds."""
        return {k: v for k, v in self.to_dict().items() if k not in UNHASHED}

    def grouped(self) -> dict[str, dict]:
        """{group: {field: value}}: the experiment by stage, then exec (GROUPS)."""
        return {g: {k: getattr(self, k) for k in names} for g, names in GROUPS.items()}

    def part(self, name: str) -> Any:
        """The frozen slice of this config a stage function takes (PARTS): heal() gets part("heal")."""
        return _PART_TYPES[name](**{k: getattr(self, k) for k in PARTS[name]})

    @property
    def exec(self) -> Any:
        """How this run computes (Exec): unhashed, free to change on resume."""
        return self.part("exec")

    def hash(self) -> str:
        blob = json.dumps(self.experiment(), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self) -> Config:
        """Every knob checked in one place: its type, finite, in range. The CLI, a stored config read back
        and a diagnostic's grid all come through here, so NaN, inf or a typo never reaches a stage."""
        _check_types(self)
        _check_ranges(self)
        _check_texts(self)
        return self


def _bad(cfg: Config, name: str, allowed: str) -> None:
    raise UserError(f"config {name}={getattr(cfg, name)!r} is invalid: must be {allowed}")


def _check_types(cfg: Config) -> None:
    """Each field's type (tuples element by element), finite numbers, and its closed set of choices."""
    hints = typing.get_type_hints(Config)
    for f in fields(cfg):
        v, t = getattr(cfg, f.name), hints[f.name]
        if typing.get_origin(t) is tuple:
            args = typing.get_args(t)
            each = (lambda x: isinstance(x, str)) if args[0] is str else _is_num
            ok = isinstance(v, tuple) and all(each(x) for x in v) and (args[-1] is Ellipsis or len(v) == len(args))
            if not ok:
                what = "strings" if args[0] is str else "finite numbers"
                _bad(cfg, f.name, f"{'one or more' if args[-1] is Ellipsis else len(args)} {what}")
        elif t is float and not _is_num(v):
            _bad(cfg, f.name, "a finite number")
        elif t is int and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_INT):
            _bad(cfg, f.name, "an integer in [0, 2**63)")
        elif t in (bool, str) and type(v) is not t:
            _bad(cfg, f.name, "true or false" if t is bool else "a string")
        ch = f.metadata.get("choices")
        if ch and v not in ch:
            _bad(cfg, f.name, "one of " + ", ".join(repr(c) for c in ch))


def _check_ranges(cfg: Config) -> None:
    """Numbers inside what the method can use (fractions, positive sizes, a band lo <= hi), and plain names."""
    bad = lambda name, allowed: _bad(cfg, name, allowed)  # noqa: E731
    for name in ("steer_layers", "lora_layers"):
        band = getattr(cfg, name)
        if not (0.0 <= band[0] <= band[1] <= 1.0):
            bad(name, "two fractions lo <= hi inside [0, 1], e.g. 0.4 0.6")
    if not cfg.alphas or any(not 0 < a <= MAX_ALPHA for a in cfg.alphas):
        bad("alphas", f"one or more positive numbers up to {MAX_ALPHA:g}")
    if not cfg.lora_targets or ("auto" in cfg.lora_targets and len(cfg.lora_targets) > 1):
        bad("lora_targets", "auto, or module-name suffixes such as q_proj v_proj (not both)")
    if not cfg.model.strip():
        bad("model", "a model id, path or preset")
    for name in ("run_id", "resume"):
        if getattr(cfg, name) and not safe_name(getattr(cfg, name)):
            bad(name, "a plain name: letters, digits and . _ + = - (no '/', not starting with '.')")
    if cfg.yoke and (cfg.control == "none" or not safe_name(cfg.yoke)):
        bad("yoke", "a treatment's run id, given with --control c0|random")
    if cfg.log_level.upper() not in LOG_LEVELS:
        bad("log_level", "one of " + ", ".join(LOG_LEVELS) + " (any case)")
    for name in ("dose_target", "top_p", "coh_floor"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            bad(name, "a fraction in [0, 1]")
    for name in ("val_frac", "warmup"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            bad(name, "a fraction in [0, 1)")
    if not 0.0 <= cfg.coh_floor_rel <= 1.0:
        bad("coh_floor_rel", "a fraction of base coherence in [0, 1]")
    if not (cfg.ppl_floor_rel == 0 or 1.0 <= cfg.ppl_floor_rel < math.inf):
        bad("ppl_floor_rel", "0 (off) or a finite multiple of base adapter_ppl >= 1")
    if cfg.repetition_penalty <= 0:
        bad("repetition_penalty", "a number > 0 (1 = off; S1 used 1.3)")
    if cfg.loop_tau > 1.0:
        bad("loop_tau", "a distinct-token ratio in [0, 1] (0 = off)")
    if cfg.loop_tau > 0 and cfg.loop_window < 8:
        bad("loop_window", "an integer >= 8 while --loop-tau is on (a shorter tail cannot show a loop)")
    if not 0.0 < cfg.kappa_min <= 1.0:
        bad("kappa_min", "in (0, 1]")
    for name in ("probe_size", "collect_size", "n_prompts", "n_keep", "min_train", "max_new_tokens", "lora_r",
                 "epochs", "batch_size", "grad_accum", "n_rounds"):
        if getattr(cfg, name) < 1:
            bad(name, "an integer >= 1")
    if cfg.max_len < MIN_MAX_LEN:
        bad("max_len", f"an integer >= {MIN_MAX_LEN} (a chat prompt plus some completion tokens)")
    for name in ("lam", "tau", "weight_decay", "spectral_lam", "temperature", "rel_tau", "loop_tau"):
        if getattr(cfg, name) < 0:
            bad(name, "a number >= 0")
    if cfg.n_keep < cfg.min_train:
        bad("n_keep", f">= min_train ({cfg.min_train}); lower --min-train or raise --n-keep")
    for name in ("lr", "ppl_tau", "rep_tau", "lora_alpha", "grad_clip"):
        if getattr(cfg, name) <= 0:
            bad(name, "a number > 0" + (" (a huge value such as 1e9 turns clipping off)" if name == "grad_clip" else ""))
    if not all(0.0 <= b < 1.0 for b in cfg.betas):
        bad("betas", "two numbers in [0, 1)")


def _check_texts(cfg: Config) -> None:
    """Names, persona texts and the steer_system template."""
    bad = lambda name, allowed: _bad(cfg, name, allowed)  # noqa: E731
    if bool(cfg.persona_pos.strip()) != bool(cfg.persona_neg.strip()):
        bad("persona_neg" if cfg.persona_pos.strip() else "persona_pos",
            "non-empty, given together with the other persona text (both or neither)")
    try:
        ok = "\0" in cfg.steer_system.format(persona="\0")
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        bad("steer_system", "a template containing {persona} and no other {field} (write {{ }} for braces)")


def _part_type(name: str, names: tuple[str, ...]) -> type:
    """A frozen dataclass of Config's fields `names`, with their types, defaults and help."""
    by = {f.name: f for f in fields(Config)}
    cls = dataclasses.make_dataclass(name, [(n, by[n].type, field(default=by[n].default, metadata=by[n].metadata))
                                            for n in names], frozen=True)
    cls.__module__ = __name__  # its string annotations resolve here (typing.get_type_hints)
    return cls


_PART_TYPES = {name: _part_type(cls, PARTS[name]) for name, cls in
               (("dose", "DoseCfg"), ("heal", "HealCfg"), ("probes", "ProbeCfg"), ("exec", "Exec"))}
DoseCfg, HealCfg, ProbeCfg, Exec = (_PART_TYPES[n] for n in ("dose", "heal", "probes", "exec"))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

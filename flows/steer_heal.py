"""The steer-heal Prefect flow: wires the stages, records what they return, resumes.

Round -1: base and prompted evals + base demo. Rounds 0..N-1: extract, dose walk
(generate + filter), steered eval, heal, bake, healed eval, demos, each a task.
The model lives in this process (`S`) and is never a task argument; the store,
not Prefect's cache, is what resume reads.
"""

from __future__ import annotations

import os
import signal
import time

from loguru import logger
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from steer_heal import backends, data, metrics
from steer_heal.bake import Stack, lora_config
from steer_heal.config import FOUNDATIONS, Config
from steer_heal.dose import Starved, dose_walk
from steer_heal.extract import cosine, extract, load_vector, save_vector, student_vector
from steer_heal.filter import drop_counts, score
from steer_heal.generate import generate
from steer_heal.heal import HealError, heal
from steer_heal.models import band, get_layers, load_model
from steer_heal.report import by_stage, round_table, write_report
from steer_heal.seeds import seed_for
from steer_heal.store import RunLog

# The rows each stage writes for its round (table, which rows): resume drops a crashed stage's partial rows.
STAGE_ROWS = {
    "dose": [("completions", lambda x: x["phase"] in ("probe", "collect")), ("dose_steps", lambda x: True)],
    "eval_steered": [("stage_metrics", lambda x: x["stage"] == "steered")],
    "heal": [("heal_steps", lambda x: True)],
    "eval_healed": [("stage_metrics", lambda x: x["stage"] == "healed"),
                    ("completions", lambda x: x["phase"].startswith("demo"))],
}


class State:
    """Worker-process state for one run: config, model, stack, store handle, inputs."""

    def __init__(self, cfg: Config, run_id: str):
        self.cfg, self.log = cfg, RunLog(cfg.out, run_id)
        model, self.tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, attn_impl=cfg.attn_impl,
                                     trust_remote_code=cfg.trust_remote_code, gguf_file=cfg.gguf_file,
                                     cache=f"{cfg.out}/models")
        self.stack = Stack(model)
        n = len(get_layers(model))
        self.layers = band(cfg.steer_layers, n)
        self.lora = lora_config(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_layers)
        self.persona = data.persona(cfg)
        self.system = cfg.gen_system or self.persona["neutral"]
        self.contexts = data.contexts()
        self.prompts = data.prompts(cfg.n_prompts)
        self.vignettes = data.load_vignettes(cfg.vignettes, cfg.n_vignettes)
        self.dilemmas = data.dilemmas(cfg.persona)
        self.steer = backends.steer_fn(cfg)
        self.done = {(r["round"], r["stage"]) for r in self.log.read("stages")}
        self.vectors: dict[int, dict] = {}

    def vdir(self, kind: str, r: int, ext: str = "safetensors"):
        d = self.log.dir / kind
        d.mkdir(exist_ok=True)
        return d / f"round_{r}.{ext}"

    def mark(self, r: int, stage: str, seconds: float) -> None:
        self.log.append("stages", dict(round=r, stage=stage, seconds=seconds))
        self.done.add((r, stage))

    def forget_partial(self, r: int, stage: str) -> None:
        """Drop rows a crashed attempt at this stage left behind, before redoing it."""
        for table, which in STAGE_ROWS.get(stage, ()):
            self.log.drop(table, lambda x, which=which: x["round"] == r and which(x))


S: State | None = None


def crash_point(where: str) -> None:
    """Fault injection for crash-and-resume tests: STEER_HEAL_KILL_AT=<where> SIGKILLs the
    whole process group here (the Prefect server included), like a power cut would."""
    if os.environ.get("STEER_HEAL_KILL_AT") == where:
        os.killpg(os.getpgid(0), signal.SIGKILL)


def _evals(stage: str, r: int, coef: float = 0.0, system: str | None = None) -> dict:
    """Run the configured evaluators on the model as it is now; store long-form rows, return their summary."""
    cfg, rows = S.cfg, []
    sys_ = S.system if system is None else system
    m, c = backends.run_evals(cfg, S.stack.model, S.tok, S.vignettes, S.dilemmas, sys_)
    if m is not None:
        rows += [dict(round=r, stage=stage, evaluator="mfv", foundation=f, prob=m["profile"][f], nats=m["nats"][f],
                      coherence=m["coherence"], top1_agree=m["top1_agree"], n=m["n"], coef=coef) for f in FOUNDATIONS]
    if c is not None:
        rows.append(dict(round=r, stage=stage, evaluator="contrast", foundation="trait", nats=c["trait_nats"], n=c["n"], coef=coef))
    S.log.append("stage_metrics", rows)
    return by_stage(rows)[(r, stage)]


def _demo(stage: str, r: int, vec=None, coef: float = 0.0, system: str | None = None) -> None:
    ps = S.prompts[: S.cfg.n_demo]
    if not ps:
        return
    outs = generate(S.stack.model, S.tok, ps, system=S.system if system is None else system, vec=vec,
                    coefs=[coef] * len(ps), max_new_tokens=S.cfg.max_new_tokens, greedy=True, batch=S.cfg.gen_batch,
                    steerer=S.steer)
    S.log.append("completions", [dict(round=r, phase=f"demo:{stage}", idx=i, coef=coef, prompt=p, completion=o)
                                 for i, (p, o) in enumerate(zip(ps, outs))])
    logger.info(f"demo {stage} r{r}: {ps[0]!r}\n    -> {outs[0]!r}")


def _opts(name: str):
    return dict(name=name, cache_policy=NO_CACHE, persist_result=False)


@task(**_opts("eval-base"))
def eval_base() -> None:
    t = time.time()
    with S.stack.base():
        _evals("base", -1)
        _evals("prompted", -1, system=S.cfg.steer_system.format(persona=S.persona["pos"]))
        _demo("base", -1)
    S.mark(-1, "eval_base", time.time() - t)


@task(**_opts("extract"))
def extract_task(r: int) -> dict:
    cfg, t, path = S.cfg, time.time(), S.vdir("vectors", r)
    if (r, "extract") in S.done and path.exists():
        v = load_vector(path)
    else:
        v = extract(S.stack.model, S.tok, S.persona["pos"], S.persona["neg"], S.contexts, S.layers,
                    cfg.steer_system, cfg.normalize, cfg.eval_batch)
        save_vector(v, path)
        S.mark(r, "extract", time.time() - t)
    S.vectors[r] = v
    v0 = S.vectors.get(0) or load_vector(S.vdir("vectors", 0))
    out = dict(cos_v0=cosine(v, v0), student_cos=None, sec_extract=time.time() - t)
    if r > 0:
        sv = student_vector(S.stack.model, S.tok, S.system, S.contexts, S.layers, S.stack.base, cfg.eval_batch)
        out["student_cos"] = cosine(sv, v)
    return out


@task(**_opts("dose"))
def dose_task(r: int) -> dict:
    cfg, t, v = S.cfg, time.time(), S.vectors[r]
    if (r, "dose") in S.done:
        rows = [x for x in S.log.read("completions") if x["round"] == r and x["phase"] in ("probe", "collect")]
        steps = [x for x in S.log.read("dose_steps") if x["round"] == r]
        # the walk settles on the largest accepted probe kappa (kappa_min when none passed)
        kappa = max((x["kappa"] for x in steps if x["accepted"]), default=cfg.kappa_min)
        kept = [x for x in rows if x["keep"]][: cfg.n_keep]
        return dict(kept=kept, scored=rows, kappa=kappa, n_steps=len(steps), sec_dose=0.0)
    S.forget_partial(r, "dose")

    def sample(items: list[dict], step: int) -> list[dict]:
        outs = generate(S.stack.model, S.tok, [x["prompt"] for x in items], system=S.system, vec=v,
                        coefs=[x["coef"] for x in items], max_new_tokens=cfg.max_new_tokens,
                        seed=seed_for(cfg.seed, r, f"dose.{step}"), temperature=cfg.temperature,
                        top_p=cfg.top_p, batch=cfg.gen_batch, desc=f"r{r} {items[0]['phase']} {step}",
                        steerer=S.steer)
        crash_point(f"dose:r{r}:step{step}")
        with S.stack.base():  # perplexity under the original model, no steering
            return score(S.stack.model, S.tok, [dict(x, completion=o) for x, o in zip(items, outs)],
                         system=S.system, ppl_tau=cfg.ppl_tau, rep_tau=cfg.rep_tau, window=cfg.ppl_window,
                         max_len=cfg.max_len, batch=cfg.gen_batch)

    try:
        res = dose_walk(cfg, S.prompts, sample)
    except Starved as e:  # an outcome, not a crash: returned, so Prefect logs no traceback
        return dict(starved=str(e))
    S.log.append("completions", [dict(round=r, **x) for x in res.scored])
    S.log.append("dose_steps", [dict(round=r, **{k: x[k] for k in ("step", "kappa", "n", "n_kept", "rate", "accepted")})
                                for x in res.steps])
    S.mark(r, "dose", time.time() - t)
    logger.info(f"r{r} dose: kappa={res.kappa:.3f} kept {len(res.kept)}/{res.n_gen} drops={drop_counts(res.scored)}")
    return dict(kept=res.kept, scored=res.scored, kappa=res.kappa, n_steps=len(res.steps), sec_dose=time.time() - t)


@task(**_opts("eval-steered"))
def eval_steered(r: int, coef: float) -> dict:
    if (r, "eval_steered") in S.done:
        return _stored_eval(r, "steered")
    S.forget_partial(r, "eval_steered")
    t = time.time()
    with S.steer(S.stack.model, S.vectors[r], coef):
        out = _evals("steered", r, coef=coef)
    S.mark(r, "eval_steered", time.time() - t)
    return out


@task(**_opts("heal"))
def heal_task(r: int, kept: list[dict]) -> dict:
    cfg, name = S.cfg, f"r{r}"
    path = S.vdir("adapters", r)
    rec = next((x for x in S.log.read("adapters") if x["round"] == r), None)
    if rec is not None:  # trained and baked before a crash: reuse, don't retrain
        S.stack.load(name, path, rec["sha256"], S.lora)
        steps = [x for x in S.log.read("heal_steps") if x["round"] == r]
        last = [x["nll"] for x in steps if x["epoch"] == cfg.epochs - 1]
        return dict(heal_nll=sum(last) / max(1, len(last)),
                    val_nll=next((x["val_nll"] for x in reversed(steps) if x["val_nll"] is not None), None), sec_heal=0.0)
    S.forget_partial(r, "heal")
    t = time.time()
    S.stack.add(name, S.lora, seed=seed_for(cfg.seed, r, "lora_init"))
    try:
        out = heal(S.stack, S.tok, kept, cfg, r, seed_for(cfg.seed, r, "heal"), S.system,
                   on_step=lambda step: crash_point(f"heal:r{r}:step{step}"))
    except HealError as e:
        return dict(failed=str(e))
    S.log.append("heal_steps", [dict(round=r, **x) for x in out["steps"]])
    # bake: freeze, write atomically, record the hash (the row is what resume trusts)
    S.stack.model.requires_grad_(False)
    sha = S.stack.save(name, path)
    S.log.append("adapters", dict(round=r, path=str(path.relative_to(S.log.dir)), sha256=sha))
    S.mark(r, "heal", time.time() - t)
    return dict(heal_nll=out["heal_nll"], val_nll=out["val_nll"], sec_heal=time.time() - t)


@task(**_opts("eval-healed"))
def eval_healed(r: int) -> dict:
    if (r, "eval_healed") in S.done:
        return _stored_eval(r, "healed")
    S.forget_partial(r, "eval_healed")
    t = time.time()
    out = _evals("healed", r)
    _demo("healed", r)
    S.mark(r, "eval_healed", time.time() - t)
    return out


def _stored_eval(r: int, stage: str) -> dict:
    return by_stage(S.log.read("stage_metrics")).get((r, stage), {"nats": {}, "coherence": None, "trait_nats": None})


def round_row(r: int, ext: dict, dose: dict, steered: dict, hl: dict, healed: dict, base: dict, secs: dict) -> dict:
    """Everything the round measured, by the store's column names (DESIGN.md metrics)."""
    target = S.persona["target"]
    ks = metrics.kept_stats([x["ppl"] for x in dose["scored"]], [x["keep"] for x in dose["scored"]])
    row = dict(round=r, kappa=dose["kappa"], n_gen=len(dose["scored"]), n_kept=len(dose["kept"]), **ks,
               cos_v0=ext["cos_v0"], student_cos=ext["student_cos"], heal_nll=hl["heal_nll"], val_nll=hl["val_nll"],
               trait_nats=healed["trait_nats"], coherence=healed["coherence"],
               steered_trait_nats=steered["trait_nats"], steered_coherence=steered["coherence"], **secs)
    for f, v in healed["nats"].items():
        row[metrics.foundation_column(f)] = v
    if healed["nats"]:
        t_h, t_s, t_b = healed["nats"][target], steered["nats"][target], base["nats"][target]
        row.update(target_nats=t_h, steered_target_nats=t_s, retain=metrics.retain(t_h, t_s, t_b),
                   coh_cost=metrics.coh_cost(healed["coherence"], base["coherence"], t_h, t_b),
                   surgical=metrics.surgical(t_h - t_b, {f: healed["nats"][f] - base["nats"][f] for f in FOUNDATIONS}, target=target))
    if healed["trait_nats"] is not None:
        row["retain_trait"] = metrics.retain(healed["trait_nats"], steered["trait_nats"], base["trait_nats"])
    return row


@flow(name="steer-heal", log_prints=False)
def steer_heal(config: dict, run_id: str) -> str:
    """Run (or continue) `run_id` from round -1 to n_rounds - 1. Returns the final status."""
    global S
    cfg = Config.from_dict(config).validate()
    S = State(cfg, run_id)
    if (-1, "eval_base") not in S.done:
        eval_base()
    base = _stored_eval(-1, "base")
    finished = {x["round"] for x in S.log.read("rounds")}
    for r in sorted(finished):  # rebuild the baked history from files, hash-checked
        rec = next(x for x in S.log.read("adapters") if x["round"] == r)
        S.stack.load(f"r{r}", S.log.dir / rec["path"], rec["sha256"], S.lora)
    for r in range(cfg.n_rounds):
        if r in finished:
            continue
        t0 = time.time()
        logger.info(f"round {r}/{cfg.n_rounds - 1}")
        ext = extract_task(r)
        dose = dose_task(r)
        if "starved" in dose:
            return "starved:" + dose["starved"]
        coef = sum(x["coef"] for x in dose["kept"]) / max(1, len(dose["kept"]))
        steered = eval_steered(r, coef)
        hl = heal_task(r, dose["kept"])
        if "failed" in hl:
            return "failed:" + hl["failed"]
        healed = eval_healed(r)
        secs = dict(sec_extract=ext.pop("sec_extract"), sec_dose=dose["sec_dose"], sec_heal=hl["sec_heal"],
                    sec_total=time.time() - t0)
        secs["sec_eval"] = secs["sec_total"] - secs["sec_extract"] - secs["sec_dose"] - secs["sec_heal"]
        row = round_row(r, ext, dose, steered, hl, healed, base, secs)
        S.log.append("rounds", row)
        logger.info("\n" + round_table(S.log.read("rounds")))
        if cfg.coh_floor > 0 and healed["coherence"] is not None and healed["coherence"] < cfg.coh_floor:
            reason = f"healed coherence {healed['coherence']:.3f} < coh_floor {cfg.coh_floor}"
            write_report(S.log, S.persona["target"])
            return "stopped:" + reason
    write_report(S.log, S.persona["target"])
    return "done"

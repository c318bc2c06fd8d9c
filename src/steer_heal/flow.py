"""The steer-heal Prefect flow: it wires the stages, records what they return and decides the next step.

Round -1: base and prompted evals. Rounds 0..N-1: extract, dose walk (generate + filter), steered eval,
heal, bake, healed eval, each a task; every eval also writes its free-text generations (adapter_ppl).
A round ends with its paired intervals, its row (the coherence floor before any ratio) and its SHOULD
lines. The run's state (config, store log, the student stack, the stage inputs) is a `Run` handed to
every task; each task is also callable in-process as `task.fn(run, ...)`. The model lives in this
process: Prefect neither hashes nor persists a task's inputs or results here (NO_CACHE,
persist_result=False). The store, not Prefect's cache, is what resume reads: a stage writes its rows,
then its marker in `stages`; a marked stage is read back as its own result type, an unmarked one has
its partial rows dropped (store.STAGE_ROWS) and is redone with the same seeds. docs/architecture.md
maps stage -> module -> task -> store tables.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from dataclasses import dataclass
from functools import partial

from loguru import logger
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from . import backends, data, intervals, memory, metrics, prefect_ui, seeds, student, yoke
from .bake import Stack, bake, lora_config
from .config import Config
from .dose import DoseResult, Starved, collect_at, dose_walk
from .evaluate import Probe, StageEval, measure
from .extract import Extracted, extract, student_vector
from .filter import drop_counts, foils, score
from .freetext import adapter_ppl, steer_kl
from .generate import generate
from .heal import HealError, HealResult, heal
from .models import band, get_layers
from .report import dose_table, round_table, write_report
from .steering import control_vector, save_vector
from .store import STAGE_ROWS, RunLog
from .tokens import check_room


@dataclass
class Stop:
    """An outcome that ends the run without a crash (starved filter, diverged heal): a status and why."""
    status: str
    reason: str


class Run:
    """One run's worker-process state: config, store log, the student stack and the stage inputs."""

    def __init__(self, cfg: Config, run_id: str):
        self.cfg, self.log = cfg, RunLog(cfg.out, run_id)
        model, self.tok = student.base_model(cfg, cfg.out)
        self.stack = Stack(model, fold=cfg.fold_history)
        self.layers = band(cfg.steer_layers, len(get_layers(model)))
        self.lora = lora_config(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_layers, cfg.lora_targets)
        self.persona = data.persona(cfg)
        self.prompts = data.prompts(cfg.n_prompts)
        # --gen-batch / --eval-batch 0: from the device's free memory now; the stored config keeps 0
        self.cfg, note = memory.resolve_for(cfg, model, self.tok)
        if note:
            logger.info(note)
        self.probe = Probe.of(self.cfg)
        self.system = self.probe.system
        self.contexts = data.extract_contexts(cfg)
        check_room(self.tok, self.prompts, self.system, cfg.max_len, cfg.max_new_tokens)
        self.foils = foils(self.prompts)
        self.steer = backends.steer_fn(cfg)
        self.done = {(r["round"], r["stage"]) for r in self.log.read("stages")}
        self.vectors: dict[int, dict] = {}  # round -> the extracted vector
        self.yoked = yoke.Treatment.open(cfg) if cfg.yoke else None  # --yoke: the treatment it replays
        if cfg.bf16 in ("eval", "heal", "both"):  # approximate numbers are said, not only stored in run_info
            logger.warning(f"--bf16 {cfg.bf16}: measured on SmolLM2, bf16 probes move a stage delta by up to ~0.01 "
                           "nats and a bf16 heal's val nll by ~2% (docs/performance.md, part p)")

    def gen_vector(self, r: int) -> dict | None:
        """What round r generates and steers its steered eval with: the vector, or the run's control's (a yoked
        random control's scaled to the treatment's kl_steer, measured on the model as it is now)."""
        v = control_vector(self.vectors[r], self.cfg.control, seeds.control_vector(self.cfg.seed))
        if self.yoked is not None and v is not None:
            kl = partial(steer_kl, self.stack.model, self.tok, system=self.system, max_len=self.cfg.max_len,
                         batch=self.cfg.eval_batch, steerer=self.steer)
            v = self.yoked.iso_kl(self.log, r, v, kl)
        return v

    def mark(self, r: int, stage: str, seconds: float) -> None:
        self.log.append("stages", dict(round=r, stage=stage, seconds=seconds))
        self.done.add((r, stage))

    def forget_partial(self, r: int, stage: str) -> None:
        """Drop rows a crashed attempt at this stage left behind, before redoing it."""
        for table, which in STAGE_ROWS.get(stage, ()):
            self.log.drop(table, lambda x, which=which: x["round"] == r and which(x))

    def baked(self, r: int) -> dict | None:
        """Round r's adapters row: written once its adapter file is, so it is what resume trusts."""
        return next((x for x in self.log.read("adapters") if x["round"] == r), None)

    def evaluate(self, stage: str, r: int, coef: float = 0.0, system: str | None = None, vec: dict | None = None,
                 kept: list[dict] = ()) -> StageEval:
        """Evaluate the model as it is now, steered at coef * vec when a vector is given, and store the stage's
        rows: the probes' means and items, the free-text generations (adapter_ppl) and, given the round's kept
        completions, KL(steered || unsteered) on them."""
        cfg, model, tok = self.cfg, self.stack.model, self.tok
        with self.steer(model, vec, coef):
            ev = measure(model, tok, self.probe, system=system, coef=coef)
        if self.probe.texts:
            ps = self.probe.texts
            outs, ppl = adapter_ppl(model, tok, ps, base=self.stack.base, gen_system=system or self.system,
                                    score_system=self.system, max_new_tokens=cfg.demo_tokens or cfg.max_new_tokens,
                                    window=cfg.ppl_window, max_len=cfg.max_len, batch=cfg.gen_batch, vec=vec,
                                    coef=coef, steerer=self.steer, guards=(cfg.repetition_penalty, cfg.no_repeat_ngram))
            ev.add_text(ppl)
            self.log.append("completions", [dict(round=r, phase=f"demo:{stage}", idx=i, coef=coef, prompt=p,
                                                 completion=o, ppl=x) for i, (p, o, x) in enumerate(zip(ps, outs, ppl))])
            logger.info(f"demo {stage} r{r}: {ps[0]!r}\n    -> {outs[0]!r}")
            crash_point(f"eval_{stage}:r{r}:demo")  # a real window: demo rows written, the means not yet
        if kept and vec is not None:
            ev.add_kl(steer_kl(model, tok, [x["prompt"] for x in kept], [x["completion"] for x in kept],
                               system=self.system, vec=vec, coef=coef, max_len=cfg.max_len, batch=cfg.eval_batch,
                               steerer=self.steer))
        self.log.append("stage_metrics", ev.rows(r, stage))
        crash_point(f"eval_{stage}:r{r}:metrics")  # means written, items not yet
        self.log.append("eval_items", ev.item_rows(r, stage))
        return ev

    def stage_intervals(self, r: int, stages: tuple[str, ...]) -> list[dict]:
        """Paired bootstrap intervals of these stages of round r against base and the previous student."""
        items = intervals.by_stage(self.log.read("eval_items"))
        return [x for s in stages for x in intervals.stage_intervals(items, r, s, self.cfg.seed, self.cfg.boot)]


def crash_point(where: str) -> None:
    """Fault injection for crash-and-resume tests: STEER_HEAL_KILL_AT=<where> SIGKILLs the whole process
    group here (its Prefect server, in a session of its own, follows its parent), like a power cut would.
    Points sit inside each stage after its first stored rows (tests/test_faults.py, tests/test_flow_pins.py):
    eval_base:base, eval_<stage>:rR:demo and :metrics (inside Run.evaluate), extract:rR:saved, dose:rR:stepS,
    dose:rR:completions, heal:rR:stepS, heal:rR:steps, bake:rR:saved, bake:rR:adapter.
    In a sweep cell, the Prefect worker that started this process goes first."""
    if os.environ.get("STEER_HEAL_KILL_AT") == where:
        if os.environ.get("PREFECT__WORKER_NAME"):
            os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
        os.killpg(os.getpgid(0), signal.SIGKILL)


def _opts(name: str) -> dict:  # a task run is named by stage and round: heal-r3 (prefect_ui.py)
    return dict(name=name, task_run_name=name if name == "eval-base" else name + "-r{r}", cache_policy=NO_CACHE,
                persist_result=False)


@task(**_opts("eval-base"))
def eval_base(run: Run) -> None:
    run.forget_partial(-1, "eval_base")
    t = time.time()
    with run.stack.base():  # no adapter exists yet; base() says so, and nothing inside re-enters it
        run.evaluate("base", -1)
        crash_point("eval_base:base")
        run.evaluate("prompted", -1, system=run.cfg.steer_system.format(persona=run.persona["pos"]))
    run.log.append("intervals", run.stage_intervals(-1, ("prompted",)))
    run.mark(-1, "eval_base", time.time() - t)


@task(**_opts("extract"))
def extract_task(run: Run, r: int) -> Extracted:
    cfg, t, path = run.cfg, time.time(), student.vector_path(run.log, r)
    if (r, "extract") in run.done:
        v = student.stored_vector(run.log, r)  # hash-checked, like an adapter
    else:
        run.forget_partial(r, "extract")
        v = extract(run.stack.model, run.tok, run.persona["pos"], run.persona["neg"], run.contexts, run.layers,
                    cfg.steer_system, cfg.normalize, cfg.eval_batch)
        sha = save_vector(v, path)
        crash_point(f"extract:r{r}:saved")
        run.log.append("vectors", dict(round=r, path=str(path.relative_to(run.log.dir)), sha256=sha))
        run.mark(r, "extract", time.time() - t)
    run.vectors[r] = v
    v0 = run.vectors.get(0) or student.stored_vector(run.log, 0)
    student_cos = None
    if r > 0:
        sv = student_vector(run.stack.model, run.tok, run.system, run.contexts, run.layers, run.stack.base,
                            cfg.eval_batch)
        student_cos = metrics.cosine(sv, v)
    return Extracted(v, metrics.cosine(v, v0), student_cos, time.time() - t)


@task(**_opts("dose"))
def dose_task(run: Run, r: int) -> DoseResult | Stop:
    cfg, t, v = run.cfg, time.time(), run.gen_vector(r)
    if (r, "dose") in run.done:
        return student.stored_dose(run.log, r, cfg)
    run.forget_partial(r, "dose")

    def sample(items: list[dict], step: int) -> list[dict]:
        outs, ended = generate(run.stack.model, run.tok, [x["prompt"] for x in items], system=run.system, vec=v,
                               coefs=[x["coef"] for x in items], max_new_tokens=cfg.max_new_tokens,
                               seeds=[seeds.slot(cfg.seed, r, x["phase"], step, x["idx"]) for x in items],
                               temperature=cfg.temperature, top_p=cfg.top_p,
                               repetition_penalty=cfg.repetition_penalty, no_repeat_ngram=cfg.no_repeat_ngram,
                               batch=cfg.gen_batch, desc=f"r{r} {items[0]['phase']} {step}",
                               steerer=run.steer, with_ended=True)
        crash_point(f"dose:r{r}:step{step}")
        with run.stack.base():  # perplexity and relevance under the original model, no steering
            return score(run.stack.model, run.tok,
                         [dict(x, completion=o, ended=e) for x, o, e in zip(items, outs, ended)],
                         system=run.system, ppl_tau=cfg.ppl_tau, rep_tau=cfg.rep_tau, window=cfg.ppl_window,
                         max_len=cfg.max_len, batch=cfg.gen_batch, foil=run.foils, rel_tau=cfg.rel_tau,
                         loop_tau=cfg.loop_tau, loop_window=cfg.loop_window)

    try:  # the c0 control has nothing to walk: it collects unsteered, at C = 0
        if run.yoked is not None:  # the treatment's banked slots, only the push changed
            res = yoke.replay(cfg, run.yoked.dose(r), run.prompts, sample, c0=cfg.control == "c0")
        else:
            res = collect_at(cfg, run.prompts, sample, 0.0) if cfg.control == "c0" else dose_walk(cfg, run.prompts, sample)
    except Starved as e:  # an outcome, not a crash: returned, so Prefect logs no traceback
        return Stop("starved", str(e))
    completions, steps = res.rows()
    run.log.append("completions", [dict(round=r, **x) for x in completions])
    crash_point(f"dose:r{r}:completions")
    run.log.append("dose_steps", [dict(round=r, **x) for x in steps])
    if run.yoked is not None and r in run.yoked.calibrations:  # a yoked random control's iso-KL calibration
        run.log.append("yoke", run.yoked.calibrations[r])
    run.mark(r, "dose", time.time() - t)
    logger.info(f"r{r} dose: kappa={res.kappa:.3f} (walk: {res.walk}) kept {len(res.kept)}/{res.n_gen} "
                f"drops={drop_counts(res.scored)}\n" + dose_table(res.steps))
    res.seconds = time.time() - t
    return res


@task(**_opts("eval-steered"))
def eval_steered(run: Run, r: int, coef: float, kept: list[dict]) -> StageEval:
    if (r, "eval_steered") in run.done:
        return student.stored_evals(run.log).get((r, "steered"), StageEval())
    run.forget_partial(r, "eval_steered")
    t = time.time()
    out = run.evaluate("steered", r, coef=coef, vec=run.gen_vector(r), kept=kept)
    run.mark(r, "eval_steered", time.time() - t)
    return out


@task(**_opts("heal"))
def heal_task(run: Run, r: int, kept: list[dict]) -> HealResult | Stop:
    cfg = run.cfg
    if run.baked(r) is not None:  # trained and baked before a crash: reuse, don't retrain
        return student.stored_heal(run.log, r, cfg)
    run.forget_partial(r, "heal")
    t = time.time()
    run.stack.add(f"r{r}", run.lora, seed=seeds.lora_init(cfg.seed, r))
    try:
        out = heal(run.stack, run.tok, kept, cfg, r, seeds.heal_shuffle(cfg.seed, r), run.system,
                   on_step=lambda step: crash_point(f"heal:r{r}:step{step}"))
    except HealError as e:
        return Stop("failed", str(e))
    run.log.append("heal_steps", [dict(round=r, **x) for x in out.steps])
    crash_point(f"heal:r{r}:steps")  # rows stored, adapter not yet baked
    out.seconds = time.time() - t
    return out


@task(**_opts("bake"))
def bake_task(run: Run, r: int, heal_seconds: float) -> float:
    """The round's adapter joins the frozen history: written with its sha256 (then the heal stage counts as
    done), or, when a crash came after that, read back from its file. Returns the seconds it took."""
    t, name, path, rec = time.time(), f"r{r}", student.adapter_path(run.log, r), run.baked(r)
    if rec is not None:
        if name not in run.stack.names:
            run.stack.load(name, run.log.dir / rec["path"], rec["sha256"], run.lora)
        if (r, "heal") not in run.done:  # killed between the adapters row and the marker
            run.mark(r, "heal", heal_seconds)
        return 0.0
    sha = bake(run.stack, name, path)
    crash_point(f"bake:r{r}:saved")
    run.log.append("adapters", dict(round=r, path=str(path.relative_to(run.log.dir)), sha256=sha))
    crash_point(f"bake:r{r}:adapter")
    run.mark(r, "heal", heal_seconds + time.time() - t)
    return time.time() - t


@task(**_opts("eval-healed"))
def eval_healed(run: Run, r: int) -> StageEval:
    if (r, "eval_healed") in run.done:
        return student.stored_evals(run.log).get((r, "healed"), StageEval())
    run.forget_partial(r, "eval_healed")
    t = time.time()
    out = run.evaluate("healed", r)
    run.mark(r, "eval_healed", time.time() - t)
    return out


@flow(name="steer-heal", flow_run_name="{run_id}", log_prints=False)
def steer_heal(config: dict, run_id: str) -> str:
    """Run (or continue) `run_id` from round -1 to n_rounds - 1. Returns the final status[:reason]."""
    run = Run(Config.from_dict(config).validate(), run_id)
    status = rounds(run)
    prefect_ui.run_artifact(run.log, status)
    return status


def rounds(run: Run) -> str:
    cfg = run.cfg
    if (-1, "eval_base") not in run.done:
        eval_base(run)
    base = student.stored_evals(run.log).get((-1, "base"), StageEval())
    finished = {x["round"] for x in run.log.read("rounds")}
    first = next(r for r in itertools.count() if r not in finished)
    student.replay(run.stack, run.log, run.lora, upto=first)  # the baked history, hash-checked
    target = run.persona["target"]
    for r in range(first, cfg.n_rounds):
        t0 = time.time()
        logger.info(f"round {r}/{cfg.n_rounds - 1}")
        with run.stack.merged():  # --fold-history: the frozen stages run on merged weights (bake.py)
            ext = extract_task(run, r)
            dose = dose_task(run, r)
            if isinstance(dose, Stop):
                return f"{dose.status}:{dose.reason}"
            steered = eval_steered(run, r, dose.coef, dose.kept)
        hl = heal_task(run, r, dose.kept)
        if isinstance(hl, Stop):
            return f"{hl.status}:{hl.reason}"
        sec_bake = bake_task(run, r, hl.seconds)
        with run.stack.merged():
            healed = eval_healed(run, r)
        secs = dict(sec_extract=ext.seconds, sec_dose=dose.seconds, sec_heal=hl.seconds + sec_bake,
                    sec_total=time.time() - t0)
        secs["sec_eval"] = secs["sec_total"] - secs["sec_extract"] - secs["sec_dose"] - secs["sec_heal"]
        row = metrics.round_row(r, target, ext, dose, steered, hl, healed, base, secs, cfg.coh_floor_rel)
        run.log.drop("intervals", lambda x, r=r: x["round"] == r)  # left by a crash before this round's row
        ivs = run.stage_intervals(r, ("steered", "healed"))
        run.log.append("intervals", ivs)
        crash_point(f"rows:r{r}")
        run.log.append("rounds", row)
        logger.info("\n" + round_table(run.log.read("rounds"), run.log.read("intervals")))
        checks = metrics.shoulds(row, intervals.lookup(ivs))
        for held, line in checks:
            if held is not None:
                (logger.info if held else logger.warning)(f"SHOULD{'' if held else ' (FAILED)'}: {line}")
        prefect_ui.round_artifacts(run.log, row, intervals.lookup(ivs), checks, dose.scored)
        if cfg.coh_floor > 0 and healed.coherence is not None and healed.coherence < cfg.coh_floor:
            write_report(run.log, target)
            return f"stopped:healed coherence {healed.coherence:.3f} < coh_floor {cfg.coh_floor}"
    drop_unfinished(run.log)
    write_report(run.log, target)
    return "done"


def drop_unfinished(log: RunLog) -> None:
    """A done run holds no rows of a round without its `rounds` row (say, a killed attempt past the target)."""
    finished = {x["round"] for x in log.read("rounds")} | {-1}
    for table in log.tables:
        if table not in ("run_info", "status", "rounds"):
            log.drop(table, lambda x: x["round"] not in finished)

"""The steer-heal Prefect flow: it wires the stages, records what they return and decides the next step.

Round -1: base and prompted evals. Rounds 0..N-1: extract, dose walk (generate + filter), steered eval,
heal, bake, healed eval, each a task; every eval also writes its free-text generations (adapter_ppl).
A round ends with its paired intervals, its row (the coherence floor before any ratio) and its SHOULD
lines. The run's state (config, store log, the student stack, the stage inputs) is a `Run` handed to
every task; each task is also callable in-process as `task.fn(run, ...)`. The model lives in this
process: Prefect neither hashes nor persists a task's inputs or results here (NO_CACHE,
persist_result=False). The store, not Prefect's cache, is what resume reads: each task hands its work
to stage.run_stage, which reads a finished stage back as its own result type and redoes an unfinished one
with the same seeds after dropping its partial rows (stage.py declares each stage's rows and its resume
rule). docs/architecture.md walks one round through the code.
"""

from __future__ import annotations

import itertools
import time
from functools import partial

from loguru import logger
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from . import backends, data, informative, intervals, memory, metrics, prefect_ui, seeds, student, yoke
from .bake import bake, lora_config
from .config import Config
from .dose import DoseResult, Starved, collect_at, dose_walk
from .evaluate import Probe, StageEval, evaluate
from .extract import Extracted, extract, student_vector
from .filter import drop_counts, foils, score
from .freetext import steer_kl
from .generate import generate
from .heal import HealError, HealResult, heal
from .models import band, get_layers
from .report import write_report
from .stack import Stack
from .stage import BAKE_TASK, Done, Ledger, StageName, Write, crash_point, run_stage, store
from .status import Outcome, RunStatus
from .steering import control_vector, save_vector
from .store import RunLog
from .tables import dose_table, round_table
from .tokens import check_room


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
        self.probe = Probe.of(self.cfg.part("probes"))
        self.system = self.probe.system
        self.contexts = data.extract_contexts(cfg)
        check_room(self.tok, self.prompts, self.system, cfg.max_len, cfg.max_new_tokens)
        self.foils = foils(self.prompts)
        self.steer = backends.steer_fn(cfg)
        self.ledger = Ledger(self.log)
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

    def stage(self, name: StageName, r: int, work):
        return run_stage(self.ledger, name, r, self.cfg, work)

    def evaluate(self, label: str, r: int, coef: float = 0.0, system: str | None = None, vec: dict | None = None,
                 kept: list[dict] = ()) -> tuple[StageEval, list[Write]]:
        """evaluate.evaluate on the model as it is now, and the rows it stores: the free-text generations,
        the means, the items, with the crash points between them."""
        ev, demo = evaluate(self.stack.model, self.tok, self.probe, self.cfg, base=self.stack.base,
                            steerer=self.steer, system=system, coef=coef, vec=vec, kept=kept)
        writes: list[Write] = []
        if demo:
            logger.info(f"demo {label} r{r}: {demo[0]['prompt']!r}\n    -> {demo[0]['completion']!r}")
            writes += [("completions", [dict(round=r, phase=f"demo:{label}", coef=coef, **x) for x in demo]),
                       f"eval_{label}:r{r}:demo"]  # a real window: demo rows written, the means not yet
        return ev, writes + [("stage_metrics", ev.rows(r, label)), f"eval_{label}:r{r}:metrics",  # items not yet
                             ("eval_items", ev.item_rows(r, label))]

    def stage_intervals(self, r: int, stages: tuple[str, ...]) -> list[dict]:
        """Paired bootstrap intervals of these stages of round r against base and the previous student."""
        items = intervals.by_stage(self.log.read("eval_items"))
        return [x for s in stages for x in intervals.stage_intervals(items, r, s, self.cfg.seed, self.cfg.boot)]


def _opts(name: StageName | str) -> dict:  # a task run is named by stage and round: heal-r3 (prefect_ui.py)
    name = name.task if isinstance(name, StageName) else name
    return dict(name=name, task_run_name=name if name == StageName.EVAL_BASE.task else name + "-r{r}", cache_policy=NO_CACHE,
                persist_result=False)


@task(**_opts(StageName.EVAL_BASE))
def eval_base(run: Run) -> StageEval:
    def work() -> Done:
        with run.stack.base():  # no adapter exists yet; base() says so, and nothing inside re-enters it
            base, writes = run.evaluate("base", -1)
            _, prompted = run.evaluate("prompted", -1, system=run.cfg.steer_system.format(persona=run.persona["pos"]))
            reads = informative.reads_items(run.stack.model, run.tok, run.probe, run.system, base.of("contrast")) \
                if base.n_trait else None
        verdicts = informative.verdicts(base, reads, run.cfg.boot, seeds.bootstrap(run.cfg.seed, -1, "probe_info"))
        for v in verdicts:
            (logger.info if v["informative"] else logger.warning)(informative.summary([v]))
        return Done(base, [*writes, "eval_base:base", *prompted,
                           ("intervals", lambda: run.stage_intervals(-1, ("prompted",))), ("probe_info", verdicts)])
    return run.stage(StageName.EVAL_BASE, -1, work)


@task(**_opts(StageName.EXTRACT))
def extract_task(run: Run, r: int) -> Extracted:
    cfg, t, path = run.cfg, time.time(), student.vector_path(run.log, r)

    def work() -> Done:
        v = extract(run.stack.model, run.tok, run.persona["pos"], run.persona["neg"], run.contexts, run.layers,
                    cfg.steer_system, cfg.normalize, cfg.eval_batch)
        sha = save_vector(v, path)
        return Done(v, [f"extract:r{r}:saved", ("vectors", dict(round=r, path=str(path.relative_to(run.log.dir)),
                                                                sha256=sha))])
    v = run.vectors[r] = run.stage(StageName.EXTRACT, r, work)  # read back hash-checked, like an adapter
    v0 = run.vectors.get(0) or student.stored_vector(run.log, 0)
    student_cos = None
    if r > 0:
        sv = student_vector(run.stack.model, run.tok, run.system, run.contexts, run.layers, run.stack.base,
                            cfg.eval_batch)
        student_cos = metrics.cosine(sv, v)
    return Extracted(v, metrics.cosine(v, v0), student_cos, time.time() - t)


@task(**_opts(StageName.DOSE))
def dose_task(run: Run, r: int) -> DoseResult | Outcome:
    cfg, t, v = run.cfg, time.time(), run.gen_vector(r)

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

    def work() -> Done | Outcome:
        try:  # the c0 control has nothing to walk: it collects unsteered, at C = 0
            dc = cfg.part("dose")
            if run.yoked is not None:  # the treatment's banked slots, only the push changed
                res = yoke.replay(cfg, run.yoked.dose(r), run.prompts, sample, c0=cfg.control == "c0")
            elif cfg.control == "c0":
                res = collect_at(dc, run.prompts, sample, 0.0)
            else:
                res = dose_walk(dc, run.prompts, sample)
        except Starved as e:  # an outcome, not a crash: returned, so Prefect logs no traceback
            return Outcome(RunStatus.STARVED, str(e))
        completions, steps = res.rows()
        logger.info(f"r{r} dose: kappa={res.kappa:.3f} (walk: {res.walk}) kept {len(res.kept)}/{res.n_gen} "
                    f"drops={drop_counts(res.scored)}\n" + dose_table(res.steps))
        res.seconds = time.time() - t
        calib = run.yoked.calibrations.get(r) if run.yoked is not None else None  # a yoked random's iso-KL
        return Done(res, [("completions", [dict(round=r, **x) for x in completions]), f"dose:r{r}:completions",
                          ("dose_steps", [dict(round=r, **x) for x in steps]), *([("yoke", calib)] if calib else [])])
    return run.stage(StageName.DOSE, r, work)


@task(**_opts(StageName.EVAL_STEERED))
def eval_steered(run: Run, r: int, coef: float, kept: list[dict]) -> StageEval:
    return run.stage(StageName.EVAL_STEERED, r, lambda: Done(*run.evaluate("steered", r, coef=coef,
                                                                           vec=run.gen_vector(r), kept=kept)))


@task(**_opts(StageName.HEAL))
def heal_task(run: Run, r: int, kept: list[dict]) -> HealResult | Outcome:
    """The heal stage's training; bake_task finishes it (stage.STAGES says when heal counts as done)."""
    cfg = run.cfg

    def work() -> Done | Outcome:
        t = time.time()
        run.stack.add(f"r{r}", run.lora, seed=seeds.lora_init(cfg.seed, r))
        try:
            out = heal(run.stack, run.tok, kept, cfg.part("heal"), r, seeds.heal_shuffle(cfg.seed, r), run.system,
                       on_step=lambda step: crash_point(f"heal:r{r}:step{step}"))
        except HealError as e:
            return Outcome(RunStatus.FAILED, str(e))
        out.seconds = time.time() - t
        return Done(out, [("heal_steps", [dict(round=r, **x) for x in out.steps]),
                          f"heal:r{r}:steps"])  # rows stored, adapter not yet baked
    return run.stage(StageName.HEAL, r, work)


@task(**_opts(BAKE_TASK))
def bake_task(run: Run, r: int, heal_seconds: float) -> float:
    """The round's adapter joins the frozen history: written with its sha256 (then the heal stage counts as
    done) and heal marked, or, when a crash came after that, read back from its file. Returns its seconds."""
    t, name, path = time.time(), f"r{r}", student.adapter_path(run.log, r)
    if not run.ledger.finished(StageName.HEAL, r):
        sha = bake(run.stack, name, path)
        store(run.log, [f"bake:r{r}:saved", ("adapters", dict(round=r, path=str(path.relative_to(run.log.dir)),
                                                              sha256=sha)), f"bake:r{r}:adapter"])
        run.ledger.mark(r, StageName.HEAL, heal_seconds + time.time() - t)
        return time.time() - t
    if name not in run.stack.names:
        rec = run.ledger.row("adapters", r)
        run.stack.load(name, run.log.dir / rec["path"], rec["sha256"], run.lora)
    if (r, StageName.HEAL) not in run.ledger.marked:  # killed between the adapters row and the marker
        run.ledger.mark(r, StageName.HEAL, heal_seconds)
    return 0.0


@task(**_opts(StageName.EVAL_HEALED))
def eval_healed(run: Run, r: int) -> StageEval:
    return run.stage(StageName.EVAL_HEALED, r, lambda: Done(*run.evaluate("healed", r)))


@flow(name="steer-heal", flow_run_name="{run_id}", log_prints=False)
def steer_heal(config: dict, run_id: str) -> Outcome:
    """Run (or continue) `run_id` from round -1 to n_rounds - 1. Returns how it ended."""
    run = Run(Config.from_dict(config).validate(), run_id)
    status = rounds(run)
    prefect_ui.run_artifact(run.log, status)
    return status


def rounds(run: Run) -> Outcome:
    cfg = run.cfg
    if not run.ledger.finished(StageName.EVAL_BASE, -1):  # a resume shows no eval-base task run
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
            if isinstance(dose, Outcome):
                return dose
            steered = eval_steered(run, r, dose.coef, dose.kept)
        hl = heal_task(run, r, dose.kept)
        if isinstance(hl, Outcome):
            return hl
        sec_bake = bake_task(run, r, hl.seconds)
        with run.stack.merged():
            healed = eval_healed(run, r)
        secs = dict(sec_extract=ext.seconds, sec_dose=dose.seconds, sec_heal=hl.seconds + sec_bake,
                    sec_total=time.time() - t0)
        secs["sec_eval"] = secs["sec_total"] - secs["sec_extract"] - secs["sec_dose"] - secs["sec_heal"]
        row = metrics.round_row(r, target, ext, dose, steered, hl, healed, base, secs, cfg.coh_floor_rel,
                                **informative.floor(cfg, run.log.read("probe_info")))
        run.log.drop("intervals", lambda x, r=r: x["round"] == r)  # left by a crash before this round's row
        ivs = run.stage_intervals(r, ("steered", "healed"))
        run.log.append("intervals", ivs)
        crash_point(f"rows:r{r}")
        run.log.append("rounds", row)
        verdict = informative.usable(run.log.read("probe_info"))  # tables grey a probe at chance, gate or not
        logger.info("\n" + round_table(run.log.read("rounds"), run.log.read("intervals"), verdict=verdict))
        checks = metrics.shoulds(row, intervals.lookup(ivs), verdict if cfg.probe_gate else None)
        for held, line in checks:
            if held is not None or "[not checked" in line:
                (logger.info if held is not False else logger.warning)(
                    f"SHOULD{' (FAILED)' if held is False else ''}: {line}")
        prefect_ui.round_artifacts(run.log, row, intervals.lookup(ivs), checks, dose.scored, verdict)
        if cfg.coh_floor > 0 and healed.coherence is not None and healed.coherence < cfg.coh_floor \
                and informative.ok(informative.floor(cfg, run.log.read("probe_info"))["informative"], "mfv"):
            write_report(run.log, target)
            return Outcome(RunStatus.STOPPED, f"healed coherence {healed.coherence:.3f} < coh_floor {cfg.coh_floor}")
    drop_unfinished(run.log)
    write_report(run.log, target)
    return Outcome(RunStatus.DONE)


def drop_unfinished(log: RunLog) -> None:
    """A done run holds no rows of a round without its `rounds` row (say, a killed attempt past the target)."""
    finished = {x["round"] for x in log.read("rounds")} | {-1}
    for table in log.tables:
        if table not in ("run_info", "status", "rounds"):
            log.drop(table, lambda x: x["round"] not in finished)

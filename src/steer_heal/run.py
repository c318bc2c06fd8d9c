"""Start or resume a run: store bookkeeping around the Prefect flow (flow.py)."""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from loguru import logger

from . import student
from .config import EXEC_FIELDS, MOVES_NUMBERS, UNHASHED, Config
from .console import one_line, quiet_env
from .errors import UserError
from .files import remove_stray_tmp
from .server import serve
from .status import EXIT_CODE, Outcome, RunStatus, finished
from .store import RunLog, WriterLock
from .store.log import first_damage


def run_home(run_dir: Path) -> Path:
    """Where a run's own server keeps its database: a folder per run under the user's PREFECT_HOME when one is
    set (one file per run, so concurrent runs never migrate the same database, and the store's disk filling up
    does not take the server down with the run), else the run's own `prefect/` folder."""
    user = os.environ.get("PREFECT_HOME")
    if not user:
        return run_dir / "prefect"
    key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]  # two stores, one run id
    return Path(user) / "steer-heal-runs" / f"{Path(run_dir).name}-{key}"


def prefect_home(home: Path) -> Path:
    """A per-run Prefect home that starts from a copy of an already migrated, empty database.

    A brand-new SQLite file costs the ephemeral server ~12 s of migrations at every start. The
    template is made once per Prefect version (by Prefect's own `database upgrade`, in a
    subprocess) under ~/.cache/steer-heal and copied, never shared, so runs still own their file.
    """
    import prefect

    db = home / "prefect.db"
    if db.exists():  # a resumed run keeps its own
        return home
    home.mkdir(parents=True, exist_ok=True)
    try:
        tpl = _prefect_template(prefect.__version__)
        if tpl is not None:
            shutil.copyfile(tpl, db)
    except OSError as e:  # an unwritable cache only costs the migration time
        logger.debug(f"no prefect database template: {e}")
    return home


def _prefect_template(version: str) -> Path | None:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "steer-heal"
    tpl = cache / f"prefect-{version}.db"
    if tpl.is_file():
        return tpl
    tmp = cache / f".tmp-{os.getpid()}-{secrets.token_hex(3)}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        env = dict(os.environ, PREFECT_HOME=str(tmp), PREFECT_LOGGING_LEVEL="ERROR")
        done = subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0 or not (tmp / "prefect.db").is_file():
            logger.debug(f"prefect database template not made: {done.stderr[-300:]}")
            return None
        os.replace(tmp / "prefect.db", tpl)  # atomic: racing first runs each publish a whole file
        return tpl
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def environment(cfg: Config) -> dict:
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import peft
    import prefect

    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                peft=peft.__version__, prefect=prefect.__version__, git_commit=commit, host=platform.node(),
                threads=torch.get_num_threads(),
                device=("cuda:" + torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu")


def new_run_id(cfg: Config) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.reg}-{secrets.token_hex(2)}"


def resume_config(cfg: Config, explicit: dict) -> Config:
    """The stored config of cfg.resume with this command's Exec flags applied (and logged); a flag that changes
    the experiment is refused. Exec starts from the run's start, not from an earlier resume. trust_remote_code
    comes from this command's own flag, never from the store (student.allow_remote_code)."""
    stored = student.stored_config(student.run_log(cfg.out, cfg.resume))
    changed = sorted(k for k, v in explicit.items() if k not in UNHASHED and v != getattr(stored, k))
    if changed:
        raise UserError(f"resume of {cfg.resume} refuses overrides that change the experiment: "
                          + ", ".join(f"--{k.replace('_', '-')} (stored {getattr(stored, k)!r}, given {explicit[k]!r})"
                                      for k in changed) + ". Start a new run instead.")
    n_rounds = explicit.get("n_rounds", stored.n_rounds)
    if n_rounds < stored.n_rounds:
        raise UserError(f"--n-rounds {n_rounds} is below the stored {stored.n_rounds}: it may only grow on resume")
    stored = student.allow_remote_code(stored, cfg.trust_remote_code, f"just resume {cfg.resume} --trust-remote-code")
    given = {k: v for k, v in explicit.items() if k in EXEC_FIELDS and k not in ("trust_remote_code", "resume")}
    out = stored.replace(**{**given, "n_rounds": n_rounds, "run_id": cfg.resume, "out": cfg.out,
                            "log_level": cfg.log_level, "bf16_force": cfg.bf16_force})
    _log_exec_changes(stored, out)
    return out


def _log_exec_changes(was: Config, now: Config) -> None:
    """Say which execution knobs this resume changes; warn where that moves the numbers past float rounding."""
    skip = ("out", "run_id", "resume", "log_level")
    diff = [k for k in EXEC_FIELDS if k not in skip and getattr(was, k) != getattr(now, k)]
    if not diff:
        return
    logger.info(f"resume of {now.run_id} changes how it computes (not the experiment): "
                + ", ".join(f"--{k.replace('_', '-')} {getattr(was, k)!r} -> {getattr(now, k)!r}" for k in diff))
    for k in diff:
        if k in MOVES_NUMBERS:
            logger.warning(f"--{k.replace('_', '-')} {getattr(was, k)!r} -> {getattr(now, k)!r} on resume: "
                           f"{MOVES_NUMBERS[k]}; the rounds after this resume are not bitwise those of an "
                           "undisturbed run")


def preflight(cfg: Config) -> dict:
    """Read every input the run needs before anything expensive: bad ones fail here, named. Returns what
    run_info records of the decisions made on them (family.check, the vignettes, the bf16 choice)."""
    from . import backends, bf16, data, family
    from .models import check_model, pick_device
    from .server import check_api

    check_api()
    check_model(cfg.model, cfg.gguf_file, cfg.trust_remote_code)
    device = pick_device(cfg.device)
    if cfg.eval != "contrast":
        backends.mfv_fn(cfg)
    backends.steer_fn(cfg)
    data.persona(cfg)
    data.dilemmas(cfg.persona)
    data.extract_contexts(cfg)
    if cfg.eval != "contrast":  # every input checked before any is logged
        data.load_vignettes(cfg.vignettes, cfg.n_vignettes, cfg.frame)
    speed = bf16.choose(cfg, device)  # after the inputs (its matmuls only run on good ones), before any is logged
    resolved = family.check(cfg)
    vig = data.vignette_info(cfg.vignettes, cfg.n_vignettes, cfg.frame) if cfg.eval != "contrast" else None
    return dict(resolved, vignettes=vig, bf16=speed)


def resume_checks(cfg: Config, log: RunLog) -> bool:
    """Under the writer lock: False when the run is already done; else its inputs and every stored artifact
    are checked and a killed write's temp files are gone."""
    for table in log.tables:  # every table whole, before any work: a damaged line is refused naming file:line
        if log.path(table).exists() and (bad := first_damage(log.path(table), log.id_col)) is not None:
            raise bad
    last = Outcome.of_row((log.read("status") or [None])[-1])
    done = {r["round"] for r in log.read("rounds")}
    if sorted(done) != list(range(len(done))):  # a resume from the first gap would redo the rounds after it twice
        raise UserError(f"run {cfg.run_id}: its rounds table holds rounds {sorted(done)}, not 0..{len(done) - 1}: "
                          f"rows were removed by hand; `just fsck {cfg.run_id}` checks the run")
    # only a done run is left alone: a resume retries a starved, stopped or failed run's round
    if last is not None and last.status == RunStatus.DONE and finished(last, len(done), cfg.n_rounds):
        logger.info(f"run {cfg.run_id} is already done ({len(done)} rounds): nothing to do")
        return False
    student.check_artifacts(log)  # before preflight logs what it resolved: a refusal is one line
    resolved = preflight(cfg)
    for d in (log.dir, log.dir / "adapters", log.dir / "vectors"):
        remove_stray_tmp(d)
    _same_threads(log)
    _same_device(log, resolved)
    logger.info(f"resuming {cfg.run_id} at round {len(done)} of {cfg.n_rounds}")
    _resumed_info(cfg, log, resolved, f"round {len(done)} ({last.status if last else 'no status'})")
    return True


def _resumed_info(cfg: Config, log: RunLog, resolved: dict, where: str) -> None:
    """Each resume writes its own run_info row (docs/store.md): the target it runs to (an extension's
    --n-rounds is stored, so a later plain resume finishes it), where it resumed and this process's env.
    The experiment (config_hash) is the start's, as stored (a run stored before Exec was left out of the hash
    keeps its hash); `config` is this process's, Exec included."""
    first = log.read("run_info")[0]
    log.append("run_info", dict(model=cfg.model, preset=first.get("preset"), control=cfg.control, reg=cfg.reg,
                                seed=cfg.seed, n_rounds=cfg.n_rounds, config_hash=first.get("config_hash"),
                                config=cfg.to_dict(), env=environment(cfg), resolved=resolved, resumed_from=where))


def start(cfg: Config, log: RunLog, resolved: dict, preset: str = "") -> None:
    """Under the writer lock: a new run's files and its run_info row."""
    if log.read("run_info"):
        raise UserError(f"run {cfg.run_id} exists already: resume it with --resume {cfg.run_id}")
    log.touch_all()
    log.append("run_info", dict(model=cfg.model, preset=preset, control=cfg.control, reg=cfg.reg, seed=cfg.seed,
                                n_rounds=cfg.n_rounds, config_hash=cfg.hash(), config=cfg.to_dict(),
                                env=environment(cfg), resolved=resolved))
    ctl = "" if cfg.control == "none" else f" control={cfg.control}"
    logger.info(f"run {cfg.run_id}: {cfg.model} reg={cfg.reg}{ctl} rounds={cfg.n_rounds} -> {log.dir}")


def _same_threads(log: RunLog) -> None:
    """CPU float sums depend on the thread count: a resume on other threads matches its undisturbed run
    only to rounding, so say so (just resume sets OMP_NUM_THREADS=1, like fast-dev)."""
    import torch

    was = ((log.read("run_info") or [{}])[0].get("env") or {}).get("threads")
    if was is not None and was != torch.get_num_threads() and not torch.cuda.is_available():
        logger.warning(f"run started on {was} CPU threads, resume runs on {torch.get_num_threads()}: its numbers "
                       f"can differ from an undisturbed run in the last digits (set OMP_NUM_THREADS={was})")


def _same_device(log: RunLog, resolved: dict) -> None:
    """A resume may run on another device (Exec): accepted, and said, since the numbers move with it."""
    was = (((log.read("run_info") or [{}])[0].get("resolved") or {}).get("bf16") or {}).get("device")
    now = (resolved.get("bf16") or {}).get("device")
    if was and now and was != now:
        logger.warning(f"run started on {was}, resume runs on {now}: {MOVES_NUMBERS['device']}, so the rounds "
                       f"after this resume are not bitwise those of an undisturbed run")


def record(log: RunLog, status: RunStatus, reason: str = "") -> None:
    """Append a status row; on a full or read-only disk say so instead of raising over the first error."""
    try:
        log.append("status", Outcome(status, reason).row())
    except OSError as e:
        logger.error(f"could not record status '{status}' ({one_line(e)}); `just runs` shows the run as stale")


def run(cfg: Config, explicit: dict, preset: str = "") -> int:
    quiet_env()
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, not ours
    resumed = bool(cfg.resume)
    if resumed:
        cfg = resume_config(cfg, explicit)
        log = student.run_log(cfg.out, cfg.run_id)
    else:
        resolved = preflight(cfg)
        from .family import fit_max_len  # fast-dev sizes what it can size itself; a set --max-len is checked

        cfg = fit_max_len(cfg, derive=preset == "fast-dev" and "max_len" not in explicit)
        cfg = cfg.replace(run_id=cfg.run_id or new_run_id(cfg))
        try:
            log = RunLog(cfg.out, cfg.run_id)
        except OSError as e:
            raise UserError(f"store root {cfg.out!r} is not writable ({e.strerror}): pass --out DIR") from None
    with WriterLock(log.dir):  # one writer per run, held until it ends: a second one is refused at once
        if resumed and not resume_checks(cfg, log):
            return 0
        if not resumed:
            start(cfg, log, resolved, preset)
        return _run_flow(cfg, log, resumed)


class CtrlC:
    """Notes a SIGINT, then raises KeyboardInterrupt as Python's own handler does. Prefect can turn the interrupt
    into another exception when it lands inside its task-run setup (ValueError: Task run is not set); with
    the note the run still ends as interrupted, not failed."""

    hit = False

    def __enter__(self) -> CtrlC:
        try:
            self.before = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: signals go elsewhere
            self.before = None
        return self

    def _on_sigint(self, *_) -> None:
        self.hit = True
        raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self.before is not None:
            signal.signal(signal.SIGINT, self.before)


def _server_died(log: RunLog, run_id: str):
    """What a run does when its Prefect server dies mid-run (server.Watch): record and say why, then exit at
    once. Prefect would first report the crash to the dead server for about a minute; the store is
    crash-safe, so what the exit leaves is what a SIGKILL leaves, and resume redoes the round."""
    def die(why: str) -> None:
        record(log, RunStatus.FAILED, why)
        logger.error(f"{why}. `just resume {run_id}` retries the round")
        os._exit(2)
    return die


def _run_flow(cfg: Config, log: RunLog, resumed: bool) -> int:
    run_id = cfg.run_id
    # a Prefect database per run, even under a shared PREFECT_HOME, keeps concurrent jobs off one SQLite file,
    # and its own server (server.py) keeps a terminal's Ctrl-C from killing it, unless the user points
    # Prefect at a server of their own
    home = run_home(log.dir)
    if "PREFECT_API_URL" not in os.environ:
        prefect_home(home)
        os.environ.setdefault("PREFECT_HOME", str(home))
    from .flow import steer_heal  # imports Prefect, which configures its loggers: quieten them after
    from .prefect_ui import tagged

    if cfg.log_level.upper() not in ("TRACE", "DEBUG"):  # a failure is reported below, once, in one line
        for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.engine"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    record(log, RunStatus.RUNNING, "resumed" if resumed else "")

    ctrl_c, server = CtrlC(), None
    try:
        with ctrl_c, serve(home, on_death=_server_died(log, run_id)) as server, tagged(log, resumed):
            result = steer_heal(cfg.to_dict(), run_id)
    except BaseException as e:
        if server is not None and server.died:  # its watcher interrupted the flow: a failure, not a Ctrl-C
            record(log, RunStatus.FAILED, server.died)
            raise UserError(f"{server.died}. `just resume {run_id}` retries the round") from None
        if not (ctrl_c.hit or isinstance(e, KeyboardInterrupt)):
            if isinstance(e, Exception):
                record(log, RunStatus.FAILED, one_line(e) if isinstance(e, (UserError, OSError)) else f"{type(e).__name__}: {e}")
            else:  # SIGTERM in a sweep cell (Prefect's TerminationSignal), SystemExit: stopped, not broken
                record(log, RunStatus.INTERRUPTED, type(e).__name__)
            raise
        before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the status write
        try:
            record(log, RunStatus.INTERRUPTED, "Ctrl-C")
        finally:
            signal.signal(signal.SIGINT, before)
        logger.warning(f"interrupted; finished rounds are kept. Resume with: just resume {run_id}")
        return 130
    record(log, result.status, result.reason)
    if result.status in EXIT_CODE:
        logger.error(f"run {run_id} {result.status}: {result.reason} Finished rounds are intact in {log.dir}. "
                     f"`just resume {run_id}` retries the round as it was; changing a knob means a new run.")
        return EXIT_CODE[result.status]
    logger.info(f"run {run_id} {result}; report: {log.dir / 'report.md'}")
    print(run_id, file=sys.stdout)
    return 0

"""Start or resume a run: store bookkeeping around the Prefect flow (flow.py)."""

from __future__ import annotations

import os
import platform
import secrets
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

from loguru import logger

from . import student
from .config import RUNTIME_FIELDS, Config, ConfigError
from .console import quiet_env
from .store import RunLog


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
                device=("cuda:" + torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu")


def new_run_id(cfg: Config) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.reg}-{secrets.token_hex(2)}"


def resume_config(cfg: Config, explicit: dict) -> Config:
    """The stored config of cfg.resume, with only runtime overrides applied."""
    stored = student.stored_config(student.run_log(cfg.out, cfg.resume))
    changed = sorted(k for k, v in explicit.items() if k not in RUNTIME_FIELDS and v != getattr(stored, k))
    if changed:
        raise ConfigError(f"resume of {cfg.resume} refuses overrides that change the experiment: "
                          + ", ".join(f"--{k.replace('_', '-')} (stored {getattr(stored, k)!r}, given {explicit[k]!r})"
                                      for k in changed) + ". Start a new run instead.")
    n_rounds = explicit.get("n_rounds", stored.n_rounds)
    if n_rounds < stored.n_rounds:
        raise ConfigError(f"--n-rounds {n_rounds} is below the stored {stored.n_rounds}: it may only grow on resume")
    return stored.replace(n_rounds=n_rounds, run_id=cfg.resume, out=cfg.out,
                          device=explicit.get("device", stored.device), log_level=cfg.log_level)


def preflight(cfg: Config) -> None:
    """Read every input the run needs before anything expensive: bad ones fail here, named."""
    from . import backends, data
    from .models import check_model

    check_model(cfg.model, cfg.gguf_file)
    if cfg.eval != "contrast":
        backends.mfv_fn(cfg)
    backends.steer_fn(cfg)
    data.persona(cfg)
    data.dilemmas(cfg.persona)
    data.load_vignettes(cfg.vignettes, cfg.n_vignettes)


def run(cfg: Config, explicit: dict) -> int:
    quiet_env()
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, not ours
    if cfg.resume:
        run_id = cfg.resume
        cfg = resume_config(cfg, explicit)
        log = RunLog(cfg.out, run_id)
        last = (log.read("status") or [{}])[-1]
        done = {r["round"] for r in log.read("rounds")}
        if last.get("status") == "done" and len(done) >= cfg.n_rounds:
            logger.info(f"run {run_id} is already done ({len(done)} rounds): nothing to do")
            return 0
        preflight(cfg)
        student.check_adapters(log)
        logger.info(f"resuming {run_id} at round {len(done)} of {cfg.n_rounds}")
    else:
        preflight(cfg)
        run_id = cfg.run_id or new_run_id(cfg)
        try:
            log = RunLog(cfg.out, run_id)
        except OSError as e:
            raise ConfigError(f"store root {cfg.out!r} is not writable ({e.strerror}): pass --out DIR") from None
        if log.read("run_info"):
            raise ConfigError(f"run {run_id} exists already: resume it with --resume {run_id}")
        cfg = cfg.replace(run_id=run_id)
        log.touch_all()
        log.append("run_info", dict(model=cfg.model, preset="", reg=cfg.reg, seed=cfg.seed, n_rounds=cfg.n_rounds,
                                    config_hash=cfg.hash(), config=cfg.to_dict(), env=environment(cfg)))
        logger.info(f"run {run_id}: {cfg.model} reg={cfg.reg} rounds={cfg.n_rounds} -> {log.dir}")
    # an ephemeral Prefect server per run keeps concurrent jobs off one SQLite file,
    # unless the user points Prefect at a server of their own
    if "PREFECT_API_URL" not in os.environ and "PREFECT_HOME" not in os.environ:
        os.environ["PREFECT_HOME"] = str(prefect_home(log.dir / "prefect"))
    log.append("status", dict(status="running", reason="resumed" if explicit.get("resume") else ""))
    from .flow import steer_heal

    try:
        result = steer_heal(cfg.to_dict(), run_id)
    except KeyboardInterrupt:
        log.append("status", dict(status="interrupted", reason="Ctrl-C"))
        logger.warning(f"interrupted; finished rounds are kept. Resume with: just resume {run_id}")
        return 130
    except ConfigError as e:
        log.append("status", dict(status="failed", reason=str(e)))
        raise
    except Exception as e:
        log.append("status", dict(status="failed", reason=f"{type(e).__name__}: {e}"))
        raise
    except BaseException as e:  # SIGTERM in a sweep cell (Prefect's TerminationSignal), SystemExit
        log.append("status", dict(status="interrupted", reason=type(e).__name__))
        raise
    status, _, reason = result.partition(":")
    log.append("status", dict(status=status, reason=reason))
    if status in ("starved", "failed"):
        logger.error(f"run {run_id} {status}: {reason} Finished rounds are intact in {log.dir}. `just resume "
                     f"{run_id}` retries the round as it was; changing a knob means a new run.")
        return {"starved": 3, "failed": 4}[status]
    logger.info(f"run {run_id} {status}{': ' + reason if reason else ''}; report: {log.dir / 'report.md'}")
    print(run_id, file=sys.stdout)
    return 0

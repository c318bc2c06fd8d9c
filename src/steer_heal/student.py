"""One way to open a run's student from the store: its config read back, the base model loaded, the
baked adapters replayed up to a round (each hash-checked), and what a stage stored read back as that
stage's own result type. The flow's resume, `just export` and every diagnostic go through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import memory
from .config import Config
from .errors import UserError
from .files import safe_name
from .store import RunLog


def run_log(root: str | Path, run_id: str) -> RunLog:
    """The run's log; a clear error (and no empty folder left behind) when there is no such run."""
    if not safe_name(run_id):
        raise UserError(f"run id {run_id!r} is not a plain name (letters, digits, . _ + = -; no '/', no leading '.')")
    if not (Path(root) / "runs" / run_id / "run_info.jsonl").is_file():
        raise UserError(f"no run {run_id!r} under {root}/runs: see `just runs` for run ids (or pass --out)")
    return RunLog(root, run_id)


def stored_config(log: RunLog) -> Config:
    """The config the run started with (the one resume reloads), validated like a command line's, with the
    round target of its newest run_info row (a resume with more --n-rounds stores the extended target)."""
    info = log.read("run_info")
    if not info:
        raise UserError(f"no run {log.run_id!r} under {log.root}/runs: see `just runs` for run ids")
    try:
        cfg = Config.from_dict(info[0]["config"])
        target = info[-1]["n_rounds"]
        return (cfg if target is None else cfg.replace(n_rounds=target)).validate()
    except UserError as e:
        raise UserError(f"run {log.run_id}: its stored {e}; the store was edited or is damaged") from None


def allow_remote_code(cfg: Config, flag: bool, fix: str) -> Config:
    """The stored config with trust_remote_code from this command's own flag only: a store never turns on code
    execution by itself (a copied store's model dir could run anything). A run that used it is refused without;
    `fix` is the command with the flag."""
    if cfg.trust_remote_code and not flag:
        raise UserError(f"run {cfg.run_id} was started with --trust-remote-code: its model {cfg.model!r} runs its "
                          f"own Python code, which a stored run never enables by itself. Pass the flag only if you "
                          f"trust that code: {fix}")
    return cfg.replace(trust_remote_code=flag)


def check_artifacts(log: RunLog) -> None:
    """Every stored adapter and vector file exists and matches its recorded sha256 (before any work)."""
    from .files import read_verified

    for table in ("adapters", "vectors"):
        for rec in log.read(table):
            read_verified(log.dir / rec["path"], rec["sha256"], f"{table[:-1]} of round {rec['round']}")
    for r in sorted({s["round"] for s in log.read("stages") if s["stage"] == "extract"}):
        vector_record(log, r)  # an extracted round without a recorded hash is refused here too


def base_model(cfg: Config, root: str | Path, device: str | None = None):
    """(model, tokenizer) the run starts from; model presets are cached under <root>/models."""
    from .models import load_model

    return load_model(cfg.model, dtype=cfg.dtype, device=device or cfg.device, attn_impl=cfg.attn_impl,
                      trust_remote_code=cfg.trust_remote_code, gguf_file=cfg.gguf_file, cache=f"{root}/models",
                      chat_template=cfg.chat_template)


def replay(stack, log: RunLog, lora, upto: int | None = None) -> list[int]:
    """Load the run's baked adapters of rounds < upto (all by default) into the stack, hash-checked, in
    round order; they join its frozen history. Returns the rounds loaded."""
    done = []
    for rec in sorted(log.read("adapters"), key=lambda x: x["round"]):
        if upto is not None and rec["round"] >= upto:
            break
        stack.load(f"r{rec['round']}", log.dir / rec["path"], rec["sha256"], lora)
        done.append(rec["round"])
    return done


@dataclass
class Student:
    """A run's base model with its baked history replayed up to (not including) round `upto`."""
    run_id: str
    log: RunLog
    cfg: Config
    stack: object   # stack.Stack, gated student on
    tok: object
    lora: object    # the LoraConfig every round's adapter uses
    upto: int | None


def open_student(root: str | Path, run_id: str, upto: int | None = None, device: str = "cpu",
                 trust_remote_code: bool = False, fix: str = "add --trust-remote-code") -> Student:
    from .bake import lora_config
    from .stack import Stack

    log = run_log(root, run_id)
    cfg = allow_remote_code(stored_config(log), trust_remote_code, fix)
    model, tok = base_model(cfg, root, device)
    cfg = memory.resolve_for(cfg, model, tok)[0]  # a stored auto batch (0) becomes this device's
    stack, lora = Stack(model), lora_config(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_layers,
                                                      cfg.lora_targets)
    replay(stack, log, lora, upto)
    return Student(run_id, log, cfg, stack, tok, lora, upto)


# ---------------------------------------------------------------- a round's stored stage outputs

def vector_path(log: RunLog, r: int) -> Path:
    return log.dir / "vectors" / f"round_{r}.safetensors"


def adapter_path(log: RunLog, r: int) -> Path:
    return log.dir / "adapters" / f"round_{r}.safetensors"


def stage_done(log: RunLog, r: int, stage: str) -> bool:
    return any(s["round"] == r and s["stage"] == stage for s in log.read("stages"))


def vector_record(log: RunLog, r: int) -> dict | None:
    """Round r's `vectors` row (path, sha256); None while the round has not extracted its vector."""
    from .errors import CorruptArtifact

    rec = next((x for x in log.read("vectors") if x["round"] == r), None)
    if rec is None and stage_done(log, r, "extract"):
        raise CorruptArtifact(f"run {log.run_id} round {r}: its vector has no recorded sha256 (stored before "
                              "steer-heal hashed vectors), so it cannot be checked and is not used; start a new run")
    return rec


def stored_vector(log: RunLog, r: int):
    """Round r's steering vector, checked against its recorded sha256; None while the round has not extracted it."""
    from .files import read_verified
    from .steering import load_vector

    rec = vector_record(log, r)
    return None if rec is None else load_vector(read_verified(log.dir / rec["path"], rec["sha256"],
                                                              f"vector of round {r}"))


def stored_dose(log: RunLog, r: int, cfg: Config):
    """Round r's dose stage read back (its scored completions, kept ones in the order the heal used them)."""
    from .dose import DoseResult

    comps = [c for c in log.read("completions") if c["round"] == r and c["phase"] in ("probe", "collect")]
    steps = [x for x in log.read("dose_steps") if x["round"] == r]
    return DoseResult.from_rows(comps, steps, cfg.n_keep, cfg.kappa_min)


def stored_kept(log: RunLog, r: int, cfg: Config) -> list[dict]:
    """The completions round r healed on; refuses a round whose dose stage has not finished."""
    if not stage_done(log, r, "dose"):
        raise UserError(f"run {log.run_id} round {r} has not finished its dose stage: no kept completions yet")
    return stored_dose(log, r, cfg).kept


def stored_heal(log: RunLog, r: int, cfg: Config):
    from .heal import HealResult

    return HealResult.from_steps([x for x in log.read("heal_steps") if x["round"] == r], cfg.epochs)


def stored_evals(log: RunLog) -> dict:
    """{(round, stage): evaluate.StageEval} of every stored evaluation of the run."""
    from .evaluate import StageEval

    return StageEval.by_stage(log.read("stage_metrics"), log.read("eval_items"))

"""A round's model for the diagnostics that evaluate or re-heal (c-sweep, barrier sweep): the student that
started the round, the round's vector and dose, and what the run evaluates with."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..evaluate import Probe
from ..student import Student, open_student, run_log, stored_evals, stored_vector
from .runs import check_history, latest_round


@dataclass
class RoundModel:
    """The student that started round `round` (baked history 0..round-1) and that round's vector."""
    student: Student
    round: int
    vector: dict | None  # v_round, None while the round has not extracted it
    coef: float | None   # the dose the round's steered eval used, None before that eval
    probe: Probe

    def __getattr__(self, name):  # run_id, log, cfg, stack, tok, lora: the student's
        return getattr(self.student, name)


# transformers builds a model under process-wide init contexts (meta device, default dtype): two
# threads loading at once (the parallel barrier sweep) break each other, so loads take turns
_LOADING = threading.Lock()


def open_round(root: str | Path, run_id: str, round_: int | None = None, device: str = "auto",
               trust_remote_code: bool = False) -> RoundModel:
    """Base model + the run's adapters of rounds < round (hash-checked), on `device`."""
    from ..models import pick_device

    log = run_log(root, run_id)
    r = latest_round(log) if round_ is None else round_
    check_history(log, r)
    vector = stored_vector(log, r)  # hash-checked before the model loads: a bad file fails at once
    with _LOADING:
        st = open_student(root, run_id, upto=r, device=str(pick_device(device)), trust_remote_code=trust_remote_code,
                          fix="add --trust-remote-code to this command")
    steered = stored_evals(log).get((r, "steered"))
    return RoundModel(st, r, vector, steered.coef if steered else None, Probe.of(st.cfg.part("probes")))


@contextmanager
def trial_adapter(stack, lora, name: str, seed: int) -> Iterator[None]:
    """A fresh adapter on top of the history for one trial, removed afterwards, leaving the stack as it was."""
    stack.add(name, lora, seed=seed)
    try:
        yield
    finally:
        stack.truncate(len(stack.names) - 1)


def devices(given: list[str] | None = None) -> list[str]:
    """Where model work runs: the given list, else every GPU when there are several, else one device."""
    import torch

    if given:
        return given
    n = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(n)] if n > 1 else ["auto"]

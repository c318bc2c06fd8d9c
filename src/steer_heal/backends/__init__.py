"""Optional backends: tinymfv's seven-way probe and steering-lite's hooks, in place of the built-in ones.

Neither package is on PyPI, so `--evaluator builtin` and `--steerer builtin` are the defaults.
A user who installed one from its repository picks it with `--evaluator tinymfv` or
`--steerer steering-lite`; the flow then calls

    mfv = mfv_fn(cfg)      # same signature and return dict as mfv.mfv, reuse_prefix and bf16 included
    steer = steer_fn(cfg)  # same signature as steering.steer: steer(model, vec, coef) -> context manager

and stores the same metric names. Each backend is one module (tinymfv.py, steering_lite.py); only
those import the packages, and only when asked. How a probe computes (reuse_prefix, bf16) is passed
in each call, never bound here: one route per knob.
"""

from __future__ import annotations

from .. import mfv as builtin_mfv
from .. import steering
from ..errors import UserError
from .steering_lite import STEERING_LITE_URL, Steer, _import_steering_lite, _steering_lite_steer
from .tinymfv import (
    _THINK_MSG,
    TINYMFV_FORMAT,
    TINYMFV_MODULES,
    TINYMFV_URL,
    Mfv,
    _import_tinymfv,
    _tinymfv_condition,
    _tinymfv_mfv,
    _tinymfv_row,
)

__all__ = ["STEERING_LITE_URL", "TINYMFV_FORMAT", "TINYMFV_MODULES", "TINYMFV_URL", "Mfv", "Steer",
           "_tinymfv_condition", "_tinymfv_row", "install_command", "mfv_fn", "steer_fn"]


def install_command(url: str) -> str:
    return f"pip install git+{url}"


def mfv_fn(cfg) -> Mfv:
    """The seven-way probe the config names: mfv.mfv (builtin) or the tinymfv adapter."""
    if cfg.evaluator == "builtin":
        return builtin_mfv.mfv
    if cfg.evaluator != "tinymfv":
        raise UserError(f"evaluator={cfg.evaluator!r} is not one of: builtin, tinymfv")
    mm = _import_tinymfv()
    if cfg.eval in ("mfv", "both") and cfg.think_tokens < 1:
        raise UserError(_THINK_MSG.format(k=cfg.think_tokens))
    return _tinymfv_mfv(mm)


def steer_fn(cfg) -> Steer:
    """The steering hooks the config names: steering.steer (builtin) or the steering-lite adapter."""
    if cfg.steerer == "builtin":
        return steering.steer
    if cfg.steerer != "steering-lite":
        raise UserError(f"steerer={cfg.steerer!r} is not one of: builtin, steering-lite")
    return _steering_lite_steer(_import_steering_lite())

"""The steering-lite backend: its `mean_diff` hooks behind steering.steer's contract (`--steerer steering-lite`).

steering-lite is not on PyPI; only this module imports it, and only when asked.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

from .. import steering
from ..errors import UserError
from ..models import get_layers

STEERING_LITE_URL = "https://github.com/wassname/steering-lite"

Steer = Callable[..., AbstractContextManager]


def _import_steering_lite():
    from . import install_command

    try:
        sl = importlib.import_module("steering_lite")
        for sub in ("attach", "target", "variants.mean_diff"):
            importlib.import_module(f"steering_lite.{sub}")
    except ImportError as e:
        raise UserError("--steerer steering-lite needs the steering-lite package, which is not on PyPI; install "
                          f"it from its repository: {install_command(STEERING_LITE_URL)}\n  import steering_lite: {e}"
                          ) from e
    return sl


def _steering_lite_steer(sl) -> Steer:
    # through the imported module, never a static import: steering-lite is an optional backend off PyPI
    attach, detach = sl.attach.attach, sl.attach.detach
    find_targets, MeanDiffC = sl.target.find_targets, sl.variants.mean_diff.MeanDiffC
    attached_attr = getattr(sl.attach, "_ATTACHED_ATTR", "_steering_lite_attached")

    @contextmanager
    def steer(model, vec: steering.Vector | None, coef: float | torch.Tensor) -> Iterator[None]:
        """steering.steer through steering-lite: its `mean_diff` method hooked on the same decoder layers,
        which adds coeff * state["v"] to each layer's output -- the builtin's h + coef * v[layer].

        The raw vector goes in as the method's state as it is (steering-lite's own extract, which
        unit-normalises, is not used). A scalar coef is steering-lite's coeff. A per-row [batch]
        coef has no coeff of its own there, so each layer's state becomes coef[:, None, None] * v
        ([batch, 1, hidden]) with coeff 1.0, the same sum per row. Hooks sit on the model's
        decoder-layer modules, so a PEFT wrapper is steered through its base model. Only one
        steering-lite steer may be open on a model at a time (steering-lite keeps one attachment
        per model); while open, its state is a buffer of the hooked layers (in state_dict too).
        """
        if vec is None:
            yield
            return
        layers = get_layers(model)
        idx = sorted(vec)
        dtype = vec[idx[0]].dtype
        per_row = torch.is_tensor(coef) and coef.dim() > 0
        cfg = MeanDiffC(layers=tuple(idx), normalize=False, dtype=dtype,
                        coeff=1.0 if per_row else float(coef))
        root = _steering_lite_root(model, layers, cfg, find_targets)
        if getattr(root, attached_attr, None) is not None:
            raise UserError("a steering-lite steer is already open on this model; steering-lite keeps one "
                              "attachment per model, so its steers cannot nest (the builtin steerer can)")
        state = {}
        for i in idx:
            dev = next(layers[i].parameters()).device
            v = vec[i].to(dev)
            state[i] = {"v": coef.detach().reshape(-1, 1, 1).to(dev, v.dtype) * v if per_row else v}
        attach(root, cfg, state)
        try:
            yield
        finally:
            detach(root)

    return steer


def _steering_lite_root(model, layers, cfg, find_targets):
    """The module steering-lite should attach to: the model itself, or a PEFT wrapper's base model, whichever
    makes its block finder return exactly our decoder layers."""
    base = getattr(model, "get_base_model", None)
    for root in (model, base() if callable(base) else None):
        if root is None:
            continue
        try:
            targets = find_targets(root, cfg)
        except (RuntimeError, ValueError, AttributeError):
            continue
        if targets and all(mod is layers[i] for _, mod, i in targets):
            return root
    raise UserError(f"steering-lite cannot find the decoder layers of {type(model).__name__} (it looks at "
                      "model.layers, language_model.layers and language_model.model.layers under .model); "
                      "use --steerer builtin for this model")

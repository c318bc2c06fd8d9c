"""The built-in steering hooks: add coef * v[layer] to the output of each decoder layer in the band.

A steering vector is {layer index: [hidden] direction}, stored as safetensors. backends/ offers
steering-lite's hooks as a drop-in for `steer`; both have the signature steer(model, vec, coef).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save

from .files import atomic_write_bytes, sha256_file
from .models import get_layers

Vector = dict[int, torch.Tensor]  # layer index -> [hidden] direction


@contextmanager
def steer(model, vec: Vector | None, coef: float | torch.Tensor) -> Iterator[None]:
    """Add coef * v[layer] to the output of each layer in the band; hooks always removed.

    coef may be a [batch] tensor so rows of one batch get different doses.
    """
    if vec is None:
        yield
        return
    layers = get_layers(model)
    handles = []

    def hook_for(v: torch.Tensor):
        def hook(_mod, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            c = coef.view(-1, 1, 1).to(h) if torch.is_tensor(coef) else coef
            h = h + c * v.to(h)
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return hook

    try:
        for i, v in vec.items():
            handles.append(layers[i].register_forward_hook(hook_for(v)))
        yield
    finally:
        for h in handles:
            h.remove()


def random_like(vec: Vector, seed: int) -> Vector:
    """A random direction with the same per-layer norms as vec (seeded): the size of the push, no trait.
    ONE direction, shared by every layer of the band and scaled per layer to vec's norm there: the extracted
    vector points nearly the same way at adjacent layers, so its pushes add up along the residual stream;
    independent per-layer directions would be equal-norm but far less disruptive (issue 24). The same seed
    draws the same direction, so only the norms follow vec."""
    g = torch.Generator().manual_seed(seed)
    x = None
    out = {}
    for i, v in sorted(vec.items()):
        if x is None:
            x = torch.randn(v.shape, generator=g, dtype=torch.float32)
        out[i] = (x * (v.float().norm() / x.norm())).to(v)
    return out


def control_vector(vec: Vector, control: str, seed: int) -> Vector | None:
    """The vector a run generates with (and steers its steered eval with), given its `control`:
    the extracted vector (none), no vector at all (c0: the loop on its own unsteered text), or an
    equal-norm random direction (random: the push without the trait). `seed` is the run's
    `seeds.control_vector`, one per run, so the random control pushes the same way every round."""
    if control == "none":
        return vec
    if control == "c0":
        return None
    if control == "random":
        return random_like(vec, seed)
    raise ValueError(f"unknown control {control!r}")


def save_vector(vec: Vector, path: str | Path) -> str:
    """Write the vector atomically; return the file's sha256."""
    atomic_write_bytes(Path(path), save({f"layer.{i}": v.contiguous().cpu() for i, v in vec.items()}))
    return sha256_file(path)


def load_vector(src: str | Path | bytes) -> Vector:
    """A vector from its file, or from bytes already checked against their sha256 (student.stored_vector)."""
    tensors = load(src) if isinstance(src, bytes) else load_file(str(src))
    return {int(k.split(".")[1]): v for k, v in tensors.items()}

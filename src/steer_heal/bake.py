"""bake: the stack of round adapters, unmerged and gated.

One set of weights gives exactly three models:
  base     every adapter off          (bitwise the original model)
  prev     history on, current off    (the student before this round)
  student  all on
Only the current round's adapter ever trains; history is frozen, also after peft
calls that switch gradients back on. Adapters are saved as safetensors + sha256.

Each gated adapter costs a forward its own small matmuls (round 10 ran ~2.8x round 0's forward on
SmolLM2, docs/performance.md). With fold=True the history is added into the weights when the next
adapter arrives: one live adapter stays gated, base() swaps the original weights back in (bitwise),
and prev/student differ from the gated stack by float rounding only (tests/test_speed.py).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load, save
from transformers.pytorch_utils import Conv1D

from .config import ConfigError
from .files import atomic_write_bytes, sha256_bytes
from .models import band, get_layers


class CorruptArtifact(ConfigError):
    """A stored adapter or vector file is missing or does not match its recorded sha256."""


def read_verified(path: str | Path, sha256: str, what: str) -> bytes:
    """The bytes of a stored artifact whose recorded sha256 they must match (the one hash check)."""
    path = Path(path)
    if not path.is_file():
        raise CorruptArtifact(f"{what} is missing: {path}. Restore the file; a run cannot resume past a lost "
                             "artifact.")
    data = path.read_bytes()
    if (got := sha256_bytes(data)) != sha256:
        raise CorruptArtifact(f"{what} at {path} does not match its recorded sha256 (file {got[:12]}..., store "
                             f"{sha256[:12]}...): the file is corrupt or was replaced. Restore it; resume will "
                             "not trust it.")
    return data


def bake(stack: Stack, name: str, path: str | Path) -> str:
    """Freeze the stack (the trained adapter joins the history) and write the adapter; its sha256 is what the
    store records and what every later load checks."""
    stack.model.requires_grad_(False)
    return stack.save(name, path)


def lora_targets(model, layers: tuple[float, float], targets: tuple[str, ...] = ()) -> list[str]:
    """Full dotted names of the linears a round's LoRA adapts: inside the decoder layers of the band, so
    never a vision tower's or lm_head. No `targets` (auto): every linear there, attention and MLP,
    fused ones (qkv_proj, gate_up_proj, query_key_value) included. Else the ones whose name ends with
    one of `targets` ("q_proj", "mlp.down_proj"). Call it on the plain model, before any adapter."""
    targets = () if tuple(targets) == ("auto",) else tuple(targets)
    dec = get_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is dec)
    linear = (torch.nn.Linear, Conv1D)
    names, seen, hit = [], {}, set()
    for i in band(layers, len(dec)):
        for n, m in dec[i].named_modules():
            if isinstance(m, linear):
                seen[n] = None
                t = next((t for t in targets if n == t or n.endswith("." + t)), None)
                if t or not targets:
                    names.append(f"{prefix}.{i}.{n}")
                    hit.add(t)
    lacking = [t for t in targets if t not in hit]
    if not names or lacking:
        why = f"no linear named {' or '.join(lacking)}" if lacking else "no linear to adapt"
        raise ConfigError(f"--lora-targets {' '.join(targets) or 'auto'}: {why} in the decoder layers of "
                          f"{type(model).__name__} ({prefix}.N); their linears: {' '.join(seen) or 'none'}. "
                          "Pass --lora-targets with names from that list")
    return names


def lora_config(model, r: int, alpha: float, layers: tuple[float, float], targets: tuple[str, ...] = ()) -> LoraConfig:
    """The LoRA every round's adapter uses: lora_targets(model, layers, targets) at rank r."""
    # init_lora_weights=True: B = 0, so a fresh adapter is an exact no-op. GPT-2's Conv1D stores its weight
    # transposed ([in, out]): fan_in_fan_out tells peft, so deltas, merges and folds land the right way round
    names = lora_targets(model, layers, targets)
    mods = dict(model.named_modules())
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=names, init_lora_weights=True,
                      fan_in_fan_out=any(isinstance(mods[n], Conv1D) for n in names))


class Stack:
    """The student: a base model plus a gated history of round adapters."""

    def __init__(self, model, fold: bool = False):
        self.model = model  # becomes a PeftModel at the first adapter
        self.names: list[str] = []  # every round's adapter, folded ones first
        self.lora: LoraConfig | None = None
        self.fold, self.folded = fold, 0  # fold: history goes into the weights; folded: how many already have
        self._orig: dict[str, torch.Tensor] = {}  # module -> its original weight, once a fold changed it
        self._unmerged: dict[str, torch.Tensor] = {}  # module -> its weight before merged() added the live deltas
        self._off = False  # inside a disable_adapter context

    @property
    def live(self) -> list[str]:
        """The adapters peft still gates (all of them unless folding)."""
        return self.names[self.folded:]

    @property
    def peft(self) -> bool:
        return bool(self.names)

    def add(self, name: str, lora: LoraConfig, seed: int) -> None:
        """A fresh adapter (A seeded, B = 0) that becomes current, trainable alone."""
        torch.manual_seed(seed)
        if not self.names:
            self.model = get_peft_model(self.model, copy.deepcopy(lora), adapter_name=name)
        else:
            self.model.add_adapter(name, copy.deepcopy(lora))
        self.names.append(name)
        self.lora = lora
        if self.fold:
            self._fold(self.live[:-1])
        self._activate(self.live)

    def _fold(self, names: list[str]) -> None:
        """Add these (frozen, complete) adapters' deltas into the base weights, keeping the originals, and
        drop them from peft."""
        if not names:
            return
        for mod_name, m in self.model.named_modules():
            if isinstance(m, LoraLayer) and any(n in m.lora_A for n in names):
                w = m.get_base_layer().weight
                self._orig.setdefault(mod_name, w.data.clone())
                with torch.no_grad():
                    for n in names:
                        if n in m.lora_A:
                            w.data += m.get_delta_weight(n).to(w.dtype)
        self.model.base_model.set_adapter(self.names[-1])  # so peft deletes no active adapter
        for n in names:
            self.model.delete_adapter(n)
        self.folded += len(names)

    def truncate(self, n: int) -> None:
        """Keep the first n adapters, frozen (a past round's student); with none left, the plain base model."""
        if len(self.names) <= n:
            return
        if n < self.folded:
            raise ConfigError(f"cannot truncate to {n} adapters: {self.folded} are folded into the weights (open the "
                              "run's stack without fold_history to look at earlier students)")
        if n == 0:
            self.model = self.model.unload()  # LoRA layers out, nothing merged: the original weights
        else:
            for name in self.names[n:]:
                self.model.delete_adapter(name)
        self.names = self.names[:n]
        if self.live:
            self._activate(self.live)
        self.model.requires_grad_(False)  # _activate leaves the newest adapter trainable; a student is frozen

    def _activate(self, names: list[str]) -> None:
        self.model.base_model.set_adapter(names)
        self.freeze_history()

    def freeze_history(self) -> None:
        """peft's set_adapter marks every active adapter trainable; only the current one may be."""
        cur = self.names[-1]
        for n, p in self.model.named_parameters():
            p.requires_grad_(f".{cur}." in n and "lora_" in n)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextmanager
    def _gates_off(self) -> Iterator[None]:
        if self._off:  # already off (base() inside merged()): peft's own context would switch them back on
            yield
            return
        self._off = True
        try:
            with self.model.disable_adapter():
                yield
        finally:
            self._off = False
            self.freeze_history()  # leaving disable_adapter re-enables grads on every active adapter

    def _weights(self, names) -> dict[str, torch.nn.Parameter]:
        return {n: m.get_base_layer().weight for n, m in self.model.named_modules() if n in names}

    @contextmanager
    def _swapped(self, new: dict[str, torch.Tensor]) -> Iterator[None]:
        """These modules' weights replaced by these tensors (a pointer swap, so restored bitwise)."""
        ws = self._weights(new)
        now = {n: w.data for n, w in ws.items()}
        try:
            for n, w in ws.items():
                w.data = new[n]
            yield
        finally:
            for n, w in ws.items():
                w.data = now[n]

    @contextmanager
    def base(self) -> Iterator[None]:
        if not self.peft:
            yield
            return
        with self._swapped({**self._unmerged, **self._orig}), self._gates_off():  # the original tensors themselves
            yield

    @contextmanager
    def merged(self) -> Iterator[None]:
        """The student with its live adapters added into the weights for a while (a folding stack's frozen
        stages: extract, dose, evals), so a forward costs what the plain model's does. Within float rounding
        of the gated student; base() inside still gives the original weights bitwise. Not for training."""
        if not (self.fold and self.peft) or self._unmerged:
            yield
            return
        live = [(n, m) for n, m in self.model.named_modules()
                if isinstance(m, LoraLayer) and any(a in m.lora_A for a in self.live)]
        with torch.no_grad():
            new = {n: m.get_base_layer().weight.data + sum(m.get_delta_weight(a).to(m.get_base_layer().weight.dtype)
                                                         for a in self.live if a in m.lora_A) for n, m in live}
        self._unmerged = {n: w.data for n, w in self._weights(new).items()}
        try:
            with self._swapped(new), self._gates_off():
                yield
        finally:
            self._unmerged = {}

    @contextmanager
    def prev(self) -> Iterator[None]:
        """History on, current off; with no history that is base."""
        if len(self.names) <= 1:
            with self.base():
                yield
        elif len(self.live) <= 1:  # the whole history is in the weights
            with self._gates_off():
                yield
        else:
            self._activate(self.live[:-1])
            try:
                yield
            finally:
                self._activate(self.live)

    @contextmanager
    def ref(self, which: str) -> Iterator[None]:
        with (self.base() if which == "base" else self.prev()):
            yield

    # ------------------------------------------------------------ files

    def save(self, name: str, path: str | Path) -> str:
        """Write the adapter atomically; return its sha256."""
        sd = {k: v.detach().contiguous().cpu() for k, v in
              get_peft_model_state_dict(self.model, adapter_name=name).items()}
        data = save(sd)
        atomic_write_bytes(Path(path), data)
        return sha256_bytes(data)

    def load(self, name: str, path: str | Path, sha256: str, lora: LoraConfig) -> None:
        """Add a baked adapter from its file after checking the hash; it joins the frozen history."""
        data = read_verified(path, sha256, f"adapter {name}")
        self.add(name, lora, seed=0)
        res = set_peft_model_state_dict(self.model, load(data), adapter_name=name)
        if getattr(res, "unexpected_keys", None):
            raise CorruptArtifact(f"adapter {name} at {path} does not fit this model: {res.unexpected_keys[:3]}")
        self.model.requires_grad_(False)

    def export(self, out_dir: str | Path, tok=None) -> Path:
        """Merge the whole stack into a plain Hugging Face model directory (on a copy)."""
        merged = copy.deepcopy(self.model)
        if self.peft:
            merged = merged.merge_and_unload(adapter_names=self.live)  # folded ones are in the weights already
        merged.save_pretrained(out_dir)
        if tok is not None:
            tok.save_pretrained(out_dir)
        return Path(out_dir)

"""stack: the student as a stack of round adapters, unmerged and gated.

One set of weights gives exactly three models:
  base     every adapter off          (bitwise the original model)
  prev     history on, current off    (the student before this round)
  student  all on
Only the current round's adapter ever trains; history is frozen, also after peft
calls that switch gradients back on. Adapters are saved as safetensors + sha256 (bake.py decides when).

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

from .errors import CorruptArtifact, UserError
from .files import atomic_write_bytes, read_verified, sha256_bytes


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
            raise UserError(f"cannot truncate to {n} adapters: {self.folded} are folded into the weights (open the "
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

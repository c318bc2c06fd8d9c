"""Optional backends: tinymfv's seven-way probe and steering-lite's hooks, in place of the built-in ones.

Neither package is on PyPI, so `--evaluator builtin` and `--steerer builtin` are the defaults.
A user who installed one from its repository picks it with `--evaluator tinymfv` or
`--steerer steering-lite`; the flow then calls

    mfv = mfv_fn(cfg)      # same signature and return dict as mfv.mfv
    steer = steer_fn(cfg)  # same signature as steering.steer: steer(model, vec, coef) -> context manager

and stores the same metric names. Only this module imports the packages, and only when asked.

tinymfv's repository renamed its package to moral-maps (module `moralmaps`) in July 2026; the
evaluate() API stayed the same, so either module name is accepted, `moralmaps` first.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from importlib import metadata

import torch

from . import mfv as builtin_mfv
from . import steering
from .config import FOUNDATIONS
from .errors import UserError
from .models import evaluating, get_layers

TINYMFV_URL = "https://github.com/wassname/tinymfv"
STEERING_LITE_URL = "https://github.com/wassname/steering-lite"
TINYMFV_MODULES = ("moralmaps", "tinymfv")  # importable names, newest first; their distributions below
_TINYMFV_DISTS = {"moralmaps": "moral-maps", "tinymfv": "tiny-mfv"}
# evaluate() keywords this adapter passes; an older tinymfv without them is refused by name
_TINYMFV_KWARGS = ("vignettes", "conditions", "max_think_tokens", "batch_size", "return_per_row", "verbose")
TINYMFV_FORMAT = 'tinymfv: JSON enum of 7 option sentences, answer slot {"violation": "<option index 0-6>'

Mfv = Callable[..., dict]
Steer = Callable[..., AbstractContextManager]


def install_command(url: str) -> str:
    return f"pip install git+{url}"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown version"


# ---------------------------------------------------------------- the seven-way probe

def mfv_fn(cfg) -> Mfv:
    """The seven-way probe the config names: mfv.mfv (builtin) or the tinymfv adapter."""
    if cfg.evaluator == "builtin":
        return builtin_mfv.mfv if cfg.reuse_prefix else functools.partial(builtin_mfv.mfv, reuse_prefix=False)
    if cfg.evaluator != "tinymfv":
        raise UserError(f"evaluator={cfg.evaluator!r} is not one of: builtin, tinymfv")
    mm = _import_tinymfv()
    if cfg.eval in ("mfv", "both") and cfg.think_tokens < 1:
        raise UserError(_THINK_MSG.format(k=cfg.think_tokens))
    return _tinymfv_mfv(mm)


_THINK_MSG = ("think_tokens={k} is invalid with --evaluator tinymfv: its probe always thinks for exactly "
              "think_tokens tokens (end-of-turn suppressed) before it forces the answer, and cannot score "
              "without a think; pass --think-tokens 1 or more (tinymfv's own default is 64)")


def _import_tinymfv():
    tried = []
    for name in TINYMFV_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            tried.append(f"import {name}: {e}")
            continue
        dist = f"{_TINYMFV_DISTS[name]} {_version(_TINYMFV_DISTS[name])}"
        fn = getattr(mod, "evaluate", None)
        params = inspect.signature(fn).parameters if callable(fn) else {}
        lacking = [k for k in _TINYMFV_KWARGS if k not in params]
        if not lacking:
            return mod
        tried.append(f"{name} ({dist}) is too old: its evaluate() lacks {', '.join(lacking)}")
    raise UserError("--evaluator tinymfv needs the tinymfv package, which is not on PyPI; install it from its "
                      f"repository: {install_command(TINYMFV_URL)}  (it installs as moral-maps, module moralmaps)"
                      "\n  " + "\n  ".join(tried))


class _WithSystem:
    """The caller's tokenizer, except that a conversation templated with add_generation_prompt=True (the
    opening user turn, the only such call tinymfv makes) gets `system` as its first message, exactly as
    mfv.chat_ids builds it. tinymfv's evaluate() has no system-prompt input of its own."""

    def __init__(self, tok, system: str):
        object.__setattr__(self, "_tok", tok)
        object.__setattr__(self, "_system", system)

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __setattr__(self, name, value):
        setattr(self._tok, name, value)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._tok)

    def apply_chat_template(self, conversation, *args, **kwargs):
        if kwargs.get("add_generation_prompt") and conversation and conversation[0].get("role") != "system":
            conversation = [{"role": "system", "content": self._system}, *conversation]
        return self._tok.apply_chat_template(conversation, *args, **kwargs)


def _tinymfv_condition(vignettes: list[dict]) -> str:
    """The tinymfv condition the vignettes' texts are in (data.load_vignettes' `frame`); one per run, and
    tinymfv's default, other_violate, when the frame could not be told."""
    frames = {v.get("frame") or "other_violate" for v in vignettes}
    if len(frames) != 1:
        raise UserError(f"vignettes mix frames {sorted(frames)}: evaluate one frame at a time")
    return frames.pop()


def _tinymfv_row(v: dict, condition: str) -> dict:
    """Our vignette {id, text, foundation, human: {F: %}} as a tinymfv row: the text under its condition."""
    row = {"id": v["id"], "foundation_coarse": v["foundation"], condition: v["text"]}
    row.update({f"human_{f}": float(x) for f, x in (v.get("human") or {}).items()})
    return row


def _tinymfv_mfv(mm) -> Mfv:
    def mfv(model, tok, vignettes: list[dict], system: str = "", think_tokens: int = 0, batch: int = 16) -> dict:
        """mfv.mfv's contract, measured by tinymfv's forced-choice probe.

        tinymfv asks with its own prompt: the seven Clifford option sentences as a JSON enum, a greedy
        think of exactly `think_tokens` tokens (end-of-turn suppressed, so >= 1 is required), then
        "</think>", a "Just answer" user turn and a forced `{"violation": "` prefill; the scored tokens
        are the option indices 0-6, in forward and reversed listing. Per vignette it returns
        p = softmax of the mean of the two listings' log-probs (the builtin averages the two
        renormalised distributions instead) and pmass_allowed = full-vocabulary mass on the seven
        index tokens, averaged over the two listings -- what `coherence` means here too, but read
        at a force-prefilled slot, so it sits much higher than the builtin's and the two do not
        compare. profile, nats (log profile), coherence, top1_agree (argmax p vs the humans' argmax,
        ties to the earlier foundation, as the builtin) and n are computed here from those rows.

        tinymfv's numbers for a vignette shift a little with the vignettes that share its batch (a
        left-padded row scores differently from the same row alone; the builtin's do not): the same
        vignettes at the same `batch` repeat exactly, so stages stay paired.

        A vignette tinymfv marks unscorable (non-finite logits, or a think closed with no answer
        slot) keeps its row with p and pmass None and is left out of every mean and of n; nothing
        is filled in for it. If no vignette is scorable, profile/nats/coherence/top1_agree are None.
        """
        if not vignettes:
            raise UserError("mfv needs at least one vignette")
        if think_tokens < 1:
            raise UserError(_THINK_MSG.format(k=think_tokens))
        t = _WithSystem(tok, system) if system else tok
        saved = (tok.padding_side, tok.pad_token)  # tinymfv sets left padding (and a pad token) on the tokenizer
        try:
            with evaluating(model):
                cond = _tinymfv_condition(vignettes)
                rep = mm.evaluate(model, t, vignettes=[_tinymfv_row(v, cond) for v in vignettes],
                                  conditions=(cond,), max_think_tokens=think_tokens,
                                  batch_size=batch, return_per_row=True, verbose=0)
        finally:
            if tok.padding_side != saved[0]:
                tok.padding_side = saved[0]
            if tok.pad_token != saved[1]:
                tok.pad_token = saved[1]
        order = [str(f) for f in rep["table"]["foundation"]]  # the order of each row's p vector
        if sorted(order) != sorted(FOUNDATIONS):
            raise UserError(f"tinymfv reports foundations {order}; this adapter maps only {list(FOUNDATIONS)}")
        rows = []
        for v, r in zip(vignettes, rep["per_row"], strict=True):
            if r["id"] != v["id"]:
                raise RuntimeError(f"tinymfv returned row {r['id']!r} where {v['id']!r} was expected")
            p = dict(zip(order, (float(x) for x in r["p"]), strict=True))
            pm = float(r["pmass_allowed"])
            ok = math.isfinite(pm) and all(math.isfinite(x) for x in p.values())
            rows.append({"id": v["id"], "foundation": v["foundation"],
                         "p": {f: p[f] for f in FOUNDATIONS} if ok else None, "pmass": pm if ok else None})
        scored = [(r, v) for r, v in zip(rows, vignettes, strict=True) if r["p"] is not None]
        n = len(scored)
        if not n:
            return {"profile": {f: None for f in FOUNDATIONS}, "nats": {f: None for f in FOUNDATIONS},
                    "coherence": None, "top1_agree": None, "n": 0, "rows": rows, "answer_format": TINYMFV_FORMAT}
        profile = {f: sum(r["p"][f] for r, _ in scored) / n for f in FOUNDATIONS}
        judged = [(r, v["human"]) for r, v in scored if v.get("human")]
        top1 = (sum(builtin_mfv.top_foundation(r["p"]) == builtin_mfv.top_foundation(h) for r, h in judged) / len(judged)
                if judged else None)
        return {"profile": profile,
                "nats": {f: math.log(p) if p > 0 else float("-inf") for f, p in profile.items()},
                "coherence": sum(r["pmass"] for r, _ in scored) / n,
                "top1_agree": top1, "n": n, "rows": rows, "answer_format": TINYMFV_FORMAT}

    return mfv


# ---------------------------------------------------------------- the steering hooks

def steer_fn(cfg) -> Steer:
    """The steering hooks the config names: steering.steer (builtin) or the steering-lite adapter."""
    if cfg.steerer == "builtin":
        return steering.steer
    if cfg.steerer != "steering-lite":
        raise UserError(f"steerer={cfg.steerer!r} is not one of: builtin, steering-lite")
    return _steering_lite_steer(_import_steering_lite())


def _import_steering_lite():
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

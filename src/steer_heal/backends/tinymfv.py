"""The tinymfv backend: its seven-way probe behind mfv.mfv's contract (`--evaluator tinymfv`).

tinymfv is not on PyPI; its repository renamed the package to moral-maps (module `moralmaps`) in July
2026 and kept the evaluate() API, so either module name is accepted, `moralmaps` first. Only this
module imports it, and only when asked.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from importlib import metadata

from loguru import logger

from .. import mfv as builtin_mfv
from ..config import FOUNDATIONS
from ..errors import UserError
from ..models import evaluating

TINYMFV_URL = "https://github.com/wassname/tinymfv"
TINYMFV_MODULES = ("moralmaps", "tinymfv")  # importable names, newest first; their distributions below
_TINYMFV_DISTS = {"moralmaps": "moral-maps", "tinymfv": "tiny-mfv"}
# evaluate() keywords this adapter passes; an older tinymfv without them is refused by name
_TINYMFV_KWARGS = ("vignettes", "conditions", "max_think_tokens", "batch_size", "return_per_row", "verbose")
TINYMFV_FORMAT = 'tinymfv: JSON enum of 7 option sentences, answer slot {"violation": "<option index 0-6>'
_SAID: set[str] = set()  # knobs this backend has said it cannot honour (once per process)

Mfv = Callable[..., dict]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown version"


def _say_once(knob: str, why: str) -> None:
    if knob not in _SAID:
        _SAID.add(knob)
        logger.info(why)


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
    from . import install_command

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
    def mfv(model, tok, vignettes: list[dict], system: str = "", think_tokens: int = 0, batch: int = 16,
            reuse_prefix: bool = True, bf16: bool = False) -> dict:
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

        bf16 is honoured (tinymfv's forwards run under bf16 autocast); reuse_prefix cannot be (tinymfv
        scores every prompt in full), which is said once per process.
        """
        if not vignettes:
            raise UserError("mfv needs at least one vignette")
        if think_tokens < 1:
            raise UserError(_THINK_MSG.format(k=think_tokens))
        if reuse_prefix:
            _say_once("reuse_prefix", "--evaluator tinymfv scores every prompt in full (it has no shared-prefix "
                      "path): --reuse-prefix does not reach its seven-way probe (--no-reuse-prefix says the same)")
        t = _WithSystem(tok, system) if system else tok
        saved = (tok.padding_side, tok.pad_token)  # tinymfv sets left padding (and a pad token) on the tokenizer
        try:
            with evaluating(model, bf16):
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

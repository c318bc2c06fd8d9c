"""memory.py: the estimate's terms against what torch holds, the auto batch at its boundary, and the real
shapes of shapes.py (their parameter counts, a byte-level tokenizer of their vocabulary)."""

from __future__ import annotations

import pytest
import torch

from steer_heal import memory, shapes
from steer_heal.config import Config
from steer_heal.errors import UserError
from steer_heal.memory import SAFETY, Shape, auto_batch, estimate, kv_bytes
from steer_heal.models import load_model
from steer_heal.presets import preset


@pytest.mark.parametrize("name", sorted(shapes.SHAPES))
def test_stored_shapes_have_their_published_parameter_counts(name):
    n = shapes.params(shapes.config(name))
    assert n == pytest.approx(shapes.PARAMS[name], rel=5e-3)
    s = Shape.of(shapes.config(name), n)
    # the seven linears of every layer plus the (tied) embedding are the model, to the norms' few thousand
    assert s.layers * s.layer_linears() + s.vocab * s.hidden == pytest.approx(n, rel=1e-4)


def test_kv_estimate_is_what_the_cache_holds(model_cache):
    """A sliding-window model's cache after a forward longer than its window: full layers hold every token,
    sliding ones their window at most (the tiny gemma3: window 64, 4 layers)."""
    model, _ = load_model("tiny-random-gemma3", cache=model_cache)
    s = Shape.of(model.config, sum(p.numel() for p in model.parameters()))
    assert s.window == 64
    ids = torch.randint(10, 200, (3, 100))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_bytes(s, 3, 100, 4) >= held  # an upper bound ...
    assert kv_bytes(s, 3, 100, 4) <= held * 1.05  # ... and a tight one


def _kw(**over):
    s = Shape.of(shapes.config("gemma-3-4b"), int(shapes.PARAMS["gemma-3-4b"]))
    return dict(dict(s=s, elt=2, heal_batch=3, prompt=120, new=512, max_len=1024, band_layers=20, rank=32,
                     rounds=8, fold=True), **over)


@pytest.mark.parametrize("stage,key", [("generate", "gen_batch"), ("eval", "eval_batch")])
def test_auto_batch_is_the_largest_that_fits(stage, key):
    kw = _kw()
    free = 20 * memory.GIB
    b = auto_batch(free, stage, **kw)
    weights = kw["s"].params * kw["elt"]
    need = lambda n: estimate(**dict(dict(gen_batch=1, eval_batch=1), **kw, **{key: n}))[stage] - weights  # noqa: E731
    assert 1 < b < 256
    assert need(b) <= SAFETY * free < need(b + 1)
    assert auto_batch(free, stage, **_kw(fold=False)) >= b  # the fold's two weight copies take room
    assert auto_batch(1 * memory.GIB, stage, **kw) == 0  # the fold's copies alone overflow 1 GiB


def test_gemma_on_an_h200_fits_the_gpu_presets_batches():
    """The numbers docs/performance.md quotes: gemma-3-4b-it in bf16 with the GPU presets' fold on 139 GiB."""
    est = estimate(**_kw(gen_batch=16, eval_batch=8))
    assert 14 * memory.GIB < est["weights+history"] < 16 * memory.GIB  # 7.8 GB weights, 2 x 3.8 GB fold copies
    assert auto_batch(130 * memory.GIB, "generate", **_kw()) >= 16


def test_auto_is_a_valid_batch_and_a_cpu_gets_the_fallback(model_cache):
    cfg = Config(**preset("fast-dev")).replace(gen_batch=0, eval_batch=0).validate()
    model, tok = load_model("tiny-random", cache=model_cache)
    got, note = memory.resolve_batches(cfg, model, 4, 40)
    assert (got.gen_batch, got.eval_batch) == (memory.FALLBACK_BATCH,) * 2 and "fallback" in note
    assert memory.resolve_batches(cfg.replace(gen_batch=3, eval_batch=5), model, 4, 40) == (
        cfg.replace(gen_batch=3, eval_batch=5), "")
    with pytest.raises(UserError, match="gen_batch"):
        cfg.replace(gen_batch=-1).validate()


def test_byte_tokenizer_has_the_real_vocab_and_a_chat_turn():
    from steer_heal.tokens import chat, turn_end_id

    tok = shapes.byte_tokenizer(4096)
    assert len(tok) == 4096 and turn_end_id(tok) == tok.eos_token_id == 1 and tok.pad_token_id == 0
    text = chat(tok, "Héllo", "Be brief.")
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert isinstance(tok.decode([4000, 300]), str)  # fillers a random model samples decode


def test_a_stored_auto_batch_opens_as_a_real_batch(model_cache, tmp_path):
    """A run stored with --gen-batch 0 --eval-batch 0 keeps 0 in its config; whoever opens its student (the
    diagnostics) gets this device's batch, never 0 (a range step of 0 would crash every probe)."""
    from steer_heal.store import RunLog
    from steer_heal.student import open_student

    cfg = Config(**preset("fast-dev")).replace(gen_batch=0, eval_batch=0, out=str(tmp_path))
    RunLog(str(tmp_path), "r").append("run_info", [dict(run_id="r", config=cfg.to_dict())])
    st = open_student(str(tmp_path), "r", upto=0)
    assert (st.cfg.gen_batch, st.cfg.eval_batch) == (memory.FALLBACK_BATCH,) * 2

"""Optional backends: the builtin path always; tinymfv and steering-lite against the real packages when installed."""

import copy
import importlib
import importlib.util
import math
import sys

import pytest
import torch

from steer_heal import backends, steering
from steer_heal import mfv as builtin_mfv
from steer_heal.config import FOUNDATIONS, Config
from steer_heal.data import load_vignettes
from steer_heal.errors import UserError
from steer_heal.models import get_layers, text_config
from steer_heal.tokens import chat, encode_left


def _importable(*names):
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


needs_tinymfv = pytest.mark.skipif(_importable(*backends.TINYMFV_MODULES) is None,
                                   reason="tinymfv (moralmaps) not installed; " + backends.install_command(backends.TINYMFV_URL))


# ---------------------------------------------------------------- builtin and absent packages

def test_builtin_is_the_default():
    cfg = Config()
    assert (cfg.evaluator, cfg.steerer) == ("builtin", "builtin")
    assert backends.mfv_fn(cfg) is builtin_mfv.mfv
    assert backends.steer_fn(cfg) is steering.steer


def test_unknown_backend_names_the_choices():
    from types import SimpleNamespace as NS
    with pytest.raises(UserError, match="builtin, tinymfv"):
        backends.mfv_fn(NS(evaluator="nope", eval="both", think_tokens=1))
    with pytest.raises(UserError, match="builtin, steering-lite"):
        backends.steer_fn(NS(steerer="nope"))


def test_absent_tinymfv_says_how_to_install(monkeypatch):
    for name in backends.TINYMFV_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # import of a None entry raises ImportError
    with pytest.raises(UserError) as e:
        backends.mfv_fn(Config(evaluator="tinymfv", think_tokens=1))
    assert "pip install git+https://github.com/wassname/tinymfv" in str(e.value)
    assert "not on PyPI" in str(e.value)


def test_absent_steering_lite_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "steering_lite", None)
    with pytest.raises(UserError) as e:
        backends.steer_fn(Config(steerer="steering-lite"))
    assert "pip install git+https://github.com/wassname/steering-lite" in str(e.value)


# ---------------------------------------------------------------- steering-lite

def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _forward(model, tok, texts):
    enc = encode_left(tok, texts, next(model.parameters()).device)
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True, use_cache=False)
    return out.logits, out.hidden_states


def _vector(model, seed=0):
    layers = get_layers(model)
    n = len(layers)
    hidden = text_config(model).hidden_size
    g = torch.Generator().manual_seed(seed)
    return {i: torch.randn(hidden, generator=g) for i in sorted({n // 2 - 1, n // 2, n - 1})}


def _assert_same_steer(model, tok, texts, vec, coef):
    sl_steer = backends.steer_fn(Config(steerer="steering-lite"))
    plain, _ = _forward(model, tok, texts)
    before_hooks, before_keys = _hook_count(model), set(model.state_dict())
    with steering.steer(model, vec, coef):
        ref_logits, ref_hs = _forward(model, tok, texts)
    with sl_steer(model, vec, coef):
        assert _hook_count(model) == before_hooks + len(vec)
        got_logits, got_hs = _forward(model, tok, texts)
    assert not torch.allclose(plain, ref_logits, atol=1e-3), "the vector should move the logits"
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-5, rtol=0)
    for a, b in zip(got_hs, ref_hs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # nothing left behind: hooks, state buffers, marker attributes
    assert _hook_count(model) == before_hooks
    assert set(model.state_dict()) == before_keys
    assert not [n for n, _ in model.named_buffers() if "_steering" in n]
    assert not [n for n, m in model.named_modules() if any(a.startswith("_steering") for a in vars(m))]


@pytest.fixture(scope="module")
def texts(tiny):
    _, tok = tiny
    return [chat(tok, "Should I report my manager?"), chat(tok, "Hi"), chat(tok, "Tell me about duty and care.", "Be brief.")]


def test_steering_lite_matches_builtin_scalar_and_per_row(tiny, texts):
    pytest.importorskip("steering_lite")
    model, tok = tiny
    vec = _vector(model)
    _assert_same_steer(model, tok, texts, vec, 2.5)
    _assert_same_steer(model, tok, texts, vec, torch.tensor(-1.5))
    _assert_same_steer(model, tok, texts, vec, torch.tensor([0.0, 1.0, -3.0]))


def test_steering_lite_through_a_peft_wrapper(tiny, texts):
    pytest.importorskip("steering_lite")
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    _assert_same_steer(wrapped, tok, texts, _vector(model, seed=1), torch.tensor([1.0, -2.0, 0.5]))


@pytest.mark.parametrize("arch", ["llama", "gemma3mm"])
def test_steering_lite_finds_the_same_layers_on_other_architectures(model_cache, arch):
    pytest.importorskip("steering_lite")
    from steer_heal.models import load_model

    model, tok = load_model(f"tiny-random-{arch}", cache=model_cache)
    texts = [chat(tok, "Should I obey?"), chat(tok, "Is it fair to cheat a cheater, just once?")]
    _assert_same_steer(model, tok, texts, _vector(model, seed=2), torch.tensor([2.0, -1.0]))


def test_steering_lite_greedy_generation_matches_builtin(tiny, texts):
    pytest.importorskip("steering_lite")
    model, tok = tiny
    vec, coef = _vector(model, seed=3), torch.tensor([0.5, 2.0, -2.0])
    enc = encode_left(tok, texts, model.device)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    outs = []
    for steer in (steering.steer, backends.steer_fn(Config(steerer="steering-lite"))):
        with torch.no_grad(), steer(model, vec, coef):
            outs.append(model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw))
    assert torch.equal(*outs)


def test_steering_lite_removes_hooks_on_error_and_refuses_to_nest(tiny):
    pytest.importorskip("steering_lite")
    model, _ = tiny
    steer = backends.steer_fn(Config(steerer="steering-lite"))
    vec, before = _vector(model), _hook_count(model)
    with pytest.raises(KeyError), steer(model, vec, 1.0):
        raise KeyError("boom")
    assert _hook_count(model) == before
    with steer(model, vec, 1.0), pytest.raises(UserError, match="cannot nest"), steer(model, vec, 1.0):
        pass
    assert _hook_count(model) == before
    with steer(model, None, 1.0):  # no vector: a no-op, as the builtin
        assert _hook_count(model) == before


# ---------------------------------------------------------------- tinymfv

@pytest.fixture(scope="module")
def vignettes():
    return load_vignettes("", 14)


def test_tinymfv_gets_the_vignettes_frame_as_its_condition(vignettes):
    """The text goes under the frame's column and that frame is the one condition asked for (self-violate
    files were sent as other_violate before); an unknown frame falls back to tinymfv's default."""
    selfish = [dict(v, frame="self_violate") for v in vignettes]
    assert backends._tinymfv_condition(selfish) == "self_violate"
    row = backends._tinymfv_row(selfish[0], "self_violate")
    assert row["self_violate"] == selfish[0]["text"] and "other_violate" not in row and len(row) == 3 + 7
    assert backends._tinymfv_condition([dict(v, frame=None) for v in vignettes]) == "other_violate"
    with pytest.raises(UserError, match="mix frames"):
        backends._tinymfv_condition([selfish[0], vignettes[1]])


@needs_tinymfv
def test_tinymfv_needs_a_think(tiny, vignettes):
    with pytest.raises(UserError, match="think-tokens 1 or more"):
        backends.mfv_fn(Config(evaluator="tinymfv"))  # think_tokens defaults to 0
    backends.mfv_fn(Config(evaluator="tinymfv", eval="contrast"))  # no seven-way probe in this run: fine
    model, tok = tiny
    with pytest.raises(UserError, match="think-tokens 1 or more"):
        backends.mfv_fn(Config(evaluator="tinymfv", think_tokens=2))(model, tok, vignettes, think_tokens=0)


@needs_tinymfv
def test_tinymfv_adapter_has_the_builtin_shape(tiny, vignettes):
    model, tok = tiny
    side, pad = tok.padding_side, tok.pad_token
    mfv = backends.mfv_fn(Config(evaluator="tinymfv", think_tokens=2))
    got = mfv(model, tok, vignettes, think_tokens=2, batch=8)
    ref = builtin_mfv.mfv(model, tok, vignettes, think_tokens=2, batch=8)
    assert set(got) == set(ref)
    assert set(got["profile"]) == set(got["nats"]) == set(FOUNDATIONS)
    assert got["n"] == len(got["rows"]) == len(vignettes)
    assert [r["id"] for r in got["rows"]] == [v["id"] for v in vignettes]
    for r in got["rows"]:
        assert set(r) == set(ref["rows"][0])
        assert list(r["p"]) == list(FOUNDATIONS)
        assert math.isclose(sum(r["p"].values()), 1.0, abs_tol=1e-6)
        assert 0.0 <= r["pmass"] <= 1.0
    assert 0.0 <= got["coherence"] <= 1.0
    assert math.isclose(sum(got["profile"].values()), 1.0, abs_tol=1e-6)
    assert all(math.isclose(got["nats"][f], math.log(got["profile"][f])) for f in FOUNDATIONS)
    assert 0.0 <= got["top1_agree"] <= 1.0  # the smoke vignettes carry human columns
    assert (tok.padding_side, tok.pad_token) == (side, pad)
    # deterministic: the same call gives the same numbers (tinymfv's depend on which vignettes share a
    # batch, so only the same vignettes at the same batch size repeat exactly)
    assert mfv(model, tok, vignettes, think_tokens=2, batch=8)["rows"] == got["rows"]


@needs_tinymfv
def test_tinymfv_gets_the_system_prompt_on_the_opening_turn(tiny, vignettes, monkeypatch):
    model, tok = tiny
    seen = []
    real = tok.apply_chat_template

    def spy(conversation, *a, **k):
        seen.append((list(conversation), bool(k.get("add_generation_prompt"))))
        return real(conversation, *a, **k)

    monkeypatch.setattr(tok, "apply_chat_template", spy)
    mfv = backends.mfv_fn(Config(evaluator="tinymfv", think_tokens=1))
    out = mfv(model, tok, vignettes[:2], system="You are a persona.", think_tokens=1)
    opening = [c for c, gen in seen if gen]
    assert len(opening) == 2 * 2  # two vignettes, forward and reversed listing
    assert all(c[0] == {"role": "system", "content": "You are a persona."} and c[1]["role"] == "user" for c in opening)
    assert not any(m["role"] == "system" for c, gen in seen if not gen for m in c)
    assert out["n"] == 2
    seen.clear()
    mfv(model, tok, vignettes[:1], think_tokens=1)
    assert not any(m["role"] == "system" for c, _ in seen for m in c)


@needs_tinymfv
def test_tinymfv_says_once_that_it_cannot_reuse_the_prefix_and_takes_bf16_in_its_call(tiny, vignettes):
    """One route per knob (issue 26): reuse_prefix and bf16 come in the probe's own call; tinymfv honours bf16
    (its forwards under autocast move its numbers) and says once per process that it cannot reuse a prefix."""
    from loguru import logger

    from steer_heal.backends import tinymfv as tm

    model, tok = tiny
    tm._SAID.discard("reuse_prefix")
    said: list[str] = []
    hid = logger.add(lambda m: said.append(m.record["message"]), level="INFO")
    try:
        mfv = backends.mfv_fn(Config(evaluator="tinymfv", think_tokens=1))
        a = mfv(model, tok, vignettes[:2], think_tokens=1, reuse_prefix=True)
        mfv(model, tok, vignettes[:2], think_tokens=1, reuse_prefix=True)
        b = mfv(model, tok, vignettes[:2], think_tokens=1, reuse_prefix=False, bf16=True)
    finally:
        logger.remove(hid)
    assert sum("--reuse-prefix does not reach" in s for s in said) == 1
    assert [r["p"] for r in a["rows"]] != [r["p"] for r in b["rows"]]


@needs_tinymfv
def test_tinymfv_unscorable_rows_are_not_filled_in(tiny, vignettes):
    """A broken forward (steered to non-finite logits) gives rows tinymfv marks NaN: kept as None, out of n."""
    model, tok = tiny
    mfv = backends.mfv_fn(Config(evaluator="tinymfv", think_tokens=1))
    with steering.steer(model, _vector(model), float("inf")):
        out = mfv(model, tok, vignettes[:2], think_tokens=1)
    assert out["n"] == 0 and out["coherence"] is None and out["top1_agree"] is None
    assert all(v is None for v in out["profile"].values())
    assert all(r["p"] is None and r["pmass"] is None for r in out["rows"])


def test_flow_runs_with_both_optional_backends(tmp_path):
    """The whole loop with --steerer steering-lite --evaluator tinymfv stores the same metric names."""
    pytest.importorskip("steering_lite")
    if importlib.util.find_spec("moralmaps") is None and importlib.util.find_spec("tinymfv") is None:
        pytest.skip("tinymfv not installed")
    from test_flow import ARGS, steer_heal

    from steer_heal.store import RunLog

    rc, _, se = steer_heal(tmp_path, *ARGS, "--run-id", "b", "--n-rounds", "1", "--steerer", "steering-lite",
                           "--evaluator", "tinymfv", "--think-tokens", "2")
    assert rc == 0, se[-3000:]
    row = RunLog(tmp_path, "b").read("rounds")[0]
    assert row["auth_nats"] is not None and row["trait_nats"] is not None and 0 <= row["coherence"] <= 1

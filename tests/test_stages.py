"""Stage properties on the tiny random model; each assertion fails if the code is wrong."""


import pytest
import torch

from steer_heal.bake import lora_config
from steer_heal.config import Config
from steer_heal.errors import CorruptArtifact
from steer_heal.extract import extract
from steer_heal.filter import drop_counts, max_ngram_freq, score
from steer_heal.generate import generate
from steer_heal.heal import aggregate, heal
from steer_heal.metrics import cosine
from steer_heal.models import get_layers, load_model
from steer_heal.presets import preset
from steer_heal.stack import Stack
from steer_heal.steering import load_vector, save_vector, steer

PROMPTS = ["My boss says ignore the injured man. What now?", "Should I report my friend?",
           "The rule says no visitors but she is lonely.", "Teacher forbids helping. Help?"]
CTX = ["Write an email to Sam.", "What is 2+2?", "Tell me about cats.", "Plan a trip to Rome."]


@pytest.fixture()
def fresh(model_cache):
    """A private copy of the tiny model for tests that add adapters."""
    return load_model("tiny-random", cache=model_cache)


def _ids(tok, text="Hello there, how are you today?"):
    return tok(text, return_tensors="pt")["input_ids"]


def _vec(model, tok):
    return extract(model, tok, "You are kind.", "You are cruel.", CTX, [1, 2])


def _layer_outputs(model, ids):
    """Each decoder layer's output as the next layer sees it (hooks run in registration order)."""
    seen, hs = [], []
    for layer in get_layers(model):
        hs.append(layer.register_forward_hook(lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).clone())))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hs:
            h.remove()
    return seen


def test_steer_hook_touches_only_band_and_always_leaves(tiny):
    model, tok = tiny
    v = _vec(model, tok)
    ids = _ids(tok)
    n_hooks = [len(layer._forward_hooks) for layer in get_layers(model)]  # transformers keeps its own
    h0 = _layer_outputs(model, ids)
    with steer(model, v, 3.0):
        h1 = _layer_outputs(model, ids)
    assert torch.equal(h0[0], h1[0])  # layer 0: below the band, untouched
    assert torch.allclose(h1[1] - h0[1], 3.0 * v[1].expand_as(h0[1]), atol=1e-5)  # layer 1: exactly +C v
    assert not torch.equal(h0[3], h1[3])  # and it propagates
    with pytest.raises(ValueError), steer(model, v, 1.0):
        raise ValueError("boom")
    assert [len(layer._forward_hooks) for layer in get_layers(model)] == n_hooks
    assert all(torch.equal(a, b) for a, b in zip(h0, _layer_outputs(model, ids)))
    # a [batch] coef gives each row its own dose (the dose walk's batches): row 0 unsteered, row 1 at 3.0
    two = torch.cat([ids, ids])
    with steer(model, v, torch.tensor([0.0, 3.0])):
        h2 = _layer_outputs(model, two)
    assert torch.allclose(h2[1][0], h0[1][0], atol=1e-5) and torch.allclose(h2[1][1], h1[1][0], atol=1e-5)


def test_last_token_states_stop_early_match_a_full_forward(tiny):
    from steer_heal.extract import last_token_states
    from steer_heal.tokens import encode_left

    model, tok = tiny
    got = last_token_states(model, tok, CTX, [0, 1], batch=3)
    with torch.no_grad():
        hs = model(**encode_left(tok, CTX, "cpu"), output_hidden_states=True).hidden_states
    for i in (0, 1):
        torch.testing.assert_close(got[i], hs[i + 1][:, -1].float(), rtol=1e-5, atol=1e-5)


def test_vector_file_round_trip_and_cosine(tiny, tmp_path):
    model, tok = tiny
    v = _vec(model, tok)
    save_vector(v, tmp_path / "v.safetensors")
    w = load_vector(tmp_path / "v.safetensors")
    assert set(w) == {1, 2} and all(torch.equal(v[k], w[k]) for k in v)
    assert cosine(v, w) == pytest.approx(1.0)
    assert cosine(v, {k: -x for k, x in v.items()}) == pytest.approx(-1.0)


def test_sampling_seeded_and_greedy_batch_invariant(tiny):
    model, tok = tiny
    v = _vec(model, tok)
    kw = dict(vec=v, coefs=[1.0, 2.0, 0.0, 1.0], max_new_tokens=8)
    a = generate(model, tok, PROMPTS, seeds=[7, 8, 9, 10], **kw)
    assert a == generate(model, tok, PROMPTS, seeds=[7, 8, 9, 10], **kw)
    assert a != generate(model, tok, PROMPTS, seeds=[11, 12, 13, 14], **kw)
    g_batch = generate(model, tok, PROMPTS, batch=4, **kw)
    g_one = generate(model, tok, PROMPTS, batch=1, **kw)
    assert g_batch == g_one


def test_each_slot_samples_from_its_own_seed_whatever_its_batch(tiny):
    """A slot's text depends on its prompt, coefficient and seed only: batch 4 and 16 give the same
    completions, and a slot keeps its text when its batch mates change."""
    model, tok = tiny
    v = _vec(model, tok)
    prompts = [PROMPTS[i % 4] for i in range(16)]
    kw = dict(vec=v, coefs=[0.5 * (i % 3) for i in range(16)], max_new_tokens=12, seeds=list(range(100, 116)))
    b16 = generate(model, tok, prompts, batch=16, **kw)
    assert generate(model, tok, prompts, batch=4, **kw) == b16
    assert len(set(b16)) > 8  # sampled, not greedy: equal prompts at equal coefs still differ by seed
    alone = generate(model, tok, prompts[5:6], vec=v, coefs=kw["coefs"][5:6], max_new_tokens=12, seeds=[105])
    assert alone == b16[5:6]
    with pytest.raises(ValueError, match="one per slot"):
        generate(model, tok, prompts, seeds=[1, 2])


def test_filter_scores_every_completion(tiny):
    model, tok = tiny
    items = [dict(prompt=p, completion=c) for p, c in zip(PROMPTS, [
        "I would help him first.", "the the the the the the the the the the", "As an AI I cannot decide.", ""])]
    out = score(model, tok, items, system="", ppl_tau=1e9, rep_tau=0.5)
    assert [r["reason"] for r in out] == ["", "rep", "refusal", "empty"]
    assert drop_counts(out) == dict(empty=1, ppl=0, rep=1, loop=0, relevance=0, narration=0, refusal=1)
    strict = score(model, tok, items[:1], system="", ppl_tau=1.0, rep_tau=0.5)
    assert strict[0]["reason"] == "ppl" and strict[0]["ppl"] > 1.0
    assert max_ngram_freq("abababababab") > 0.4 and max_ngram_freq("a quick brown fox jumps".split()) < 0.3


def test_refusal_pattern_drops_refusals_not_sympathy():
    from steer_heal.filter import _REF

    for text in ("I'm sorry, but I can't help with that.", "I am unable to assist.", "As an AI, I have no view.",
                 "I apologize, but that is not possible.", "I'm an AI assistant."):
        assert _REF.search(text), text
    for text in ("I'm sorry to hear that your boss said so.", "I am sorry for your loss; call her today."):
        assert not _REF.search(text), text


def test_fresh_adapter_is_exact_noop_and_gates_are_bitwise(fresh):
    model, tok = fresh
    ids = _ids(tok)
    with torch.no_grad():
        base = model(ids).logits
    st = Stack(model)
    lora = lora_config(model, 4, 8, (0.0, 1.0))
    st.add("r0", lora, seed=1)
    with torch.no_grad():
        assert torch.equal(st.model(ids).logits, base)
        for p in st.trainable():  # make r0 a real change
            p.add_(torch.randn_like(p) * 0.05)
        student0 = st.model(ids).logits
        assert not torch.equal(student0, base)
    st.model.requires_grad_(False)
    st.add("r1", lora, seed=2)
    with torch.no_grad():
        for p in st.trainable():
            p.add_(torch.randn_like(p) * 0.05)
        with st.base():
            assert torch.equal(st.model(ids).logits, base)
        with st.prev():
            assert torch.equal(st.model(ids).logits, student0)
        assert not torch.equal(st.model(ids).logits, student0)


def test_only_current_adapter_gets_gradient(fresh):
    model, tok = fresh
    st = Stack(model)
    lora = lora_config(model, 4, 8, (0.0, 1.0))
    st.add("r0", lora, seed=1)
    st.add("r1", lora, seed=2)
    st.model.base_model.set_adapter(["r0", "r1"])  # peft switches both back to trainable ...
    st.freeze_history()                            # ... the stack undoes that
    with st.prev():
        pass
    with st.base():  # peft's disable_adapter turns grads back on for every active adapter on exit
        pass
    st.model(_ids(tok)).logits.sum().backward()
    grads = {n: p.grad for n, p in st.model.named_parameters()}
    assert any(g is not None for n, g in grads.items() if ".r1." in n)
    assert all(g is None for n, g in grads.items() if ".r1." not in n)


def _kl_to_base(st, tok, kept):
    from steer_heal.heal import divergence
    from steer_heal.tokens import chat, completion_logits, pack

    b = pack(tok, [chat(tok, k["prompt"]) for k in kept], [k["completion"] for k in kept], 96, "cpu", eos=True)
    with torch.no_grad():
        lp = torch.log_softmax(completion_logits(st.model, b), -1)
        with st.base():
            lq = torch.log_softmax(completion_logits(st.model, b), -1)
    return float(divergence(lp, lq, "kl_rev")[b["cmask"]].mean())


def test_kl_rev_barrier_ends_closer_to_base_than_nll(model_cache):
    cfg = Config(**preset("fast-dev")).replace(epochs=3, lr=5e-3, lam=5.0, tau=0.0, batch_size=4, val_frac=0.0)
    kept = [dict(prompt=p, completion="I would help them right away and explain later.") for p in PROMPTS * 2]
    div = {}
    for reg in ("nll", "kl_rev"):
        model, tok = load_model("tiny-random", cache=model_cache)
        st = Stack(model)
        st.add("r0", lora_config(model, 4, 8, (0.0, 1.0)), seed=3)
        out = heal(st, tok, kept, cfg.replace(reg=reg), 0, seed=4, system="")
        assert out.steps[0]["div"] == 0.0 and out.steps[-1]["nll"] < out.steps[0]["nll"]
        div[reg] = _kl_to_base(st, tok, kept)
    assert 0 < div["kl_rev"] < div["nll"]


def test_gnorm_split_and_ref_cache_change_nothing_but_the_log_and_the_work(model_cache, monkeypatch):
    """Two backward passes (sft, then barrier) on logged steps sum to the one-pass gradient, and reference
    log-probs cached after epoch 0 train the same adapter as recomputing them, with fewer forwards."""
    import steer_heal.heal as heal_mod

    calls = []
    real = heal_mod.completion_rows
    monkeypatch.setattr(heal_mod, "completion_rows", lambda m, b: calls.append(1) or real(m, b))
    cfg = Config(**preset("fast-dev")).replace(epochs=2, lr=5e-3, lam=5.0, batch_size=2, val_frac=0.0, reg="kl_rev")
    kept = [dict(prompt=p, completion="I would help them right away and explain later.") for p in PROMPTS]
    weights, logs, forwards = {}, {}, {}
    for name, kw in {"plain": dict(gnorm_every=0, ref_cache_mb=0), "split": dict(gnorm_every=1, ref_cache_mb=0),
                     "split3": dict(gnorm_every=3, ref_cache_mb=0), "cached": dict(gnorm_every=0)}.items():
        model, tok = load_model("tiny-random", cache=model_cache)
        st = Stack(model)
        st.add("r0", lora_config(model, 4, 8, (0.0, 1.0)), seed=3)
        calls.clear()
        logs[name] = [r["gnorm_barrier"] for r in heal(st, tok, kept, cfg.replace(**kw), 0, seed=4, system="").steps]
        forwards[name] = len(calls)
        weights[name] = torch.cat([p.detach().flatten() for p in st.trainable()])
    assert logs["plain"] == [None] * 4 and all(g is not None for g in logs["split"])
    assert [g is not None for g in logs["split3"]] == [True, False, False, True]
    assert forwards == {"plain": 8, "split": 8, "split3": 8, "cached": 6}  # 4 student + 4 ref, or 4 + 2
    for name in ("split", "split3", "cached"):
        torch.testing.assert_close(weights[name], weights["plain"], rtol=1e-3, atol=5e-5)  # Adam magnifies rounding


def test_aggregate_finite_gradient_at_zero():
    for how in ("mean", "rmse", "p95", "max"):
        d = torch.zeros(2, 3, requires_grad=True)
        aggregate(d, torch.ones(2, 3, dtype=torch.bool), how).backward()
        assert torch.isfinite(d.grad).all(), how


def test_stack_rebuilt_from_files_and_merged_export(fresh, model_cache, tmp_path):
    model, tok = fresh
    ids = _ids(tok)
    st = Stack(model)
    lora = lora_config(model, 4, 8, (0.25, 0.75))
    shas = []
    for i in range(2):
        st.add(f"r{i}", lora, seed=i)
        with torch.no_grad():
            for p in st.trainable():
                p.add_(torch.randn_like(p) * 0.05)
        st.model.requires_grad_(False)
        shas.append(st.save(f"r{i}", tmp_path / f"r{i}.safetensors"))
    with torch.no_grad():
        student = st.model(ids).logits
    m2, _ = load_model("tiny-random", cache=model_cache)
    st2 = Stack(m2)
    for i in range(2):
        st2.load(f"r{i}", tmp_path / f"r{i}.safetensors", shas[i], lora)
    with torch.no_grad():
        assert torch.equal(st2.model(ids).logits, student)
    out = st2.export(tmp_path / "merged", tok)
    merged, _ = load_model(str(out))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, student, atol=1e-4)
    (tmp_path / "r1.safetensors").write_bytes(b"corrupt")
    m3, _ = load_model("tiny-random", cache=model_cache)
    with pytest.raises(CorruptArtifact, match="sha256"):
        Stack(m3).load("r1", tmp_path / "r1.safetensors", shas[1], lora)


def test_student_vector_is_what_the_baked_history_moved(tiny):
    """h_student(neutral + x) - h_base(neutral + x), averaged over contexts, per layer; zero with no history."""
    import copy

    from steer_heal.extract import last_token_states, student_vector
    from steer_heal.tokens import chat

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    st = Stack(model)
    st.add("r0", lora_config(model, 4, 8.0, (0.0, 1.0)), seed=0)
    layers, ctx = [0, len(get_layers(model)) - 1], ["Hello there.", "What should I do now?", "Tell me more."]
    zero = student_vector(st.model, tok, "Be brief.", ctx, layers, st.base, batch=2)  # B = 0: nothing moved yet
    assert all(torch.count_nonzero(v) == 0 for v in zero.values())
    g = torch.Generator().manual_seed(3)
    for name, p in st.model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    sv = student_vector(st.model, tok, "Be brief.", ctx, layers, st.base, batch=2)
    texts = [chat(tok, x, "Be brief.") for x in ctx]
    hs = last_token_states(st.model, tok, texts, layers)
    with st.base():
        hb = last_token_states(st.model, tok, texts, layers)
    assert sorted(sv) == layers
    for i in layers:
        assert sv[i].shape == (model.config.hidden_size,) and sv[i].norm() > 1e-4
        assert torch.allclose(sv[i], (hs[i] - hb[i]).mean(0), atol=1e-6)
        assert not torch.allclose(sv[i], (hs[i] - hb[i])[0], atol=1e-6)  # a mean over contexts, not the first


def test_random_like_keeps_each_layers_norm_and_dtype():
    from steer_heal.steering import random_like

    vec = {2: torch.randn(16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16), 5: torch.ones(16) * 3}
    got = random_like(vec, seed=1)
    assert sorted(got) == [2, 5] and got[2].dtype == torch.bfloat16 and got[5].dtype == torch.float32
    for i in vec:
        assert got[i].float().norm() == pytest.approx(vec[i].float().norm().item(), rel=1e-2)
    assert not torch.allclose(got[5], vec[5]) and torch.equal(random_like(vec, seed=1)[5], got[5])


def test_extract_is_the_mean_persona_difference_at_each_contexts_last_token(tiny):
    """v[layer] = mean over contexts of h(pos persona + x) - h(neg persona + x); a suffix context (user, answer start)
    is read at the suffix's last token; normalize gives unit vectors, and nothing else is rescaled."""
    from steer_heal.extract import extract, last_token_states, texts
    from steer_heal.tokens import chat

    model, tok = tiny
    ctx = ["Hello there.", ("What now?", " Well, I")]
    assert texts(tok, ctx, "S") == [chat(tok, "Hello there.", "S"), chat(tok, "What now?", "S") + " Well, I"]
    layers = [0, len(get_layers(model)) - 1]
    v = extract(model, tok, "You are kind.", "You are cruel.", ctx, layers)
    hp = last_token_states(model, tok, texts(tok, ctx, "You are kind."), layers)
    hn = last_token_states(model, tok, texts(tok, ctx, "You are cruel."), layers)
    for i in layers:
        assert torch.allclose(v[i], (hp[i] - hn[i]).mean(0), atol=1e-6) and v[i].norm() > 1e-4
    framed = extract(model, tok, "kind", "cruel", ctx, layers, steer_system="You are {persona}.")
    assert all(torch.allclose(framed[i], v[i], atol=1e-6) for i in layers)  # the persona fills the frame
    unit = extract(model, tok, "You are kind.", "You are cruel.", ctx, layers, normalize=True)
    for i in layers:
        assert unit[i].norm().item() == pytest.approx(1.0, abs=1e-5)
        assert torch.allclose(unit[i] * v[i].norm(), v[i], atol=1e-5)

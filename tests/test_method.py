"""The method's own pieces (issue 15): the dose walk finds the edge, controls change only what they should,
presets say what they are, the spectral penalty is a mean, EOS only after a completion that ended itself."""

import copy
from pathlib import Path

import pytest
import torch

from steer_heal.config import Config, preset
from steer_heal.generate import generate
from steer_heal.models import load_model
from steer_heal.tokens import turn_end_id

PROMPTS = ["My boss says ignore the injured man. What now?", "Should I report my friend?",
           "The rule says no visitors but she is lonely.", "Teacher forbids helping. Help?"]
DOCS = Path(__file__).parents[1] / "docs"

# ---------------------------------------------------------------- spectral mean, EOS

def test_spectral_penalty_is_the_mean_over_lora_modules(model_cache):
    from steer_heal.bake import Stack, lora_config
    from steer_heal.heal import spectral_norm

    model, _ = load_model("tiny-random", cache=model_cache)
    st = Stack(model)
    st.add("r0", lora_config(model, 4, 8, (0.0, 1.0)), seed=1)
    with torch.no_grad():
        for p in st.trainable():
            p.add_(torch.randn_like(p) * 0.1)
    sig = [m.scaling["r0"] * torch.linalg.matrix_norm(m.lora_B["r0"].weight @ m.lora_A["r0"].weight, ord=2).item()
           for m in st.model.modules() if hasattr(m, "lora_A") and "r0" in m.lora_A]
    assert len(sig) > 2
    assert spectral_norm(st.model).item() == pytest.approx(sum(sig) / len(sig), rel=1e-4)


def test_heal_adds_the_turn_end_only_after_completions_that_ended(model_cache, monkeypatch):
    import steer_heal.heal as heal_mod
    from steer_heal.bake import Stack, lora_config

    model, tok = load_model("tiny-random", cache=model_cache)
    st = Stack(model)
    st.add("r0", lora_config(model, 4, 8, (0.0, 1.0)), seed=1)
    seen = []
    real = heal_mod.completion_logits
    monkeypatch.setattr(heal_mod, "completion_logits", lambda m, b: seen.append(b) or real(m, b))
    text = "I would help them right away"
    kept = [dict(prompt=PROMPTS[0], completion=text, ended=True), dict(prompt=PROMPTS[1], completion=text, ended=False)]
    cfg = Config(**preset("fast-dev")).replace(reg="nll", epochs=1, batch_size=2, val_frac=0.0)
    heal_mod.heal(st, tok, kept, cfg, 0, seed=0, system="")
    b = seen[0]
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    lens = b["cmask"].sum(-1).tolist()
    by_len = dict(zip(lens, b["targets"].tolist()))
    assert sorted(lens) == [n, n + 1]  # the cut completion trains no stop token
    assert by_len[n + 1][n] == turn_end_id(tok)


def test_turn_end_is_what_the_template_closes_a_turn_with(tiny):
    _, tok = tiny
    assert turn_end_id(tok) == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    other = copy.deepcopy(tok)  # gemma-like: the turn closes with a token that is not the eos
    other.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n"
                           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert turn_end_id(other) == other.convert_tokens_to_ids("<|endoftext|>") != other.eos_token_id


def test_generate_tells_rows_that_stopped_from_rows_that_were_cut(tiny):
    model, tok = tiny
    kw = dict(max_new_tokens=6, seed=1)
    texts, ended = generate(model, tok, PROMPTS, with_ended=True, **kw)
    assert ended == [False] * 4 and all(texts)  # the random model never emits its eos: every row was cut
    saved = model.generation_config.eos_token_id
    try:  # a list of stop ids, as gemma has; with every id a stop, every row stops by itself at once
        model.generation_config.eos_token_id = list(range(len(tok)))
        out, ended = generate(model, tok, PROMPTS, with_ended=True, **kw)
    finally:
        model.generation_config.eos_token_id = saved
    assert ended == [True] * 4 and all(len(o) <= len(t) for o, t in zip(out, texts))

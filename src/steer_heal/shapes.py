"""Real model shapes without their weights: the text stacks of gemma-3-4b-it and Qwen3-4B as stored config
values (public facts of their config.json files), built with random weights on the meta device (parameter
counts, memory estimates: memory.py) or on a real device (timing: bench/gpu.py), plus a byte-level tokenizer
of the real vocabulary size for when no tokenizer ships offline.

Random weights time the same matmuls as the real ones, but they do not emit EOS on cue: a timing run
generates to a fixed length (min_new_tokens = max_new_tokens), and the bench says so. `scaled` keeps the
width (every matrix's shape but the layer count) and cuts the stack to a few layers: the CPU copy a
default-suite test can run.
"""

from __future__ import annotations

import copy

import torch

# google/gemma-3-4b-it, text_config (Gemma3TextConfig): 34 layers, a sliding-window layer 5 in 6 (window 1024)
GEMMA3_4B = dict(
    model_type="gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
    max_position_embeddings=131072, rope_theta=1_000_000.0, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0)
# Qwen/Qwen3-4B (Qwen3Config): 36 full-attention layers
QWEN3_4B = dict(
    model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
SHAPES = {"gemma-3-4b": GEMMA3_4B, "qwen3-4b": QWEN3_4B}
PARAMS = {"gemma-3-4b": 3.88e9, "qwen3-4b": 4.02e9}  # what `params(config(name))` gives, to 3 digits


def config(name: str, layers: int | None = None, vocab: int | None = None):
    """The transformers config of a stored shape; `layers` / `vocab` cut the stack / the vocabulary (the rest
    of the shape stays). Special token ids of a cut vocabulary move to its first ids."""
    from transformers import AutoConfig

    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}: one of {', '.join(SHAPES)}")
    kw = copy.deepcopy(SHAPES[name])
    if layers:
        kw["num_hidden_layers"] = layers
    if vocab:
        kw.update(vocab_size=vocab, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    kw["layer_types"] = _layer_types(name, kw["num_hidden_layers"])
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def _layer_types(name: str, n: int) -> list[str]:
    if name == "gemma-3-4b":  # every 6th layer global, the others local (sliding_window_pattern 6)
        return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    return ["full_attention"] * n


def params(cfg) -> int:
    """Parameter count of cfg's model (tied head counted once), from a meta-device copy: no memory."""
    return sum(p.numel() for p in meta_model(cfg).parameters())


def meta_model(cfg):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(cfg))


def random_model(cfg, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """cfg's model with random weights (transformers' own init, seeded) built directly on `device`, eval mode,
    frozen, as load_model returns a model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=dtype, attn_implementation="sdpa")
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.eval().requires_grad_(False)
    return model


def byte_tokenizer(vocab: int):
    """A byte-level tokenizer with exactly `vocab` ids: pad, eos and the ChatML turn marks first (ids 0-3,
    as `config(vocab=...)` places them), the 256 bytes, then never-matching fillers up to `vocab`, so ids the
    random model samples decode. Text costs one token per byte (longer prompts than the real tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .tokens import CHATML

    special = ["<pad>", "<|im_end|>", "<bos>", "<|im_start|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    names = special + alphabet + [f"<|x{i}|>" for i in range(vocab - len(special) - len(alphabet))]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(names)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(special)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>", bos_token=None)
    tok.chat_template = CHATML
    return tok

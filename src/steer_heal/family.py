"""What a model family needs, decided and checked in preflight before any stage runs: the chat template
(and BOS), the attention implementation and the LoRA targets. Only the tokenizer and a weightless
(meta-device) copy of the model are loaded, so a model the loop cannot serve fails in seconds, naming
the flag that fixes it. The flow later makes the same decisions with the same functions
(models.load_model, bake.lora_config); run_info.resolved records them (docs/store.md).
"""

from __future__ import annotations

from loguru import logger

from .bake import lora_config
from .config import Config
from .errors import UserError
from .models import attn_for, get_layers, meta_copy, read_part, resolve
from .tokens import check_room, longest_prompt, use_template


def check(cfg: Config) -> dict:
    """Resolve and check the family's template, attention and LoRA targets; log them; return the record."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    where, gguf = resolve(cfg.model, cfg.gguf_file, f"{cfg.out}/models")
    template = use_template(read_part("tokenizer", where, gguf, cfg.trust_remote_code), cfg.chat_template, cfg.model)
    config = read_part("config", where, gguf, cfg.trust_remote_code)  # after the cheaper refusal above
    impl, note = attn_for(config, cfg.attn_impl)
    meta = meta_copy(config, cfg.trust_remote_code)
    dec = get_layers(meta)
    prefix = next(n for n, m in meta.named_modules() if m is dec)
    lora = lora_config(meta, cfg.lora_r, cfg.lora_alpha, cfg.lora_layers, cfg.lora_targets)
    order = {n: i for i, (n, _) in enumerate(meta.named_modules())}
    names = sorted(lora.target_modules, key=order.__getitem__)  # model order (peft rewrites the config's list)
    try:  # peft must accept every target (a module type it cannot adapt fails here, not in heal)
        adapted = sum(isinstance(m, LoraLayer) for m in get_peft_model(meta, lora).modules())
    except (ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"peft cannot adapt the --lora-targets of {cfg.model} ({str(e).splitlines()[0]}): "
                          "pass --lora-targets with other module names") from None
    if adapted != len(names):
        raise UserError(f"peft adapted {adapted} of the {len(names)} --lora-targets modules of {cfg.model}")
    per_layer = targets_by_name(names, prefix)
    # logged once every check has passed: a refused model's output is its one error line
    logger.info(f"chat template: {template['name']} (sha256 {template['sha256'][:12]}, BOS {template['bos']})")
    if note:
        logger.warning(note)
    logger.info(targets_table(per_layer, prefix, cfg.lora_targets))
    return {"model_type": getattr(config, "model_type", None), "chat_template": template, "attn_impl": {"requested": cfg.attn_impl, "used": impl, "note": note},
            "lora_targets": {"targets": list(cfg.lora_targets), "n": len(names), "prefix": prefix,
                             "per_layer": {k: len(v) for k, v in per_layer.items()}}}


def fit_max_len(cfg: Config, derive: bool) -> Config:
    """max_len against this model's tokenizer, in preflight. `derive` (fast-dev, no --max-len: its 96 fits only
    the tiny BPE): at least the longest chat prompt plus max_new_tokens, said in one line. Else a max_len too
    small for the longest prompt is refused here, in seconds (tokens.check_room; the flow warns of cuts)."""
    from . import data

    where, gguf = resolve(cfg.model, cfg.gguf_file, f"{cfg.out}/models")
    tok = read_part("tokenizer", where, gguf, cfg.trust_remote_code)
    use_template(tok, cfg.chat_template, cfg.model)
    system = cfg.gen_system or data.persona(cfg)["neutral"]  # the system prompt the flow generates under
    prompts = data.prompts(cfg.n_prompts)
    if not derive:
        check_room(tok, prompts, system, cfg.max_len, cfg.max_new_tokens, warn=False)
        return cfg
    longest = longest_prompt(tok, prompts, system)
    need = longest + cfg.max_new_tokens
    if need <= cfg.max_len:
        logger.info(f"max_len {cfg.max_len} (the preset's) holds the longest chat prompt ({longest} tokens) + "
                    f"max_new_tokens {cfg.max_new_tokens}")
        return cfg
    logger.info(f"max_len {need} = the longest chat prompt ({longest} tokens with this tokenizer) + max_new_tokens "
                f"{cfg.max_new_tokens} (the preset's {cfg.max_len} is too small; --max-len sets it)")
    return cfg.replace(max_len=need)


def targets_by_name(names: list[str], prefix: str) -> dict[str, list[int]]:
    """{name inside the layer: [layer indices]} of full target names under `prefix` (the layer list)."""
    out: dict[str, list[int]] = {}
    for n in names:
        i, inner = n.removeprefix(prefix + ".").split(".", 1)
        out.setdefault(inner, []).append(int(i))
    return out


def kind(inner: str) -> str:
    """attention, mlp or other, by the first part of a linear's name inside its decoder layer."""
    head = inner.split(".")[0]
    if "attn" in head or "attention" in head:
        return "attention"
    return "mlp" if "mlp" in head or head in ("feed_forward", "ffn", "fc1", "fc2") else "other"


def _span(ix: list[int]) -> str:
    return f"{ix[0]}-{ix[-1]}" if ix == list(range(ix[0], ix[-1] + 1)) and len(ix) > 1 else ",".join(map(str, ix))


def targets_table(per_layer: dict[str, list[int]], prefix: str, targets: tuple[str, ...]) -> str:
    """One row per (kind, layers): which linears of which layers get a LoRA."""
    rows: dict[tuple[str, str], list[str]] = {}
    for inner, ix in per_layer.items():
        rows.setdefault((kind(inner), _span(ix)), []).append(inner)
    n = sum(map(len, per_layer.values()))
    head = f"LoRA targets ({' '.join(targets)}): {n} linears in {prefix}.N\n  {'kind':<10} {'layers':<8} linears"
    return "\n".join([head] + [f"  {k:<10} {s:<8} {' '.join(v)}" for (k, s), v in rows.items()])

import subprocess
import sys
from dataclasses import fields

import pytest

from steer_heal.cli import build_parser, parse, to_argv
from steer_heal.config import Config, preset
from steer_heal.errors import UserError

BAD = [
    (dict(reg="kl"), "reg='kl'", "'nll', 'kl_fwd', 'kl_rev'"),
    (dict(kl_agg="median"), "kl_agg='median'", "'rmse'"),
    (dict(barrier_ref="teacher"), "barrier_ref", "'prev'"),
    (dict(dtype="int8"), "dtype", "'bfloat16'"),
    (dict(steer_layers=(0.6, 0.4)), "steer_layers", "inside [0, 1]"),
    (dict(steer_layers=(0.2, 1.5)), "steer_layers", "inside [0, 1]"),
    (dict(lora_layers=(-0.1, 0.5)), "lora_layers", "inside [0, 1]"),
    (dict(alphas=()), "alphas", "positive"),
    (dict(alphas=(1.0, -2.0)), "alphas", "positive"),
    (dict(n_keep=4, min_train=8), "n_keep=4", "min_train"),
    (dict(dose_target=1.5), "dose_target", "fraction"),
    (dict(kappa_min=0.0), "kappa_min", "(0, 1]"),
    (dict(lr=0.0), "lr", "> 0"),
    (dict(epochs=0), "epochs", ">= 1"),
    (dict(lam=-1.0), "lam", ">= 0"),
    (dict(target="Purity"), "target='Purity'", "'Authority'"),
    (dict(eval="all"), "eval='all'", "'both'"),
    (dict(persona_pos="kind", persona_neg=""), "persona_neg", "both or neither"),
    (dict(steer_system="no placeholder"), "steer_system", "{persona}"),
    (dict(betas=(0.9, 1.0)), "betas", "[0, 1)"),
    (dict(model=" "), "model", "preset"),
    (dict(coh_floor_rel=1.5), "coh_floor_rel", "fraction of base coherence"),
    (dict(boot=-1), "boot", "[0, 2**63)"),
]


@pytest.mark.parametrize("kw,field,allowed", BAD)
def test_validation_names_field_value_and_allowed(kw, field, allowed):
    with pytest.raises(UserError) as e:
        Config(**kw).validate()
    assert field in str(e.value) and allowed in str(e.value)


def test_defaults_and_presets_validate():
    Config().validate()
    for name in ("fast-dev", "small", "s2-headline", "s4-next", "s1-journal"):
        Config(**preset(name)).validate()
    with pytest.raises(UserError, match="unknown preset"):
        preset("huge")


def test_hash_stable_and_ignores_runtime_fields():
    a = Config()
    assert a.hash() == Config().hash()
    assert a.hash() == a.replace(out="elsewhere", n_rounds=9, run_id="x").hash()
    assert a.hash() != a.replace(reg="nll").hash()
    assert Config.from_dict(a.to_dict()) == a


def test_cli_flags_and_preset_precedence():
    cfg, explicit = parse(["--preset", "fast-dev", "--reg", "kl_fwd", "--n-rounds", "10", "--kl-agg", "rmse",
                           "--steer-layers", "0.3", "0.7", "--alphas", "0.5", "1", "--no-normalize"])
    assert cfg.model == "tiny-random" and cfg.reg == "kl_fwd" and cfg.n_rounds == 10 and cfg.kl_agg == "rmse"
    assert cfg.steer_layers == (0.3, 0.7) and cfg.alphas == (0.5, 1.0)
    assert explicit["reg"] == "kl_fwd" and "model" not in explicit


def test_cli_round_trip_every_field():
    cfg = Config(reg="kl_fwd", lam=0.3, alphas=(0.5, 2.0), normalize=True, trust_remote_code=True,
                 steer_layers=(0.1, 0.2), betas=(0.8, 0.9), target="Care", persona_pos="a", persona_neg="b")
    assert parse(to_argv(cfg))[0] == cfg


def test_cli_bad_value_exits_with_message():
    r = subprocess.run([sys.executable, "-m", "steer_heal", "--n-keep", "2", "--min-train", "8"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "n_keep=2" in r.stderr and "Traceback" not in r.stderr


def test_help_lists_every_knob():
    text = build_parser().format_help()
    for f in fields(Config):
        assert "--" + f.name.replace("_", "-") in text
    assert "--preset" in text

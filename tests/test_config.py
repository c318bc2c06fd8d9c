import subprocess
import sys
from dataclasses import fields

import pytest

from steer_heal.cli import build_parser, parse, to_argv
from steer_heal.config import Config
from steer_heal.errors import UserError
from steer_heal.presets import preset

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


# ---------------------------------------------------------------- experiment apart from execution (issue 26)

def test_every_field_sits_in_one_group_and_exec_is_left_out_of_the_hash():
    from steer_heal.config import EXEC_FIELDS, GROUPS, HealCfg

    names = [f.name for f in fields(Config)]
    grouped = [n for g in GROUPS.values() for n in g]
    assert sorted(grouped) == sorted(names) and len(grouped) == len(set(grouped))
    a = Config()
    other = dict(device="cpu", attn_impl="eager", trust_remote_code=True, gen_batch=3, eval_batch=5,
                 reuse_prefix=False, bf16="eval", bf16_force=True, fold_history=True, ref_cache_mb=0, gnorm_every=0,
                 out="x", run_id="y", resume="z", log_level="DEBUG")
    assert set(other) == set(EXEC_FIELDS)
    for k, v in other.items():
        assert getattr(a, k) != v and a.replace(**{k: v}).hash() == a.hash(), k
    for k, v in dict(reg="nll", dtype="float32", evaluator="tinymfv", max_len=64, seed=7, lr=0.1).items():
        assert a.replace(**{k: v}).hash() != a.hash(), k  # the experiment, the weights' dtype included
    assert a.grouped()["heal"]["lr"] == a.lr and "reuse_prefix" in a.grouped()["exec"]
    h = a.replace(lr=0.5, bf16="heal").part("heal")
    assert isinstance(h, HealCfg) and (h.lr, h.bf16, h.max_len) == (0.5, "heal", a.max_len)
    assert not hasattr(h, "persona") and a.exec.reuse_prefix is True
    from steer_heal.evaluate import Probe

    b = a.replace(reuse_prefix=False, eval_batch=3, target="Care")
    assert Probe.of(b.part("probes")) == Probe.of(b) and Probe.of(b).reuse_prefix is False
    with pytest.raises(AttributeError):
        h.lr = 1.0  # frozen


def test_help_groups_the_flat_flags_under_experiment_and_execution():
    text = build_parser().format_help()
    import re

    at = lambda flag: re.search(rf"\n  {flag}[ ,]", text).start()  # noqa: E731  (its help line, not the usage)
    heal, ex = text.index("experiment: heal:"), text.index("execution (")
    assert text.index("experiment: dose:") < heal < at("--lr") < ex < at("--reuse-prefix")
    assert at("--device") > ex and at("--bf16") > ex and heal < at("--reg") < ex
    cfg, _ = parse(["--no-reuse-prefix", "--lr", "0.1"])  # flat on the command line
    assert cfg.reuse_prefix is False and cfg.lr == 0.1


def _said(level="INFO"):
    from loguru import logger

    out: list[str] = []
    return out, logger.add(lambda m: out.append(f"{m.record['level'].name} {m.record['message']}"), level=level)


def test_resume_may_change_exec_says_so_and_still_refuses_the_experiment(tmp_path):
    from loguru import logger
    from test_errors import fake_run

    from steer_heal.run import resume_config

    fake_run(tmp_path, "r")
    said, hid = _said()
    try:
        got = resume_config(Config(out=str(tmp_path), resume="r"),
                            {"reuse_prefix": False, "eval_batch": 4, "device": "cpu", "bf16": "eval", "resume": "r"})
    finally:
        logger.remove(hid)
    assert (got.reuse_prefix, got.eval_batch, got.device, got.bf16, got.run_id) == (False, 4, "cpu", "eval", "r")
    info = [s for s in said if s.startswith("INFO") and "changes how it computes" in s]
    assert len(info) == 1 and "--reuse-prefix True -> False" in info[0] and "--eval-batch" in info[0]
    warn = [s for s in said if s.startswith("WARNING")]
    assert any("--bf16 'auto' -> 'eval'" in s and "0.01 nats" in s for s in warn)
    assert any("--device 'auto' -> 'cpu'" in s for s in warn)
    assert got.hash() == resume_config(Config(out=str(tmp_path), resume="r"), {}).hash()
    with pytest.raises(UserError, match="refuses overrides that change the experiment: --lr"):
        resume_config(Config(out=str(tmp_path), resume="r"), {"lr": 1.0, "reuse_prefix": False})


def test_a_run_stored_before_exec_existed_reads_back_and_resumes(tmp_path):
    """tests/data/run_info_before_exec.json is a fast-dev run_info row written by the code before issue 26
    (Exec fields in the flat config and in its hash): it reads back as it was and resumes with an Exec change,
    and the resume's run_info row keeps the stored experiment hash."""
    import json
    from pathlib import Path

    from steer_heal import student
    from steer_heal.run import _resumed_info, resume_config
    from steer_heal.store import RunLog

    row = json.loads((Path(__file__).parent / "data" / "run_info_before_exec.json").read_text())
    log = RunLog(tmp_path, "old")
    log.append("run_info", row)
    back = student.stored_config(log)
    assert back.to_dict() == Config.from_dict(row["config"]).to_dict() and back.model == "tiny-random"
    assert back.hash() != row["config_hash"]  # Exec has left the hash; the stored one stays the run's identity
    got = resume_config(Config(out=str(tmp_path), resume="old"), {"reuse_prefix": False, "n_rounds": 3})
    assert got.experiment() == back.experiment() and (got.reuse_prefix, got.n_rounds) == (False, 3)
    _resumed_info(got, log, {}, "round 2 (done)")
    rows = log.read("run_info")
    assert rows[1]["config_hash"] == row["config_hash"] and rows[1]["config"]["reuse_prefix"] is False


def test_a_resume_on_another_device_than_the_start_is_said(tmp_path):
    """--device auto started on a GPU and resumed on a CPU changes no flag: the start's resolved device says it."""
    from loguru import logger

    from steer_heal.run import _same_device
    from steer_heal.store import RunLog

    log = RunLog(tmp_path, "d")
    log.append("run_info", dict(model="m", config=Config().to_dict(), resolved={"bf16": {"device": "cuda"}}))
    said, hid = _said()
    try:
        _same_device(log, {"bf16": {"device": "cuda"}})
        assert not said
        _same_device(log, {"bf16": {"device": "cpu"}})
    finally:
        logger.remove(hid)
    assert len(said) == 1 and said[0].startswith("WARNING run started on cuda, resume runs on cpu")

"""Presets: every value of every real-model preset names its source, and equals the table below, kept by hand
beside presets.py from the method's sources (S1 the project's journal, S2 the method repository's README
headline, S3 its config.py at the last commit, S4 its last loop entries; docs/usage.md). A value or a tag that
changes in presets.py without this table changing fails here."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from steer_heal.config import Config
from steer_heal.errors import UserError
from steer_heal.presets import PRESETS, REAL, SOURCED, preset, preset_table, source_table

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

# knob=(value, source tag: the text before the source's first ":")
TABLE = {
    "s2-headline": dict(
        model=('google/gemma-3-4b-it', "S1 S2"), steer_layers=((0.45, 0.55), "S3"), alphas=((0.5, 0.75, 1.0), "S3"),
        control=('none', "ours"), dose_target=(0.75, "S3"), probe_size=(8, "S3"), kappa_min=(0.2, "S3"),
        bisect_steps=(6, "ours"), max_batches=(6, "S3"), n_prompts=(16, "ours"), n_keep=(64, "ours"),
        min_train=(30, "S4"), max_new_tokens=(512, "S3 S4"), max_len=(1024, "ours"), collect_size=(16, "ours"),
        gen_batch=(0, "ours"), temperature=(1.0, "ours"), top_p=(0.95, "ours"), n_extract_pairs=(256, "S1 S3"),
        ppl_tau=(50.0, "ours"), rep_tau=(0.3, "ours"), ppl_window=(128, "ours"), loop_tau=(0.5, "ours"),
        reg=('kl_rev', "S2 S3 S4"), kl_agg=('rmse', "S2"), barrier_ref=('base', "S2"), lam=(0.3, "S2 S3 S4"),
        tau=(0.5, "S2 S3 S4"), lam_round_pow=(-0.5, "S2"), spectral_lam=(0.01, "S3 (S2 silent)"),
        weight_decay=(0.0, "ours"), lora_r=(32, "S1 S3"), lora_alpha=(64.0, "S1 S3"),
        lora_layers=((0.2, 0.8), "S1 S3"), epochs=(6, "S1 S3"), batch_size=(1, "S3"), grad_accum=(4, "S3"),
        lr=(0.0001, "S1 S3"), warmup=(0.1, "S1 S3"), betas=((0.9, 0.95), "S1 S3"), grad_clip=(1.0, "ours"),
        think_tokens=(128, "S1 S3 S4"), n_vignettes=(0, "ours"), eval_batch=(0, "ours"), n_rounds=(8, "S2"),
        coh_floor=(0.95, "S3"), fold_history=(True, "ours"), repetition_penalty=(1.0, "S3 (S2 silent)"),
        no_repeat_ngram=(0, "S3 (S2 silent)"),
    ),
    "s4-next": dict(
        model=('google/gemma-3-4b-it', "S1 S2"), steer_layers=((0.45, 0.55), "S3"), alphas=((0.5, 0.75, 1.0), "S3"),
        control=('none', "ours"), dose_target=(0.75, "S3"), probe_size=(8, "S3"), kappa_min=(0.2, "S3"),
        bisect_steps=(6, "ours"), max_batches=(6, "S3"), n_prompts=(16, "ours"), n_keep=(64, "ours"),
        min_train=(30, "S4"), max_new_tokens=(512, "S3 S4"), max_len=(1024, "ours"), collect_size=(16, "ours"),
        gen_batch=(0, "ours"), temperature=(1.0, "ours"), top_p=(0.95, "ours"), n_extract_pairs=(256, "S1 S3"),
        ppl_tau=(50.0, "ours"), rep_tau=(0.3, "ours"), ppl_window=(128, "ours"), loop_tau=(0.5, "ours"),
        reg=('kl_rev', "S2 S3 S4"), kl_agg=('mean', "S3"), barrier_ref=('base', "S4 next"), lam=(0.3, "S2 S3 S4"),
        tau=(0.5, "S4"), lam_round_pow=(0.0, "S4 next"), spectral_lam=(0.0, "S4 next"), weight_decay=(0.0, "ours"),
        lora_r=(32, "S1 S3"), lora_alpha=(64.0, "S1 S3"), lora_layers=((0.2, 0.8), "S1 S3"), epochs=(6, "S1 S3"),
        batch_size=(1, "S3"), grad_accum=(4, "S3"), lr=(0.0001, "S1 S3"), warmup=(0.1, "S1 S3"),
        betas=((0.9, 0.95), "S1 S3"), grad_clip=(1.0, "ours"), think_tokens=(128, "S1 S3 S4"),
        n_vignettes=(0, "ours"), eval_batch=(0, "ours"), n_rounds=(10, "S4"), coh_floor=(0.95, "S3"),
        fold_history=(True, "ours"), repetition_penalty=(1.0, "S3 (S4 silent)"),
        no_repeat_ngram=(0, "S3 (S4 silent)"),
    ),
    "s1-journal": dict(
        model=('google/gemma-3-4b-it', "S1 S2"), steer_layers=((0.45, 0.55), "S3"), alphas=((0.25, 0.5), "S1"),
        control=('none', "ours"), dose_target=(0.75, "S3"), probe_size=(8, "S3"), kappa_min=(0.2, "S3"),
        bisect_steps=(6, "ours"), max_batches=(6, "S3"), n_prompts=(16, "ours"), n_keep=(64, "ours"),
        min_train=(30, "S4"), max_new_tokens=(512, "S3 S4"), max_len=(1024, "ours"), collect_size=(16, "ours"),
        gen_batch=(0, "ours"), temperature=(1.0, "ours"), top_p=(0.95, "ours"), n_extract_pairs=(256, "S1 S3"),
        ppl_tau=(50.0, "ours"), rep_tau=(0.3, "ours"), ppl_window=(128, "ours"), loop_tau=(0.5, "ours"),
        reg=('kl_rev', "S1"), kl_agg=('mean', "S3 (S1 silent)"), barrier_ref=('base', "S1"), lam=(0.1, "S1"),
        tau=(0.0, "S1"), lam_round_pow=(0.0, "S3"), spectral_lam=(0.01, "S3 (S1 silent)"), weight_decay=(0.0, "ours"),
        lora_r=(32, "S1 S3"), lora_alpha=(64.0, "S1 S3"), lora_layers=((0.2, 0.8), "S1 S3"), epochs=(6, "S1 S3"),
        batch_size=(1, "S3 (S1 silent)"), grad_accum=(4, "S3"), lr=(0.0001, "S1 S3"), warmup=(0.1, "S1 S3"),
        betas=((0.9, 0.95), "S1 S3"), grad_clip=(1.0, "ours"), think_tokens=(128, "S1 S3 S4"),
        n_vignettes=(0, "ours"), eval_batch=(0, "ours"), n_rounds=(8, "ours (S1 silent)"), coh_floor=(0.95, "S3"),
        fold_history=(True, "ours"), repetition_penalty=(1.3, "S1"), no_repeat_ngram=(3, "S1"),
    ),
    "small": dict(
        model=('smollm2-135m', "ours"), steer_layers=((0.4, 0.6), "ours"), alphas=((12.0, 16.0, 20.0), "ours"),
        n_rounds=(3, "ours"), n_prompts=(32, "ours"), n_keep=(24, "ours"), min_train=(8, "ours"),
        probe_size=(8, "S3"), dose_target=(0.75, "S3"), kappa_min=(0.2, "S3"), bisect_steps=(4, "ours"),
        max_new_tokens=(48, "ours"), max_len=(192, "ours"), collect_size=(16, "ours"), gen_batch=(16, "ours"),
        ppl_tau=(40.0, "ours"), rel_tau=(0.1, "ours"), loop_tau=(0.5, "ours"), n_extract_pairs=(64, "ours"),
        epochs=(2, "ours"), batch_size=(4, "ours"), dtype=('float32', "ours"), fold_history=(True, "ours"),
    ),
}


def test_each_real_preset_equals_its_sourced_table():
    assert set(TABLE) == set(REAL)
    for name, want in TABLE.items():
        got = {k: (v, s.split(":")[0]) for k, (v, s) in SOURCED[name].items()}
        assert got == want, name


def test_every_source_is_s1_to_s4_or_ours_with_a_reason():
    for name in REAL:
        for knob, (_, src) in SOURCED[name].items():
            assert re.match(r"^(S[1-4]\b|ours\b.*: \S)", src), (name, knob, src)


def test_presets_are_valid_configs_and_the_gpu_ones_follow_the_sources():
    for name in PRESETS:
        Config(**preset(name)).validate()
    s2, s4, s1 = (Config(**preset(n)) for n in ("s2-headline", "s4-next", "s1-journal"))
    # S2's headline: rmse, lam 0.3 decaying to 0.11 at round 7, tau 0.5, 8 rounds
    assert (s2.kl_agg, s2.lam, s2.tau, s2.lam_round_pow, s2.n_rounds) == ("rmse", 0.3, 0.5, -0.5, 8)
    assert s2.lam * 8 ** s2.lam_round_pow == pytest.approx(0.11, abs=0.005)
    # S4's next experiment: barrier to base, spectral and ramp off
    assert (s4.barrier_ref, s4.spectral_lam, s4.lam_round_pow, s4.tau, s4.lam) == ("base", 0.0, 0.0, 0.5, 0.3)
    # S1's generation guards; S3 removed them, so the presets reproducing S2 and S4 leave them off
    assert (s1.repetition_penalty, s1.no_repeat_ngram) == (1.3, 3)
    assert (s2.repetition_penalty, s2.no_repeat_ngram, s4.repetition_penalty) == (1.0, 0, 1.0)
    for c in (s1, s2, s4):
        assert (c.n_extract_pairs, c.batch_size, c.grad_accum, c.max_new_tokens, c.think_tokens) == (256, 1, 4, 512, 128)
        assert c.loop_tau > 0


def test_journal_is_refused_in_one_line_naming_its_replacements():
    with pytest.raises(UserError, match="s2-headline.*s4-next"):
        preset("journal")
    p = subprocess.run([sys.executable, "-m", "steer_heal", "--preset", "journal"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "retired" in lines[0] and "s2-headline" in lines[0] and "s4-next" in lines[0], p.stderr


def test_help_and_usage_md_show_each_presets_values_and_sources():
    from steer_heal.cli import build_parser

    text = build_parser().format_help()
    lines = text[text.index("presets (the value"):].splitlines()
    head = lines[2].split()
    assert head == ["knob", "default", *PRESETS]
    col = head.index("s2-headline")
    first = lines[3:lines.index("", 3)] if "" in lines[3:] else lines[3:]  # the value table; source tables follow
    shown = {ln.split()[0]: ln for ln in first}
    for knob, value in preset("s2-headline").items():
        cells = re.split(r"\s{2,}", shown[knob].strip())
        want = " ".join(f"{x:g}" for x in value) if isinstance(value, tuple) \
            else (f"{value:g}" if isinstance(value, float) else str(value))
        assert cells[col] == want, (knob, cells, want)
    usage = (DOCS / "usage.md").read_text()
    assert preset_table(md=True) in usage, "docs/usage.md's preset table is stale"
    for name in REAL:
        assert source_table(name) in text, name
        assert source_table(name, md=True) in usage, f"docs/usage.md's {name} source table is stale"


def test_just_run_uses_s2_headline():
    justfile = (REPO / "justfile").read_text()
    body = justfile[justfile.index("\nrun *ARGS:"):].split("\n\n")[0]
    assert "--preset s2-headline" in body


# The journal preset's config as a run stored it before issue 25 (no guards, loop gate or suffix contexts).
OLD_JOURNAL = dict(
    model="google/gemma-3-4b-it", steer_layers=[0.45, 0.5], alphas=[0.5, 0.75, 1.0], control="none",
    dose_target=0.75, probe_size=8, kappa_min=0.2, bisect_steps=6, max_batches=8,
    n_prompts=16, n_keep=64, min_train=30, max_new_tokens=512, max_len=1024, collect_size=16, gen_batch=16,
    temperature=1.0, top_p=0.95, ppl_tau=50.0, rep_tau=0.3, ppl_window=128, rel_tau=0.0,
    reg="kl_rev", kl_agg="rmse", barrier_ref="prev", lam=0.3, tau=2.0, lam_round_pow=-0.5,
    spectral_lam=0.01, weight_decay=0.0, lora_r=32, lora_alpha=64.0, lora_layers=[0.2, 0.8],
    epochs=6, batch_size=3, grad_accum=2, lr=1e-4, warmup=0.1, betas=[0.9, 0.95], grad_clip=1.0,
    think_tokens=128, n_vignettes=0, eval_batch=8, n_rounds=8, coh_floor=0.95, fold_history=True,
)


def test_a_stored_journal_run_reads_back_exactly_as_it_ran(tmp_path):
    from steer_heal.store import RunLog
    from steer_heal.student import stored_config

    log = RunLog(tmp_path, "old-journal")
    log.append("run_info", dict(model="google/gemma-3-4b-it", preset="journal", reg="kl_rev", seed=0, n_rounds=8,
                                config=OLD_JOURNAL))
    cfg = stored_config(log)
    for k, v in OLD_JOURNAL.items():
        assert getattr(cfg, k) == (tuple(v) if isinstance(v, list) else v), k
    # the knobs it predates read back as what it ran: no guards, no loop gate, the 85 bundled contexts
    assert (cfg.repetition_penalty, cfg.no_repeat_ngram, cfg.loop_tau, cfg.n_extract_pairs) == (1.0, 0, 0.0, 0)

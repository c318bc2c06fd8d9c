"""Diagnostics (scripts/) on the tiny model: rows back by SQL, beside a live run, the front, intervals, the queue.

One real two-round run per module; the scripts' main() run in this process against it (their
imports are paid once), a second real run trains while they work.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from test_flow import ARGS, steer_heal

from steer_heal.config import Config
from steer_heal.diag import model as diag_model
from steer_heal.diag import stats
from steer_heal.errors import UserError
from steer_heal.steering import random_like
from steer_heal.store import RunLog, query
from steer_heal.student import stored_dose

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@cache
def script(name: str):
    """The diagnostic's module (scripts/<name>.py is a thin entry point to it)."""
    return importlib.import_module("steer_heal.diag." + {"barrier_sweep": "barrier"}.get(name, name))


def rows_of(out, kind: str, diag_id: str | None = None) -> list[dict]:
    """A diagnostic's rows as SQL returns them (the newest record of that kind unless diag_id)."""
    _, ids = query(out, "SELECT diag_id FROM diagnostics WHERE kind = ? ORDER BY created DESC", [kind])
    assert ids, f"no {kind} diagnostic in the store"
    _, got = query(out, "SELECT round, source_run, row FROM diag_rows WHERE diag_id = ?", [diag_id or ids[0][0]])
    return [dict(json.loads(r), _round=rnd, _source=src) for rnd, src, r in got]


def stored_stage(out, run_id: str, r: int, stage: str) -> dict:
    _, got = query(out, "SELECT foundation, nats, coherence FROM stage_metrics WHERE run_id = ? AND round = ? "
                        "AND stage = ? AND foundation IN ('Authority', 'trait')", [run_id, r, stage])
    d = {f: (n, c) for f, n, c in got}
    return dict(target_nats=d["Authority"][0], coherence=d["Authority"][1], trait_nats=d["trait"][0])


def assert_valid_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    h, w, _ = imread(path).shape
    assert h > 100 and w > 100


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("diag")
    rc, _, se = steer_heal(out, *ARGS, "--run-id", "a")
    assert rc == 0, se[-3000:]
    return out


# ---------------------------------------------------------------- pure helpers

def test_t_quantile_matches_the_table():
    for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (5, 2.5706), (10, 2.2281), (30, 2.0423)):
        assert stats.t_quantile(0.95, df) == pytest.approx(t, abs=1e-4)


def test_mean_ci_is_the_hand_computed_t_interval():
    ci = stats.mean_ci([-0.1, -0.2, None, -0.3])  # None (a NULL metric) is left out
    hw = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n), sd of (-.1, -.2, -.3) = 0.1
    assert ci["n"] == 3 and ci["mean"] == pytest.approx(-0.2)
    assert (ci["lo"], ci["hi"]) == (pytest.approx(-0.2 - hw, abs=1e-6), pytest.approx(-0.2 + hw, abs=1e-6))
    assert stats.mean_ci([1.0]) == dict(mean=1.0, lo=None, hi=None, n=1)
    assert stats.mean_ci([None])["mean"] is None


HAND = [  # (x, y, on the front?)
    (2.0, 0.0, True),   # most trait moved
    (2.0, 0.0, True),   # its exact tie: ties do not dominate each other
    (1.0, 1.0, True),
    (1.0, 0.5, False),  # same x as (1, 1), less coherence
    (0.5, 0.5, False),  # dominated on both axes
    (0.0, 2.0, True),   # most coherence
    (-1.0, 2.0, False),  # same coherence, less trait
]


def test_pareto_front_on_a_hand_made_table():
    assert stats.pareto_front([(x, y) for x, y, _ in HAND]) == [f for *_, f in HAND]


def test_random_like_keeps_each_layer_norm_and_is_seeded():
    v = {3: torch.tensor([3.0, 4.0, 0.0]), 5: torch.tensor([0.0, 0.0, 2.0])}
    r = random_like(v, 7)
    assert {k: float(x.norm()) for k, x in r.items()} == pytest.approx({3: 5.0, 5: 2.0})
    assert all(torch.equal(r[k], random_like(v, 7)[k]) for k in v)
    assert not torch.equal(r[3], random_like(v, 8)[3])


def test_random_control_pushes_each_layer_of_a_multi_layer_band_by_that_layers_norm(tiny):
    """On the tiny model steered over every layer, with a different norm per layer: the random control's push,
    measured at each layer's output inside one forward, is coef x a vector of that layer's own norm, in a
    direction other than the trait's."""
    from steer_heal import seeds
    from steer_heal.models import get_layers
    from steer_heal.steering import control_vector, steer

    model, tok = tiny
    layers = get_layers(model)
    assert len(layers) >= 2
    g = torch.Generator().manual_seed(0)
    v = {i: torch.randn(model.config.hidden_size, generator=g) * (i + 1) for i in range(len(layers))}
    rv = control_vector(v, "random", seeds.control_vector(0))
    seen: dict[str, dict[int, torch.Tensor]] = {"before": {}, "after": {}}

    def grab(when, i):
        def hook(_m, _inp, out):
            seen[when][i] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return hook

    ids = tok("Should I report my friend?", return_tensors="pt").input_ids
    handles = [layer.register_forward_hook(grab("before", i)) for i, layer in enumerate(layers)]
    try:
        with steer(model, rv, 0.5), torch.no_grad():
            handles += [layer.register_forward_hook(grab("after", i)) for i, layer in enumerate(layers)]
            model(ids)
    finally:
        for h in handles:
            h.remove()
    for i in v:
        push = (seen["after"][i] - seen["before"][i]).float()[0]  # [tokens, hidden]: the same push on each token
        assert push.norm(dim=-1).tolist() == pytest.approx([0.5 * float(v[i].norm())] * ids.shape[1], rel=1e-3)
        assert abs(torch.nn.functional.cosine_similarity(push[0], v[i].float(), dim=0)) < 0.5


def test_barrier_grid_pins_barrier_knobs_of_nll_cells():
    cfg = Config(reg="kl_rev", lam=1.0)
    cells = script("barrier_sweep").grid(cfg, {"reg": ["nll", "kl_rev"], "lam": [0.5, 1.0]})
    assert [(c["reg"], c["lam"]) for c in cells] == [("nll", 1.0), ("kl_rev", 0.5), ("kl_rev", 1.0)]
    with pytest.raises(UserError, match="kl_agg"):
        script("barrier_sweep").grid(cfg, {"kl_agg": ["median"]})


def test_barrier_sweep_runs_s4s_tau_bracket_with_the_barrier_to_base():
    # a run like S4's loops (barrier to prev, spectral on, ramped lam): the bracket overrides all three
    cfg = Config(reg="kl_rev", barrier_ref="prev", spectral_lam=0.01, lam_round_pow=0.5, lam=1.0)
    bs = script("barrier_sweep")
    a = bs.parse(["run", "0", "--barrier-ref", "base", "--spectral-lam", "0", "--lam-round-pow", "0",
                  "--lam", "0.3", "--tau", "0.25", "0.5", "1", "2"])
    cells = bs.grid(cfg, {k: getattr(a, k) for k in bs.GRID})
    assert [c["tau"] for c in cells] == [0.25, 0.5, 1.0, 2.0]
    assert all((c["barrier_ref"], c["spectral_lam"], c["lam_round_pow"], c["lam"]) == ("base", 0.0, 0.0, 0.3)
               for c in cells)


def test_barrier_order_puts_coherent_cells_with_most_new_trait_first():
    rows = [dict(stage="healed", name=n, coh_ok=ok, new_trait=t) for n, ok, t in
            (("a", False, 0.9), ("b", True, 0.1), ("c", True, None), ("d", True, 0.3))]
    assert [r["name"] for r in script("barrier_sweep").ordered(rows)] == ["d", "b", "c", "a"]


# ---------------------------------------------------------------- scripts on the tiny run

def test_round_student_has_only_earlier_adapters_and_trials_leave_no_trace(store):
    rm0 = diag_model.open_round(store, "a", 0, "cpu")
    assert rm0.stack.names == [] and not hasattr(rm0.stack.model, "peft_config")
    assert rm0.coef == pytest.approx(stored_dose(rm0.log, 0, rm0.cfg).coef)  # the dose the kept data came from
    rm1 = diag_model.open_round(store, "a", 1, "cpu")
    assert rm1.stack.names == ["r0"] and rm1.vector is not None
    ids = rm1.tok("You see a man ignoring a rule.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = rm1.stack.model(ids).logits
        with rm1.stack.base():
            assert torch.equal(rm0.stack.model(ids).logits, rm1.stack.model(ids).logits)
        with diag_model.trial_adapter(rm1.stack, rm1.lora, "r1", seed=1):
            assert rm1.stack.names == ["r0", "r1"]
        assert torch.equal(rm1.stack.model(ids).logits, before) and rm1.stack.names == ["r0"]


def test_csweep_rows_in_the_store_reproduce_the_steered_eval(store):
    assert script("csweep").main(["a", "1", "--out", str(store), "--coefs", "0", "3", "--random", "2"]) == 0
    rows = rows_of(store, "csweep")
    _, c = query(store, "SELECT DISTINCT coef FROM stage_metrics WHERE run_id = 'a' AND round = 1 AND stage = 'steered'")
    c_dose = c[0][0]  # the round's own dose, always added to the sweep
    assert len(c) == 1 and 0 < c_dose < 3
    assert {(r["vector"], r["coef"]) for r in rows} == {(v, c) for v in ("trait", "random0", "random1")
                                                        for c in (0.0, c_dose, 3.0)}
    assert all(r["_round"] == 1 and r["_source"] == "a" for r in rows)
    at = {(r["vector"], r["coef"]): r for r in rows}
    dose, stored = at[("trait", c_dose)], stored_stage(store, "a", 1, "steered")
    assert dose["dose"] and {k: dose[k] for k in stored} == pytest.approx(stored, abs=1e-6)
    assert len(dose["nats"]) == 7 and isinstance(dose["generation"], str)
    # at C = 0 every direction is the same unsteered student; at C = 3 they differ
    assert at[("random0", 0.0)]["target_nats"] == pytest.approx(at[("trait", 0.0)]["target_nats"], abs=1e-9)
    assert at[("random0", 3.0)]["target_nats"] != pytest.approx(at[("trait", 3.0)]["target_nats"], abs=1e-6)
    assert_valid_png(next((store / "diagnostics").glob("*-csweep-*/csweep.png")))


def test_barrier_sweep_rows_and_the_run_cell_reproduces_the_run_heal(store):
    assert script("barrier_sweep").main(["a", "1", "--out", str(store), "--reg", "nll", "kl_rev"]) == 0
    rows = rows_of(store, "barrier-sweep")
    cells = {r["reg"]: r for r in rows if r["stage"] == "healed"}
    assert sorted(cells) == ["kl_rev", "nll"] and cells["kl_rev"]["run_cell"] and not cells["nll"]["run_cell"]
    # same history, same kept completions, same seeds: the run's own heal comes out again
    stored = stored_stage(store, "a", 1, "healed")
    assert {k: cells["kl_rev"][k] for k in stored} == pytest.approx(stored, abs=1e-6)
    start = next(r for r in rows if r["stage"] == "start")
    assert start["target_nats"] == pytest.approx(stored_stage(store, "a", 0, "healed")["target_nats"], abs=1e-6)
    c = cells["nll"]
    assert c["d_target_new"] == pytest.approx(c["target_nats"] - start["target_nats"])
    # the slope is coherence change per nat of new target, blank only when the nats move under MIN_DEN
    from steer_heal import metrics
    for c in cells.values():
        want = metrics.coh_cost(c["coherence"], start["coherence"], c["target_nats"], start["target_nats"])
        assert (c["slope"] is None) == (want is None) == (abs(c["d_target_new"]) < metrics.MIN_DEN)
        assert want is None or c["slope"] == pytest.approx(want)
        assert c["d_coh"] == pytest.approx(c["coherence"] - start["coherence"])
    assert (store / "diagnostics" / rows_of_id(store, "barrier-sweep") / "report.md").is_file()


@pytest.mark.slow
def test_barrier_sweep_in_parallel_through_prefect_matches_sequential(store):
    """--devices cpu cpu takes the multi-GPU path (a Prefect ThreadPoolTaskRunner, one model per worker)
    on the CPU; slow only because it starts Prefect's ephemeral server (about 40 s here)."""
    args = ["a", "1", "--out", str(store), "--reg", "nll", "kl_rev", "--lam", "0.5", "1"]
    assert script("barrier_sweep").main(args) == 0
    seq = {(r["reg"], r["lam"]): r["target_nats"] for r in rows_of(store, "barrier-sweep") if r["stage"] == "healed"}
    assert script("barrier_sweep").main([*args, "--devices", "cpu", "cpu"]) == 0
    rows = rows_of(store, "barrier-sweep")
    assert (store / "diagnostics" / rows_of_id(store, "barrier-sweep") / "prefect").is_dir()
    assert sorted(r["device"] for r in rows if r["stage"] == "start") == ["cpu", "cpu"]
    assert {(r["reg"], r["lam"]): r["target_nats"] for r in rows if r["stage"] == "healed"} == pytest.approx(seq)


def rows_of_id(out, kind: str) -> str:
    _, ids = query(out, "SELECT diag_id FROM diagnostics WHERE kind = ? ORDER BY created DESC", [kind])
    return ids[0][0]


def test_plot_run_writes_png_svg_and_rows(store):
    assert script("plot_run").main(["a", "--out", str(store)]) == 0
    assert_valid_png(store / "runs" / "a" / "plots" / "rounds.png")
    assert (store / "runs" / "a" / "plots" / "rounds.svg").read_text().lstrip().startswith("<?xml")
    rows = rows_of(store, "plot")
    assert {(r["round"], r["stage"]) for r in rows} == {(-1, "base"), (-1, "prompted"), (0, "steered"),
                                                        (0, "healed"), (1, "steered"), (1, "healed")}
    diag_id = rows_of_id(store, "plot")
    assert "rounds.png" in (store / "diagnostics" / diag_id / "report.md").read_text()
    report = (store / "runs" / "a" / "report.md").read_text()  # the run's report links both
    assert "[rounds.png](plots/rounds.png)" in report and f"plot: [{diag_id}](../../diagnostics/{diag_id}/report.md)" in report


def test_stages_intervals_reproduce_the_runs_stored_intervals(store):
    """`just stages` recomputes the paired intervals from eval_items with the run's seeds: at the run's --boot
    it gives exactly the run's own `intervals` rows; at another --boot, other resamples."""
    _, stored = query(store, "SELECT round, stage, metric, ref, delta, lo, hi, ns FROM intervals WHERE run_id = 'a' "
                             "AND round >= 0")
    assert stored
    assert script("stages").main(["a", "--out", str(store)]) == 0
    rows = {(r["round"], r["stage"]): r for r in rows_of(store, "stages") if r["level"] == "run"}
    names = {"target": "d_target", "trait": "d_trait", "coh": "d_coh", "ppl": "d_ppl"}
    for r, stage, metric, ref, d, lo, hi, ns in stored:
        name = names[metric] + ("_prev" if ref == "prev" else "")
        got = rows[(r, stage)]
        assert (got[name], got[f"{name}_lo"], got[f"{name}_hi"], got[f"{name}_ns"]) == (d, lo, hi, ns), name
    assert all(rows[(r, s)]["broken"] == "" for r, s in rows if s != "base")  # nothing broke on the tiny model
    assert script("stages").main(["a", "--out", str(store), "--boot", "300"]) == 0
    other = {(r["round"], r["stage"]): r for r in rows_of(store, "stages") if r["level"] == "run"}
    assert other[(1, "healed")]["d_trait"] == rows[(1, "healed")]["d_trait"]
    assert other[(1, "healed")]["d_trait_lo"] != rows[(1, "healed")]["d_trait_lo"]


def test_stages_mark_a_stage_under_the_floor_broken_and_withhold_only_its_ratios(store):
    """The same stored run read at a floor above every stage's coherence: each stage is named broken, its ratios
    (coh_cost, surgical, retain) are withheld with the flag, and its deltas and intervals are the same numbers."""
    from steer_heal.diag.stages import run_rows

    def table(name):
        cols, rows = query(store, f"SELECT * FROM {name} WHERE run_id = 'a'")
        return [dict(zip(cols, r, strict=True)) for r in rows]

    sm, items = table("stage_metrics"), table("eval_items")
    plain = {(r["round"], r["stage"]): r for r in run_rows("a", sm, "Authority", items, boot=200)}
    high = {(r["round"], r["stage"]): r for r in run_rows("a", sm, "Authority", items, boot=200, floor_rel=1e6)}
    stages = [k for k in high if k[1] != "base"]
    assert stages and all("coherence" in high[k]["broken"] or "mass" in high[k]["broken"] for k in stages)
    assert high[(-1, "base")]["broken"] == "" and all(plain[k]["broken"] == "" for k in stages)
    for k in stages:
        assert high[k].get("coh_cost") is None and high[k].get("surgical") is None
        assert {m: high[k].get(m) for m in ("d_target", "d_trait_lo", "d_coh_hi")} == \
            {m: plain[k].get(m) for m in ("d_target", "d_trait_lo", "d_coh_hi")}
    healed = [k for k in stages if k[1] == "healed" and plain[k].get("retain") is not None]
    assert healed and all(high[k]["withheld"] == "BROKEN" and high[k].get("retain") is None for k in healed)


def test_pareto_default_query_and_a_hand_made_table_by_sql(store):
    assert script("pareto").main(["--out", str(store)]) == 0
    rows = rows_of(store, "pareto")
    assert {r["round"] for r in rows} == {0, 1} and all(r["label"] == "a" for r in rows)
    assert all(r["trait_moved"] == 0 for r in rows if r["stage"] == "base")
    values = ", ".join(f"('p{i}', 0, 'healed', {x}, {y})" for i, (x, y, _) in enumerate(HAND))
    sql = f"SELECT * FROM (VALUES {values}) t(label, round, stage, trait_moved, coherence)"
    assert script("pareto").main(["--out", str(store), "--sql", sql]) == 0
    got = {r["label"]: r["front"] for r in rows_of(store, "pareto")}
    assert got == {f"p{i}": f for i, (*_, f) in enumerate(HAND)}
    assert_valid_png(store / "diagnostics" / rows_of_id(store, "pareto") / "pareto.png")


def test_stages_seed_interval_by_hand(tmp_path):
    """Three seeds of one config and one other config, hand-made in the store: the interval is the t one."""
    base, d = -2.0, {0: -0.1, 1: -0.2, 2: -0.3}
    for run_id, seed, lam in (("s0", 0, 1.0), ("s1", 1, 1.0), ("s2", 2, 1.0), ("other", 0, 2.0)):
        log = RunLog(tmp_path, run_id)
        log.append("run_info", dict(seed=seed, config=Config(model="tiny-random", seed=seed, lam=lam).to_dict()))
        healed = base + d.get(seed, 0.0) if run_id != "other" else base - 1.0
        for r, stage, t in ((-1, "base", base), (0, "steered", base - 0.4), (0, "healed", healed)):
            log.append("stage_metrics", [dict(round=r, stage=stage, evaluator="mfv", foundation=f, n=7, coherence=0.5,
                                              nats=t if f == "Authority" else -1.9) for f in ("Authority", "Care")])
    assert script("stages").main(["s0", "s1", "s2", "other", "--out", str(tmp_path)]) == 0
    rows = rows_of(tmp_path, "stages")
    seeds = [r for r in rows if r["level"] == "seeds"]
    assert {(r["round"], r["stage"]) for r in seeds} == {(0, "steered"), (0, "healed")}  # "other" has one seed
    h = next(r for r in seeds if r["stage"] == "healed")
    hw = 4.302653 * 0.1 / math.sqrt(3)
    assert h["runs"] == ["s0", "s1", "s2"] and h["config"] == "lam=1"
    assert (h["d_target_mean"], h["d_target_lo"], h["d_target_hi"]) == pytest.approx((-0.2, -0.2 - hw, -0.2 + hw))
    assert h["retain_mean"] == pytest.approx(0.5)  # (-0.1/-0.4 + -0.2/-0.4 + -0.3/-0.4) / 3
    s0 = next(r for r in rows if r["level"] == "run" and r["run_id"] == "s0" and r["stage"] == "healed")
    assert s0["_source"] == "s0" and s0["paired"] and s0["surgical"] and s0["retain"] == pytest.approx(0.25)


def test_diagnostics_beside_a_live_training_run_lose_nothing(store):
    """A run trains into the store while c-sweep and the stage table (of that very run too) read and write it."""
    N = 8  # rounds: long enough that the diagnostics below start (and mostly finish) while it writes
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PREFECT_HOME", None)
    live = subprocess.Popen([sys.executable, "-m", "steer_heal", "--out", str(store), *ARGS, "--run-id", "live",
                             "--seed", "4", "--n-rounds", str(N)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    written, overlaps = [], 0
    try:
        deadline = time.time() + 300
        while not any(s["stage"] == "eval_base" for s in RunLog(store, "live").read("stages")):
            assert live.poll() is None and time.time() < deadline, "the live run ended before it wrote"
            time.sleep(0.5)
        assert script("stages").main(["a", "live", "--out", str(store)]) == 0  # no model: done in a moment
        written.append(rows_of_id(store, "stages"))
        overlaps += live.poll() is None
        assert live.poll() is None  # c-sweep starts while the run writes
        assert script("csweep").main(["a", "1", "--out", str(store), "--coefs", "0", "2"]) == 0
        written.insert(0, rows_of_id(store, "csweep"))
        while live.poll() is None:
            assert script("stages").main(["a", "live", "--out", str(store)]) == 0
            written.append(rows_of_id(store, "stages"))
            overlaps += live.poll() is None
        _, se = live.communicate(timeout=300)
    finally:
        try:
            os.killpg(live.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert live.returncode == 0, se[-3000:]
    assert overlaps >= 1  # at least one stage table finished while the run was still writing
    # the run's side: everything it wrote is there, once
    _, runs = query(store, "SELECT status, rounds_done FROM runs WHERE run_id = 'live'")
    assert runs == [("done", N)]
    for table in ("stage_metrics", "eval_items", "intervals", "completions", "heal_steps", "rounds"):
        lines = [x for x in (store / "runs" / "live" / f"{table}.jsonl").read_text().splitlines() if x.strip()]
        _, n = query(store, f"SELECT count(*) FROM {table} WHERE run_id = 'live'")
        assert n[0][0] == len(lines) > 0, table
    _, n = query(store, "SELECT count(*) FROM stage_metrics WHERE run_id = 'live'")
    # base, prompted + steered, healed per round: 7 foundations, contrast, free text each; steered also kl
    assert n[0][0] == (2 + 2 * N) * 9 + N
    # the diagnostics' side: every row each record wrote reads back, and each saw all of the finished run
    assert len(rows_of(store, "csweep", written[0])) == 3  # C = 0, 2 and the round's dose 1
    for diag_id in written:
        lines = (store / "diagnostics" / diag_id / "diag_rows.jsonl").read_text().splitlines()
        _, got = query(store, "SELECT count(*) FROM diag_rows WHERE diag_id = ?", [diag_id])
        assert got[0][0] == len(lines) > 0
    for diag_id in written[1:]:
        assert sum(r["run_id"] == "a" for r in rows_of(store, "stages", diag_id) if r["level"] == "run") == 6


# ---------------------------------------------------------------- recipes and the queue

def just(*args, env=None, timeout=120):
    return subprocess.run([shutil.which("just") or "just", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_recipe_runs_the_script_and_a_missing_run_is_a_clear_error(store):
    p = just("stages", "a", "--out", str(store))
    assert p.returncode == 0 and "healed" in p.stdout and "diagnostic " in p.stdout, p.stderr[-2000:]
    p = just("csweep", "nosuch", "--out", str(store))
    assert p.returncode == 2 and "no run 'nosuch'" in p.stderr and "Traceback" not in p.stderr
    assert not (store / "runs" / "nosuch").exists()


def _path_without_pueue(extra: Path | None = None) -> str:
    dirs = [d for d in os.environ["PATH"].split(os.pathsep) if d and not (Path(d) / "pueue").exists()]
    return os.pathsep.join(([str(extra)] if extra else []) + dirs)


def test_queue_without_pueue_or_a_prefect_server_says_how_to_get_either():
    """Without pueue the queue is the Prefect work pool (tests/test_pool.py); with no server either, one line
    names both ways out."""
    env = dict(os.environ, PATH=_path_without_pueue(), PREFECT_API_URL="http://127.0.0.1:9/api")
    p = just("queue-csweep", "x", env=env)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "pueue is not installed and no Prefect server answers at http://127.0.0.1:9/api" in p.stderr
    assert "`just server`" in p.stderr and "cargo install pueue" in p.stderr
    assert "or run `just csweep x` directly" in p.stderr


def test_queue_adds_the_job_to_a_named_group(tmp_path):
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "pueue"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nprintf "%s|" "$@" >> {calls}\necho >> {calls}\n')
    fake.chmod(0o755)
    p = just("queue-barrier", "r1", "2", "--lam", "0.5", "1", env=dict(os.environ, PATH=_path_without_pueue(fake.parent)))
    assert p.returncode == 0, p.stderr
    group_add, add = calls.read_text().splitlines()
    assert group_add == "group|add|steer-heal|"
    assert add == (f"add|--group|steer-heal|--label|barrier-sweep|--working-directory|{REPO}|--|"
                   "just barrier-sweep r1 2 --lam 0.5 1|")


def _hand_run(out, run_id: str, seed: int, moves: dict[str, tuple[float, float]], control: str = "none"):
    """A run stored by hand: per stage (Authority nats moved from base, coherence); base at -2.0 and 0.9."""
    log = RunLog(out, run_id)
    log.append("run_info", dict(seed=seed, config=Config(model="tiny-random", seed=seed, control=control).to_dict()))
    for (r, stage), (move, coh) in {(-1, "base"): (0.0, 0.9), **moves}.items():
        log.append("stage_metrics", [dict(round=r, stage=stage, evaluator="mfv", foundation=f, n=7, coherence=coh,
                                          nats=-2.0 + (move if f == "Authority" else 0.0)) for f in ("Authority", "Care")])


def test_pareto_never_puts_a_broken_point_on_the_front(tmp_path):
    """The broken point has the largest trait moved (care_vs_authority lowers Authority: -2.0 nats is +2.0 toward
    the trait) at coherence 0.01, under the floor: it is flagged, drawn crossed, and the front is the rest."""
    _hand_run(tmp_path, "ok", 0, {(0, "steered"): (-0.5, 0.8), (0, "healed"): (-0.3, 0.85)})
    _hand_run(tmp_path, "wreck", 1, {(0, "steered"): (-2.5, 0.01), (0, "healed"): (-2.0, 0.01)})
    assert script("pareto").main(["--out", str(tmp_path)]) == 0
    pts = {(r["label"], r["stage"]): r for r in rows_of(tmp_path, "pareto") if r["round"] == 0}
    wreck = pts[("wreck", "steered")]
    assert wreck["trait_moved"] == max(p["trait_moved"] for p in pts.values())
    assert wreck["broken"] is True and wreck["front"] is False and pts[("wreck", "healed")]["front"] is False
    assert pts[("ok", "steered")]["broken"] is False and pts[("ok", "steered")]["front"] is True
    assert pts[("ok", "healed")]["front"] is True  # less moved, more coherent: a trade-off, not dominated
    diag = rows_of_id(tmp_path, "pareto")
    text = (tmp_path / "diagnostics" / diag / "report.md").read_text()
    assert "2 BROKEN point(s)" in text and "r0 wreck steered" in text
    assert_valid_png(tmp_path / "diagnostics" / diag / "pareto.png")
    svg = (tmp_path / "diagnostics" / diag / "pareto.svg").read_text()
    assert "never on the front" in svg  # the legend says what the cross means


def test_facets_copy_the_references_into_each_round_and_flag_the_front_without_broken_points():
    """Round -1's points are drawn in every round's panel (as that round); rows without a number are left out; a
    broken point is in its panel but neither on the front nor able to push others off it."""
    from steer_heal.diag.pareto import facets

    def pt(label, r, stage, x, y, broken=""):
        return dict(label=label, round=r, stage=stage, trait_moved=x, coherence=y, broken=broken)

    rows = [pt("a", -1, "base", 0.0, 0.9), pt("a", -1, "prompted", 0.3, 0.8), pt("a", 0, "steered", 1.0, 0.5),
            pt("a", 0, "healed", 0.6, 0.85), pt("w", 0, "steered", 2.0, 0.95, "coherence 0.01 < 0.85 x base 0.9"),
            pt("a", 1, "healed", 0.5, 0.7), pt("n", 1, "healed", None, 0.9), pt("n", 1, "steered", 0.4, None)]
    got = facets(rows)
    assert sorted(got) == [0, 1]
    assert [(p["label"], p["round"], p["stage"], p["x"], p["y"], p["front"]) for p in got[0]] == [
        ("a", 0, "base", 0.0, 0.9, True), ("a", 0, "prompted", 0.3, 0.8, False), ("a", 0, "steered", 1.0, 0.5, True),
        ("a", 0, "healed", 0.6, 0.85, True), ("w", 0, "steered", 2.0, 0.95, False)]
    assert [(p["label"], p["round"], p["stage"], p["front"]) for p in got[1]] == [
        ("a", 1, "base", True), ("a", 1, "prompted", True), ("a", 1, "healed", True)]
    assert rows[0]["round"] == -1 and "front" not in rows[0]  # the caller's rows are not changed
    only_refs = facets(rows[:2] + [pt("a", -1, "x", 0.1, 0.7)])
    assert list(only_refs) == [-1]
    assert [(p["round"], p["front"]) for p in only_refs[-1]] == [(-1, True), (-1, True), (-1, False)]


def test_stage_broken_checks_every_stored_stage_against_its_runs_base_and_floor(tmp_path):
    """Each run's stages against its own base, at its own coh_floor_rel (0 = off); base, and a run with no base,
    are never broken."""
    from steer_heal.diag.pareto import stage_broken

    _hand_run(tmp_path, "ok", 0, {(0, "steered"): (-0.5, 0.8), (0, "healed"): (-0.3, 0.85)})
    _hand_run(tmp_path, "wreck", 1, {(0, "steered"): (-2.5, 0.01), (1, "healed"): (-2.0, 0.85)})
    for run_id, floor, stages in (("lax", 0.0, ((-1, "base", 0.9), (0, "steered", 0.01))),
                                  ("nobase", 0.85, ((0, "steered", 0.01),))):
        log = RunLog(tmp_path, run_id)
        log.append("run_info", dict(seed=0, config=Config(model="tiny-random", coh_floor_rel=floor).to_dict()))
        for r, stage, coh in stages:
            log.append("stage_metrics", [dict(round=r, stage=stage, evaluator="mfv", foundation=f, n=7, coherence=coh,
                                              nats=-2.0) for f in ("Authority", "Care")])
    got = {(x, r, s): why for x, r, s, why in stage_broken(str(tmp_path), ["ok", "wreck", "lax", "nobase"])}
    assert sorted(got) == sorted([("ok", -1, "base"), ("ok", 0, "steered"), ("ok", 0, "healed"), ("wreck", -1, "base"),
                                  ("wreck", 0, "steered"), ("wreck", 1, "healed"), ("lax", -1, "base"),
                                  ("lax", 0, "steered"), ("nobase", 0, "steered")])
    assert got[("wreck", 0, "steered")] == "coherence 0.01 < 0.85 x base 0.9"
    assert all(why == "" for k, why in got.items() if k != ("wreck", 0, "steered"))
    # the option-mass test reads the stored items (the mean holds, most items collapsed); base is never flagged,
    # not even with a number missing
    b_sm, b_items, _ = _hand_stage(-1, "base", [0.2] * 6, [0.0] * 6, [0.8] * 4 + [0.3] * 2, [10.0] * 6)
    s_sm, s_items, _ = _hand_stage(0, "steered", [0.1] * 6, [0.1] * 6, [0.04] * 4 + [0.99] * 2, [11.0] * 6)
    log = RunLog(tmp_path, "mass")
    log.append("run_info", dict(seed=0, config=Config(model="tiny-random", coh_floor_rel=0.5).to_dict()))
    log.append("stage_metrics", [dict(x, nats=None) if x["evaluator"] == "contrast" and x["round"] < 0 else x
                                 for x in b_sm + s_sm])
    log.append("eval_items", b_items + s_items)
    got = {(r, s): why for _, r, s, why in stage_broken(str(tmp_path), ["mass"])}
    assert got[(-1, "base")] == "" and "option mass collapsed" in got[(0, "steered")]

def test_stages_tables_mark_a_broken_stage_and_beyond_control_names_it(tmp_path):
    """Delta tables, the over-seed aggregate and the beyond-control row all mark a stage under the floor."""
    for s in range(2):
        _hand_run(tmp_path, f"t{s}", s, {(0, "steered"): (-0.5, 0.8 if s else 0.01), (0, "healed"): (-0.3, 0.85)})
        _hand_run(tmp_path, f"c{s}", s, {(0, "steered"): (0.0, 0.9), (0, "healed"): (-0.1, 0.88)}, control="c0")
    assert script("stages").main(["t0", "t1", "c0", "c1", "--out", str(tmp_path), "--unyoked"]) == 0
    rows = rows_of(tmp_path, "stages")
    agg = next(r for r in rows if r["level"] == "seeds" and r["stage"] == "steered" and r["runs"] == ["t0", "t1"])
    assert agg["broken"] == 1
    beyond = {r["stage"]: r for r in rows if r["level"] == "beyond"}
    assert beyond["steered"]["broken"] == ["t0"] and beyond["healed"]["broken"] == []
    text = (tmp_path / "diagnostics" / rows_of_id(tmp_path, "stages") / "report.md").read_text()
    against_base = text[text.index("against base"):text.index("against the previous")]
    assert any("t0" in ln and "steered" in ln and ln.rstrip().endswith("BROKEN") for ln in against_base.splitlines())
    assert "BROKEN 1/2" in text and "BROKEN t0" in text


def test_beyond_control_refuses_a_repeated_seed_in_one_arm(tmp_path):
    _hand_run(tmp_path, "t0", 0, {(0, "healed"): (-0.3, 0.85)})
    _hand_run(tmp_path, "t0b", 0, {(0, "healed"): (-0.6, 0.85)})  # the treatment again, with seed 0
    _hand_run(tmp_path, "c0", 0, {(0, "healed"): (-0.1, 0.88)}, control="c0")
    with pytest.raises(UserError, match="runs t0 and t0b are the same arm .* same seed 0"):
        script("stages").main(["t0", "t0b", "c0", "--out", str(tmp_path)])


def test_plot_and_report_mark_a_broken_stage(tmp_path):
    from steer_heal.report import write_report

    _hand_run(tmp_path, "w", 0, {(0, "steered"): (-2.0, 0.01), (0, "healed"): (-0.3, 0.85)})
    assert script("plot_run").main(["w", "--out", str(tmp_path)]) == 0
    rows = {(r["round"], r["stage"]): r for r in rows_of(tmp_path, "plot")}
    assert rows[(0, "steered")]["broken"].startswith("coherence 0.01 <") and rows[(0, "healed")]["broken"] == ""
    table = (tmp_path / "diagnostics" / rows_of_id(tmp_path, "plot") / "report.md").read_text()
    assert [ln.split()[-1] for ln in table.splitlines() if " steered " in ln] == ["BROKEN"]
    assert "broken (under the coherence floor)" in (tmp_path / "runs" / "w" / "plots" / "rounds.svg").read_text()
    report = write_report(RunLog(tmp_path, "w"))
    prev = report[report.index("Against the previous student"):report.index("## Free-text")]
    steered = [ln for ln in prev.splitlines() if "| steered |" in ln]
    assert len(steered) == 1 and steered[0].rstrip(" |").endswith("BROKEN")


# ---------------------------------------------------------------- the stage table's rows by hand (issue 30 item 1)

def _hand_stage(r: int, stage: str, p, diff, pmass, ppl, off=(0.0, 0.0), n=None, kl=0.0):
    """One stage as a run stores it: its eval_items, and the stage_metrics rows they give (target_nats = log mean
    p_target, trait = mean diff, coherence = mean pmass, adapter_ppl = mean ppl); Care and Fairness at -2 + off."""
    items = ([dict(round=r, stage=stage, evaluator="mfv", item=f"v{i}", p_target=float(a), pmass=float(b))
              for i, (a, b) in enumerate(zip(p, pmass, strict=True))]
             + [dict(round=r, stage=stage, evaluator="contrast", item=f"d{i}", diff=float(x))
                for i, x in enumerate(diff)]
             + [dict(round=r, stage=stage, evaluator="freetext", item=str(i), ppl=float(x)) for i, x in enumerate(ppl)])
    nats = dict(Authority=math.log(float(np.mean(p))), Care=-2.0 + off[0], Fairness=-2.0 + off[1])
    coh, n = float(np.mean(pmass)), len(p) if n is None else n
    sm = [dict(round=r, stage=stage, evaluator="mfv", foundation=f, nats=v, coherence=coh, n=n)
          for f, v in nats.items()]
    sm += [dict(round=r, stage=stage, evaluator="contrast", foundation="trait", nats=float(np.mean(diff)), n=len(diff)),
           dict(round=r, stage=stage, evaluator="freetext", foundation="freetext", ppl=float(np.mean(ppl)), n=len(ppl)),
           dict(round=r, stage=stage, evaluator="kl", foundation="kl", kl=kl, n=n)]
    return sm, items, dict(n=n, target_nats=nats["Authority"], trait_nats=float(np.mean(diff)), coherence=coh,
                           adapter_ppl=float(np.mean(ppl)), kl=kl, care=nats["Care"], fairness=nats["Fairness"])


# (round, stage): p_target factor, trait shift, option-mass factor, ppl shift, (Care, Fairness) moves
MOVES = {(-1, "prompted"): (0.9, 0.1, 1.0, 0.5, (0.0, 0.0)), (0, "steered"): (0.5, 0.4, 0.9, 3.0, (-0.1, 0.05)),
         (0, "healed"): (0.8, 0.2, 0.95, 1.0, (0.0, -0.5)), (1, "steered"): (0.4, 0.6, 0.85, 4.0, (0.1, 0.0)),
         (1, "healed"): (0.6, 0.4, 0.92, 2.0, (0.0, 0.1))}


def _hand_stages(seed: int = 0, n: int = 6):
    """A run of every stage by hand: (stage_metrics, eval_items, {(round, stage): the stored numbers}); the
    prompted stage is scored on one vignette fewer (unpaired)."""
    rng = np.random.default_rng(seed)
    bp, bd, bm, bx = rng.uniform(0.1, 0.3, n), rng.normal(0, 0.2, n), rng.uniform(0.6, 0.9, n), rng.uniform(10, 20, n)
    sm, items, want = [], [], {}
    for (r, stage), (tp, dd, mm, xx, off) in {(-1, "base"): (1.0, 0.0, 1.0, 0.0, (0.0, 0.0)), **MOVES}.items():
        noise = 0.0 if stage == "base" else 0.1
        got = _hand_stage(r, stage, bp * tp * np.exp(rng.normal(0, noise, n)), bd + dd + rng.normal(0, noise, n),
                          bm * mm, bx + xx + rng.normal(0, 10 * noise, n), off, n - 1 if stage == "prompted" else None,
                          kl=0.0 if stage == "base" else 0.01 * (r + 2))
        sm, items, want[(r, stage)] = sm + got[0], items + got[1], got[2]
    return sm, items, want


def test_run_rows_carry_the_stored_numbers_their_deltas_intervals_and_ratios():
    """run_rows on a hand-made run: one row per stage in stage order with the stored numbers, deltas against base,
    the paired intervals of intervals.stage_intervals with the run's seed (against base and, as *_prev, the
    previous student), coh_cost, surgical and retain by spec.md's formulas; base and an unpaired stage get none."""
    from steer_heal import intervals as I
    from steer_heal.diag.stages import run_rows

    sm, items, want = _hand_stages()
    rows = run_rows("a", sm, "Authority", items, seed=3, boot=300)
    keys = [(x["round"], x["stage"]) for x in rows]
    assert keys == [(-1, "base"), (-1, "prompted"), (0, "steered"), (0, "healed"), (1, "steered"), (1, "healed")]
    by, b = dict(zip(keys, rows, strict=True)), want[(-1, "base")]
    for k, row in by.items():
        w = want[k]
        assert {f: row[f] for f in ("run_id", "n", "target_nats", "trait_nats", "coherence", "adapter_ppl", "kl")} == \
            dict(run_id="a", **{f: w[f] for f in ("n", "target_nats", "trait_nats", "coherence", "adapter_ppl", "kl")})
        assert row["broken"] == "" and "withheld" not in row
    assert by[(-1, "base")]["paired"] and by[(-1, "base")]["d_ppl"] == 0.0
    assert not any(f in by[(-1, "base")] for f in ("d_target_lo", "coh_cost", "surgical", "retain"))
    assert by[(-1, "prompted")]["paired"] is False
    assert not any(f in by[(-1, "prompted")] for f in ("d_target", "d_trait_lo", "coh_cost", "surgical"))
    per_stage = I.by_stage(items)
    names = dict(target="d_target", trait="d_trait", coh="d_coh", ppl="d_ppl")
    for (r, stage), row in by.items():
        if r < 0:
            continue
        w = want[(r, stage)]
        assert (row["d_target"], row["d_trait"], row["d_coh"], row["d_ppl"]) == pytest.approx(
            (w["target_nats"] - b["target_nats"], w["trait_nats"] - b["trait_nats"], w["coherence"] - b["coherence"],
             w["adapter_ppl"] - b["adapter_ppl"]), rel=1e-9)
        ivs = I.stage_intervals(per_stage, r, stage, 3, 300)
        assert len(ivs) == 8
        for iv in ivs:
            name = names[iv["metric"]] + ("_prev" if iv["ref"] == "prev" else "")
            assert [row[name + s] for s in ("", "_lo", "_hi", "_ns")] == [iv["delta"], iv["lo"], iv["hi"], iv["ns"]]
        d_t = w["target_nats"] - b["target_nats"]
        assert row["coh_cost"] == pytest.approx((w["coherence"] - b["coherence"]) / d_t)
    h1, h0 = want[(1, "healed")], want[(0, "healed")]
    assert by[(1, "healed")]["d_trait_prev"] == pytest.approx(h1["trait_nats"] - h0["trait_nats"])
    assert by[(1, "healed")]["d_trait_lo"] != by[(1, "healed")]["d_trait_prev_lo"]
    assert by[(0, "steered")]["surgical"] is True and by[(0, "healed")]["surgical"] is False  # Fairness moved 0.5
    for r in (0, 1):
        h, s = want[(r, "healed")], want[(r, "steered")]
        assert by[(r, "healed")]["retain"] == pytest.approx(
            (h["target_nats"] - b["target_nats"]) / (s["target_nats"] - b["target_nats"]))
        assert by[(r, "healed")]["retain_trait"] == pytest.approx(
            (h["trait_nats"] - b["trait_nats"]) / (s["trait_nats"] - b["trait_nats"]))
        assert "retain" not in by[(r, "steered")]
    sm2, it2 = ([x for x in xs if (x["round"], x["stage"]) in ((-1, "base"), (0, "steered"))] for xs in (sm, items))
    assert run_rows("a", sm2, "Authority", it2) == run_rows("a", sm2, "Authority", it2, seed=0, boot=2000)  # defaults
    # a care target: Care is the target, so only Fairness is off-target (Authority is not an off-target foundation)
    care = {(x["round"], x["stage"]): x for x in run_rows("a", sm, "Care")}
    assert care[(0, "steered")]["d_target"] == pytest.approx(-0.1) and care[(0, "steered")]["surgical"] is True


def test_run_rows_withhold_ratios_by_which_stage_is_under_the_floor():
    """Option mass kept 0.9, 0.95, 0.85, 0.92 of base in steered 0, healed 0, steered 1, healed 1: at a floor of
    0.93, healed 0 keeps its own ratios but withholds retain for its broken steered stage, healed 1 withholds them as
    BROKEN, and base is never broken; the median-item mass test reads the items (a few items hold the mean up)."""
    from steer_heal.diag.stages import run_rows

    sm, items, _ = _hand_stages()
    by = {(x["round"], x["stage"]): x for x in run_rows("a", sm, "Authority", items, boot=0, floor_rel=0.93)}
    assert by[(-1, "base")]["broken"] == "" and by[(0, "healed")]["broken"] == ""
    assert all(by[k]["broken"].startswith("coherence") for k in ((0, "steered"), (1, "steered"), (1, "healed")))
    assert by[(0, "healed")]["withheld"] == "broken:steered" and "retain" not in by[(0, "healed")]
    assert by[(0, "healed")]["coh_cost"] is not None and "coh_cost" not in by[(0, "steered")]
    assert by[(1, "healed")]["withheld"] == "BROKEN" and "retain_trait" not in by[(1, "healed")]
    assert run_rows("a", sm, "Authority", items, boot=0, floor_rel=2.0)[0]["broken"] == ""  # base against itself
    # the mean mass holds at 0.36 of 0.63 (over 0.5) while four of six items fell to 5% of theirs
    b_sm, b_items, _ = _hand_stage(-1, "base", [0.2] * 6, [0.0] * 6, [0.8] * 4 + [0.3] * 2, [10.0] * 6)
    s_sm, s_items, _ = _hand_stage(0, "steered", [0.1] * 6, [0.1] * 6, [0.04] * 4 + [0.99] * 2, [11.0] * 6)
    got = run_rows("m", b_sm + s_sm, "Authority", b_items + s_items, boot=0, floor_rel=0.5)
    assert got[1]["broken"].startswith("option mass collapsed: median item keeps 0.05")


def test_seed_rows_average_each_cell_over_seeds_two_level_with_items():
    """Three seeds of one config (and a one-seed config listed first): per non-base cell, in stage order, the mean
    over seeds with the t interval over seeds, or with items and resamples the two-level one for the deltas (the
    ratios stay on seeds); surgical counts the seeds whose stage was surgical."""
    from steer_heal import intervals as I
    from steer_heal.diag.stages import run_rows, seed_rows

    rows, items = [], {}
    for s, run in enumerate(("x", "s0", "s1", "s2")):
        sm, it, _ = _hand_stages(seed=s)
        rows += run_rows(run, sm, "Authority", it, seed=s, boot=0)
        items[run] = I.by_stage(it)
    groups, labels = {"solo": ["x"], "k": ["s0", "s1", "s2"]}, {"solo": "lam=2", "k": "lam=1"}
    plain = seed_rows(rows, groups, labels)
    assert [(a["round"], a["stage"]) for a in plain] == [(-1, "prompted"), *[k for k in MOVES if k[0] >= 0]]
    got = {(a["round"], a["stage"]): a for a in plain}
    cell = [r for r in rows if r["run_id"] != "x" and (r["round"], r["stage"]) == (0, "healed")]
    h = got[(0, "healed")]
    assert (h["level"], h["config"], h["config_key"], h["runs"], h["n_seeds"]) == \
        ("seeds", "lam=1", "k", ["s0", "s1", "s2"], 3)
    assert got[(0, "steered")]["surgical"] == 3 and h["surgical"] == 0 and h["broken"] == 0
    for m in ("d_target", "retain"):
        ci = stats.mean_ci([r[m] for r in cell])
        assert (h[f"{m}_mean"], h[f"{m}_lo"], h[f"{m}_hi"], h[f"{m}_over"]) == (ci["mean"], ci["lo"], ci["hi"], "seeds")
    assert seed_rows(rows, groups, labels, items) == plain  # no resamples (boot 0 by default): the t over seeds
    assert seed_rows(rows, groups, labels, items, boot=0) == plain
    two = {(a["round"], a["stage"]): a for a in seed_rows(rows, groups, labels, items, boot=200)}[(0, "healed")]
    assert two["d_target_over"] == two["d_trait_over"] == "seeds+items" and two["retain_over"] == "seeds"
    assert two["d_trait_mean"] == pytest.approx(stats.mean_ci([r["d_trait"] for r in cell])["mean"])
    assert two["d_trait_lo"] < two["d_trait_mean"] < two["d_trait_hi"]
    assert (two["d_trait_lo"], two["d_trait_hi"]) != (h["d_trait_lo"], h["d_trait_hi"])
    from steer_heal import seeds as S  # the seed stream of the cell (round, stage, metric), every seed's items

    want = I.over_seeds([[items[r][(0, "healed")], items[r][(-1, "base")]] for r in ("s0", "s1", "s2")], (1, -1),
                        "trait", 200, S.bootstrap(0, 0, "seeds-healed.trait"))
    assert (two["d_trait_mean"], two["d_trait_lo"], two["d_trait_hi"]) == (want["delta"], want["lo"], want["hi"])
    # s2's healed stage scored on other items (unpaired): the two-level interval is over the two paired seeds
    flip = [dict(r, paired=False) if (r["run_id"], r["round"], r["stage"]) == ("s2", 0, "healed") else r for r in rows]
    two2 = {(a["round"], a["stage"]): a for a in seed_rows(flip, groups, labels, items, boot=200)}[(0, "healed")]
    want2 = I.over_seeds([[items[r][(0, "healed")], items[r][(-1, "base")]] for r in ("s0", "s1")], (1, -1),
                         "trait", 200, S.bootstrap(0, 0, "seeds-healed.trait"))
    assert two2["d_trait_over"] == "seeds+items"
    assert (two2["d_trait_lo"], two2["d_trait_hi"]) == (want2["lo"], want2["hi"])


def test_seed_rows_give_the_growth_over_rounds_against_the_previous_student_two_level():
    """Growth (round 1's healed student against round 0's) is a paired delta too: over seeds its mean is the mean
    of the runs' d_<m>_prev, and with items its interval is two-level on round 1's and round 0's healed items,
    not on base's; round 0's "previous student" is base, so no growth is claimed there twice."""
    from steer_heal import intervals as I
    from steer_heal import seeds as S
    from steer_heal.diag.stages import run_rows, seed_rows, summary

    rows, items = [], {}
    for s, run in enumerate(("s0", "s1", "s2")):
        sm, it, _ = _hand_stages(seed=s)
        rows += run_rows(run, sm, "Authority", it, seed=s, boot=0)
        items[run] = I.by_stage(it)
    groups, labels = {"k": ["s0", "s1", "s2"]}, {"k": "lam=1"}
    got = {(a["round"], a["stage"]): a for a in seed_rows(rows, groups, labels, items, boot=200)}
    h1 = got[(1, "healed")]
    cell = [r for r in rows if (r["round"], r["stage"]) == (1, "healed")]
    assert h1["d_trait_prev_mean"] == pytest.approx(stats.mean_ci([r["d_trait_prev"] for r in cell])["mean"])
    want = I.over_seeds([[items[r][(1, "healed")], items[r][(0, "healed")]] for r in ("s0", "s1", "s2")], (1, -1),
                        "trait", 200, S.bootstrap(0, 1, "seeds-healed-vs-prev.trait"))
    assert (h1["d_trait_prev_mean"], h1["d_trait_prev_lo"], h1["d_trait_prev_hi"]) == \
        (want["delta"], want["lo"], want["hi"])
    assert h1["d_trait_prev_over"] == "seeds+items" and h1["d_trait_prev_mean"] != h1["d_trait_mean"]
    assert got[(-1, "prompted")]["d_trait_prev_mean"] is None  # no student before the prompted baseline
    text = summary(rows, list(got.values()))
    growth = text[text.index("over seeds, against the previous student"):]
    assert "lam=1" in growth and f"{h1['d_trait_prev_mean']:.3f}" in growth
    assert not any(line.split()[1:3] == ["0", "healed"] for line in growth.splitlines()[2:])  # rounds >= 1 only
    # growth against a broken previous student is flagged: the reference is as broken as the stage would be
    bad = [dict(r, broken="coherence") if (r["run_id"], r["round"], r["stage"]) == ("s0", 0, "healed") else r
           for r in rows]
    agg = seed_rows(bad, groups, labels, items, boot=0)
    growth = summary(bad, agg)[summary(bad, agg).index("over seeds, against the previous student"):]
    assert [line.split()[-2:] for line in growth.splitlines()[2:]] == [["BROKEN", "1/3"], ["BROKEN", "1/3"]]


def test_beyond_control_gives_the_growth_over_a_round_beyond_the_controls_growth():
    """Did the round add more trait than the control's round added? Per seed pair, (treatment round 1 - its round
    0) - (control round 1 - its round 0): the mean of the runs' d_<m>_prev differences, two-level on the four
    stages' shared items; round 0 (whose previous student is base) gets none, and the table lists rounds >= 1."""
    from steer_heal import intervals as I
    from steer_heal import seeds as S
    from steer_heal.diag import control
    from steer_heal.diag.runs import family
    from steer_heal.diag.stages import run_rows

    rows, items, cfgs = [], {}, {}
    for seed in range(3):
        for run, ctl, data_seed in ((f"t{seed}", "none", seed), (f"c{seed}", "c0", 10 + seed)):
            sm, it, _ = _hand_stages(seed=data_seed)
            rows += run_rows(run, sm, "Authority", it, seed=seed, boot=0)
            items[run] = I.by_stage(it)
            cfgs[run] = Config(model="tiny-random", seed=seed, control=ctl)
    fam = family(cfgs["t0"])
    out = {(x["round"], x["stage"]): x for x in control.beyond(rows, cfgs, {fam: "lam=1"}, items, 150, unyoked=True)}
    h1 = out[(1, "healed")]
    run_of = {(r["run_id"], r["round"], r["stage"]): r for r in rows}
    grow = [run_of[(f"t{s}", 1, "healed")]["d_trait_prev"] - run_of[(f"c{s}", 1, "healed")]["d_trait_prev"]
            for s in range(3)]
    lists = [[items[x][k] for x in (f"t{s}", f"c{s}") for k in ((1, "healed"), (0, "healed"))] for s in range(3)]
    want = I.over_seeds(lists, (1, -1, -1, 1), "trait", 150, S.bootstrap(0, 1, "beyond-healed-vs-prev.d_trait"))
    assert h1["beyond_d_trait_prev_mean"] == pytest.approx(stats.mean_ci(grow)["mean"])
    assert (h1["beyond_d_trait_prev_mean"], h1["beyond_d_trait_prev_lo"], h1["beyond_d_trait_prev_hi"]) == \
        (want["delta"], want["lo"], want["hi"])
    assert h1["beyond_d_trait_prev_over"] == "seeds+items" and h1["beyond_d_trait_prev_mean"] != h1["beyond_d_trait_mean"]
    assert out[(0, "healed")].get("beyond_d_trait_prev_mean") is None
    text = control.summary(list(out.values()))
    growth = text[text.index("growth beyond control"):]
    assert f"{h1['beyond_d_trait_prev_mean']:+.3f}" in growth
    assert [re.search(r" (-?\d) +(steered|healed) ", line).groups() for line in growth.splitlines()[2:]] == \
        [("1", "steered"), ("1", "healed")]
    bad = [dict(r, broken="coherence") if (r["run_id"], r["round"], r["stage"]) == ("c1", 0, "healed") else r
           for r in rows]
    got = control.beyond(bad, cfgs, {fam: "lam=1"}, items, 0, unyoked=True)
    growth = control.summary(got)[control.summary(got).index("growth beyond control"):]
    assert all(line.endswith("BROKEN c1") for line in growth.splitlines()[2:])  # c1's previous student is broken


def test_beyond_control_rows_pair_arms_by_seed_per_cell():
    """Treatment seeds 0 and 1 with rounds 0 and 1; a c0 control of seeds 0 and 1 with round 0 only (seed 1 without
    its healed stage); a random control of seed 1 alone. Rows: per control kind, the cells both arms hold, in stage
    order, only complete pairs; over seeds (the t) with two pairs, over items with one, whose paired bootstrap uses
    the pair's seed; a pair missing a number leaves it out of that mean."""
    from steer_heal import intervals as I
    from steer_heal import seeds as S
    from steer_heal.diag import control
    from steer_heal.diag.runs import family
    from steer_heal.diag.stages import run_rows

    beyond = functools.partial(control.beyond, unyoked=True)  # hand-made arms, not yoked (yoke.py)

    # each arm's two seeds scored alike (same hand data): the pairs share their item effects, so the two-level
    # interval's item term, and with it its bootstrap seed, counts
    arms = dict(t0=(0, "none", 0), t1=(1, "none", 0), c0=(0, "c0", 2), c1=(1, "c0", 2), r1=(1, "random", 4))
    def kept(run: str, ctl: str, x: dict) -> bool:  # controls stop after round 0; c1 has no healed stage
        if run == "c1":
            return x["round"] < 0 or (x["round"], x["stage"]) == (0, "steered")
        return ctl == "none" or x["round"] < 1

    rows, items, cfgs = [], {}, {}
    for run, (seed, ctl, data_seed) in arms.items():
        sm, it, _ = _hand_stages(seed=data_seed)
        sm, it = [x for x in sm if kept(run, ctl, x)], [x for x in it if kept(run, ctl, x)]
        rows += run_rows(run, sm, "Authority", it, seed=seed, boot=0)
        items[run] = I.by_stage(it)
        cfgs[run] = Config(model="tiny-random", seed=seed, control=ctl)
    fam = family(cfgs["t0"])
    out = beyond(rows, cfgs, {fam: "lam=1"})
    assert [(x["control"], x["round"], x["stage"], x["n_pairs"]) for x in out] == \
        [("c0", 0, "steered", 2), ("c0", 0, "healed", 1), ("random", 0, "steered", 1), ("random", 0, "healed", 1)]
    st = out[0]
    assert (st["level"], st["family"], st["treatment"], st["controls"], st["broken"]) == \
        ("beyond", "lam=1", ["t0", "t1"], ["c0", "c1"], [])
    run_of = {(r["run_id"], r["round"], r["stage"]): r for r in rows}
    diffs = [run_of[(t, 0, "steered")]["d_trait"] - run_of[(c, 0, "steered")]["d_trait"] for t, c in (("t0", "c0"),
                                                                                                        ("t1", "c1"))]
    ci = stats.mean_ci(diffs)
    assert (st["beyond_d_trait_mean"], st["beyond_d_trait_lo"], st["beyond_d_trait_hi"], st["beyond_d_trait_over"]) \
        == (ci["mean"], ci["lo"], ci["hi"], "seeds")
    assert out[1]["treatment"] == ["t0"] and out[1]["beyond_d_trait_over"] == "items"
    assert not any("beyond_d_trait_items" in x for x in out)  # no items given: no interval over them
    assert beyond(rows, cfgs, {})[0]["family"] == fam  # no label: the family's own name
    assert beyond(rows, cfgs, {fam: "lam=1"}, None, 200) == out
    assert beyond(rows, cfgs, {fam: "lam=1"}, items) == out  # items without resamples change nothing
    # two seed pairs with items: two-level, each pair's (treatment - its base) - (control - its base) on shared items
    st2 = beyond(rows, cfgs, {fam: "lam=1"}, items, 150)[0]
    lists = [[items[x][k] for x in pair for k in ((0, "steered"), (-1, "base"))]
             for pair in (("t0", "c0"), ("t1", "c1"))]
    want2 = I.over_seeds(lists, (1, -1, -1, 1), "target", 150, S.bootstrap(0, 0, "beyond-steered.d_target"))
    assert st2["beyond_d_target_over"] == "seeds+items"
    assert (st2["beyond_d_target_mean"], st2["beyond_d_target_lo"], st2["beyond_d_target_hi"]) == \
        (want2["delta"], want2["lo"], want2["hi"])
    assert want2["item_hw"] > 0 and want2["lo"] != I.over_seeds(lists, (1, -1, -1, 1), "target", 150, 1)["lo"]
    # a run missing from items, or pairs sharing a single item: no two-level interval, the t over seed pairs
    assert beyond(rows, cfgs, {fam: "lam=1"}, {k: v for k, v in items.items() if k != "c1"}, 150)[0] == out[0]
    one_item = {run: {k: [x for x in v if x["item"] in ("v0", "d0", "0")] for k, v in by.items()}
                for run, by in items.items()}
    assert beyond(rows, cfgs, {fam: "lam=1"}, one_item, 150)[0]["beyond_d_target_over"] == "seeds"
    # one seed pair whose stage has no items on one side: no interval over items for it
    for side in ("t1", "r1"):
        holes = dict(items, **{side: {k: v for k, v in items[side].items() if k != (0, "healed")}})
        assert beyond(rows, cfgs, {fam: "lam=1"}, holes, 150)[3]["beyond_d_trait_items"] is None
    # one seed pair with items: the treatment's stage against the control's, paired over items, on the pair's seed
    one = beyond(rows, cfgs, {fam: "lam=1"}, items, 150)[3]
    assert (one["control"], one["stage"], one["treatment"]) == ("random", "healed", ["t1"])
    want = I.compare(items["t1"][(0, "healed")], items["r1"][(0, "healed")], 150,
                     lambda m: S.bootstrap(1, 0, f"beyond-healed.{m}"))
    assert one["beyond_d_trait_items"] == next(x for x in want if x["metric"] == "trait")
    # a treatment stage without a trait number: that pair drops out of the trait mean only
    holed = [dict(r, d_trait=None) if (r["run_id"], r["round"], r["stage"]) == ("t1", 0, "steered") else r
             for r in rows]
    got = beyond(holed, cfgs, {fam: "lam=1"})[0]
    assert got["beyond_d_trait_mean"] == pytest.approx(diffs[0]) and got["beyond_d_trait_lo"] is None
    assert got["beyond_d_target_lo"] is not None


# ---------------------------------------------------------------- a diagnostic's status (issue 23 item 7)

RECORD = """
import sys, time
from steer_heal.console import script
from steer_heal.diag.record import Diagnostic

def body(argv):
    d = Diagnostic(sys.argv[1], "csweep", "r1", 0, dict(coefs=[1, 2, 3]))
    d.add([dict(coef=1.0)])
    print(d.id, flush=True)
    if sys.argv[2] == "finish":
        d.add([dict(coef=2.0), dict(coef=3.0)])
        d.finish("table")
        return 0
    time.sleep(60)  # killed here, part-way

sys.exit(script("test", body, None))
"""


def _record(out: Path, how: str) -> str:
    """A diagnostic process, through `sh -c 'exec python ...'` as a just recipe runs it: `finish`, or killed
    part-way by SIGTERM or SIGKILL sent to the shell's pid (exec: the shell became python)."""
    p = subprocess.Popen(["sh", "-c", 'exec "$0" -c "$1" "$2" "$3"', sys.executable, RECORD, str(out), how],
                         stdout=subprocess.PIPE, text=True)
    diag_id = p.stdout.readline().strip()
    if how != "finish":
        p.send_signal({"term": signal.SIGTERM, "kill": signal.SIGKILL}[how])
    p.communicate(timeout=60)
    assert p.returncode == {"finish": 0, "term": 128 + signal.SIGTERM, "kill": -signal.SIGKILL}[how]
    return diag_id


def test_a_killed_diagnostic_says_so_and_readers_count_only_finished_records(tmp_path):
    """A csweep killed part-way left a record that looked finished: a re-run counted each point twice and
    report.md linked a missing file. Now its status says interrupted (SIGTERM) or running (SIGKILL), diag_rows
    holds only done records, all_diag_rows still holds the partial rows, and nothing is deleted."""
    from steer_heal.report import _extras
    from steer_heal.store import RunLog as Log

    termed, killed = _record(tmp_path, "term"), _record(tmp_path, "kill")
    done = _record(tmp_path, "finish")
    got = dict(query(tmp_path, "SELECT diag_id, status FROM diags")[1])
    assert got == {termed: "interrupted", killed: "running", done: "done"}
    assert query(tmp_path, "SELECT diag_id, count(*) FROM diag_rows GROUP BY ALL")[1] == [(done, 3)]
    assert sorted(query(tmp_path, "SELECT diag_id, count(*) FROM all_diag_rows GROUP BY ALL")[1]) == sorted(
        [(termed, 1), (killed, 1), (done, 3)])
    assert all((tmp_path / "diagnostics" / d / "diag_rows.jsonl").is_file() for d in (termed, killed))
    links = _extras(Log(tmp_path, "r1"))
    assert len(links) == 1 and done in links[0]  # report.md links only the finished record


def test_every_recipe_execs_its_python():
    """`just` runs a recipe line as `sh -c LINE`: without exec, killing that sh leaves the python running
    (and writing). Every one-line recipe that starts python execs it."""
    text = (Path(__file__).resolve().parents[1] / "justfile").read_text()
    lines = [x.strip() for x in text.splitlines() if x.startswith("    @") and "{{python}}" in x]
    lax = [x for x in lines if "exec {{python}}" not in x and "||" not in x]  # smollm2's check-then-install
    assert lines and not lax, lax


def test_seeds_of_one_config_pool_over_exec_knobs_but_not_over_bf16():
    """Exec is not the experiment (issue 26): seeds run with other batch sizes or reuse_prefix are repeats of
    one config; bf16 moves the numbers ~0.01 nats, so its runs are a config of their own."""
    from steer_heal.diag.runs import config_key, config_labels, family, seedless

    a = Config(reg="kl_rev")
    assert config_key(a) == config_key(a.replace(seed=3, eval_batch=4, reuse_prefix=False, device="cpu"))
    assert config_key(a) != config_key(a.replace(bf16="eval")) != config_key(a.replace(lam=0.5))
    assert family(a) == family(a.replace(control="c0")) != family(a.replace(bf16="both"))
    labels = config_labels({"x": seedless(a), "y": seedless(a.replace(bf16="eval"))})
    assert labels == {"x": "bf16=auto", "y": "bf16=eval"}

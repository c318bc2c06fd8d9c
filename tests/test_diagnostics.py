"""Diagnostics (scripts/) on the tiny model: rows back by SQL, beside a live run, the front, intervals, the queue.

One real two-round run per module; the scripts' main() run in this process against it (their
imports are paid once), a second real run trains while they work.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import pytest
import torch
from test_flow import ARGS, steer_heal

from steer_heal.config import Config, ConfigError
from steer_heal.diag import model as diag_model
from steer_heal.diag import stats
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
    with pytest.raises(ConfigError, match="kl_agg"):
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
    with pytest.raises(ConfigError, match="runs t0 and t0b are the same arm .* same seed 0"):
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

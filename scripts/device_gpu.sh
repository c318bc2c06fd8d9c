#!/usr/bin/env bash
# The GPU check of issue 28 in one command: the round's stages on gemma-3-4b-it and Qwen3-4B shapes with
# random weights (src/steer_heal/bench/gpu.py), batched vs batch 1, FLOP/s against the measured matmul rate,
# peak memory beside memory.py's estimate. Writes gpu.json, gpu.png, gpu.log and nvidia-smi.csv to $OUT
# (default out/bench-gpu). Needs the repo and torch, transformers, peft, safetensors, matplotlib; installs
# nothing. The stages import loguru: where the image lacks it, it comes from .device/site, which
# `scripts/device_gpu.sh --prep` fills from this machine's install (pure Python; .device/ is git-ignored).
# Stays under 8 minutes: the bench is cut at 450 s, and it writes its JSON after each shape.
# Exact device call: docs/performance.md, "Issue 28".
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prep" ]; then
    python - <<'PY'
import pathlib, shutil
import loguru
dst = pathlib.Path(".device/site/loguru")
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(pathlib.Path(loguru.__file__).parent, dst, ignore=shutil.ignore_patterns("__pycache__"))
print(f"copied loguru {loguru.__version__} to {dst}")
PY
    exit 0
fi
out="${OUT:-out/bench-gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python -c "import loguru" 2>/dev/null || export PYTHONPATH="$PYTHONPATH:$PWD/.device/site"
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv > "$out/nvidia-smi.csv" 2>&1 || true
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee "$out/gpu.log"
timeout 450 python -m steer_heal.bench.gpu --out "$out" "$@" 2>&1 | tee -a "$out/gpu.log"

#!/usr/bin/env bash
# GPU check for meddx scoring: one script, about 5 minutes on one H100 with 16 cores.
#
#   benchmarks/gpu_check.sh                      # resnet50, 24,000 images of 512 px
#   N=2000 UNIQUE=2000 MODEL=resnet18 benchmarks/gpu_check.sh
#   PYTHON=python3 benchmarks/gpu_check.sh       # a Python that imports meddx and Ray
#
# Installs meddx into .venv when the Python given cannot import it (needs the package
# index), makes the images, and runs benchmarks/bench.py's png512 preset: (a) the
# model's ceiling on the GPU in fp32 and in the precision `auto` picks, (b) the users'
# loop (Dataset + DataLoader with 0 and all-core workers, each its first 30 s), (c) `meddx
# score` as a whole command, (d) read + decode alone on Ray's CPU workers, and decode ms
# per film on one core. Rendering a 512 px image costs about 0.2 core-seconds, so UNIQUE distinct images are
# rendered and the rest of N are hard links to them: each is still read and decoded on
# its own. (c) and (d) read the local folder: one moto process serves about a hundred
# objects a second, far below what a GPU node consumes. Target: c >= 0.8 x the
# same-precision ceiling, or, where decoding on the CPUs is the bound, c within 10% of d.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-24000}
UNIQUE=${UNIQUE:-3000}
MODEL=${MODEL:-resnet50}
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c "import meddx, ray, torch" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install --disable-pip-version-check -q -e '.[test]'
    PY=.venv/bin/python
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
df -h /dev/shm | tail -1 || true
exec "$PY" benchmarks/bench.py --preset png512 --n "$N" --unique "$UNIQUE" --model "$MODEL" \
    --source local --skip-training --loop-seconds 30

#!/usr/bin/env bash
# GPU check for meddx scoring: one script, about 5 minutes on one H100 with 16 cores.
#
#   benchmarks/gpu_check.sh            # resnet50, 6,000 images of 512 px
#   N=2000 MODEL=resnet18 benchmarks/gpu_check.sh
#
# Installs meddx into .venv if it is not there (needs the package index), makes the
# synthetic images, and runs benchmarks/bench.py: (a) the model's ceiling on the GPU in
# fp32 and in the precision `auto` picks, (b) the classic loop, (c) `meddx score` as a
# whole command, (d) read + decode alone on Ray's CPU workers. (c) and (d) read the
# local folder: one moto process serves about a hundred objects a second, far below
# what a GPU node consumes. Target: c >= 0.8 x the same-precision ceiling, or, where
# decoding on the CPUs is the bound, c within 10% of d.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-6000}
MODEL=${MODEL:-resnet50}
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c "import meddx, ray, torch" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install --disable-pip-version-check -q -e '.[test]'
    PY=.venv/bin/python
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" benchmarks/bench.py --n "$N" --size 512 --model "$MODEL" --source local --skip-training

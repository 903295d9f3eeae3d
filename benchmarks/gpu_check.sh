#!/usr/bin/env bash
# One-shot GPU check for a session with a device (see docs/cuda.md): everything lands under
# $OUT (default ./gpu_out). About 3 minutes on an H200.
#   1. the whole CUDA suite on the real device (no simulator), 8 pytest-xdist workers when
#      xdist is installed (each worker compiles its own kernels);
#   2. benchmarks/gpu.py --mlp --kernels, alone on the card.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/tests:$PWD/tests/cuda_sim${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 NBNET_CUDA_REAL=1
unset NUMBA_ENABLE_CUDASIM
PY=${PY:-python3}
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9_-')
CARD=${CARD:-unknown}
{ uname -r; nvidia-smi 2>&1 | head -12
  timeout 60 $PY -c "import nbnet; from nbnet import devices; print(nbnet.available_devices(), devices.device_info(), devices.cuda_pool())"
} > "$OUT/env.txt" 2>&1
OPTS=""
$PY -c "import xdist" 2>/dev/null && OPTS="-n 8"
$PY -c "import pytest_timeout" 2>/dev/null && OPTS="$OPTS --timeout=150"
timeout 200 $PY -m pytest -q -p no:cacheprovider -rfE $OPTS tests/cuda_sim/suite_cuda.py \
  > "$OUT/pytest-gpu.txt" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest-gpu.txt"
timeout 200 $PY benchmarks/gpu.py --mlp --kernels > "$OUT/gpu-$CARD.txt" 2>&1
echo "gpu.py rc=$?" >> "$OUT/gpu-$CARD.txt"
tail -5 "$OUT/pytest-gpu.txt"; cat "$OUT/gpu-$CARD.txt"

#!/usr/bin/env bash
# One-shot GPU check (one device session): everything lands under $OUT (default ./gpu_out).
#   1. the formerly failing test (BatchNorm1D + relu, float64 mean 1e3) in its own process,
#      so a poisoned CUDA context (ILLEGAL_ADDRESS) cannot take the rest down;
#   2. benchmarks/gpu.py (BatchNorm1D / LayerNorm1D / BatchNorm2D rows + a short sweep;
#      no MLP: nbnet.Model is being rewritten);
#   3. the whole CUDA suite on the real device (no simulator, no -x, a per-test timeout
#      when pytest-timeout is installed).
# Budget: about 5 minutes in all (each step has its own timeout).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/tests:$PWD/tests/cuda_sim${PYTHONPATH:+:$PYTHONPATH}
unset NUMBA_ENABLE_CUDASIM
export NBNET_CUDA_REAL=1
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9_-')
CARD=${CARD:-unknown}
echo "$CARD" > "$OUT/card.txt"
{
  echo "== nvidia-smi"; nvidia-smi 2>&1 | head -15
  echo "== python -c device_info"
  timeout 40 python -c "import nbnet; from nbnet import devices; print(nbnet.available_devices(), devices.device_info(), devices.cuda_pool())" 2>&1
} > "$OUT/env.txt"
PT_TIMEOUT=""
python -c "import pytest_timeout" 2>/dev/null && PT_TIMEOUT="--timeout=90"
SUITE=tests/cuda_sim/suite_cuda.py
# 1. the formerly failing test, alone
timeout 60 python -m pytest -q -p no:cacheprovider $PT_TIMEOUT \
  "$SUITE::test_batchnorm_against_reference" "$SUITE::test_fused_batchnorm_shapes" \
  > "$OUT/pytest-isolated.txt" 2>&1
echo "isolated rc=$?" >> "$OUT/pytest-isolated.txt"
# 2. the benchmark
timeout 90 python benchmarks/gpu.py --sweep > "$OUT/gpu-$CARD.txt" 2>&1
echo "gpu.py rc=$?" >> "$OUT/gpu-$CARD.txt"
# 3. the whole suite
timeout 100 python -m pytest -q -p no:cacheprovider -rfE $PT_TIMEOUT "$SUITE" \
  > "$OUT/pytest-gpu.txt" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest-gpu.txt"
tail -3 "$OUT/pytest-isolated.txt"; tail -15 "$OUT/pytest-gpu.txt"; cat "$OUT/gpu-$CARD.txt"

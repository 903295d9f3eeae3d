#!/usr/bin/env bash
# One-shot GPU check: the CUDA suite on the real device (no simulator) + benchmarks/gpu.py.
# Writes everything under $OUT (default ./gpu_out): pytest output and gpu-<card>.txt.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset NUMBA_ENABLE_CUDASIM
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9_-')
CARD=${CARD:-unknown}
{
  echo "== nvidia-smi"; nvidia-smi 2>&1 | head -15
  echo "== python -c device_info"
  python -c "import nbnet; from nbnet import devices; print(nbnet.available_devices(), devices.device_info())" 2>&1
} > "$OUT/env.txt"
timeout 150 env NBNET_CUDA_REAL=1 python -m pytest -q -p no:cacheprovider \
  tests/cuda_sim/suite_cuda.py > "$OUT/pytest-gpu.txt" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest-gpu.txt"
timeout 150 python benchmarks/gpu.py > "$OUT/gpu-$CARD.txt" 2>&1
echo "gpu.py rc=$?" >> "$OUT/gpu-$CARD.txt"
echo "==== with NBNET_CUDA_POOL=cupy (CuPy caching allocator)" >> "$OUT/gpu-$CARD.txt"
timeout 120 env NBNET_CUDA_POOL=cupy python benchmarks/gpu.py --quick >> "$OUT/gpu-$CARD.txt" 2>&1
echo "gpu.py (pool) rc=$?" >> "$OUT/gpu-$CARD.txt"
tail -5 "$OUT/pytest-gpu.txt"; cat "$OUT/gpu-$CARD.txt"

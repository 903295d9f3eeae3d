#!/usr/bin/env bash
# Second GPU session: locate the ReLU illegal-address fault (CUDA_LAUNCH_BLOCKING makes the
# faulting launch raise), then rerun the CUDA suite. Everything lands under $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/tests:$PWD/tests/cuda_sim${PYTHONPATH:+:$PYTHONPATH}
unset NUMBA_ENABLE_CUDASIM
export NBNET_CUDA_REAL=1
for layer in "BatchNorm1D" "LayerNorm1D" "BatchNorm2D"; do
  for act in relu "leaky_relu(alpha=0.1)" gelu; do
    CUDA_LAUNCH_BLOCKING=1 timeout 40 python - "$layer" "$act" >> "$OUT/diag.txt" 2>&1 <<'PY'
import sys, traceback
import numpy as np
import nbnet
layer_name, act = sys.argv[1], sys.argv[2]
shape = (6, 3, 3, 11) if layer_name == "BatchNorm2D" else (37, 11)
rng = np.random.default_rng(0)
X = rng.normal(1e3, 1.0, shape)
dY = rng.normal(size=shape)
cpu = getattr(nbnet, layer_name)(act_fn=act)
gpu = getattr(nbnet, layer_name)(act_fn=act, device="cuda")
stage = "forward"
try:
    Y = gpu.forward(X); Yc = cpu.forward(X)
    stage = "backward"
    dX = gpu.backward(dY); dXc = cpu.backward(dY)
    err = max(np.abs(Y - Yc).max(), np.abs(dX - dXc).max())
    print(f"{layer_name} {act}: ok, max abs diff vs CPU {err:.2e}")
except Exception as exc:
    tb = traceback.extract_tb(exc.__traceback__)
    where = [f"{f.name}:{f.lineno}" for f in tb if "nbnet" in f.filename]
    print(f"{layer_name} {act}: FAILED in {stage}: {type(exc).__name__}: {str(exc)[:120]} at {where[-3:]}")
PY
  done
done
PT_TIMEOUT=""
python -c "import pytest_timeout" 2>/dev/null && PT_TIMEOUT="--timeout=60"
timeout 120 python -m pytest -q -p no:cacheprovider -rfE $PT_TIMEOUT tests/cuda_sim/suite_cuda.py \
  > "$OUT/pytest-gpu.txt" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest-gpu.txt"
cat "$OUT/diag.txt"; tail -25 "$OUT/pytest-gpu.txt"

#!/usr/bin/env bash
# GPU session: locate the ReLU illegal-address fault (CUDA_LAUNCH_BLOCKING makes the
# faulting launch raise), then rerun the CUDA suite. Everything lands under $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/tests:$PWD/tests/cuda_sim${PYTHONPATH:+:$PYTHONPATH}
unset NUMBA_ENABLE_CUDASIM
export NBNET_CUDA_REAL=1
# 0. (round 8) the fused column backward called directly, one process per activation code,
#    on the arrays of an identity BatchNorm1D: does the fault follow the code value alone?
#    Then the same launch for code 1 under compute-sanitizer, when the card has it.
for code in 0 5 1 2; do
  CUDA_LAUNCH_BLOCKING=1 timeout 40 python - "$code" >> "$OUT/diag-direct.txt" 2>&1 <<'PY'
import sys
import numpy as np
import nbnet
from nbnet import devices
from nbnet.registry import get_kernel
code = int(sys.argv[1])
rng = np.random.default_rng(0)
X = rng.normal(1e3, 1.0, (37, 11))
layer = nbnet.BatchNorm1D(device="cuda")
layer.forward(X)
Xd, mean, invstd = layer.X[0], layer.derived_variables["mean"][0], layer.derived_variables["invstd"][0]
p = layer.parameters
dY = devices.to_device(rng.normal(size=X.shape), "cuda")
gg = devices.to_device(np.zeros(11), "cuda")
gb = devices.to_device(np.zeros(11), "cuda")
dX = devices.to_device(np.zeros(X.shape), "cuda")
try:
    get_kernel("column_backward_train", "cuda")(Xd.size, Xd, dY, mean, invstd, p["scaler"],
                                                p["intercept"], code, 0.1, gg, gb, True, dX)
    print(f"direct column_backward_train code {code}: ok, sum dX {float(np.sum(devices.to_host(dX))):.3e}")
except Exception as exc:
    print(f"direct column_backward_train code {code}: FAILED {type(exc).__name__}: {str(exc)[:160]}")
PY
done
if command -v compute-sanitizer >/dev/null 2>&1; then
  timeout 120 compute-sanitizer --tool memcheck --print-limit 20 python -c "
import numpy as np, nbnet
l = nbnet.BatchNorm1D(device='cuda', act_fn='relu')
X = np.random.default_rng(0).normal(1e3, 1.0, (37, 11))
l.forward(X); l.backward(np.random.default_rng(1).normal(size=X.shape))
print('relu backward ok under memcheck')" > "$OUT/memcheck.txt" 2>&1
else
  echo "no compute-sanitizer on this machine" > "$OUT/memcheck.txt"
fi
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
cat "$OUT/diag-direct.txt" "$OUT/diag.txt"; tail -30 "$OUT/memcheck.txt"; tail -25 "$OUT/pytest-gpu.txt"

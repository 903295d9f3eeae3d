"""CUDA: the suite in tests/cuda_sim/suite_cuda.py, run in a subprocess (bounds-checked
simulator, 16-thread blocks; a subset again with 64-thread blocks).

``numba.cuda`` reads ``NUMBA_ENABLE_CUDASIM`` when it is first imported, so the suite
cannot share this process: without a GPU it runs under the simulator (tiny shapes, small
blocks); with ``NBNET_CUDA_REAL=1`` (set by benchmarks/gpu_check.sh on a GPU machine) it
runs on the real device instead. Also checks that importing nbnet and CPU work never need
numba-cuda.
"""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _run_suite(simulator, block=None, select=None):
    env = dict(os.environ)
    if block is not None:
        env["NBNET_SUITE_BLOCK"] = str(block)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    else:
        env.pop("NUMBA_ENABLE_CUDASIM", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
           os.path.join(HERE, "cuda_sim", "suite_cuda.py")] + (["-k", select] if select else [])
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_cuda_suite():
    real = os.environ.get("NBNET_CUDA_REAL") == "1"
    proc = _run_suite(simulator=not real)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


@pytest.mark.skipif(os.environ.get("NBNET_CUDA_REAL") == "1", reason="simulator geometry check")
def test_cuda_suite_other_block_size():
    """Column kernels again with 64-thread blocks (16-column tiles, 4 row lanes): a bug can
    hide behind one geometry (bounds-checked simulator; shapes not multiples of the tile)."""
    proc = _run_suite(simulator=True, block=64,
                      select="fused_batchnorm_shapes and relu-float64")
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


def test_import_and_cpu_work_without_cuda():
    code = ("import sys, numpy as np, nbnet; "
            "l = nbnet.BatchNorm1D(); l.forward(np.ones((4, 3))); "
            "assert 'numba.cuda' not in sys.modules, 'numba.cuda imported by CPU work'; "
            "print(nbnet.available_devices())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert "cpu" in proc.stdout


def test_device_info_reports_gpu_or_reason():
    import nbnet
    from nbnet import devices

    info = devices.device_info()
    assert isinstance(info["available"], bool)
    if info["available"]:
        assert "cuda" in nbnet.available_devices() and info.get("name")
    else:
        assert info["reason"] and nbnet.available_devices() == ["cpu"]

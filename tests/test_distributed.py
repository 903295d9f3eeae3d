"""Issue 7: data-parallel training on MPI. Each test launches ``mpiexec -n 2`` on a script
in tests/mpi/ with a timeout; the scripts assert and exit non-zero on failure."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(__file__)
pytest.importorskip("mpi4py")


def _mpiexec():
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return local if os.path.exists(local) else shutil.which("mpiexec")


def run_mpi(script, n=2, timeout=240, args=(), expect_ok=True):
    exe = _mpiexec()
    if exe is None:
        pytest.skip("mpiexec not found (pip install 'nbnet[mpi]')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    cmd = [exe, "-n", str(n), sys.executable, "-m", "mpi4py", os.path.join(HERE, "mpi", script), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if expect_ok:
        assert r.returncode == 0, f"{script} failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def test_single_process_context():
    from nbnet import distributed
    ctx = distributed.init(threads=1)
    assert ctx.world_size >= 1 and 0 <= ctx.rank < ctx.world_size
    s = distributed.DistributedSampler(10, rank=1, world_size=3, shuffle=False)
    assert list(s.indices()) == [1, 4, 7, 0][:len(s)]
    shards = [set(distributed.DistributedSampler(10, rank=r, world_size=3, seed=5).indices()) for r in range(3)]
    assert set().union(*shards) == set(range(10))
    assert len({len(distributed.DistributedSampler(10, rank=r, world_size=3).indices()) for r in range(3)}) == 1


def test_collectives_and_sampler():
    r = run_mpi("check_collectives.py")
    assert r.stdout.count("collectives ok") == 2


def test_syncbatchnorm_equals_single_process():
    r = run_mpi("check_syncbn.py")
    assert r.stdout.count("syncbn ok") == 2


def test_data_parallel_training_equals_single_process():
    r = run_mpi("check_training.py")
    assert r.stdout.count("training ok") == 2


def test_failing_rank_ends_the_job():
    r = run_mpi("check_failure.py", expect_ok=False, timeout=120)
    assert r.returncode != 0
    assert "deliberate failure on rank 1" in r.stderr


def test_cli_train_under_mpiexec(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    csv = tmp_path / "d.csv"
    np.savetxt(csv, np.column_stack([X, y]), delimiter=",", header="a,b,c,d,e,label", comments="", fmt="%.6g")
    out = tmp_path / "m.npz"
    exe = _mpiexec()
    cmd = [exe, "-n", "2", sys.executable, "-m", "nbnet.cli", "train", str(csv), "--target", "label",
           "--epochs", "3", "--hidden", "16", "--out", str(out), "--seed", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert out.exists()
    assert "saved" in (r.stdout + r.stderr).lower()

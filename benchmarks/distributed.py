"""Data-parallel scaling on MPI: an MLP epoch on 1 and 2 ranks, 1 numba thread each.

``python benchmarks/distributed.py`` launches itself under ``mpiexec -n 1`` and ``-n 2``
and prints one table: samples per second, the all-reduce time per step, and the scaling
efficiency ``throughput(n) / (n * throughput(1))``. Each rank keeps a batch of 128 rows
(weak scaling, as data-parallel training is used) on a 784-256-256-10 MLP with
SyncBatchNorm + ReLU, float32, synthetic data; the medians of 3 epochs after a warm-up.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def worker(n_samples, epochs):
    import nbnet
    from nbnet import distributed

    ctx = distributed.init(threads=1)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n_samples, 784)).astype(np.float32)
    y = rng.integers(0, 10, n_samples)
    model = nbnet.Model([nbnet.FullyConnected(256), nbnet.SyncBatchNorm1D(act_fn="relu"),
                         nbnet.FullyConnected(256), nbnet.SyncBatchNorm1D(act_fn="relu"),
                         nbnet.FullyConnected(10)], optimizer="adam(lr=1e-3)", seed=0, input_dim=784)
    model.distribute(ctx)
    comm_time = [0.0]
    steps = [0]
    inner = model.reduce_gradients

    def timed_reduce():
        t = time.perf_counter()
        inner()
        comm_time[0] += time.perf_counter() - t
        steps[0] += 1

    model.reduce_gradients = timed_reduce
    model.fit(X[:1024], y[:1024], epochs=1, batch_size=128, verbose=0, distributed=True)  # warm-up
    times = []
    for _ in range(epochs):
        comm_time[0], steps[0] = 0.0, 0
        ctx.comm.Barrier()
        t = time.perf_counter()
        model.fit(X, y, epochs=1, batch_size=128, verbose=0, distributed=True)
        ctx.comm.Barrier()
        times.append(time.perf_counter() - t)
    if ctx.rank == 0:
        print(json.dumps({"ranks": ctx.world_size, "epoch_s": float(np.median(times)),
                          "samples": n_samples, "steps": steps[0],
                          "allreduce_ms_per_step": 1e3 * comm_time[0] / max(1, steps[0])}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16384, help="examples per epoch (all ranks)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.samples, args.epochs)
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    rows = []
    for n in [int(r) for r in args.ranks.split(",")]:
        out = subprocess.run([mpiexec, "-n", str(n), sys.executable, "-m", "mpi4py", __file__, "--worker",
                              "--samples", str(args.samples), "--epochs", str(args.epochs)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]["samples"] / rows[0]["epoch_s"]
    print(f"{'ranks':>5} {'epoch (s)':>10} {'samples/s':>10} {'all-reduce/step':>16} {'efficiency':>10}")
    for r in rows:
        thr = r["samples"] / r["epoch_s"]
        print(f"{r['ranks']:>5} {r['epoch_s']:>10.3f} {thr:>10.0f} {r['allreduce_ms_per_step']:>13.3f} ms "
              f"{thr / (r['ranks'] * base):>9.0%}")


if __name__ == "__main__":
    main()

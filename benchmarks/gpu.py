"""GPU benchmark: nbnet's CUDA kernels vs PyTorch on the same card.

For BatchNorm1D, LayerNorm1D and BatchNorm2D (NHWC) training steps (forward + backward,
float32) prints the nbnet time, PyTorch's time and the device-to-device copy floor
(two copies of X, the least traffic a step could need), timed with CUDA events after a
warm-up, plus the kernel launches per forward/backward; then one MLP training epoch on the
GPU vs the same model in PyTorch, when nbnet's Model and CuPy are available.

``--kernels`` also times the four kernels of the fused BatchNorm1D step at (262144, 512)
one by one, next to a copy of X (which pass is furthest from the memory's speed).

Usage: PYTHONPATH=. python benchmarks/gpu.py [--quick] [--mlp] [--kernels] [--sweep]
"""
import argparse
import platform
import sys
import time

import numpy as np

import nbnet
from nbnet import devices, registry

SHAPES = {
    "BatchNorm1D": [(4096, 1024), (65536, 256), (262144, 512)],
    "LayerNorm1D": [(4096, 1024), (65536, 256), (262144, 512)],
    "BatchNorm2D": [(64, 56, 56, 256)],
}


class LaunchCounter:
    """Counts kernel launches (every CUDA launch goes through ``_common.launch``)."""

    def __init__(self):
        registry._load("cuda")
        from nbnet.kernels.cuda import _common
        self._launches = _common.LAUNCHES
        self._base = self._launches[0]

    @property
    def count(self):
        return self._launches[0] - self._base

    @count.setter
    def count(self, value):
        self._base = self._launches[0] - value


def cuda_time(fn, cuda, reps):
    for _ in range(3):
        fn()
    cuda.synchronize()
    start, stop = cuda.event(), cuda.event()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return cuda.event_elapsed_time(start, stop) / reps  # ms


def torch_time(fn, torch, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / reps


def make_layer(name, C):
    if name == "BatchNorm1D":
        return nbnet.BatchNorm1D(device="cuda")
    if name == "LayerNorm1D":
        return nbnet.LayerNorm1D(device="cuda")
    return nbnet.BatchNorm2D(device="cuda")


def torch_module(torch, name, shape):
    nn = torch.nn
    if name == "BatchNorm1D":
        return nn.BatchNorm1d(shape[-1]).cuda(), lambda x: x
    if name == "LayerNorm1D":
        return nn.LayerNorm(shape[-1]).cuda(), lambda x: x
    # NHWC input: channels_last memory format, the layout PyTorch's fast NHWC kernels use
    mod = nn.BatchNorm2d(shape[-1]).cuda().to(memory_format=torch.channels_last)
    return mod, lambda x: x.permute(0, 3, 1, 2)  # (N,H,W,C) storage viewed as NCHW channels_last


def bench_norm(name, shape, cuda, torch, reps, counter):
    rng = np.random.default_rng(0)
    Xh = rng.standard_normal(shape, dtype=np.float32)
    dYh = rng.standard_normal(shape, dtype=np.float32)
    X, dY = cuda.to_device(Xh), cuda.to_device(dYh)
    layer = make_layer(name, shape[-1])

    def step():
        layer.forward(X)
        layer.backward(dY)
        layer.X.clear()
        for v in layer.derived_variables.values():
            v.clear()

    step()
    cuda.synchronize()
    counter.count = 0
    layer.forward(X)
    n_fwd = counter.count
    counter.count = 0
    layer.backward(dY)
    n_bwd = counter.count
    layer.X.clear()
    for v in layer.derived_variables.values():
        v.clear()
    t_nb = cuda_time(step, cuda, reps)
    row = {"layer": name, "shape": shape, "nbnet_ms": t_nb, "launches": (n_fwd, n_bwd)}
    if torch is not None:
        mod, view = torch_module(torch, name, shape)
        xt = torch.as_tensor(Xh, device="cuda").requires_grad_(True)
        dyt = torch.as_tensor(dYh, device="cuda")

        def tstep():
            xt.grad = None
            y = mod(view(xt))
            y.backward(view(dyt))

        row["torch_ms"] = torch_time(tstep, torch, reps)
        dst = torch.empty_like(xt)
        src = xt.detach()

        def copies():
            dst.copy_(src)
            dst.copy_(src)

        row["floor_ms"] = torch_time(copies, torch, reps)
        # correctness spot check against PyTorch (float32)
        if name != "LayerNorm1D":
            mod.train()
        y_nb = layer.forward(X)
        layer.X.clear()
        for v in layer.derived_variables.values():
            v.clear()
        y_t = mod(view(xt)).detach()
        if name == "BatchNorm2D":
            y_t = y_t.permute(0, 2, 3, 1)
        row["max_abs_err_vs_torch"] = float(np.max(np.abs(y_nb.copy_to_host() - y_t.contiguous().cpu().numpy())))
    del X, dY, layer
    return row


def bench_kernels(cuda, reps, shape=(262144, 512)):
    """ms per launch of each fused BatchNorm kernel (identity activation, float32), and of
    one device-to-device copy of X, with CUDA events."""
    from nbnet.kernels.cuda import _common, column_stats as cs
    R, C = shape
    rng = np.random.default_rng(0)
    X = cuda.to_device(rng.standard_normal(shape, dtype=np.float32))
    dY = cuda.to_device(rng.standard_normal(shape, dtype=np.float32))
    Y, dX = cuda.device_array(shape, np.float32), cuda.device_array(shape, np.float32)
    gamma, beta = cuda.to_device(np.ones(C, np.float32)), cuda.to_device(np.zeros(C, np.float32))
    gg, gb = cuda.to_device(np.zeros(C, np.float32)), cuda.to_device(np.zeros(C, np.float32))
    rm, rv = cuda.to_device(np.zeros(C)), cuda.to_device(np.ones(C))
    mean, invstd = cuda.device_array(C), cuda.device_array(C)
    rpc, n_chunks, TX, TY = _common.column_plan(R, C)
    pa, pb = cuda.device_array((n_chunks, C)), cuda.device_array((n_chunks, C))
    grid, block, L = (n_chunks, _common.n_blocks(C, TX)), (TX, TY), _common.launch
    steps = {
        "statistics, Welford (float64 input)": lambda: L(cs._fused_stats, grid, block, X, rpc,
                                                          pa, pb),
        "statistics, shifted sums (float32 input)": lambda: L(cs._fused_stats_shifted, grid,
                                                               block, X, rpc, pa, pb),
        "merge + normalize (read X, write Y)": lambda: L(
            cs._fused_merge_normalize, grid, block, X, pa, pb, rpc, 1e-5, 0.9, False, rm, rv,
            gamma, beta, 0, 0.0, mean, invstd, Y),
        "backward reduce (read X, dY)": lambda: L(
            cs._fused_backward_reduce, grid, block, X, dY, mean, invstd, gamma, beta, 0, 0.0,
            rpc, pa, pb),
        "merge + dX (read X, dY, write dX)": lambda: L(
            cs._fused_merge_backward_dx, grid, block, X, dY, mean, invstd, gamma, beta, 0, 0.0,
            pa, pb, rpc, gg, gb, True, dX),
        "one copy of X (read, write)": lambda: Y.copy_to_device(X),
    }
    return {name: cuda_time(fn, cuda, reps) for name, fn in steps.items()}


def bench_mlp(cuda, torch):
    """One epoch of a 784-512-512-10 ReLU MLP (batch 256, SGD) on 8192 random examples."""
    n, d, h, k, bs = 8192, 784, 512, 10, 256
    rng = np.random.default_rng(0)
    Xh = rng.standard_normal((n, d), dtype=np.float32)
    yh = rng.integers(0, k, n)
    out = {}
    try:
        from nbnet.layers.dense import FullyConnected
        from nbnet.model import Model
        model = Model([FullyConnected(h, act_fn="relu"), FullyConnected(h, act_fn="relu"),
                       FullyConnected(k)], optimizer="sgd(lr=0.01)", input_dim=d, device="cuda",
                      seed=0)
        model.fit(Xh[: bs * 4], yh[: bs * 4], epochs=1, batch_size=bs, verbose=0)  # warm-up
        cuda.synchronize()
        t0 = time.perf_counter()
        model.fit(Xh, yh, epochs=1, batch_size=bs, verbose=0)
        cuda.synchronize()
        out["nbnet_s"] = time.perf_counter() - t0
    except Exception as exc:  # report, don't hide
        out["nbnet_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if torch is not None:
        nn = torch.nn
        net = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                            nn.Linear(h, k)).cuda()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        Xt = torch.as_tensor(Xh)
        yt = torch.as_tensor(yh)

        def epoch(limit=None):
            perm = torch.randperm(n)
            for s in range(0, n if limit is None else limit, bs):
                idx = perm[s:s + bs]
                xb, yb = Xt[idx].cuda(non_blocking=True), yt[idx].cuda(non_blocking=True)
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(net(xb), yb)
                loss.backward()
                opt.step()
                loss.item()  # per-batch loss on the host, as a fit loop reports it

        epoch(bs * 4)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        epoch()
        torch.cuda.synchronize()
        out["torch_s"] = time.perf_counter() - t0
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--mlp", action="store_true", help="also time one MLP epoch (nbnet.Model)")
    ap.add_argument("--kernels", action="store_true",
                    help="time the fused BatchNorm1D kernels at (262144, 512) one by one")
    ap.add_argument("--sweep", action="store_true",
                    help="BatchNorm1D (262144, 512) under a few CUDA_BLOCK / TARGET_BLOCKS settings")
    ap.add_argument("--only", default="", help="comma-separated layer names to run")
    args = ap.parse_args(argv)
    info = devices.device_info()
    print("card:", info, " NBNET_CUDA_POOL =", __import__("os").environ.get("NBNET_CUDA_POOL", "(auto)"),
          " allocator in use:", devices.cuda_pool())
    if not info.get("available") or info.get("simulator"):
        print("no GPU: nothing to benchmark")
        return 0
    cuda = devices.import_cuda()
    try:
        import torch
        tv = torch.__version__
    except Exception:
        torch, tv = None, "not installed"
    try:
        import cupy
        cv = cupy.__version__
    except Exception:
        cv = "not installed"
    import numba
    import numba_cuda
    print(f"python {platform.python_version()}  numpy {np.__version__}  numba {numba.__version__}  "
          f"numba-cuda {getattr(numba_cuda, '__version__', '?')}  torch {tv}  cupy {cv}  "
          f"nbnet {nbnet.__version__}  CUDA_BLOCK {nbnet.config.CUDA_BLOCK}")
    reps = 5 if args.quick else 20
    counter = LaunchCounter()
    print()
    print(f"{'layer':<12} {'shape':<20} {'nbnet ms':>9} {'torch ms':>9} {'floor ms':>9} "
          f"{'nb/torch':>9} {'nb/floor':>9} {'launches f/b':>12} {'max|dy| vs torch':>16}")
    only = [n for n in args.only.split(",") if n]
    for name, shapes in SHAPES.items():
        if only and name not in only:
            continue
        for shape in shapes:
            try:
                r = bench_norm(name, shape, cuda, torch, reps, counter)
            except Exception as exc:
                print(f"{name:<12} {str(shape):<20} ERROR {type(exc).__name__}: {exc}"[:300])
                continue
            t, f = r.get("torch_ms", float("nan")), r.get("floor_ms", float("nan"))
            print(f"{name:<12} {str(shape):<20} {r['nbnet_ms']:9.3f} {t:9.3f} {f:9.3f} "
                  f"{r['nbnet_ms'] / t:9.2f} {r['nbnet_ms'] / f:9.2f} "
                  f"{'%d/%d' % r['launches']:>12} {r.get('max_abs_err_vs_torch', float('nan')):16.2e}")
            sys.stdout.flush()
    if args.sweep:
        from nbnet.kernels.cuda import _common
        print()
        print("sweep, BatchNorm1D (262144, 512) float32 training step:")
        saved = (nbnet.config.CUDA_BLOCK, _common.TARGET_BLOCKS)
        for block, target in [(256, 1024), (256, 2048), (256, 512), (512, 1024), (128, 2048)]:
            nbnet.config.CUDA_BLOCK, _common.TARGET_BLOCKS = block, target
            try:
                r = bench_norm("BatchNorm1D", (262144, 512), cuda, None, reps, counter)
                print(f"  CUDA_BLOCK {block:4d}  TARGET_BLOCKS {target:5d}  {r['nbnet_ms']:8.3f} ms")
            except Exception as exc:
                print(f"  CUDA_BLOCK {block:4d}  TARGET_BLOCKS {target:5d}  ERROR {type(exc).__name__}: {exc}"[:200])
            sys.stdout.flush()
        nbnet.config.CUDA_BLOCK, _common.TARGET_BLOCKS = saved
    if args.kernels:
        print()
        print("fused BatchNorm1D (262144, 512) float32, ms per launch:")
        for name, ms in bench_kernels(cuda, reps).items():
            print(f"  {name:<42} {ms:8.3f}")
    if args.mlp:
        print()
        print("MLP epoch (784-512-512-10 ReLU, 8192 examples, batch 256, SGD):", bench_mlp(cuda, torch))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile the default kernel set into numba's on-disk cache.

``python -m nbnet.warmup [--dtypes float32,float64]`` runs every layer and optimizer once
on a small input (serial loops) and once on a larger one (parallel loops), so that later
processes load every kernel from the cache instead of compiling it. CI runs it once
before the tests; users never need to (the first use of a kernel compiles and caches it),
but it moves the one-off compile cost to install time.
"""
import argparse
import sys
import time

import numpy as np


def _layer_cases():
    import nbnet

    cases = [
        (lambda: nbnet.BatchNorm1D(), (64,)),
        (lambda: nbnet.BatchNorm1D(act_fn="relu"), (64,)),
        (lambda: nbnet.LayerNorm1D(), (64,)),
        (lambda: nbnet.LayerNorm1D(act_fn="relu"), (64,)),
    ]
    optional = [
        ("BatchNorm2D", lambda c: c(), (4, 4, 16)),
        ("BatchNorm2D", lambda c: c(data_format="NCHW"), (16, 4, 4)),
        ("LayerNorm2D", lambda c: c(), (4, 4, 16)),
        ("GroupNorm", lambda c: c(4), (4, 4, 16)),
        ("GroupNorm", lambda c: c(4, data_format="NCHW"), (16, 4, 4)),
        ("GroupNorm", lambda c: c(4), (16,)),
        ("InstanceNorm2D", lambda c: c(), (4, 4, 16)),
        ("RMSNorm", lambda c: c(), (64,)),
        # 128 units: 2048 x 128 outputs reach the parallel loops of the dense epilogues
        ("FullyConnected", lambda c: c(128, act_fn="relu"), (64,)),
        ("FullyConnected", lambda c: c(128), (64,)),  # an output layer: plain bias sums
        ("ReLU", lambda c: c(), (64,)),
        # each smooth activation is a kernel of its own (kernels/cpu/elementwise.py)
        ("LeakyReLU", lambda c: c(), (64,)),
        ("ELU", lambda c: c(), (64,)),
        ("GELU", lambda c: c(approximate=True), (64,)),
        ("GELU", lambda c: c(approximate=False), (64,)),
        ("Sigmoid", lambda c: c(), (64,)),
        ("Tanh", lambda c: c(), (64,)),
        ("Softmax", lambda c: c(), (64,)),
        ("Dropout", lambda c: c(0.5, seed=0), (64,)),
    ]
    for name, make, shape in optional:
        cls = getattr(nbnet, name, None)
        if cls is not None:
            cases.append(((lambda cls=cls, make=make: make(cls)), shape))
    return cases


def warm(dtypes=("float32", "float64"), verbose=True):
    """Run every layer and optimizer once per dtype, on small and large inputs."""
    import nbnet

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for dtype in dtypes:
        dtype = np.dtype(dtype)
        for make, feat in _layer_cases():
            for n in (2, 2048):  # serial loops, then the parallel ones
                X = rng.normal(size=(n,) + feat).astype(dtype)
                layer = make()
                Y = layer.forward(X)
                layer.backward(rng.normal(size=Y.shape).astype(dtype))
                layer.forward(X, retain_derived=False)
        # the losses a training run ends in (serial and parallel loops)
        from nbnet import losses
        for n in (2, 4096):
            logits = rng.normal(size=(n, 64)).astype(dtype)
            labels = np.arange(n) % 64
            xent = losses.CrossEntropy(from_logits=True)
            xent.loss_and_grad(labels, logits)
            xent.loss_and_grad(np.eye(64, dtype=dtype)[labels], logits)
            losses.SquaredError().loss_and_grad(logits, logits[::-1].copy())
        # few, very wide rows: the column-block parameter gradients, parallel loops
        X = rng.normal(size=(4, 64, 64, 16)).astype(dtype)
        layer = nbnet.LayerNorm2D()
        layer.backward(layer.forward(X))
        for spec in ("sgd(momentum=0.9, clip_norm=1.0)", "adagrad", "rmsprop", "adam"):
            for n in (8, 1 << 17):
                opt = nbnet.get_optimizer(spec)
                p = np.zeros(n, dtype)
                opt.step()
                opt(p, np.ones(n, dtype), "w")
    if verbose:
        print(f"nbnet: kernel cache warm ({', '.join(map(str, dtypes))}) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nbnet.warmup", description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,float64",
                        help="comma-separated dtypes to compile for (default: float32,float64)")
    args = parser.parse_args(argv)
    warm(tuple(d.strip() for d in args.dtypes.split(",") if d.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

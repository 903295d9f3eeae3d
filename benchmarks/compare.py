#!/usr/bin/env python
"""nbnet side by side with PyTorch (CPU), numpy-ml and the memory floor, in one table.

Run it on its own (no asv needed)::

    python benchmarks/compare.py                      # full shapes, all cores
    python benchmarks/compare.py --threads 1          # one thread for nbnet, torch and BLAS
    python benchmarks/compare.py --only batchnorm2d   # rows whose name matches (regex, any case)
    python benchmarks/compare.py --quick --json out.json   # tiny shapes, a few seconds (CI)

What is measured
----------------
* ``normalization``: every normalization layer nbnet has, a training step
  (``forward`` + ``backward``, then ``flush_gradients``) and an inference ``forward``
  (running statistics). PyTorch runs the same module at the same thread count
  (``torch.set_num_threads``), channels_last for NHWC inputs; numpy-ml only where it has
  the layer (BatchNorm1D/2D, LayerNorm1D/2D; note that numpy-ml draws its ``scaler`` in
  float64, so it computes everything in float64 whatever the input's dtype).
* ``activations``: the elementwise activation layers (ReLU, LeakyReLU, ELU, GELU with the
  tanh approximation and with erf, Sigmoid, Tanh) on a (2048, 1024) float32 input, a
  training step and an inference forward, against the same ``torch.nn`` modules.
* ``optimizers``: one in-place ``Adam`` / ``SGD(momentum=0.9)`` update of 1M and 10M
  float32 parameters (PyTorch's default ``torch.optim`` implementation on CPU).
* ``training``: one epoch of an MLP 784-256-256-10 (Linear, BatchNorm+ReLU, twice, then
  Linear; softmax cross-entropy; Adam), batch 128, float32, synthetic data.
* ``cold_start``: time from starting a new process until it has done ``import nbnet`` and
  a first BatchNorm1D training step with a warm kernel cache (the child reports when it is
  done; interpreter exit is not counted), next to ``import torch`` (torch column) and
  ``import numpy`` (floor column), measured the same way; once as installed here, once
  with scipy hidden (a plain ``pip install nbnet`` has no scipy; numba's start-up would
  import it when it is present, which nbnet defers: ``config.DEFER_SCIPY``). Children run
  with bytecode caching on, as an installed package does. Last, the compile cost: a new
  process with an empty kernel cache (its own ``NUMBA_CACHE_DIR``) until BatchNorm1D and
  LayerNorm1D have trained and inferred at a serial and a parallel size (the default
  float32 kernel set); no torch column.

The **floor** is what the memory system allows: a training step must at least read X and
dY and write Y and dX -- the time of two ``np.copyto`` of the input; an inference forward
reads X and writes Y -- one copy; an optimizer update moves its arrays once (Adam reads
param, grad, m, v and writes param, m, v: 3.5 copies of the parameter array; SGD with
momentum 2.5 copies). ``nbnet/floor`` is how far a kernel is from that bound;
``torch/nbnet`` > 1 means nbnet is faster.

Before anything is measured, a separate process compiles nbnet's kernel set into the
disk cache (``python -m nbnet.warmup``; a few seconds when the cache is already warm),
so the measuring process only loads kernels. Kernels compiled inside the measuring
process made the rows measured right after read 3-8x their usual time, torch's and
numpy-ml's columns too (a LayerNorm1D (128,64) training step 156-223 us instead of 26 us;
on the 2-core reference machine, reproduced by deleting the cache before a run); ``--quick``
skips this.

Every callable runs once before timing (JIT compilation, allocator warm-up); then each
repetition times every implementation of a row in turn (rotating the order), each over
enough calls to last ``--min-time``, and the table reports medians. Numbers from a busy
machine are noisy: compare ratios from one run, not times across runs.
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

# Both libraries run OpenMP pools in this one process. nbnet bounds the spin-wait of idle
# workers (nbnet.config.GOMP_SPINCOUNT) when it is imported; set the same bound here,
# before torch loads its own libgomp, so that neither pool's idle spinning starves the
# other's threads (or BLAS) and both run under the same rule.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import numpy as np  # noqa: E402

SECTIONS = ("normalization", "optimizers", "training", "cold_start")


# ----------------------------------------------------------------------------- imports

def import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def import_numpy_ml():
    """numpy-ml 0.1.2, or None. It imports ``collections.Hashable`` (gone since Python
    3.10): restore the aliases before importing it."""
    import collections
    import collections.abc

    for name in ("Hashable", "Iterable", "Mapping", "MutableMapping", "Sequence", "Callable"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import numpy_ml
            from numpy_ml.neural_nets import activations, layers, optimizers
    except Exception:  # ImportError, or numpy-ml failing on this numpy
        return None
    return {"version": getattr(numpy_ml, "__version__", "0.1.2"), "layers": layers,
            "optimizers": optimizers, "activations": activations}


# ----------------------------------------------------------------------------- timing

def _time_calls(fn, number):
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def measure(fns, reps, min_time, warm=None):
    """Median seconds per call of each callable in ``fns`` (a dict), measured side by side.

    Each callable (or those named in ``warm``) runs once untimed (compilation, first-touch
    allocation, kernel cache), then gets a call count that makes one timing last about
    ``min_time`` (one call when ``min_time`` is None); every repetition times all
    callables in turn, starting from a different one each time.
    """
    names = [k for k, f in fns.items() if f is not None]
    number = {}
    for k in names:
        t_warm = 0.0
        if warm is None or k in warm:
            t_warm = _time_calls(fns[k], 1)  # warm-up: JIT compile / cache load, allocator
        if min_time is None or t_warm > max(1.0, 20 * min_time):
            number[k] = 1  # long calls (an epoch): one per timing, no calibration call
            continue
        t = _time_calls(fns[k], 1)
        number[k] = max(1, min(10000, int(min_time / max(t, 1e-9))))
    samples = {k: [] for k in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for k in order:
            samples[k].append(_time_calls(fns[k], number[k]))
    return {k: statistics.median(v) for k, v in samples.items()}


def measure_reported(fns, reps, warm=()):
    """Median of the seconds each callable *returns* (it times itself: a child process
    reporting when its work is done), called in turn, ``reps`` times; the callables named
    in ``warm`` run once first, untimed."""
    names = [k for k, f in fns.items() if f is not None]
    for k in names:
        if k in warm:
            fns[k]()
    samples = {k: [] for k in names}
    for r in range(reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            samples[k].append(fns[k]())
    return {k: statistics.median(v) for k, v in samples.items()}


def copy_bandwidth(nbytes=64 << 20, reps=7):
    """Bytes per second moved by ``np.copyto`` (read + write) of an ``nbytes`` array."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t = min(_time_calls(lambda: np.copyto(dst, src), 1) for _ in range(reps))
    return 2 * src.nbytes / t


# ----------------------------------------------------------------------------- rows

class Row:
    """One line of the table: a name, its callables (built lazily) and the floor."""

    def __init__(self, section, name, build, shape=None, dtype=None, floor_scale=1.0):
        self.section, self.name, self.build = section, name, build
        self.shape, self.dtype = shape, dtype
        self.floor_scale = floor_scale  # floor callable time * floor_scale = floor time


def _shape_str(shape):
    return "(" + ",".join(str(s) for s in shape) + ")"


def _nhwc_to_torch(torch, a, requires_grad=False):
    """An NHWC NumPy array as an NCHW torch tensor in channels_last memory (no copy)."""
    t = torch.from_numpy(a).permute(0, 3, 1, 2)
    return t.requires_grad_() if requires_grad else t


def _torch_callables(torch, make_module, X, dY, layout):
    """(train_step, inference_forward) for a torch module at the layer's layout."""
    dtype = torch.from_numpy(X[:0]).dtype
    m = make_module().to(dtype)
    if layout == "nhwc":
        m = m.to(memory_format=torch.channels_last)
        xt, xt_inf, dyt = (_nhwc_to_torch(torch, X, True), _nhwc_to_torch(torch, X),
                           _nhwc_to_torch(torch, dY))
    else:
        xt, xt_inf, dyt = (torch.from_numpy(X).requires_grad_(), torch.from_numpy(X),
                           torch.from_numpy(dY))
    m_inf = make_module().to(dtype)
    if layout == "nhwc":
        m_inf = m_inf.to(memory_format=torch.channels_last)
    m_inf.eval()

    def train():
        xt.grad = None
        m.zero_grad(set_to_none=True)
        m(xt).backward(dyt)

    def infer():
        with torch.inference_mode():
            m_inf(xt_inf)

    return train, infer


def _nbnet_callables(make_layer, X, dY):
    layer = make_layer()

    def train():
        layer.forward(X)
        layer.backward(dY)
        layer.flush_gradients()

    def infer():
        layer.forward(X, retain_derived=False)

    return train, infer


def _numpy_ml_callables(make_layer, X, dY):
    layer = make_layer()
    frozen = make_layer()
    frozen.forward(X)  # build the parameters, then infer with the running statistics
    frozen.flush_gradients()
    frozen.freeze()

    def train():
        layer.forward(X)
        layer.backward(dY)
        layer.flush_gradients()

    def infer():
        frozen.forward(X, retain_derived=False)

    return train, infer


def _floor_callables(X):
    Y, dX = np.empty_like(X), np.empty_like(X)
    dY = X.copy()

    def train():
        np.copyto(Y, X)
        np.copyto(dX, dY)

    def infer():
        np.copyto(Y, X)

    return train, infer


def normalization_rows(nbnet, torch, npml, quick, dtypes_1d=("float32", "float64")):
    """Rows for every normalization layer nbnet has (looked up with getattr)."""
    nn = torch.nn if torch is not None else None
    L = npml["layers"] if npml is not None else None
    if quick:
        shapes_1d = [(64, 32), (128, 64)]
        img = (2, 4, 4, 64)
        img2 = (2, 2, 2, 128)
        rms = (64, 64)
    else:
        shapes_1d = [(256, 1024), (4096, 1024), (65536, 256), (128, 64)]
        img = (32, 32, 32, 64)
        img2 = (64, 16, 16, 256)
        rms = (4096, 1024)

    specs = []  # (label, nbnet factory, torch factory, numpy-ml factory, shape, dtype, layout)

    def nb(name, **kw):
        cls = getattr(nbnet, name, None)
        return None if cls is None else (lambda: cls(**kw))

    for dtype in dtypes_1d:
        for shp in shapes_1d:
            C = shp[1]
            specs.append(("BatchNorm1D", nb("BatchNorm1D"),
                          nn and (lambda C=C: nn.BatchNorm1d(C, eps=1e-5, momentum=0.1)),
                          L and (lambda: L.BatchNorm1D(momentum=0.9, epsilon=1e-5)),
                          shp, dtype, "rows"))
            specs.append(("LayerNorm1D", nb("LayerNorm1D"),
                          nn and (lambda C=C: nn.LayerNorm(C, eps=1e-5)),
                          L and (lambda: L.LayerNorm1D(epsilon=1e-5)), shp, dtype, "rows"))
    f32 = "float32"
    # wide rows, few of them (a small batch of many features): the column kernels cut such
    # rows into tiles of config.TILE_BYTES
    wide = (8, 2048) if quick else (256, 16384)
    specs.append(("BatchNorm1D", nb("BatchNorm1D"),
                  nn and (lambda C=wide[1]: nn.BatchNorm1d(C, eps=1e-5, momentum=0.1)),
                  L and (lambda: L.BatchNorm1D(momentum=0.9, epsilon=1e-5)), wide, f32, "rows"))
    specs.append(("LayerNorm1D", nb("LayerNorm1D"),
                  nn and (lambda C=wide[1]: nn.LayerNorm(C, eps=1e-5)),
                  L and (lambda: L.LayerNorm1D(epsilon=1e-5)), wide, f32, "rows"))
    for shp in (img, img2):
        C = shp[3]
        specs.append(("BatchNorm2D NHWC", nb("BatchNorm2D"),
                      nn and (lambda C=C: nn.BatchNorm2d(C, eps=1e-5, momentum=0.1)),
                      L and (lambda: L.BatchNorm2D(momentum=0.9, epsilon=1e-5)), shp, f32, "nhwc"))
    for shp in (img, img2):
        N, H, W, C = shp
        specs.append(("BatchNorm2D NCHW", nb("BatchNorm2D", data_format="NCHW"),
                      nn and (lambda C=C: nn.BatchNorm2d(C, eps=1e-5, momentum=0.1)),
                      None, (N, C, H, W), f32, "rows"))
    specs.append(("GroupNorm(32) NHWC", nb("GroupNorm", n_groups=32),
                  nn and (lambda: nn.GroupNorm(32, img[3], eps=1e-5)), None, img, f32, "nhwc"))
    # wide channels at few positions, and GroupNorm on a batch of features (one position):
    # the channels-last kernels' blocks of groups and their runs path
    gn_wide = (2, 2, 2, 256) if quick else (8, 7, 7, 2048)
    specs.append(("GroupNorm(32) NHWC", nb("GroupNorm", n_groups=32),
                  nn and (lambda C=gn_wide[3]: nn.GroupNorm(32, C, eps=1e-5)), None, gn_wide,
                  f32, "nhwc"))
    # channels-first (PyTorch's default layout; a diffusion U-Net's 256-channel stage)
    gn_cf = (2, 64, 4, 4) if quick else (16, 256, 32, 32)
    specs.append(("GroupNorm(32) NCHW", nb("GroupNorm", n_groups=32, data_format="NCHW"),
                  nn and (lambda C=gn_cf[1]: nn.GroupNorm(32, C, eps=1e-5)), None, gn_cf, f32,
                  "rows"))
    # GroupNorm on features, wide groups and groups of 8 channels (the one-position kernels)
    for gn_flat in ([(16, 256), (64, 256)] if quick else [(64, 4096), (1024, 256)]):
        specs.append(("GroupNorm(32)", nb("GroupNorm", n_groups=32),
                      nn and (lambda C=gn_flat[1]: nn.GroupNorm(32, C, eps=1e-5)), None,
                      gn_flat, f32, "rows"))
    if nn is not None and not hasattr(nn, "RMSNorm"):
        rms_torch = None
    else:
        rms_torch = nn and (lambda: nn.RMSNorm(rms[1], eps=1e-6))
    specs.append(("RMSNorm", nb("RMSNorm"), rms_torch, None, rms, f32, "rows"))
    specs.append(("LayerNorm2D NHWC", nb("LayerNorm2D"),
                  nn and (lambda: nn.LayerNorm(img[1:], eps=1e-5)),
                  L and (lambda: L.LayerNorm2D(epsilon=1e-5)), img, f32, "rows"))
    specs.append(("InstanceNorm2D NHWC", nb("InstanceNorm2D"),
                  nn and (lambda: nn.InstanceNorm2d(img[3], eps=1e-5)), None, img, f32, "nhwc"))
    bn_relu_torch = nn and (lambda: nn.Sequential(nn.BatchNorm2d(img[3], eps=1e-5, momentum=0.1),
                                                  nn.ReLU()))
    specs.append(("BatchNorm2D(act_fn=relu) fused NHWC", nb("BatchNorm2D", act_fn="relu"),
                  bn_relu_torch, None, img, f32, "nhwc"))
    specs.append(("BatchNorm2D + ReLU layer NHWC", _bn_plus_relu(nbnet), bn_relu_torch, None,
                  img, f32, "nhwc"))
    # ReLU fused into the other layer families (selects in the input's dtype; PyTorch: the
    # layer, then nn.ReLU)
    gn_relu_torch = nn and (lambda: nn.Sequential(nn.GroupNorm(32, img[3], eps=1e-5), nn.ReLU()))
    specs.append(("GroupNorm(32, act_fn=relu) NHWC", nb("GroupNorm", n_groups=32, act_fn="relu"),
                  gn_relu_torch, None, img, f32, "nhwc"))
    ln_relu_torch = nn and (lambda C=shapes_1d[1][1]: nn.Sequential(nn.LayerNorm(C, eps=1e-5),
                                                                    nn.ReLU()))
    specs.append(("LayerNorm1D(act_fn=relu)", nb("LayerNorm1D", act_fn="relu"), ln_relu_torch,
                  None, shapes_1d[1], f32, "rows"))
    # a smooth act_fn (on CPU its own vectorised pass after the normalization); PyTorch has
    # no fused form, so its row is the same two modules in sequence
    bn_gelu_torch = nn and (lambda C=shapes_1d[1][1]: nn.Sequential(
        nn.BatchNorm1d(C, eps=1e-5, momentum=0.1), nn.GELU(approximate="tanh")))
    specs.append(("BatchNorm1D(act_fn=gelu)", nb("BatchNorm1D", act_fn="gelu"), bn_gelu_torch,
                  None, shapes_1d[1], f32, "rows"))

    rows = []
    for label, make_nb, make_torch, make_npml, shape, dtype, layout in specs:
        if make_nb is None:
            continue  # the layer is not in this nbnet (yet)
        for mode in ("train", "infer"):
            name = f"{label} {mode} {_shape_str(shape)} {dtype}"

            def build(make_nb=make_nb, make_torch=make_torch, make_npml=make_npml, shape=shape,
                      dtype=dtype, layout=layout, mode=mode):
                rng = np.random.default_rng(0)
                X = rng.normal(3.0, 2.0, shape).astype(dtype)
                dY = rng.normal(0.0, 1.0, shape).astype(dtype)
                i = 0 if mode == "train" else 1
                fns = {"nbnet": _nbnet_callables(make_nb, X, dY)[i]}
                if make_torch is not None:
                    fns["torch"] = _torch_callables(torch, make_torch, X, dY, layout)[i]
                if make_npml is not None:
                    fns["numpy_ml"] = _numpy_ml_callables(make_npml, X, dY)[i]
                fns["floor"] = _floor_callables(X)[i]
                return fns

            rows.append(Row("normalization", name, build, shape, dtype))
    return rows


def activation_rows(nbnet, torch, quick):
    """Rows for the elementwise activation layers (float32; no numpy-ml column: its
    activations are functions, not layers with backward)."""
    nn = torch.nn if torch is not None else None
    shape = (64, 32) if quick else (2048, 1024)
    specs = [
        ("ReLU", lambda: nbnet.ReLU(), nn and (lambda: nn.ReLU())),
        ("LeakyReLU(0.01)", lambda: nbnet.LeakyReLU(alpha=0.01),
         nn and (lambda: nn.LeakyReLU(0.01))),
        ("ELU", lambda: nbnet.ELU(alpha=1.0), nn and (lambda: nn.ELU(1.0))),
        ("GELU(tanh)", lambda: nbnet.GELU(approximate=True),
         nn and (lambda: nn.GELU(approximate="tanh"))),
        ("GELU(erf)", lambda: nbnet.GELU(approximate=False), nn and (lambda: nn.GELU())),
        ("Sigmoid", lambda: nbnet.Sigmoid(), nn and (lambda: nn.Sigmoid())),
        ("Tanh", lambda: nbnet.Tanh(), nn and (lambda: nn.Tanh())),
    ]
    rows = []
    for label, make_nb, make_torch in specs:
        for mode in ("train", "infer"):
            name = f"{label} {mode} {_shape_str(shape)} float32"

            def build(make_nb=make_nb, make_torch=make_torch, mode=mode):
                rng = np.random.default_rng(0)
                X = rng.normal(0.0, 2.0, shape).astype(np.float32)
                dY = rng.normal(0.0, 1.0, shape).astype(np.float32)
                i = 0 if mode == "train" else 1
                fns = {"nbnet": _nbnet_callables(make_nb, X, dY)[i]}
                if make_torch is not None:
                    fns["torch"] = _torch_callables(torch, make_torch, X, dY, "rows")[i]
                fns["floor"] = _floor_callables(X)[i]
                return fns

            rows.append(Row("activations", name, build, shape, "float32"))
    return rows


class _NumpyReLU:
    """Stand-in for nbnet.ReLU while that layer does not exist: NumPy max(x, 0)."""

    def forward(self, X, retain_derived=True):
        self.X = X
        return np.maximum(X, 0)

    def backward(self, dY, retain_grads=True):
        return dY * (self.X > 0)

    def flush_gradients(self):
        self.X = None


def _bn_plus_relu(nbnet):
    """A factory for BatchNorm2D followed by a separate ReLU layer (nbnet's, else NumPy)."""
    BN = getattr(nbnet, "BatchNorm2D", None)
    if BN is None:
        return None
    ReLU = getattr(nbnet, "ReLU", None)

    class BNThenReLU:
        def __init__(self):
            self.bn = BN()
            self.relu = ReLU() if ReLU is not None else _NumpyReLU()

        def forward(self, X, retain_derived=True):
            return self.relu.forward(self.bn.forward(X, retain_derived), retain_derived)

        def backward(self, dY):
            return self.bn.backward(self.relu.backward(dY))

        def flush_gradients(self):
            self.bn.flush_gradients()
            self.relu.flush_gradients()

    return BNThenReLU


def optimizer_rows(nbnet, torch, npml, quick):
    sizes = (1000, 10000) if quick else (1_000_000, 10_000_000)
    rows = []
    # (label, nbnet factory, torch factory(params), numpy-ml factory, arrays moved per element)
    specs = [
        ("Adam", lambda: nbnet.Adam(lr=1e-3),
         torch and (lambda ps: torch.optim.Adam(ps, lr=1e-3)),
         npml and (lambda: npml["optimizers"].Adam(lr=1e-3)), 7),
        ("SGD(momentum=0.9)", lambda: nbnet.SGD(lr=0.01, momentum=0.9),
         torch and (lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)),
         npml and (lambda: npml["optimizers"].SGD(lr=0.01, momentum=0.9)), 5),
    ]
    for label, make_nb, make_torch, make_npml, arrays in specs:
        for n in sizes:
            name = f"{label} step {n:,} params float32"

            def build(make_nb=make_nb, make_torch=make_torch, make_npml=make_npml, n=n):
                rng = np.random.default_rng(0)
                grad = rng.normal(0.0, 1.0, n).astype(np.float32)
                p_nb = np.zeros(n, np.float32)
                opt_nb = make_nb()
                fns = {"nbnet": lambda: opt_nb(p_nb, grad, "w")}
                if make_torch is not None:
                    p_t = torch.nn.Parameter(torch.zeros(n, dtype=torch.float32))
                    p_t.grad = torch.from_numpy(grad)
                    opt_t = make_torch([p_t])
                    fns["torch"] = opt_t.step
                if make_npml is not None:
                    state = {"p": np.zeros(n, np.float32)}
                    opt_np = make_npml()

                    def npml_step():  # numpy-ml returns a new array
                        state["p"] = opt_np.update(state["p"], grad, "w")

                    fns["numpy_ml"] = npml_step
                src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
                fns["floor"] = lambda: np.copyto(dst, src)
                return fns

            rows.append(Row("optimizers", name, build, (n,), "float32", floor_scale=arrays / 2))
    return rows


def training_rows(nbnet, torch, npml, quick):
    n_examples = 256 if quick else 8192
    batch = 128
    name = f"MLP 784-256-256-10 BN+ReLU epoch ({n_examples} examples, batch {batch}) float32"
    Model = getattr(nbnet, "Sequential", None) or getattr(nbnet, "Model", None)
    FC = getattr(nbnet, "FullyConnected", None)
    if Model is None or FC is None:
        return []

    def build():
        rng = np.random.default_rng(0)
        X = rng.normal(0.0, 1.0, (n_examples, 784)).astype(np.float32)
        y = rng.integers(0, 10, n_examples)
        model = Model([FC(256, seed=1), nbnet.BatchNorm1D(act_fn="relu"), FC(256, seed=2),
                       nbnet.BatchNorm1D(act_fn="relu"), FC(10, seed=3)],
                      loss="cross_entropy", optimizer="adam(lr=1e-3)", seed=0)
        fns = {"nbnet": lambda: model.fit(X, y, epochs=1, batch_size=batch, shuffle=False,
                                          verbose=0)}
        if torch is not None:
            nn = torch.nn
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(784, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                nn.Linear(256, 10))
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
            loss_fn = nn.CrossEntropyLoss()
            Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

            def torch_epoch():
                for s in range(0, n_examples, batch):
                    opt.zero_grad(set_to_none=True)
                    loss_fn(net(Xt[s:s + batch]), yt[s:s + batch]).backward()
                    opt.step()

            fns["torch"] = torch_epoch
        if npml is not None:
            fns["numpy_ml"] = _numpy_ml_mlp_epoch(npml, X, y, batch)
        return fns

    return [Row("training", name, build, (n_examples, 784), "float32")]


def _numpy_ml_mlp_epoch(npml, X, y, batch):
    """The same MLP with numpy-ml's layers (FC, BatchNorm1D, its ReLU), softmax CE, Adam."""
    L = npml["layers"]
    relu = npml["activations"].ReLU()
    stack = [L.FullyConnected(256, optimizer="adam"), L.BatchNorm1D(optimizer="adam"), "relu",
             L.FullyConnected(256, optimizer="adam"), L.BatchNorm1D(optimizer="adam"), "relu",
             L.FullyConnected(10, optimizer="adam")]

    def epoch():
        for s in range(0, X.shape[0], batch):
            out, pre = X[s:s + batch], []
            for layer in stack:
                if layer == "relu":
                    pre.append(out)
                    out = relu.fn(out)
                else:
                    out = layer.forward(out)
            z = out - out.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(p.shape[0]), y[s:s + batch]] -= 1.0
            g = p / p.shape[0]
            for layer in reversed(stack):
                if layer == "relu":
                    g = g * relu.grad(pre.pop())
                else:
                    g = layer.backward(g)
            for layer in stack:
                if layer != "relu":
                    layer.update()

    return epoch


# ----------------------------------------------------------------------------- cold start

_NBNET_FIRST_STEP = (
    "import numpy as np, nbnet\n"
    "X = np.random.default_rng(0).normal(size=(4096, 256)).astype(np.float32)\n"
    "bn = nbnet.BatchNorm1D()\n"
    "Y = bn.forward(X)\n"
    "bn.backward(Y)\n"
)

# The default float32 kernel set: what BatchNorm1D and LayerNorm1D training and inference
# compile, at a size below config.SERIAL_CUTOFF and one above it (the serial and the
# parallel loops of every kernel), run in a process with an empty kernel cache.
_NBNET_COMPILE = (
    "import numpy as np, nbnet\n"
    "for make in (nbnet.BatchNorm1D, nbnet.LayerNorm1D):\n"
    "    for n in (4, 2048):\n"
    "        X = np.random.default_rng(0).normal(size=(n, 64)).astype(np.float32)\n"
    "        layer = make()\n"
    "        layer.backward(layer.forward(X))\n"
    "        layer.forward(X, retain_derived=False)\n"
)
COMPILE_ROW = ("new process, empty kernel cache, until BatchNorm1D and LayerNorm1D have trained "
               "and inferred at (4,64) and (2048,64): the default float32 kernel set compiled")

# Hides scipy from the child process, as in a plain ``pip install nbnet`` (scikit-learn
# and numpy-ml bring it here). numba's start-up probes SciPy's BLAS (importing
# scipy.linalg, ~0.12 s); nbnet defers that probe during its first kernel call
# (config.DEFER_SCIPY), so the two rows should now agree.
_WITHOUT_SCIPY = "import sys\nsys.modules['scipy'] = None\n"

# The child prints time.perf_counter() (CLOCK_MONOTONIC, shared by all processes on
# Linux) when its work is done: the time to "reach" the step, without interpreter exit,
# which costs another ~0.15 s once numba has compiled or loaded code (module teardown).
_DONE = "import time\nprint(repr(time.perf_counter()))\n"


def _process_until_done(code, env=None):
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code + _DONE], check=True, env=env,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1]) - t0


def cold_start_rows(torch, threads):
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
    # Bytecode caching on, as for any installed package (pip compiles a wheel's .pyc at
    # install time): with PYTHONDONTWRITEBYTECODE set (as on the reference machine) every
    # new process would recompile nbnet's sources, ~70 ms that no installed copy pays.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    rows = []
    for label, prefix in (("", ""), (", scipy hidden", _WITHOUT_SCIPY)):
        name = ("new process until its first BatchNorm1D training step (4096,256) is done, "
                f"warm cache{label}")

        def build(prefix=prefix):
            fns = {"nbnet": lambda: _process_until_done(prefix + _NBNET_FIRST_STEP, env)}
            if torch is not None:
                fns["torch"] = lambda: _process_until_done("import torch\n", env)
            fns["floor"] = lambda: _process_until_done("import numpy\n", env)
            return fns  # main() has measure() run nbnet's once first: that warms the kernel cache

        rows.append(Row("cold_start", name, build, (4096, 256), "float32"))

    def build_compile():
        def compile_all():
            with tempfile.TemporaryDirectory() as cache:
                return _process_until_done(_NBNET_COMPILE, dict(env, NUMBA_CACHE_DIR=cache))

        return {"nbnet": compile_all, "floor": lambda: _process_until_done("import numpy\n", env)}

    rows.append(Row("cold_start", COMPILE_ROW, build_compile, (2048, 64), "float32"))
    return rows


# ----------------------------------------------------------------------------- report

def warm_kernel_cache():
    """Compile nbnet's kernel set into the disk cache in a child process (``python -m
    nbnet.warmup``, the environment inherited), so that this process loads kernels instead
    of compiling them (see the module notes). Returns the seconds it took."""
    import nbnet  # (lazy: no kernel is loaded) for the copy of nbnet this process uses

    root = os.path.dirname(os.path.dirname(os.path.abspath(nbnet.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nbnet.warmup"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def machine_info(threads, npml):
    import numba

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    torch = import_torch()
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "not initialised"
    return {
        "cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(), "numpy": np.__version__,
        "numba": numba.__version__, "torch": torch.__version__ if torch else None,
        "numpy_ml": npml["version"] if npml else None,
        "numba_threading_layer": layer, "threads": threads,
        "torch_threads": torch.get_num_threads() if torch else None,
    }


def _fmt_time(t):
    if t is None:
        return "-"
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} us"


def _fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}x"


def print_table(header, results, bandwidth):
    print(f"# nbnet compare: {header['cpu']}, {header['usable_cores']} usable of "
          f"{header['logical_cores']} logical cores, {header['platform']}")
    print(f"# python {header['python']}, numpy {header['numpy']}, numba {header['numba']}, "
          f"torch {header['torch']}, numpy-ml {header['numpy_ml']}")
    print(f"# threads {header['threads']} (numba threading layer {header['numba_threading_layer']}, "
          f"torch {header['torch_threads']}); np.copyto bandwidth {bandwidth / 1e9:.1f} GB/s")
    warm_s = header.get("kernel_cache_warmup_s")
    if warm_s is not None:
        print(f"# kernel cache warmed in a child process first ({warm_s:.1f} s)")
    cols = ["case", "nbnet", "torch", "numpy-ml", "floor", "torch/nbnet", "nbnet/floor"]
    section = None
    lines = []
    for r in results:
        if r["section"] != section:
            section = r["section"]
            lines.append(None)
            lines.append([f"[{section}]"] + [""] * (len(cols) - 1))
        t = r["times"]
        lines.append([r["name"], _fmt_time(t.get("nbnet")), _fmt_time(t.get("torch")),
                      _fmt_time(t.get("numpy_ml")), _fmt_time(r["floor"]),
                      _fmt_ratio(r["torch_over_nbnet"]), _fmt_ratio(r["nbnet_over_floor"])])
    widths = [max(len(c), *(len(l[i]) for l in lines if l)) for i, c in enumerate(cols)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(fmt(cols))
    print("  ".join("-" * w for w in widths))
    for l in lines:
        if l is not None:
            print(fmt(l))
    print("# medians; torch/nbnet > 1: nbnet faster; floor: np.copyto time of the bytes the "
          "step must move (cold_start floor: python -c 'import numpy')")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for nbnet (numba), torch and BLAS (default: numba's, "
                             "the core count or NUMBA_NUM_THREADS)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and few repetitions: a smoke run of a few seconds")
    parser.add_argument("--only", default=None, metavar="PATTERN",
                        help="only rows whose 'section name' matches this regex (any case)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 7; quick 3)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds per timing (default 0.05; quick 0.002)")
    args = parser.parse_args(argv)

    import numba

    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        parser.error(f"--threads must be in 1..{numba.config.NUMBA_NUM_THREADS} "
                     "(NUMBA_NUM_THREADS caps it)")
    numba.set_num_threads(threads)
    torch = import_torch()
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
        blas_limit = threadpool_limits(threads)  # numpy's BLAS (dense layers, numpy-ml)
    except ImportError:
        blas_limit = None
    npml = import_numpy_ml()

    warm_s = None if args.quick else warm_kernel_cache()

    import nbnet

    # one parallel kernel first, so that numba reports its threading layer
    warm = nbnet.BatchNorm1D()
    warm.forward(np.ones((512, 256), np.float32))
    reps = args.reps or (3 if args.quick else 7)
    min_time = args.min_time if args.min_time is not None else (0.002 if args.quick else 0.05)
    bandwidth = copy_bandwidth(8 << 20 if args.quick else 64 << 20)
    header = machine_info(threads, npml)
    header.update(copy_bandwidth_GBps=bandwidth / 1e9, reps=reps, min_time=min_time,
                  quick=args.quick, kernel_cache_warmup_s=warm_s)

    rows = (normalization_rows(nbnet, torch, npml, args.quick)
            + activation_rows(nbnet, torch, args.quick)
            + optimizer_rows(nbnet, torch, npml, args.quick)
            + training_rows(nbnet, torch, npml, args.quick)
            + cold_start_rows(torch, threads))
    if args.only:
        pattern = re.compile(args.only, re.IGNORECASE)
        rows = [r for r in rows if pattern.search(f"{r.section} {r.name}")]
        if not rows:
            parser.error(f"--only {args.only!r} matches no row; rows are named '<section> "
                         f"<name>', e.g. 'normalization BatchNorm1D train (4096,1024) float32'")

    results = []
    for row in rows:
        fns = row.build()
        r_reps = reps
        if row.section in ("training", "cold_start"):
            r_reps = min(reps, 1 if args.quick else 3)
        if row.section == "cold_start":  # one process per call; warm nbnet's kernel cache
            times = measure_reported(fns, r_reps, warm=("nbnet",))
        else:
            times = measure(fns, r_reps, min_time)
        del fns
        floor = times.pop("floor", None)
        if floor is not None:
            floor *= row.floor_scale
        nb, tt = times.get("nbnet"), times.get("torch")
        results.append({
            "section": row.section, "name": row.name,
            "shape": list(row.shape) if row.shape else None, "dtype": row.dtype,
            "threads": threads, "times": times, "floor": floor,
            "torch_over_nbnet": (tt / nb) if (tt and nb) else None,
            "nbnet_over_floor": (nb / floor) if (nb and floor) else None,
        })
        print(f"  {row.section}: {row.name}: " + ", ".join(
            f"{k} {_fmt_time(v)}" for k, v in times.items()), file=sys.stderr, flush=True)

    print_table(header, results, bandwidth)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": results}, f, indent=1)
    if blas_limit is not None:
        blas_limit.restore_original_limits()
    return 0


if __name__ == "__main__":
    sys.exit(main())

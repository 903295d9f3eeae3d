"""The CUDA suite: every CUDA kernel against its CPU twin, the float64 references,
determinism, device round trips and zero-copy input.

Run by tests/test_cuda.py in a subprocess: under ``NUMBA_ENABLE_CUDASIM=1`` on machines
without a GPU (tiny shapes, ``config.CUDA_BLOCK = 32`` and a small ``CHUNK_BYTES`` so that
the multi-block, multi-lane and multi-chunk paths run), and without the simulator on a
real GPU (``NBNET_CUDA_REAL=1``). The file name does not match ``test_*.py`` on purpose:
``numba.cuda`` must be imported with the right environment, so the main pytest process
never collects it.
"""
import os

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0") and \
        os.environ.get("NBNET_SIM_BOUNDS", "1") != "0":
    import sim_bounds  # debug mode: out-of-range and negative kernel indices raise

    sim_bounds.install()

import nbnet
from nbnet import config, devices
from nbnet.registry import get_kernel

from conftest import rel_err
from reference import batchnorm_ref, layernorm_ref, norm_backward_ref, norm_forward_ref

pytestmark = pytest.mark.skipif(not devices.cuda_status()[0],
                                reason=f"CUDA unavailable: {devices.cuda_status()[1]}")

SIM = devices.is_simulator()
TOL = {np.float64: 1e-12, np.float32: 1e-5}
REF_TOL = {np.float64: 1e-10, np.float32: 1e-5}
DTYPES = [np.float64, np.float32]


#: Block size of the run: NBNET_SUITE_BLOCK, else 16 under the simulator (column tiles of
#: 4 columns x 4 row lanes; merge tiles 16 x 4; every simulated thread is a Python thread) and 256 on a GPU. tests/test_cuda.py runs
#: the simulator suite with several block sizes, since bugs hide behind one geometry.
BLOCK = int(os.environ.get("NBNET_SUITE_BLOCK", "16" if SIM else "256"))


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(config, "CUDA_BLOCK", BLOCK)
    monkeypatch.setattr(config, "CHUNK_BYTES", 512)  # several chunks even for tiny inputs


def host(x):
    return devices.to_host(x)


def close(a, b, dtype, tol=None):
    tol = (tol or TOL)[dtype]
    assert rel_err(host(a), host(b)) <= tol, rel_err(host(a), host(b))


def data(shape, dtype, seed=0, loc=3.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2.0 + loc).astype(dtype)


def pair(make, X, dY, **kw):
    """Run forward + backward of the same layer on cpu and cuda; return both results."""
    out = {}
    for dev in ("cpu", "cuda"):
        layer = make(device=dev, **kw)
        Y = layer.forward(X)
        dX = layer.backward(dY)
        out[dev] = (layer, Y, dX)
    return out


LAYERS = [
    ("bn1d", lambda **kw: nbnet.BatchNorm1D(**kw), (37, 11)),
    ("bn2d_nhwc", lambda **kw: nbnet.BatchNorm2D(**kw), (3, 4, 5, 6)),
    ("bn2d_nchw", lambda **kw: nbnet.BatchNorm2D(data_format="NCHW", **kw), (3, 6, 4, 5)),
    ("ln1d", lambda **kw: nbnet.LayerNorm1D(**kw), (9, 37)),
    ("ln2d", lambda **kw: nbnet.LayerNorm2D(**kw), (5, 3, 4, 6)),
    ("rms", lambda **kw: nbnet.RMSNorm(**kw), (9, 37)),
    ("gn_nhwc", lambda **kw: nbnet.GroupNorm(3, **kw), (3, 3, 4, 6)),
    ("gn_nchw", lambda **kw: nbnet.GroupNorm(2, data_format="NCHW", **kw), (3, 6, 3, 4)),
    ("gn_rows", lambda **kw: nbnet.GroupNorm(4, **kw), (9, 16)),  # one position (features)
    ("in_track", lambda **kw: nbnet.InstanceNorm2D(track_running_stats=True, affine=True, **kw),
     (3, 3, 4, 6)),
]


@pytest.mark.parametrize("act,dtype", [(None, np.float64), ("gelu", np.float32)])
@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_layer_matches_cpu(name, make, shape, act, dtype):
    X = data(shape, dtype)
    dY = data(shape, dtype, seed=1, loc=0.5)
    res = pair(make, X, dY, act_fn=act)
    (lc, Yc, dXc), (lg, Yg, dXg) = res["cpu"], res["cuda"]
    assert isinstance(Yg, np.ndarray) and Yg.dtype == dtype  # NumPy in -> NumPy out
    close(Yg, Yc, dtype)
    close(dXg, dXc, dtype)
    for k in lc.parameters:
        close(lg.parameters[k], lc.parameters[k], dtype)
    for k in lc.gradients:
        assert devices.is_device_array(lg.gradients[k])
        close(lg.gradients[k], lc.gradients[k], dtype)
    # inference path (running statistics where the layer has them)
    lc.eval(), lg.eval()
    close(lg.forward(X), lc.forward(X), dtype)


@pytest.mark.parametrize("name,make,shape", [LAYERS[0], LAYERS[2], LAYERS[-1]],
                         ids=["bn1d", "bn2d_nchw", "in_track"])
def test_nonfinite_batch_keeps_running_statistics(name, make, shape):
    """A batch with NaN in one channel and Inf in another: on cuda (the fused and the
    separate merge kernels, and InstanceNorm's host update) those channels keep their
    running statistics, as on cpu, and the others update as on cpu."""
    X = data(shape, np.float64)
    Xb = data(shape, np.float64, seed=3, loc=-1.0)
    ch = 1 if name == "bn2d_nchw" else -1
    np.moveaxis(Xb, ch, -1)[(0,) * (len(shape) - 1) + (1,)] = np.nan
    np.moveaxis(Xb, ch, -1)[(-1,) * (len(shape) - 1) + (2,)] = np.inf
    result = {}
    for dev in ("cpu", "cuda"):
        layer = make(device=dev)
        layer.forward(X)
        before = {k: host(layer.parameters[k]).copy() for k in ("running_mean", "running_var")}
        layer.forward(Xb)
        result[dev] = {k: host(layer.parameters[k]) for k in before}
        for k, v in result[dev].items():
            assert np.isfinite(v).all(), (dev, k, v)
            assert (v[1:3] == before[k][1:3]).all(), (dev, k)
    for k in result["cpu"]:
        close(result["cuda"][k], result["cpu"][k], np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_against_reference(dtype):
    X = data((37, 11), dtype, loc=1e3 if dtype == np.float64 else 3.0)
    dY = data((37, 11), dtype, seed=2)
    layer = nbnet.BatchNorm1D(device="cuda", act_fn="relu")
    Y = layer.forward(X)
    dX = layer.backward(dY)
    g, b = np.ones(11), np.zeros(11)
    Yr, _, _ = batchnorm_ref(X, g, b, 1e-5, act="relu")
    dXr, dgr, dbr = norm_backward_ref(X, dY, (0,), g, b, 1e-5, act="relu")
    close(Y, Yr, dtype, REF_TOL)
    close(dX, dXr, dtype, REF_TOL)
    close(layer.gradients["scaler"], dgr, dtype, REF_TOL)
    close(layer.gradients["intercept"], dbr, dtype, REF_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_and_groupnorm_against_reference(dtype):
    X = data((7, 45), dtype)
    dY = data((7, 45), dtype, seed=3)
    g, b = np.ones(45), np.zeros(45)
    layer = nbnet.LayerNorm1D(device="cuda")
    close(layer.forward(X), layernorm_ref(X, g, b, 1e-5)[0], dtype, REF_TOL)
    dXr, dgr, dbr = norm_backward_ref(X, dY, (1,), g, b, 1e-5)
    close(layer.backward(dY), dXr, dtype, REF_TOL)
    close(layer.gradients["scaler"], dgr, dtype, REF_TOL)
    X4 = data((3, 2, 3, 4), dtype)
    gn = nbnet.GroupNorm(2, device="cuda")
    Xg = X4.reshape(3, 6, 2, 2).astype(np.float64)  # (N, P, G, cg) grouping of NHWC
    Yr = norm_forward_ref(Xg, (1, 3), 1.0, 0.0, 1e-5)[0].reshape(X4.shape)
    close(gn.forward(X4), Yr, dtype, REF_TOL)


def test_cai_input_is_not_copied_and_stays_on_device():
    cuda = devices.import_cuda()
    X = data((37, 11), np.float32)
    dX_dev = cuda.to_device(X)
    layer = nbnet.BatchNorm1D(device="cuda")
    Y = layer.forward(dX_dev)
    assert devices.is_device_array(Y) and not isinstance(Y, np.ndarray)
    kept = layer.X[0]
    def ptr(a):
        if hasattr(a, "__cuda_array_interface__"):
            return a.__cuda_array_interface__["data"][0]
        return a._ary.__array_interface__["data"][0]  # the simulator's device array
    assert ptr(kept) == ptr(dX_dev)  # the retained input is the caller's memory
    dX = layer.backward(cuda.to_device(np.ones_like(X)))
    assert devices.is_device_array(dX)
    close(Y, nbnet.BatchNorm1D().forward(X), np.float32)


def test_determinism_bit_identical():
    X = data((29, 13), np.float32)
    dY = data((29, 13), np.float32, seed=5)
    runs = []
    for _ in range(2):
        layer = nbnet.BatchNorm1D(device="cuda", act_fn="gelu")
        Y = layer.forward(X)
        dX = layer.backward(dY)
        ln = nbnet.LayerNorm1D(device="cuda")
        Z = ln.forward(X)
        dZ = ln.backward(dY)
        runs.append([Y, dX, host(layer.gradients["scaler"]), host(layer.parameters["running_var"]),
                     Z, dZ, host(ln.gradients["scaler"])])
    for a, b in zip(*runs):
        assert np.array_equal(a, b)


def test_to_round_trip_and_checkpoint_on_cpu():
    X = data((37, 11), np.float64)
    layer = nbnet.BatchNorm1D(device="cuda", optimizer="adam")
    layer.forward(X)
    layer.backward(X * 0.1)
    layer.update()
    before = {k: host(v).copy() for k, v in layer.parameters.items()}
    state = {k: host(v["mean"]).copy() for k, v in layer.optimizer.cache.items()}
    layer.to("cpu")
    assert all(isinstance(v, np.ndarray) for v in layer.parameters.values())
    assert all(isinstance(v["mean"], np.ndarray) for v in layer.optimizer.cache.values())
    for k, v in before.items():
        assert np.array_equal(layer.parameters[k], v)
    for k, v in state.items():
        assert np.array_equal(layer.optimizer.cache[k]["mean"], v)
    summary = layer.summary()
    assert all(isinstance(v, np.ndarray) for v in summary["parameters"].values())
    layer.to("cuda")
    assert all(devices.is_device_array(v) for v in layer.parameters.values())
    for k, v in before.items():
        assert np.array_equal(host(layer.parameters[k]), v)
    cpu_twin = nbnet.BatchNorm1D().set_params(summary)  # a GPU model's summary loads on CPU
    Xn = data((37, 11), np.float64, seed=9)
    layer.eval(), cpu_twin.eval()
    close(layer.forward(Xn), cpu_twin.forward(Xn), np.float64)


@pytest.mark.parametrize("opt,dtype", [("sgd(lr=0.1, momentum=0.9)", np.float64),
                                       ("adam", np.float32), ("rmsprop", np.float64),
                                       ("adagrad", np.float32), ("sgd(lr=0.1, clip_norm=0.5)", np.float64)])
def test_optimizers_match_cpu(opt, dtype):
    X = data((37, 11), dtype)
    dY = data((37, 11), dtype, seed=4)
    params = {}
    for dev in ("cpu", "cuda"):
        layer = nbnet.BatchNorm1D(device=dev, optimizer=opt)
        for _ in range(2):
            layer.forward(X)
            layer.backward(dY)
            layer.update()
        params[dev] = layer.parameters
    for k in params["cpu"]:
        close(params["cuda"][k], params["cpu"][k], dtype)


# ------------------------------------------------------------ kernel-level twins

def both(op, *args, size=None):
    """Run op on cpu (NumPy args) and cuda (device copies); return (cpu_args, cuda_args)."""
    cpu = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    dev = [devices.to_device(a, "cuda") if isinstance(a, np.ndarray) else a for a in args]
    if size is None:
        get_kernel(op, "cpu")(*cpu)
        get_kernel(op, "cuda")(*dev)
    else:
        get_kernel(op, "cpu")(size, *cpu)
        get_kernel(op, "cuda")(size, *dev)
    return cpu, [host(a) if devices.is_device_array(a) else a for a in dev]


def assert_outputs(cpu, dev, dtype, idx):
    for i in idx:
        close(dev[i], cpu[i], dtype)


def _have(op):
    try:
        get_kernel(op, "cpu")
        return True
    except NotImplementedError:
        return False


@pytest.mark.parametrize("dtype", [np.float64])
@pytest.mark.parametrize("code", [0, 1, 2, 3, 4, 5, 6, 7])
def test_activation_kernels(code, dtype):
    x = data(50, dtype, loc=0.0)
    dy = data(50, dtype, seed=1)
    cpu, dev = both("act_forward", x, code, 0.2, 16, np.empty_like(x), size=50)
    assert_outputs(cpu, dev, dtype, [4])
    cpu, dev = both("act_backward", x, dy, code, 0.2, 16, np.empty_like(x), size=50)
    assert_outputs(cpu, dev, dtype, [5])


@pytest.mark.parametrize("dtype", [np.float64])
@pytest.mark.parametrize("code", [6, 7])
def test_activation_backward_from_output(code, dtype):
    """tanh's and the sigmoid's slope from their output, against the CPU twin."""
    y = np.tanh(data(50, dtype, loc=0.0)) if code == 6 else 1 / (1 + np.exp(-data(50, dtype)))
    dy = data(50, dtype, seed=1)
    cpu, dev = both("act_backward_from_output", y, dy, code, 16, np.empty_like(y), size=50)
    assert_outputs(cpu, dev, dtype, [4])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_and_loss_kernels(dtype):
    R, C = 23, 10
    Z = data((R, C), dtype, loc=0.0)
    b = data(C, dtype, seed=2)
    for code in (0, 1, 2):  # the piecewise-linear codes: the CPU epilogues fuse no other
        cpu, dev = both("dense_forward_epilogue", Z, b, code, 0.2, 4, np.zeros_like(Z), size=R * C)
        assert_outputs(cpu, dev, dtype, [0] if code == 0 else [0, 5])
        dY = data((R, C), dtype, seed=3)
        nch = -(-R // 4)
        cpu, dev = both("dense_backward_epilogue", Z, dY, code, 0.2, 4, np.empty_like(Z),
                        np.empty((nch, C)), size=R * C)
        assert_outputs(cpu, dev, dtype, [5, 6])
    cpu, dev = both("column_partial_sums", Z, 4, np.empty((-(-R // 4), C)), size=R * C)
    assert_outputs(cpu, dev, dtype, [2])
    part = data((7, C), np.float64)
    cpu, dev = both("merge_partial_sums", part, np.empty(C), size=7 * C)
    assert_outputs(cpu, dev, np.float64, [1])
    cpu, dev = both("softmax_forward", Z, np.empty_like(Z), size=R * C)
    assert_outputs(cpu, dev, dtype, [1])
    Yс = cpu[1]
    cpu, dev = both("softmax_backward", Yс, Z, np.empty_like(Z), size=R * C)
    assert_outputs(cpu, dev, dtype, [2])
    T = np.eye(C, dtype=dtype)[np.arange(R) % C]
    cpu, dev = both("softmax_xent_onehot", Z, T, 0.5, np.empty(R), np.empty_like(Z), size=R * C)
    assert_outputs(cpu, dev, dtype, [3, 4])
    # -inf logits mask classes of zero target weight: finite loss, zero gradient there
    Zm = np.where((T == 0) & (np.arange(R * C).reshape(R, C) % 3 == 0), -np.inf, Z).astype(dtype)
    cpu, dev = both("softmax_xent_onehot", Zm, T, 0.5, np.empty(R), np.empty_like(Z), size=R * C)
    assert_outputs(cpu, dev, dtype, [3, 4])
    assert np.isfinite(cpu[3]).all() and (cpu[4][np.isinf(Zm)] == 0).all()
    labels = (np.arange(R) % C).astype(np.int64)
    cpu, dev = both("softmax_xent_labels", Z, labels, 0.5, np.empty(R), np.empty_like(Z), size=R * C)
    assert_outputs(cpu, dev, dtype, [3, 4])
    y, t = Z.reshape(-1), data(R * C, dtype, seed=7)
    cpu, dev = both("squared_error", y, t, 0.25, 64, np.empty(-(-R * C // 64)), np.empty_like(y),
                    size=R * C)
    assert_outputs(cpu, dev, dtype, [4, 5])
    u = np.random.default_rng(1).random(R * C)
    cpu, dev = both("dropout_forward", y, u, 0.3, 1 / 0.7, 64, np.empty_like(y),
                    np.empty(R * C, np.uint8), size=R * C)
    assert_outputs(cpu, dev, dtype, [5])
    assert np.array_equal(cpu[6], dev[6])
    cpu, dev = both("dropout_backward", t, cpu[6], 1 / 0.7, 64, np.empty_like(t), size=R * C)
    assert_outputs(cpu, dev, dtype, [4])
    cpu, dev = both("add_into", y.copy(), t.astype(np.float64))
    assert_outputs(cpu, dev, dtype, [0])
    cpu, dev = both("fill", y.copy(), 2.5)
    assert_outputs(cpu, dev, dtype, [0])


def test_running_invstd_and_sum_of_squares():
    rm, rv = data(11, np.float32), np.abs(data(11, np.float32)) + 0.1
    mean, inv = devices.empty(11, np.float64, "cuda"), devices.empty(11, np.float64, "cuda")
    get_kernel("running_invstd", "cuda")(11, devices.to_device(rm, "cuda"),
                                         devices.to_device(rv, "cuda"), 1e-5, mean, inv)
    close(mean, rm.astype(np.float64), np.float64)
    close(inv, 1 / np.sqrt(rv.astype(np.float64) + 1e-5), np.float64)
    x = data(300, np.float32)
    cpu, dev = both("sum_of_squares", x, 64, np.empty(5), np.empty(1), size=300)
    assert_outputs(cpu, dev, np.float64, [2, 3])


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True),
                                             (True, True)])
def test_matmul_twin(trans_a, trans_b):
    """out = op(a) @ op(b) on both devices, the transposes given as flags."""
    a = data((4, 5) if trans_a else (5, 4), np.float64)
    b = data((3, 4) if trans_b else (4, 3), np.float64, seed=1)
    want = (a.T if trans_a else a) @ (b.T if trans_b else b)
    out_cpu = np.empty((5, 3))
    get_kernel("matmul", "cpu")(a, b, out_cpu, trans_a, trans_b)
    out = devices.empty((5, 3), np.float64, "cuda")
    try:
        get_kernel("matmul", "cuda")(devices.to_device(a, "cuda"), devices.to_device(b, "cuda"), out,
                                     trans_a, trans_b)
    except RuntimeError as exc:  # no CuPy on a real GPU: the error names what to install
        assert "cupy" in str(exc).lower()
        pytest.skip("CuPy not installed")
    close(out_cpu, want, np.float64)
    close(out, want, np.float64)


def test_dense_layer_never_transposes_a_device_array(monkeypatch):
    """numba-cuda's ``DeviceNDArray.T`` copies through a transpose kernel it compiles anew
    on every call (0.28 s on an H200): a dense layer's backward must pass transpose flags
    to ``matmul`` instead. The device array class's transpose is made to fail here."""
    from nbnet.layers.dense import FullyConnected

    cls = type(devices.empty((2, 2), np.float32, "cuda"))

    def no_transpose(self, axes=None):
        raise AssertionError("a device array was transposed")

    monkeypatch.setattr(cls, "transpose", no_transpose)
    X, dY = data((7, 5), np.float64), data((7, 4), np.float64, seed=1)
    res = {}
    for dev in ("cpu", "cuda"):
        layer = FullyConnected(4, act_fn="relu", device=dev, seed=0)
        Y = layer.forward(X)
        dX = layer.backward(dY)
        layer.backward(dY)  # accumulating into non-zero gradients takes the other product
        res[dev] = (Y, dX, layer.gradients["W"], layer.gradients["b"])
    for got, want in zip(res["cuda"], res["cpu"]):
        close(got, want, np.float64)


@pytest.mark.skipif(not hasattr(nbnet, "Dense") and not _have("matmul"), reason="no dense layer")
def test_dense_layer_on_cuda_if_present():
    dense_mod = pytest.importorskip("nbnet.layers.dense")
    Dense = getattr(dense_mod, "Dense", None) or getattr(dense_mod, "FullyConnected", None)
    if Dense is None:
        pytest.skip("no Dense class")
    X = data((6, 5), np.float64)
    try:
        res = {}
        for dev in ("cpu", "cuda"):
            layer = Dense(4, device=dev)
            layer.set_params({"parameters": {k: host(v) for k, v in res.get("params", {}).items()}}
                             ) if res.get("params") else None
            Y = layer.forward(X)
            res.setdefault("params", layer.parameters)
            res[dev] = (Y, layer.backward(np.ones_like(host(Y))))
    except (TypeError, NotImplementedError) as exc:
        pytest.skip(f"Dense API differs: {exc}")
    close(res["cuda"][0], res["cpu"][0], np.float64)
    close(res["cuda"][1], res["cpu"][1], np.float64)


def _launches():
    from nbnet.kernels.cuda import _common

    return _common.LAUNCHES[0]


@pytest.mark.parametrize("make,shape,fwd,bwd", [
    (lambda: nbnet.BatchNorm1D(device="cuda"), (37, 11), 2, 2),
    (lambda: nbnet.BatchNorm2D(device="cuda"), (3, 4, 5, 6), 2, 2),
    (lambda: nbnet.LayerNorm1D(device="cuda"), (9, 37), 1, 2),
], ids=["bn1d", "bn2d", "ln1d"])
def test_launch_counts(make, shape, fwd, bwd):
    """Kernel launches per training step (counted at the launch itself, not per op): BatchNorm
    forward = partial stats + (merge, normalize); backward = reduce + (merge, accumulate, dx)."""
    cuda = devices.import_cuda()
    X = cuda.to_device(data(shape, np.float32))
    layer = make()
    layer.forward(X)
    layer.X.clear()
    for v in layer.derived_variables.values():
        v.clear()
    n0 = _launches()
    layer.forward(X)
    assert _launches() - n0 == fwd
    n0 = _launches()
    layer.forward(X)
    layer.backward([X, X])
    assert _launches() - n0 == fwd + 2 * bwd  # bwd per retained forward call


@pytest.mark.parametrize("target_blocks", [1024, 8])
@pytest.mark.parametrize("first_row_off", [0.0, 40.0])
def test_fused_float32_statistics_are_shifted(monkeypatch, target_blocks, first_row_off):
    """Float32 BatchNorm statistics on cuda are float64 sums of ``x - K``, ``K`` the chunk's
    first value of each column. Data at 3e6 with a spread of 2 need the shift: with
    ``K = 0`` the 50-row chunks fail (shorter sums of float32 squares are exact in
    float64). A chunk whose first row lies 40 spreads off is the shift's worst case. Few
    target blocks make 50-row chunks, so the 8-row loop runs (16-row chunks otherwise);
    float64 reference, two steps."""
    from nbnet.kernels.cuda import _common
    monkeypatch.setattr(_common, "TARGET_BLOCKS", target_blocks)
    R, C = 200, 7
    X = data((R, C), np.float64, loc=3e6)
    rpc = _common.column_plan(R, C)[0]
    X[::rpc] += first_row_off * 2.0
    X = X.astype(np.float32)
    dY = data((R, C), np.float32, seed=2)
    g, b = np.ones(C), np.zeros(C)
    Yr, _, _ = batchnorm_ref(X, g, b, 1e-5)
    dXr, _, _ = norm_backward_ref(X, dY, (0,), g, b, 1e-5)
    layer = nbnet.BatchNorm1D(device="cuda")
    for _ in range(2):
        close(layer.forward(X), Yr, np.float32, {np.float32: 2e-5})
        close(layer.backward(dY), dXr, np.float32, {np.float32: 2e-5})
        layer.X.clear()
        for v in layer.derived_variables.values():
            v.clear()
    Xf = X.astype(np.float64)
    close(layer.parameters["running_var"], 0.9 ** 2 + (1 - 0.9 ** 2) * Xf.var(0), np.float32,
          {np.float32: 2e-5})


@pytest.mark.parametrize("shape,act,dtype,loc", [
    ((2, 3), "relu", np.float64, 1e3),
    ((37, 11), "relu", np.float64, 1e3),
    ((20, 37), None, np.float32, 1e4),
    ((70, 5), "leaky relu", np.float32, 0.0),
])
def test_fused_batchnorm_shapes(shape, act, dtype, loc):
    """The fused CUDA ops on shapes that are not multiples of the tile or the chunk, large
    means (float32 at 1e4 breaks E[x^2] - E[x]^2), against the float64 reference; the
    running statistics and gradients too, and a second step (gradients accumulate)."""
    X = data(shape, dtype, loc=loc)
    dY = data(shape, dtype, seed=2)
    C = shape[1]
    layer = nbnet.BatchNorm1D(device="cuda", act_fn=act)
    g, b = np.ones(C), np.zeros(C)
    ref_act = act.replace(" ", "_") if act else None
    Yr, _, _ = batchnorm_ref(X, g, b, 1e-5, act=ref_act)
    dXr, dgr, dbr = norm_backward_ref(X, dY, (0,), g, b, 1e-5, act=ref_act)
    tol = {np.float64: 1e-9, np.float32: 2e-5}
    for step in (1, 2):
        close(layer.forward(X), Yr, dtype, tol)
        close(layer.backward(dY), dXr, dtype, tol)
        close(layer.gradients["scaler"], step * dgr, dtype, tol)
        close(layer.gradients["intercept"], step * dbr, dtype, tol)
        layer.X.clear()  # keep the gradients: the second step accumulates
        for v in layer.derived_variables.values():
            v.clear()
    Xf = X.astype(np.float64)
    rm = (1 - 0.9 ** 2) * Xf.mean(0)
    rv = 0.9 ** 2 + (1 - 0.9 ** 2) * Xf.var(0)
    close(layer.parameters["running_mean"], rm, dtype, tol)
    close(layer.parameters["running_var"], rv, dtype, tol)

"""FullyConnected, activation layers, Softmax, Dropout and Flatten: forward/backward
against float64 references, finite differences and PyTorch."""
import math

import numpy as np
import pytest

import reference_train as ref
from nbnet.activations import parse_activation
from nbnet.layers import (ELU, GELU, BatchNorm1D, Dropout, Flatten, FullyConnected, Identity,
                          LeakyReLU, ReLU, Sigmoid, Softmax, Tanh)
from nbnet.layers.dense import init_weights

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}
# (nbnet spec, reference name, alpha)
ACTS = [(None, None, None), ("relu", "relu", None), ("leaky_relu(alpha=0.2)", "leaky_relu", 0.2),
        ("elu(alpha=1.5)", "elu", 1.5), ("gelu", "gelu", None),
        ("gelu(approximate=False)", "gelu_exact", None), ("tanh", "tanh", None),
        ("sigmoid", "sigmoid", None)]
SHAPES = [(1, 3, 2), (7, 5, 4), (300, 64, 130)]  # (N, n_in, n_out); the last runs in parallel

torch = None
try:
    import torch
except ImportError:  # pragma: no cover
    pass
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch not installed")


def _data(shape, dtype, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# ------------------------------------------------------------------ FullyConnected

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec,name,alpha", ACTS)
@pytest.mark.parametrize("N,n_in,n_out", SHAPES)
def test_dense_forward_backward_vs_reference(dtype, spec, name, alpha, N, n_in, n_out):
    X = _data((N, n_in), dtype)
    dY = _data((N, n_out), dtype, seed=1)
    layer = FullyConnected(n_out, act_fn=spec, seed=3)
    Y = layer.forward(X)
    assert Y.dtype == dtype and Y.shape == (N, n_out)
    W, b = layer.parameters["W"], layer.parameters["b"]
    assert W.shape == (n_in, n_out) and b.shape == (1, n_out) and W.dtype == dtype
    layer.parameters["b"][...] = _data((1, n_out), dtype, seed=2)  # a non-zero bias
    Y = layer.forward(X)
    Y_ref, Z_ref = ref.dense_forward_ref(X, W, layer.parameters["b"], name, alpha)
    np.testing.assert_allclose(Y, Y_ref, **TOL[dtype])
    np.testing.assert_allclose(layer.derived_variables["Z"][-1], Z_ref, **TOL[dtype])
    layer.flush_gradients()
    layer.forward(X)
    dX = layer.backward(dY)
    dX_ref, dW_ref, db_ref = ref.dense_backward_ref(X, W, Z_ref, dY, name, alpha)
    assert dX.dtype == dtype
    np.testing.assert_allclose(dX, dX_ref, **TOL[dtype])
    np.testing.assert_allclose(layer.gradients["W"], dW_ref, **TOL[dtype])
    np.testing.assert_allclose(layer.gradients["b"], db_ref, **TOL[dtype])


@pytest.mark.parametrize("act,layer", [("gelu", GELU()), ("sigmoid", Sigmoid()), ("elu", ELU()),
                                       ("tanh", Tanh()), ("gelu(approximate=False)",
                                                          GELU(approximate=False))])
def test_dense_smooth_act_fn_is_the_activation_layer_after_the_product(act, layer):
    """On CPU a smooth act_fn is the activation layers' vectorised pass over Z = XW + b
    (fused into the epilogue it was one C-library call per value): output, dX, dW and db
    equal those of the layer without act_fn followed by the activation layer, bit for bit."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(37, 11)).astype(np.float32)
    dY = rng.normal(size=(37, 5)).astype(np.float32)
    fused, plain = FullyConnected(5, act_fn=act, seed=1), FullyConnected(5, seed=1)
    fused.forward(X[:1], retain_derived=False)
    plain.forward(X[:1], retain_derived=False)
    plain.set_params({"parameters": {k: v.copy() for k, v in fused.parameters.items()}})
    layer.flush_gradients()
    np.testing.assert_array_equal(fused.forward(X), layer.forward(plain.forward(X)))
    np.testing.assert_array_equal(fused.backward(dY), plain.backward(layer.backward(dY)))
    for k in ("W", "b"):
        np.testing.assert_array_equal(fused.gradients[k], plain.gradients[k])


def test_fused_cpu_kernels_reject_smooth_activation_codes():
    """The CPU normalization and dense kernels fuse only identity, ReLU and leaky ReLU; a
    smooth code (which the layers run as a pass of their own) is a ValueError, not a
    silently different activation."""
    from nbnet.registry import get_kernel
    X = np.ones((8, 4), np.float32)
    g, b, mean, invstd = np.ones(4, np.float32), np.zeros(4, np.float32), np.zeros(4), np.ones(4)
    for code in (3, 5, 7):
        with pytest.raises(ValueError, match="smooth activation"):
            get_kernel("column_normalize", "cpu")(X.size, X, mean, invstd, g, b, code, 1.0, 4, 4,
                                                  False, np.empty_like(X))
        with pytest.raises(ValueError, match="smooth activation"):
            get_kernel("row_forward", "cpu")(X.size, X, g, b, 1e-5, True, code, 1.0, 4,
                                             np.empty_like(X), np.empty(8), np.empty(8))
        with pytest.raises(ValueError, match="smooth activation"):
            get_kernel("dense_forward_epilogue", "cpu")(X.size, X.copy(), b, code, 1.0, 4,
                                                        np.empty_like(X))


def test_dense_finite_differences():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 4))
    dY = rng.normal(size=(6, 3))
    layer = FullyConnected(3, act_fn="tanh", seed=0)
    layer.forward(X)
    layer.parameters["b"][...] = rng.normal(size=(1, 3))

    def loss():
        return float((layer.forward(X, retain_derived=False) * dY).sum())

    layer.flush_gradients()
    layer.forward(X)
    dX = layer.backward(dY)
    np.testing.assert_allclose(layer.gradients["W"], ref.numerical_grad(loss, layer.parameters["W"]),
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(layer.gradients["b"], ref.numerical_grad(loss, layer.parameters["b"]),
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dX, ref.numerical_grad(loss, X), rtol=1e-6, atol=1e-8)


def test_dense_accumulates_over_calls_and_update_flushes():
    X1, X2 = _data((5, 4), np.float64), _data((5, 4), np.float64, seed=7)
    d1, d2 = _data((5, 2), np.float64, seed=8), _data((5, 2), np.float64, seed=9)
    layer = FullyConnected(2, act_fn="relu", seed=0, optimizer="sgd(lr=0.1)")
    layer.forward(X1)
    layer.forward(X2)
    dXs = layer.backward([d1, d2])
    assert isinstance(dXs, list) and len(dXs) == 2
    W = layer.parameters["W"].copy()
    Z1, Z2 = layer.derived_variables["Z"]
    g1 = ref.dense_backward_ref(X1, W, Z1, d1, "relu")
    g2 = ref.dense_backward_ref(X2, W, Z2, d2, "relu")
    np.testing.assert_allclose(layer.gradients["W"], g1[1] + g2[1], rtol=1e-12)
    np.testing.assert_allclose(layer.gradients["b"], g1[2] + g2[2], rtol=1e-12)
    layer.update()
    np.testing.assert_allclose(layer.parameters["W"], W - 0.1 * (g1[1] + g2[1]), rtol=1e-12)
    assert not layer.gradients["W"].any() and layer.X == [] and layer.derived_variables["Z"] == []
    # after the flush the next backward writes fresh gradients (no stale accumulation)
    layer.forward(X1)
    layer.backward(d1)
    np.testing.assert_allclose(layer.gradients["W"],
                               ref.dense_backward_ref(X1, layer.parameters["W"],
                                                      layer.derived_variables["Z"][0], d1, "relu")[1],
                               rtol=1e-12)


def test_dense_skip_dx_and_retain_grads_false():
    X, dY = _data((4, 3), np.float64), _data((4, 2), np.float64, seed=1)
    layer = FullyConnected(2, seed=0)
    layer.forward(X)
    assert layer.backward(dY, compute_dX=False) is None
    assert layer.gradients["W"].any()
    layer.flush_gradients()
    layer.forward(X)
    layer.backward(dY, retain_grads=False)
    assert not layer.gradients["W"].any()


def test_dense_validation_leaves_layer_unchanged():
    layer = FullyConnected(3, seed=0)
    layer.forward(_data((4, 5), np.float32))
    W = layer.parameters["W"].copy()
    with pytest.raises(ValueError, match="5 input features"):
        layer.forward(_data((4, 6), np.float32))
    with pytest.raises(TypeError, match="float32"):
        layer.forward(_data((4, 5), np.float64))
    with pytest.raises(TypeError):
        layer.forward(np.ones((4, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="2-D"):
        layer.forward(np.ones(5, np.float32))
    with pytest.raises(ValueError, match="shape"):
        layer.backward(np.ones((4, 4), np.float32))
    np.testing.assert_array_equal(layer.parameters["W"], W)
    with pytest.raises(ValueError, match="n_out"):
        FullyConnected(0)
    with pytest.raises(ValueError, match="init"):
        FullyConnected(3, init="xavier")
    with pytest.raises(ValueError):
        FullyConnected(3, act_fn="swish")
    fresh = FullyConnected(3)
    with pytest.raises(RuntimeError, match="forward"):
        fresh.backward(np.ones((2, 3)))


def test_dense_hyperparameters_and_set_params():
    layer = FullyConnected(4, act_fn="leaky_relu(alpha=0.1)", init="he_normal", seed=5, optimizer="adam")
    hp = layer.hyperparameters
    assert hp["layer"] == "FullyConnected" and hp["n_out"] == 4 and hp["init"] == "he_normal"
    assert parse_activation(hp["act_fn"]) == parse_activation("leaky_relu(alpha=0.1)")
    assert hp["optimizer"]["id"] == "Adam"
    W = np.arange(12, dtype=np.float32).reshape(3, 4)
    other = FullyConnected(4)
    other.set_params({"parameters": {"W": W, "b": np.ones((1, 4), np.float32)}})
    assert other.n_in == 3
    np.testing.assert_array_equal(other.forward(np.eye(3, dtype=np.float32)), W + 1)
    with pytest.raises(ValueError, match="shape"):
        other.set_params({"parameters": {"W": np.ones((2, 4), np.float32)}})
    np.testing.assert_array_equal(other.parameters["W"], W)


@pytest.mark.parametrize("mode", ["glorot_uniform", "glorot_normal", "he_uniform", "he_normal",
                                  "std_normal", "trunc_normal"])
def test_initialisers(mode):
    act = parse_activation("relu")
    W = init_weights(mode, (400, 300), act, np.random.default_rng(0))
    assert W.shape == (400, 300)
    gain = np.sqrt(2.0)
    if mode == "glorot_uniform":
        b = gain * np.sqrt(6 / 700)
        assert np.abs(W).max() <= b and np.isclose(W.std(), b / np.sqrt(3), rtol=0.02)
    elif mode == "he_uniform":
        b = np.sqrt(6 / 400)
        assert np.abs(W).max() <= b and np.isclose(W.std(), b / np.sqrt(3), rtol=0.02)
    elif mode == "glorot_normal":
        std = gain * np.sqrt(2 / 700)
        assert np.abs(W).max() <= 2 * std and np.isclose(W.std(), 0.88 * std, rtol=0.03)
    elif mode == "he_normal":
        std = np.sqrt(2 / 400)
        assert np.abs(W).max() <= 2 * std and np.isclose(W.std(), 0.88 * std, rtol=0.03)
    elif mode == "std_normal":
        assert np.isclose(W.std(), 1.0, rtol=0.02) and np.abs(W).max() > 3
    else:
        assert np.abs(W).max() <= 2.0 and np.isclose(W.std(), 0.88, rtol=0.03)
    # seeded layers: same seed, same weights; float32 holds the rounded float64 draw
    a = FullyConnected(7, init=mode, seed=11)
    b = FullyConnected(7, init=mode, seed=11)
    a.forward(np.zeros((2, 5), np.float32))
    b.forward(np.zeros((2, 5), np.float64))
    np.testing.assert_array_equal(a.parameters["W"], b.parameters["W"].astype(np.float32))


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_matches_torch_linear(dtype):
    X = _data((32, 20), dtype)
    dY = _data((32, 10), dtype, seed=1)
    layer = FullyConnected(10, act_fn="relu", seed=0)
    Y = layer.forward(X)
    lin = torch.nn.Linear(20, 10).to(getattr(torch, np.dtype(dtype).name))
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(layer.parameters["W"].T.copy()))
        lin.bias.copy_(torch.from_numpy(layer.parameters["b"].reshape(-1).copy()))
    Xt = torch.from_numpy(X).requires_grad_(True)
    Yt = torch.relu(lin(Xt))
    Yt.backward(torch.from_numpy(dY))
    dX = layer.backward(dY)
    tol = TOL[dtype] if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(Y, Yt.detach().numpy(), **tol)
    np.testing.assert_allclose(dX, Xt.grad.numpy(), **tol)
    np.testing.assert_allclose(layer.gradients["W"], lin.weight.grad.numpy().T, **tol)
    np.testing.assert_allclose(layer.gradients["b"].reshape(-1), lin.bias.grad.numpy(), **tol)


# ------------------------------------------------------------------ activation layers

LAYERS = [(Identity(), None, None), (ReLU(), "relu", None), (LeakyReLU(), "leaky_relu", 0.3),
          (LeakyReLU(alpha=0.05), "leaky_relu", 0.05), (ELU(), "elu", 1.0), (ELU(alpha=0.5), "elu", 0.5),
          (GELU(), "gelu", None), (GELU(approximate=False), "gelu_exact", None), (Tanh(), "tanh", None),
          (Sigmoid(), "sigmoid", None)]


def _ids(v):
    return repr(v) if not isinstance(v, (str, float, type(None))) else ""


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer,name,alpha", LAYERS, ids=_ids)
@pytest.mark.parametrize("shape", [(3,), (4, 5), (50, 30, 40)])
def test_activation_layers_vs_reference(dtype, layer, name, alpha, shape):
    layer.flush_gradients()
    X = (_data(shape, dtype) * 3).astype(dtype)
    dY = _data(shape, dtype, seed=1)
    Y = layer.forward(X)
    assert Y.shape == X.shape and Y.dtype == dtype
    np.testing.assert_allclose(Y, ref.act_ref(name, X, alpha), **TOL[dtype])
    dX = layer.backward(dY)
    np.testing.assert_allclose(dX, dY * ref.act_grad_ref(name, X, alpha), **TOL[dtype])
    # numpy-ml activation-object API
    np.testing.assert_allclose(layer.fn(X), Y, rtol=0, atol=0)
    np.testing.assert_allclose(layer.grad(X), ref.act_grad_ref(name, X, alpha), **TOL[dtype])
    assert parse_activation(layer) == layer.activation


@pytest.mark.parametrize("layer,name,alpha", LAYERS[1:], ids=_ids)
def test_activation_finite_differences(layer, name, alpha):
    layer.flush_gradients()
    X = np.random.default_rng(0).normal(size=(4, 5)) * 2
    X[np.abs(X) < 1e-3] = 0.5  # keep away from kinks
    dY = np.random.default_rng(1).normal(size=(4, 5))
    layer.forward(X)
    dX = layer.backward(dY)
    num = ref.numerical_grad(lambda: float((layer.fn(X) * dY).sum()), X)
    np.testing.assert_allclose(dX, num, rtol=1e-6, atol=1e-8)


@needs_torch
@pytest.mark.parametrize("layer,fn", [
    (ReLU(), lambda t: torch.relu(t)), (LeakyReLU(0.3), lambda t: torch.nn.functional.leaky_relu(t, 0.3)),
    (ELU(1.0), lambda t: torch.nn.functional.elu(t)),
    (GELU(), lambda t: torch.nn.functional.gelu(t, approximate="tanh")),
    (GELU(approximate=False), lambda t: torch.nn.functional.gelu(t)), (Tanh(), torch.tanh),
    (Sigmoid(), torch.sigmoid), (Softmax(), lambda t: torch.softmax(t, dim=-1))])
def test_activations_match_torch(layer, fn):
    layer.flush_gradients()
    X = _data((16, 9), np.float64) * 3
    dY = _data((16, 9), np.float64, seed=1)
    Xt = torch.from_numpy(X).requires_grad_(True)
    Yt = fn(Xt)
    Yt.backward(torch.from_numpy(dY))
    np.testing.assert_allclose(layer.forward(X), Yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.backward(dY), Xt.grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", [Tanh, Sigmoid])
def test_tanh_and_sigmoid_backward_from_their_output(cls, dtype, monkeypatch):
    """Tanh and Sigmoid differentiate from their retained output (``1 - y**2``,
    ``y * (1 - y)``: no exp evaluated again), bit for bit what the slope from ``z`` gives
    (the same formulas), NaN and +-inf included; per retained forward call (a list of
    gradients), serial and parallel sizes; inference retains nothing."""
    from nbnet.layers.base import LayerBase

    called = []
    kernel = LayerBase._kernel
    monkeypatch.setattr(LayerBase, "_kernel", lambda self, op: (called.append(op),
                                                                 kernel(self, op))[1])
    rng = np.random.default_rng(0)
    for shape in [(7, 5), (600, 700)]:  # serial and parallel loops
        layer = cls()
        Xs = [(rng.normal(size=shape) * 6).astype(dtype) for _ in range(2)]
        Xs[0].flat[:5] = [np.nan, np.inf, -np.inf, 0.0, -0.0]
        dYs = [rng.normal(size=shape).astype(dtype) for _ in range(2)]
        layer.forward(Xs[1], retain_derived=False)
        assert layer.derived_variables.get("Y", []) == []
        Ys = [layer.forward(X) for X in Xs]
        assert all(a is b for a, b in zip(layer.derived_variables["Y"], Ys))
        called.clear()
        dXs = layer.backward(dYs)
        assert "act_backward_from_output" in called and "act_backward" not in called
        for X, dY, dX in zip(Xs, dYs, dXs):
            from_z = layer.grad(X) * dY  # the slope kernel from z, then the product
            np.testing.assert_array_equal(dX, from_z)
            assert dX.dtype == dtype


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
@pytest.mark.parametrize("make", [lambda act: FullyConnected(9, act_fn=act, seed=3),
                                  lambda act: BatchNorm1D(act_fn=act)])
def test_dense_and_normalization_act_fn_backward_from_their_output(make, act, monkeypatch):
    """A dense or normalization layer whose act_fn is tanh or the sigmoid (run as a pass of
    its own on CPU) retains its output and differentiates from it: the output op is the
    one called, and every gradient is bit for bit what the slope from z gives (the
    layer's z path, SLOPE_FROM_OUTPUT emptied); two retained forward calls, serial and
    parallel sizes, float32 and float64."""
    from nbnet.layers import activation, dense, normalization
    from nbnet.layers.base import LayerBase

    called = []
    kernel = LayerBase._kernel
    monkeypatch.setattr(LayerBase, "_kernel", lambda self, op: (called.append(op),
                                                                kernel(self, op))[1])
    rng = np.random.default_rng(2)
    for dtype in (np.float32, np.float64):
        for rows in (6, 40000):  # serial and parallel loops
            Xs = [(rng.normal(size=(rows, 9)) * 3).astype(dtype) for _ in range(2)]
            dYs = [rng.normal(size=(rows, 9)).astype(dtype) for _ in range(2)]
            results = []
            for from_output in (True, False):
                with monkeypatch.context() as m:
                    if not from_output:
                        for mod in (activation, dense, normalization):
                            m.setattr(mod, "SLOPE_FROM_OUTPUT", frozenset())
                    layer = make(act)
                    Ys = [layer.forward(X) for X in Xs]
                    if from_output:
                        assert all(a is b for a, b in zip(layer.derived_variables["Y"], Ys))
                    called.clear()
                    dXs = layer.backward(dYs)
                    assert ("act_backward_from_output" in called) == from_output
                    assert ("act_backward" in called) != from_output
                    results.append(dXs + [layer.gradients[k].copy()
                                          for k in sorted(layer.gradients)])
            for a, b in zip(*results):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cls", [ReLU, Tanh, Sigmoid])
def test_activation_backward_rejects_bad_gradients_and_keeps_its_state(cls):
    """A gradient of the wrong shape, a non-float one, or one too many gets one clear
    error; what forward retained (the input, and Tanh's and Sigmoid's output) stays, and
    a correct backward afterwards gives the right answer."""
    layer = cls()
    with pytest.raises(RuntimeError, match="without a retained forward"):
        layer.backward(np.ones((4, 3)))
    X = _data((4, 3), np.float64)
    dY = _data((4, 3), np.float64, seed=1)
    Y = layer.forward(X)
    kept = (list(layer.X), {k: list(v) for k, v in layer.derived_variables.items()})
    with pytest.raises(ValueError, match=r"shape of the layer's output \(4, 3\), got \(3, 4\)"):
        layer.backward(np.ones((3, 4)))
    with pytest.raises((TypeError, ValueError), match="dLdy"):
        layer.backward(np.ones((4, 3), np.int64))
    with pytest.raises(ValueError, match="2 gradient"):
        layer.backward([dY, dY])
    assert [a is b for a, b in zip(layer.X, kept[0])] == [True]
    assert {k: [id(a) for a in v] for k, v in layer.derived_variables.items()} == \
        {k: [id(a) for a in v] for k, v in kept[1].items()}
    np.testing.assert_array_equal(layer.backward(dY), dY * layer.grad(X))
    np.testing.assert_array_equal(layer.forward(X, retain_derived=False), Y)


def test_activation_nan_propagates():
    X = np.array([[np.nan, 1.0, -1.0]], np.float32)
    for layer in (ReLU(), LeakyReLU(), ELU(), Tanh(), Sigmoid(), GELU()):
        Y = layer.forward(X)
        assert np.isnan(Y[0, 0]) and np.isfinite(Y[0, 1:]).all()
        dX = layer.backward(np.ones_like(X))
        assert np.isnan(dX[0, 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_slopes_at_extreme_inputs(dtype):
    """Far from 0 every smooth activation's slope is exactly its limit (1 or 0), never NaN:
    GELU(tanh)'s z**3 overflows float32 from |z| ~ 7e12 (float64 from ~6e102), which made
    the gradient inf * 0 = NaN (as PyTorch's float32 GELU backward still does)."""
    big = [1e4, 1e13, 1e30, float(np.finfo(np.float32).max)]
    if dtype == np.float64:
        big += [1e200, float(np.finfo(np.float64).max)]
    z = np.array([-b for b in big] + big, dtype)[None, :]
    n = len(big)
    limits = {"elu": (0.0, 1.0), "gelu": (0.0, 1.0), "gelu_exact": (0.0, 1.0), "tanh": (0.0, 0.0),
              "sigmoid": (0.0, 0.0)}
    for layer, name, alpha in LAYERS:
        if name not in limits:
            continue
        layer.flush_gradients()
        layer.forward(z)
        dX = layer.backward(np.ones_like(z))
        neg, pos = limits[name]
        assert np.array_equal(dX[0, :n], np.full(n, neg, dtype)), (name, dX)
        assert np.array_equal(dX[0, n:], np.full(n, pos, dtype)), (name, dX)
    # the fused epilogue (normalization layers' act_fn): z = xhat * scaler + 1e30
    X = np.random.default_rng(0).normal(size=(64, 3)).astype(dtype)
    dY = np.random.default_rng(1).normal(size=(64, 3)).astype(dtype)
    fused, plain = BatchNorm1D(act_fn="gelu"), BatchNorm1D()
    for layer in (fused, plain):
        layer.forward(X, retain_derived=False)
        layer.set_params({"parameters": {"intercept": np.full(3, 1e30, dtype)}})
        layer.forward(X)
    # slope 1: the identity's gradient (the fused path computes it in float64, so to rounding)
    np.testing.assert_allclose(fused.backward(dY), plain.backward(dY), **TOL[dtype])


# ------------------------------------------------------------------ Softmax

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", [((5, 7), -1), ((3, 4, 6), -1), ((3, 4, 6), 1), ((6, 4), 0)])
def test_softmax_vs_reference(dtype, shape, dim):
    layer = Softmax(dim=dim)
    X = _data(shape, dtype) * 4
    dY = _data(shape, dtype, seed=1)
    Y = layer.forward(X)
    np.testing.assert_allclose(Y, ref.softmax_ref(X, dim), **TOL[dtype])
    np.testing.assert_allclose(layer.backward(dY), ref.softmax_backward_ref(X, dY, dim), **TOL[dtype])


def test_softmax_is_stable_and_finite_differences():
    layer = Softmax()
    X = np.array([[1e4, 1e4 - 1, -1e4], [-1e30, 0.0, 1e30]], np.float32)
    Y = layer.forward(X, retain_derived=False)
    assert np.isfinite(Y).all()
    np.testing.assert_allclose(Y.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(Y[0], ref.softmax_ref(X.astype(np.float64))[0], rtol=1e-6)
    X = np.random.default_rng(0).normal(size=(3, 5))
    dY = np.random.default_rng(1).normal(size=(3, 5))
    layer.forward(X)
    num = ref.numerical_grad(lambda: float((layer.fn(X) * dY).sum()) if hasattr(layer, "fn")
                             else float((layer.forward(X, retain_derived=False) * dY).sum()), X)
    np.testing.assert_allclose(layer.backward(dY), num, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ Dropout, Flatten

@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout(dtype):
    X = _data((200, 50), dtype)
    dY = _data((200, 50), dtype, seed=1)
    p = 0.3
    layer = Dropout(p, seed=42)
    Y = layer.forward(X)
    mask = layer.derived_variables["mask"][0].astype(bool)
    assert 0.65 < mask.mean() < 0.75
    np.testing.assert_allclose(Y, ref.dropout_ref(X, mask, p), **TOL[dtype])
    np.testing.assert_allclose(layer.backward(dY), ref.dropout_ref(dY, mask, p), **TOL[dtype])
    # same seed, same masks; inference is the identity
    again = Dropout(p, seed=42)
    np.testing.assert_array_equal(again.forward(X), Y)
    assert again.forward(X, retain_derived=False) is X or np.array_equal(again.forward(X, retain_derived=False), X)
    again.eval()
    np.testing.assert_array_equal(again.forward(X), X)
    # the expectation is preserved (inverted dropout)
    big = np.ones((1000, 100), dtype)
    assert abs(Dropout(0.5, seed=0).forward(big).mean() - 1.0) < 0.02
    with pytest.raises(ValueError, match="p"):
        Dropout(1.0)
    with pytest.raises(ValueError, match="p"):
        Dropout(-0.1)


def test_dropout_p_zero_is_identity_in_training():
    X = _data((4, 3), np.float64)
    layer = Dropout(0.0)
    np.testing.assert_array_equal(layer.forward(X), X)
    np.testing.assert_array_equal(layer.backward(X), X)


def test_flatten():
    X = _data((4, 3, 2, 5), np.float32)
    layer = Flatten()
    Y = layer.forward(X)
    assert Y.shape == (4, 30)
    dX = layer.backward(Y * 2)
    assert dX.shape == X.shape
    np.testing.assert_array_equal(dX, X * 2)
    assert Flatten("last").forward(X, retain_derived=False).shape == (24, 5)
    assert Flatten(-1).forward(X, retain_derived=False).shape == (1, 120)
    with pytest.raises(ValueError):
        Flatten("middle")


@pytest.mark.parametrize("keep_dim, out_shape", [("first", (4, 30)), ("last", (24, 5)),
                                                 (-1, (1, 120))])
def test_flatten_backward_needs_the_output_shape(keep_dim, out_shape):
    """A gradient with as many values but another shape (transposed, or the input's own
    shape) is an error naming both shapes, not a silent reshape that mixes examples."""
    X = _data((4, 3, 2, 5), np.float32)
    layer = Flatten(keep_dim)
    assert layer.forward(X).shape == out_shape
    for bad in (np.ones(out_shape[::-1], np.float32), np.ones(X.shape, np.float32),
                np.ones((X.size,), np.float32)):
        with pytest.raises(ValueError, match=r"must have the shape forward returned"):
            layer.backward(bad)
    dY = _data(out_shape, np.float32, seed=3)
    np.testing.assert_array_equal(layer.backward(dY), dY.reshape(X.shape))
    # empty batches keep their trailing size
    E = np.zeros((0, 3, 2, 5), np.float32)
    assert Flatten(keep_dim).forward(E, retain_derived=False).shape == \
        {"first": (0, 30), "last": (0, 5), -1: (1, 0)}[keep_dim]


# ---------------------------------------------------------------- vectorisable CPU math
def _vector_math_eval():
    """Loops over (exp, expm1, tanh, erf) of vector_math: the float64 ones and the float32 ones."""
    from numba import njit
    from nbnet.kernels.cpu.vector_math import (verf, verf32, vexp, vexp32, vexpm1, vexpm1_32,
                                               vtanh, vtanh32)

    def make(exp, expm1, tanh, erf):
        @njit
        def run(which, x, out):
            for i in range(x.shape[0]):
                if which == 0:
                    out[i] = exp(x[i])
                elif which == 1:
                    out[i] = expm1(x[i])
                elif which == 2:
                    out[i] = tanh(x[i])
                else:
                    out[i] = erf(x[i])
        return run

    return make(vexp, vexpm1, vtanh, verf), make(vexp32, vexpm1_32, vtanh32, verf32)


@pytest.mark.parametrize("which,ref,max_ulp", [(0, math.exp, 1), (1, math.expm1, 4), (2, math.tanh, 4),
                                              (3, math.erf, 16)])
def test_vector_math_matches_libm(which, ref, max_ulp):
    """The CPU activations' exp/expm1/tanh/erf (nbnet/kernels/cpu/vector_math.py) agree with the
    C library over the whole float64 range: within a few ulp for normal results, one
    subnormal step below, inf/0/-1 at the ends, NaN for NaN and the sign of zero kept."""
    rng = np.random.default_rng(11)
    x = np.concatenate([
        rng.uniform(-750, 750, 100_000), rng.uniform(-2, 2, 100_000), rng.uniform(-7, 7, 100_000),
        10.0 ** rng.uniform(-310, 0, 4000) * rng.choice([-1, 1], 4000),
        [0.0, -0.0, np.inf, -np.inf, np.nan, 709.782712893384, 709.7827128933841,
         -745.1332191019411, -745.1332191019412, -708.5, 0.34657359027997264,
         -0.34657359027997264, 0.3465735902799727, 19.06, -20.0, 20.5, 5e-324, 2.0, -2.0,
         1.9999999999, 6.0, -5.9999]])

    def expected(v):
        try:
            return ref(v)
        except OverflowError:
            return math.inf

    want = np.array([expected(v) for v in x])
    got = np.empty_like(x)
    _vector_math_eval()[0](which, x, got)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ends = np.isinf(want) | (want == 0) | (np.abs(want) == 1)
    assert np.array_equal(got[ends], want[ends])
    assert np.array_equal(np.signbit(got[want == 0]), np.signbit(want[want == 0]))
    normal = np.isfinite(want) & (np.abs(want) >= np.finfo(np.float64).tiny)
    ulps = np.abs(got[normal] - want[normal]) / np.spacing(np.abs(want[normal]))
    assert ulps.max() <= max_ulp
    sub = np.isfinite(want) & (np.abs(want) < np.finfo(np.float64).tiny) & (want != 0)
    assert np.all(np.abs(got[sub] - want[sub]) <= 5e-324)


@pytest.mark.parametrize("which,ref,max_ulp", [(0, math.exp, 2), (1, math.expm1, 4), (2, math.tanh, 4),
                                              (3, math.erf, 5)])
def test_vector_math_float32_matches_libm(which, ref, max_ulp):
    """The float32 versions (the activation layers' float32 arithmetic) against the C
    library's float64 result, over the whole float32 range: within a few float32 ulp of
    the exact value (measured: 1.0, 3.6, 2.7; erf 4.15 over every float32 in [1e-30,
    3.92], at |x| < 0.5, where PyTorch's float32 erf, good to ~1e-7 absolute, is off by
    thousands of ulp), the float32 ends exactly (overflow to inf, 0, +-1), subnormal
    results within one step, NaN for NaN, the sign of zero kept."""
    rng = np.random.default_rng(12)
    x = np.concatenate([
        rng.uniform(-110, 95, 100_000), rng.uniform(-2, 2, 100_000), rng.uniform(-7, 7, 100_000),
        10.0 ** rng.uniform(-45, 0, 4000) * rng.choice([-1, 1], 4000),
        [0.0, -0.0, np.inf, -np.inf, np.nan, 88.72283, 88.72284, -87.4, -103.97207, -103.9721,
         0.34657, -0.34658, 2.0, -2.0, 3.92, 4.0, -4.0, 10.0, -10.0, 1e-45]]).astype(np.float32)
    if which == 3:  # every 512th float32 in [0.01, 1): where erf's rounding is worst
        bits = np.arange(np.float32(0.01).view(np.int32), np.float32(1.0).view(np.int32), 512,
                         dtype=np.int32)
        x = np.concatenate([x, bits.view(np.float32)])

    def exact(v):
        try:
            return ref(float(v))
        except OverflowError:
            return math.inf

    want64 = np.array([exact(v) for v in x])
    with np.errstate(over="ignore"):
        want = want64.astype(np.float32)
    got = np.empty_like(x)
    _vector_math_eval()[1](which, x, got)
    assert got.dtype == np.float32
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ends = np.isinf(want) | (want == 0) | (np.abs(want) == 1)
    assert np.array_equal(got[ends], want[ends])
    assert np.array_equal(np.signbit(got[want == 0]), np.signbit(want[want == 0]))
    tiny = np.finfo(np.float32).tiny
    normal = np.isfinite(want) & (np.abs(want) >= tiny) & ~ends
    ulps = np.abs(got[normal] - want64[normal]) / np.spacing(np.abs(want[normal])).astype(np.float64)
    assert ulps.max() <= max_ulp
    sub = np.isfinite(want) & (np.abs(want) < tiny) & (want != 0)
    assert sub.any() or which != 0
    assert np.all(np.abs(got[sub].astype(np.float64) - want64[sub]) <= np.spacing(np.float32(0)))

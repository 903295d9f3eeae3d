"""Issue 2: BatchNorm1D and LayerNorm1D against float64 references, PyTorch, finite
differences; stability, determinism, caching, bad input."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import nbnet
from conftest import TOL, rel_err
from reference import layernorm_ref, norm_backward_ref, norm_forward_ref

SHAPES = [(2, 1), (2, 5), (7, 1), (33, 1031), (1000, 3), (513, 70)]
DTYPES = [np.float64, np.float32]


def _bn_ref(X, dY, gamma, beta, eps):
    Y, mean, var = norm_forward_ref(X, (0,), gamma, beta, eps)
    dX, dg, db = norm_backward_ref(X, dY, (0,), gamma, beta, eps, param_axes=(0,))
    return Y, dX, dg, db, mean.ravel(), var.ravel()


def _ln_ref(X, dY, gamma, beta, eps):
    Y, _, _ = layernorm_ref(X, gamma, beta, eps)
    dX, dg, db = norm_backward_ref(X, dY, (1,), gamma, beta, eps, param_axes=(0,))
    return Y, dX, dg, db


def _random_params(layer, rng, dtype):
    """Non-trivial scaler/intercept so the tests see them."""
    C = layer.n_in
    layer.set_params({"parameters": {"scaler": rng.uniform(0.5, 1.5, C).astype(dtype),
                                     "intercept": rng.normal(size=C).astype(dtype)}})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm1d_matches_reference(shape, dtype, rng):
    X = rng.normal(2.0, 3.0, shape).astype(dtype)
    dY = rng.normal(size=shape).astype(dtype)
    layer = nbnet.BatchNorm1D(momentum=0.8, epsilon=1e-3)
    layer.forward(X[:2])  # build, then set random parameters
    layer.flush_gradients()
    layer.reset_running_stats()
    _random_params(layer, rng, dtype)
    gamma = layer.parameters["scaler"].copy()
    beta = layer.parameters["intercept"].copy()
    Y = layer.forward(X)
    dX = layer.backward(dY)
    Yr, dXr, dgr, dbr, mean, var = _bn_ref(X, dY, gamma, beta, 1e-3)
    tol = TOL[dtype]
    assert Y.dtype == dtype and dX.dtype == dtype
    assert rel_err(Y, Yr) < tol
    # dX = gamma * invstd * (dY - mean(dY) - xhat * mean(dY * xhat)) is a difference of
    # terms of size |gamma * invstd * dY|; float32 kernels compute it in float32, so the
    # error is relative to those terms. With N == 2 the terms cancel almost exactly (dX is
    # ~1e-6 of them), and a max-relative-to-dX check would demand more than float32 holds.
    terms = np.abs(gamma * dY.astype(np.float64)) / np.sqrt(var + 1e-3)
    assert np.abs(dX - dXr).max() <= tol * 10 * max(np.abs(dXr).max(), terms.max())
    assert rel_err(dX, dXr) < tol * 10 or shape[0] == 2
    assert rel_err(layer.gradients["scaler"], dgr) < tol * 10
    assert rel_err(layer.gradients["intercept"], dbr) < tol * 10
    assert rel_err(layer.parameters["running_mean"], 0.2 * mean) < tol
    assert rel_err(layer.parameters["running_var"], 0.8 + 0.2 * var) < tol


@pytest.mark.parametrize("shape", [(7, 1), (33, 1031), (1000, 3), (513, 70)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act,ref_name,alpha", [("relu", "relu", None),
                                                ("leaky_relu(alpha=0.2)", "leaky_relu", 0.2)])
@pytest.mark.parametrize("make,axis", [(nbnet.BatchNorm1D, 0), (nbnet.LayerNorm1D, 1)])
def test_fused_relu_matches_reference(make, axis, act, ref_name, alpha, shape, dtype, rng):
    """ReLU and leaky ReLU fused into the kernels (selects in X's dtype; the slope formed
    from the same pre-activation as the output), at serial and parallel shapes, with
    several row blocks and chunks."""
    X = rng.normal(0.5, 2.0, shape).astype(dtype)
    dY = rng.normal(size=shape).astype(dtype)
    layer = make(act_fn=act)
    layer.forward(X[:2], retain_derived=False)
    layer.flush_gradients()
    _random_params(layer, rng, dtype)
    gamma = layer.parameters["scaler"].astype(np.float64)
    beta = layer.parameters["intercept"].astype(np.float64)
    Y = layer.forward(X)
    dX = layer.backward(dY)
    Yr, _, var = norm_forward_ref(X, (axis,), gamma, beta, layer.epsilon, ref_name, alpha)
    dXr, dgr, dbr = norm_backward_ref(X, dY, (axis,), gamma, beta, layer.epsilon, ref_name, alpha,
                                      param_axes=(0,))
    tol = TOL[dtype]
    terms = np.abs(gamma * dY.astype(np.float64)) / np.sqrt(var + layer.epsilon)
    assert rel_err(Y, Yr) < tol
    assert np.abs(dX - dXr).max() <= tol * 10 * max(np.abs(dXr).max(), terms.max())
    scale = np.abs(dY).sum(axis=0).max()  # the sums' natural size (cancellation in dgamma)
    assert np.abs(layer.gradients["scaler"] - dgr).max() <= tol * 10 * max(np.abs(dgr).max(), scale)
    assert np.abs(layer.gradients["intercept"] - dbr).max() <= tol * 10 * max(np.abs(dbr).max(), scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm1d_matches_reference(shape, dtype, rng):
    X = rng.normal(-1.0, 2.0, shape).astype(dtype)
    dY = rng.normal(size=shape).astype(dtype)
    layer = nbnet.LayerNorm1D(epsilon=1e-4)
    layer.forward(X[:1], retain_derived=False)
    _random_params(layer, rng, dtype)
    gamma = layer.parameters["scaler"].copy()
    beta = layer.parameters["intercept"].copy()
    Y = layer.forward(X)
    dX = layer.backward(dY)
    Yr, dXr, dgr, dbr = _ln_ref(X, dY, gamma, beta, 1e-4)
    tol = TOL[dtype]
    if shape[1] == 1:  # every row normalises to exactly 0: only the intercept remains
        assert rel_err(Y, Yr) < tol
    else:
        assert rel_err(Y, Yr) < tol
        assert rel_err(dX, dXr) < tol * 10
    assert rel_err(layer.gradients["scaler"], dgr) < tol * 10 or np.abs(dgr).max() < 1e-12
    assert rel_err(layer.gradients["intercept"], dbr) < tol * 10


def test_unbiased_running_var_and_inference(rng):
    X = rng.normal(1.0, 2.0, (50, 4))
    layer = nbnet.BatchNorm1D(momentum=0.0, unbiased_running_var=True)
    layer.forward(X)
    np.testing.assert_allclose(layer.parameters["running_var"], X.var(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(layer.parameters["running_mean"], X.mean(0), rtol=1e-12)
    # inference (retain_derived=False) uses the running statistics and changes nothing
    before = {k: v.copy() for k, v in layer.parameters.items()}
    X2 = rng.normal(size=(1, 4))  # N == 1 is fine in inference
    Y = layer.forward(X2, retain_derived=False)
    np.testing.assert_allclose(Y, (X2 - X.mean(0)) / np.sqrt(X.var(0, ddof=1) + 1e-5), rtol=1e-12)
    for k in before:
        np.testing.assert_array_equal(before[k], layer.parameters[k])
    # a frozen layer and eval() mode also run inference
    layer.freeze()
    np.testing.assert_array_equal(layer.forward(X2), Y)
    layer.unfreeze()
    layer.eval()
    np.testing.assert_array_equal(layer.forward(X2), Y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inference_statistics_kernel_matches_numpy_bit_for_bit(dtype, rng):
    """The CPU running_invstd kernel (one call per inference forward) gives the bits of
    the NumPy expression it replaced, float64 from either parameter dtype; an inference
    forward after a user edits the running statistics in place sees the edit."""
    from nbnet.registry import get_kernel
    rm = rng.normal(size=37).astype(dtype)
    rv = (rng.uniform(1e-6, 1e3, 37)).astype(dtype)
    mean, invstd = np.empty(37), np.empty(37)
    get_kernel("running_invstd", "cpu")(37, rm, rv, 1e-5, mean, invstd)
    np.testing.assert_array_equal(mean, rm.astype(np.float64))
    np.testing.assert_array_equal(invstd, 1.0 / np.sqrt(rv.astype(np.float64) + 1e-5))
    layer = nbnet.BatchNorm1D()
    X = rng.normal(size=(16, 37)).astype(dtype)
    layer.forward(X)
    layer.parameters["running_mean"][:] = rm
    layer.parameters["running_var"][:] = rv
    Y = layer.forward(X, retain_derived=False)
    ref = (X.astype(np.float64) - rm.astype(np.float64)) / np.sqrt(rv.astype(np.float64) + 1e-5)
    assert rel_err(Y, ref) < TOL[dtype]


def test_default_parameters_and_momentum_convention(rng):
    X = rng.normal(size=(20, 3))
    layer = nbnet.BatchNorm1D()
    layer.forward(X)
    np.testing.assert_array_equal(layer.parameters["scaler"], np.ones(3))
    np.testing.assert_array_equal(layer.parameters["intercept"], np.zeros(3))
    # numpy-ml: running = 0.9 * running + 0.1 * batch, from mean 0 / var 1
    np.testing.assert_allclose(layer.parameters["running_mean"], 0.1 * X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(layer.parameters["running_var"], 0.9 + 0.1 * X.var(0), rtol=1e-12)


# ----------------------------------------------------------------- torch agreement
torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm1d_matches_torch(dtype, rng):
    X = rng.normal(3.0, 2.0, (64, 17)).astype(dtype)
    dY = rng.normal(size=X.shape).astype(dtype)
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    ours = nbnet.BatchNorm1D(momentum=0.9, unbiased_running_var=True)
    theirs = torch.nn.BatchNorm1d(17, momentum=0.1, eps=1e-5).to(tdtype)
    Y = ours.forward(X)
    dX = ours.backward(dY)
    tX = torch.tensor(X, requires_grad=True)
    tY = theirs(tX)
    tY.backward(torch.tensor(dY))
    tol = TOL[dtype] * 100
    assert rel_err(Y, tY.detach().numpy()) < tol
    assert rel_err(dX, tX.grad.numpy()) < tol
    assert rel_err(ours.gradients["scaler"], theirs.weight.grad.numpy()) < tol
    assert rel_err(ours.gradients["intercept"], theirs.bias.grad.numpy()) < tol
    assert rel_err(ours.parameters["running_mean"], theirs.running_mean.numpy()) < tol
    assert rel_err(ours.parameters["running_var"], theirs.running_var.numpy()) < tol
    theirs.eval()
    X2 = rng.normal(size=(5, 17)).astype(dtype)
    assert rel_err(ours.forward(X2, retain_derived=False), theirs(torch.tensor(X2)).detach().numpy()) < tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm1d_matches_torch(dtype, rng):
    X = rng.normal(3.0, 2.0, (31, 40)).astype(dtype)
    dY = rng.normal(size=X.shape).astype(dtype)
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    ours = nbnet.LayerNorm1D()
    theirs = torch.nn.LayerNorm(40, eps=1e-5).to(tdtype)
    Y = ours.forward(X)
    dX = ours.backward(dY)
    tX = torch.tensor(X, requires_grad=True)
    theirs(tX).backward(torch.tensor(dY))
    tol = TOL[dtype] * 100
    assert rel_err(Y, theirs(tX).detach().numpy()) < tol
    assert rel_err(dX, tX.grad.numpy()) < tol
    assert rel_err(ours.gradients["scaler"], theirs.weight.grad.numpy()) < tol
    assert rel_err(ours.gradients["intercept"], theirs.bias.grad.numpy()) < tol


# ----------------------------------------------------------------- finite differences
def _fd_check(make_layer, X, rng, param_names):
    """Central differences of L = sum(W * y) w.r.t. X and parameters (float64)."""
    W = rng.normal(size=X.shape)  # random upstream gradient: all-ones zeroes BN's dX
    layer = make_layer()
    layer.forward(X[:2])
    layer.flush_gradients()
    C = layer.n_in
    layer.set_params({"parameters": {"scaler": rng.uniform(0.5, 1.5, C), "intercept": rng.normal(size=C)}})
    if hasattr(layer, "reset_running_stats"):
        layer.reset_running_stats()

    def loss(x):
        return float(np.sum(W * layer.forward(x)))

    layer.forward(X)
    dX = layer.backward(W)
    grads = {k: layer.gradients[k].copy() for k in param_names}
    layer.flush_gradients()
    h = 1e-6
    num = np.zeros_like(X)
    for idx in np.ndindex(X.shape):
        xp, xm = X.copy(), X.copy()
        xp[idx] += h
        xm[idx] -= h
        num[idx] = (loss(xp) - loss(xm)) / (2 * h)
        layer.flush_gradients()
    assert rel_err(dX, num) < 1e-6
    for k in param_names:
        p = layer.parameters[k]
        numk = np.zeros_like(p)
        for i in range(p.size):
            old = p[i]
            p[i] = old + h
            lp = loss(X)
            p[i] = old - h
            lm = loss(X)
            p[i] = old
            numk[i] = (lp - lm) / (2 * h)
            layer.flush_gradients()
        assert rel_err(grads[k], numk) < 1e-6


@pytest.mark.parametrize("act", [None, "tanh", "gelu"])
def test_batchnorm1d_finite_differences(act, rng):
    _fd_check(lambda: nbnet.BatchNorm1D(act_fn=act), rng.normal(1.0, 2.0, (9, 4)), rng, ["scaler", "intercept"])


@pytest.mark.parametrize("act", [None, "sigmoid"])
def test_layernorm1d_finite_differences(act, rng):
    _fd_check(lambda: nbnet.LayerNorm1D(act_fn=act), rng.normal(1.0, 2.0, (5, 6)), rng, ["scaler", "intercept"])


# ----------------------------------------------------------------- stability
def test_stability_float32_mean_1e4(rng):
    X = rng.normal(1e4, 1.0, (4096, 64)).astype(np.float32)
    layer = nbnet.BatchNorm1D(momentum=0.0)
    Y = layer.forward(X)
    true_var = X.astype(np.float64).var(0)
    assert np.max(np.abs(layer.parameters["running_var"] - true_var) / true_var) <= 1e-4
    assert np.max(np.abs(Y.astype(np.float64).mean(0))) <= 1e-3
    ln = nbnet.LayerNorm1D()
    Yl = ln.forward(X)
    assert np.max(np.abs(Yl.astype(np.float64).mean(1))) <= 1e-3
    np.testing.assert_allclose(Yl.astype(np.float64).var(1), 1.0, rtol=1e-2)


@pytest.mark.parametrize("scale", [1e19, 1e30])
@pytest.mark.parametrize("shape", [(513, 70), (4096, 64)])  # serial and parallel kernels
def test_float32_extreme_scale_matches_reference(scale, shape, rng):
    """float32 data with a standard deviation of 1e19 and 1e30 (the squares of its deviations
    pass float32's 3.4e38; the variance 1e60 is not even a float32) normalise and
    differentiate like float64: the overflowed float32 sums are taken again in float64,
    and dX never forms invstd**2 (1e-60) as a float32 factor. Before: every output 0."""
    X = (rng.normal(1.0, 1.0, shape) * scale).astype(np.float32)
    dY = rng.normal(size=shape).astype(np.float32)
    assert np.isfinite(X).all()
    for make, ref in ((nbnet.BatchNorm1D, _bn_ref), (nbnet.LayerNorm1D, _ln_ref)):
        layer = make()
        layer.forward(X[:2], retain_derived=False)  # build, then set random parameters
        _random_params(layer, rng, np.float32)
        p = {k: v.astype(np.float64) for k, v in layer.parameters.items()}
        Y = layer.forward(X)
        dX = layer.backward(dY)
        Yr, dXr, dgr, dbr = ref(X.astype(np.float64), dY, p["scaler"], p["intercept"],
                                layer.epsilon)[:4]
        assert rel_err(Y, Yr) < 1e-5, make.__name__
        assert rel_err(dX, dXr) < 1e-5, make.__name__
        assert rel_err(layer.gradients["scaler"], dgr) < 1e-5, make.__name__
        assert rel_err(layer.gradients["intercept"], dbr) < 1e-5, make.__name__
        if make is nbnet.BatchNorm1D and scale == 1e19:  # var ~2e38: still a float32
            var = X.astype(np.float64).var(0)
            assert rel_err(layer.parameters["running_var"], 0.9 + 0.1 * var) < 1e-5


def test_stability_float64_mean_1e8(rng):
    X = rng.normal(1e8, 1.0, (4096, 64))
    layer = nbnet.BatchNorm1D(momentum=0.0)
    layer.forward(X)
    true_var = ((X - X.mean(0)) ** 2).mean(0)
    assert np.max(np.abs(layer.parameters["running_var"] - true_var) / true_var) <= 1e-6


# ----------------------------------------------------------------- layout, lists
def test_noncontiguous_and_fortran_inputs_match_contiguous(rng):
    X = rng.normal(size=(40, 30))
    for make in (nbnet.BatchNorm1D, nbnet.LayerNorm1D):
        a, b, c = make(), make(), make()
        ya = a.forward(np.ascontiguousarray(X))
        yb = b.forward(np.asfortranarray(X))
        Xbig = np.zeros((80, 30))
        Xbig[::2] = X
        yc = c.forward(Xbig[::2])
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(ya, yc)
        dY = rng.normal(size=X.shape)
        np.testing.assert_array_equal(a.backward(dY), b.backward(np.asfortranarray(dY)))


def test_backward_list_of_gradients(rng):
    X1, X2 = rng.normal(size=(10, 3)), rng.normal(size=(12, 3))
    d1, d2 = rng.normal(size=(10, 3)), rng.normal(size=(12, 3))
    multi = nbnet.BatchNorm1D()
    multi.forward(X1)
    multi.forward(X2)
    dxs = multi.backward([d1, d2])
    single = nbnet.BatchNorm1D()
    single.forward(X1)
    dx1 = single.backward(d1)
    g1 = single.gradients["scaler"].copy()
    single.flush_gradients()
    single.forward(X2)
    dx2 = single.backward(d2)
    np.testing.assert_array_equal(dxs[0], dx1)
    np.testing.assert_array_equal(dxs[1], dx2)
    np.testing.assert_allclose(multi.gradients["scaler"], g1 + single.gradients["scaler"], rtol=1e-12)
    with pytest.raises(ValueError, match="1 gradient"):
        multi.backward(d1)


def test_update_uses_optimizer_and_flushes(rng):
    X = rng.normal(size=(16, 4))
    dY = rng.normal(size=(16, 4))
    layer = nbnet.BatchNorm1D(optimizer="sgd(lr=0.5)")
    layer.forward(X)
    layer.backward(dY)
    g = layer.gradients["scaler"].copy()
    before = layer.parameters["scaler"].copy()
    rm = layer.parameters["running_mean"].copy()
    layer.update()
    np.testing.assert_allclose(layer.parameters["scaler"], before - 0.5 * g, rtol=1e-12)
    np.testing.assert_array_equal(layer.parameters["running_mean"], rm)  # not a learnt parameter
    assert layer.X == [] and not layer.gradients["scaler"].any()
    layer.freeze()
    with pytest.raises(RuntimeError, match="frozen"):
        layer.update()


def test_summary_set_params_round_trip(rng):
    X = rng.normal(size=(16, 5))
    a = nbnet.BatchNorm1D(momentum=0.7, epsilon=1e-3, optimizer="adam(lr=0.01)", act_fn="relu")
    a.forward(X)
    s = a.summary()
    assert s["layer"] == "BatchNorm1D" and s["hyperparameters"]["momentum"] == 0.7
    json.dumps(s["hyperparameters"])  # hyperparameters are plain JSON
    b = nbnet.BatchNorm1D().set_params(s)
    assert b.momentum == 0.7 and b.epsilon == 1e-3 and str(b.act_fn) == "ReLU"
    for k in a.parameters:
        np.testing.assert_array_equal(a.parameters[k], b.parameters[k])
    np.testing.assert_array_equal(a.forward(X, retain_derived=False), b.forward(X, retain_derived=False))


# ----------------------------------------------------------------- bad input
def _snapshot(layer):
    return {k: v.copy() for k, v in layer.parameters.items()}


def _assert_unchanged(layer, snap):
    assert set(snap) == set(layer.parameters)
    for k, v in snap.items():
        np.testing.assert_array_equal(v, layer.parameters[k])


@pytest.mark.parametrize("make", [nbnet.BatchNorm1D, nbnet.LayerNorm1D])
def test_bad_inputs_change_nothing(make, rng):
    layer = make()
    layer.forward(rng.normal(size=(8, 4)))
    snap = _snapshot(layer)
    n_retained = len(layer.X)
    with pytest.raises(ValueError, match=r"2-D.*\(8,\)"):
        layer.forward(np.zeros(8))
    with pytest.raises(ValueError, match=r"built for 4 features.*\(8, 5\)"):
        layer.forward(np.zeros((8, 5)))
    for bad in (np.zeros((8, 4), np.int64), np.zeros((8, 4), bool), np.zeros((8, 4), np.float16),
                np.zeros((8, 4), np.complex128), np.zeros((8, 4), object)):
        with pytest.raises(TypeError, match=str(bad.dtype)):
            layer.forward(bad)
    with pytest.raises(TypeError, match="float64 parameters"):
        layer.forward(np.zeros((8, 4), np.float32))
    with pytest.raises(ValueError, match=r"shape \(4,\).*\(3,\)"):
        layer.set_params({"parameters": {"scaler": np.ones(3), "intercept": np.zeros(4)}})
    with pytest.raises(ValueError, match="shape of the layer's output"):
        layer.backward(np.zeros((7, 4)))
    assert len(layer.X) == n_retained
    _assert_unchanged(layer, snap)


def test_batchnorm_single_example_training_error(rng):
    layer = nbnet.BatchNorm1D()
    layer.forward(rng.normal(size=(4, 3)))
    snap = _snapshot(layer)
    with pytest.raises(ValueError, match="expected more than 1 value per feature when training"):
        layer.forward(rng.normal(size=(1, 3)))
    _assert_unchanged(layer, snap)
    assert layer.forward(rng.normal(size=(1, 3)), retain_derived=False).shape == (1, 3)


def test_empty_batch(rng):
    for make in (nbnet.BatchNorm1D, nbnet.LayerNorm1D):
        layer = make()
        layer.forward(rng.normal(size=(4, 3)))
        layer.flush_gradients()
        snap = _snapshot(layer)
        Y = layer.forward(np.zeros((0, 3)))
        assert Y.shape == (0, 3)
        _assert_unchanged(layer, snap)
        assert layer.backward(np.zeros((0, 3))).shape == (0, 3)
        assert not layer.gradients["scaler"].any()


def test_nan_propagates_to_affected_features_only(rng):
    X = rng.normal(size=(32, 5))
    X[3, 2] = np.nan
    X[7, 4] = np.inf
    bn = nbnet.BatchNorm1D()
    Y = bn.forward(X)
    assert np.isnan(Y[:, 2]).all() and np.isfinite(Y[:, [0, 1, 3]]).all()
    assert np.isfinite(bn.parameters["running_mean"][[0, 1, 3]]).all()
    # features 2 (NaN) and 4 (Inf) keep their running statistics (the initial 0 and 1)
    for k, initial in (("running_mean", 0.0), ("running_var", 1.0)):
        assert (bn.parameters[k][[2, 4]] == initial).all()
        assert (bn.parameters[k][[0, 1, 3]] != initial).all()
    ln = nbnet.LayerNorm1D()
    Yl = ln.forward(X)
    bad_rows = {3, 7}
    assert all(np.isfinite(Yl[i]).all() for i in range(32) if i not in bad_rows)
    assert np.isnan(Yl[3]).all()


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="momentum"):
        nbnet.BatchNorm1D(momentum=1.5)
    with pytest.raises(ValueError, match="epsilon"):
        nbnet.LayerNorm1D(epsilon=-1)
    with pytest.raises(ValueError, match="unknown activation"):
        nbnet.BatchNorm1D(act_fn="swishy")


# ----------------------------------------------------------------- registry / devices
def test_registry_errors():
    from nbnet import registry
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        nbnet.BatchNorm1D(device="tpu")
    with pytest.raises(NotImplementedError, match="no kernel for op 'nope'"):
        registry.get_kernel("nope", "cpu")
    assert "column_partial_stats" in registry.ops("cpu")


def test_unavailable_cuda_error_names_reason(monkeypatch):
    from nbnet import devices
    monkeypatch.setattr(devices, "_cuda_status", (False, "no CUDA GPU or driver was found"))
    with pytest.raises(RuntimeError, match=r"device 'cuda' is not available: no CUDA GPU.*Available devices: cpu"):
        nbnet.BatchNorm1D(device="cuda")
    with pytest.raises(RuntimeError, match="not available"):
        nbnet.set_default_device("cuda")
    assert nbnet.available_devices() == ["cpu"]


def test_default_device_env(tmp_path):
    code = "import nbnet; print(nbnet.get_default_device(), nbnet.BatchNorm1D().device)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "NBNET_DEVICE": "cpu"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["cpu", "cpu"]


# ----------------------------------------------------------------- determinism, caching
_DETERMINISM_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, nbnet
    rng = np.random.default_rng(7)
    out = []
    for make, shape in ((nbnet.BatchNorm1D, (3000, 97)), (nbnet.LayerNorm1D, (700, 301))):
        for dtype in (np.float32, np.float64):
            X = rng.normal(5, 3, shape).astype(dtype)
            dY = rng.normal(size=shape).astype(dtype)
            layer = make(act_fn="gelu")
            Y = layer.forward(X)
            dX = layer.backward(dY)
            out += [Y, dX, layer.gradients["scaler"], layer.gradients["intercept"]]
            out += [v for k, v in sorted(layer.parameters.items())]
    sys.stdout.write(np.concatenate([a.ravel().astype(np.float64) for a in out]).tobytes().hex())
""")


def test_bit_identical_across_thread_counts():
    results = []
    for threads in ("1", "2"):
        # NBNET_SERIAL_CUTOFF=0: every kernel runs its parallel twin, whatever the size
        env = {**os.environ, "NUMBA_NUM_THREADS": threads, "NBNET_SERIAL_CUTOFF": "0"}
        r = subprocess.run([sys.executable, "-c", _DETERMINISM_SCRIPT], env=env,
                           capture_output=True, text=True, check=True)
        results.append(r.stdout)
    assert len(results[0]) > 1000
    assert results[0] == results[1]


def test_layers_on_several_python_threads_at_once(rng):
    """Kernels release the GIL (nogil) and the default threading layer takes parallel
    regions from several threads at once: four threads training their own BatchNorm1D
    and LayerNorm1D on parallel-sized inputs get the bits a single thread gets."""
    import threading

    X = rng.normal(size=(1024, 256)).astype(np.float32)
    dY = rng.normal(size=X.shape).astype(np.float32)

    def run():
        out = []
        for make in (nbnet.BatchNorm1D, nbnet.LayerNorm1D):
            layer = make()
            out.append(layer.forward(X))
            out.append(layer.backward(dY))
            out.append(layer.gradients["scaler"].copy())
        return out

    expected = run()
    results, errors = [None] * 4, []

    def worker(i):
        try:
            for _ in range(5):
                results[i] = run()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got in results:
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)


_CACHE_SCRIPT = textwrap.dedent("""
    import json, numpy as np, nbnet
    from nbnet.kernels.cpu import all_dispatchers
    X = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
    for make in (nbnet.BatchNorm1D, nbnet.LayerNorm1D):
        layer = make()
        layer.forward(X)
        layer.backward(X)
    hits = misses = 0
    for d in all_dispatchers():
        hits += sum(d.stats.cache_hits.values())
        misses += sum(d.stats.cache_misses.values())
    print(json.dumps({"hits": hits, "misses": misses}))
""")


def test_second_process_loads_kernels_from_cache(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    runs = [json.loads(subprocess.run([sys.executable, "-c", _CACHE_SCRIPT], env=env, capture_output=True,
                                      text=True, check=True).stdout.strip().splitlines()[-1]) for _ in range(2)]
    assert runs[0]["misses"] > 0 and runs[0]["hits"] == 0
    assert runs[1]["misses"] == 0 and runs[1]["hits"] == runs[0]["misses"]


_TASK_MODULE = textwrap.dedent("""
    import numpy as np
    from numba import prange
    from nbnet.kernels.cpu._jit import kernel, task_body


    @task_body
    def _scale_task(k, X, factor, Y):
        if factor < 0.0:
            raise ValueError("negative factor")
        for j in range(X.shape[1]):
            Y[k, j] = X[k, j] * factor


    @kernel
    def scale_rows(X, factor, Y):
        for k in prange(X.shape[0]):
            _scale_task(np.int64(k), X, factor, Y)
""")

_TASK_SCRIPT = textwrap.dedent("""
    import json, sys, warnings, numpy as np
    import taskmod
    X = np.arange(12.0).reshape(4, 3)
    Yp, Ys = np.empty_like(X), np.empty_like(X)
    taskmod.scale_rows.parallel(X, 2.0, Yp)
    taskmod.scale_rows.serial(X, 3.0, Ys)
    try:
        taskmod.scale_rows.serial(X, -1.0, Ys.copy())
        raised = None
    except ValueError as exc:
        raised = str(exc)
    try:
        taskmod._scale_task(np.int64(0), X, 1.0, Ys)
        python_call = None
    except TypeError as exc:
        python_call = str(exc)
    d, t = taskmod.scale_rows.dispatcher, taskmod._scale_task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "inspection disabled for cached code"
        ir = d.inspect_llvm(d.signatures[0]).splitlines()
        task_ir = t.inspect_llvm(t.signatures[0]).splitlines() if t.signatures else []

    def wrappers(lines):  # numba's Python and C entry points (mangled names: _ZN7cpython..)
        return sorted({w for l in lines if l.startswith("define")
                       for w in ("cpython", "cfunc") if f"@_ZN{len(w)}{w}" in l})

    print(json.dumps({
        "ok": bool(np.array_equal(Yp, 2 * X) and np.array_equal(Ys, 3 * X)),
        "raised": raised,
        "hits": sum(d.stats.cache_hits.values()),
        "misses": sum(d.stats.cache_misses.values()),
        "declares_symbol": any(l.startswith("declare") and "@nbnet.task.taskmod._scale_task." in l
                               for l in ir),
        "defines_task": any(l.startswith("define") and "_scale_task" in l for l in ir),
        "python_call": python_call, "kernel_wrappers": wrappers(ir),
        "task_wrappers": wrappers(task_ir) if task_ir else None}))
""")


def test_task_bodies_are_called_through_a_symbol_and_reload_from_cache(tmp_path):
    """A kernel calls its task body through a symbol (the body is not linked into, nor
    compiled again in, the kernel's module); a later process loads the kernel from the
    disk cache and binds the symbol before linking, also when the body's own cache entry
    is gone (it is compiled again); errors raised in the body reach the caller.

    Neither is compiled with wrappers it does not need (compile time): the kernel has a
    Python entry point but no C one, the body neither, and calling the body from Python
    raises instead of jumping to a missing entry point."""
    (tmp_path / "taskmod.py").write_text(_TASK_MODULE)
    cache = tmp_path / "cache"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def run():
        r = subprocess.run([sys.executable, "-c", _TASK_SCRIPT], env=env, capture_output=True,
                           text=True, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])

    first = run()
    assert first["ok"] and first["raised"] == "negative factor"
    assert first["misses"] == 1 and first["hits"] == 0
    assert first["declares_symbol"] and not first["defines_task"]
    assert first["kernel_wrappers"] == ["cpython"] and first["task_wrappers"] == []
    assert "runs only inside a kernel" in first["python_call"]
    second = run()
    assert second["ok"] and second["raised"] == "negative factor"
    assert "runs only inside a kernel" in second["python_call"]
    assert second["misses"] == 0 and second["hits"] == 1
    task_entries = [f for f in cache.rglob("*") if f.is_file() and "_scale_task" in f.name]
    assert task_entries
    for f in task_entries:
        f.unlink()
    third = run()
    assert third["ok"] and third["hits"] == 1 and third["misses"] == 0


def test_kernels_are_built_on_first_use():
    """Importing the CPU kernels rewrites and wraps none of them (that cost every process
    ~80 ms); a kernel gets its dispatcher when first called."""
    script = textwrap.dedent("""
        import json, numpy as np, nbnet
        from nbnet.kernels.cpu import KERNELS
        from nbnet.kernels.cpu._jit import Kernel
        kernels = [getattr(k, "kernel", k) for k in KERNELS.values()]  # shims: their Kernel
        kernels = [k for k in kernels if isinstance(k, Kernel)]
        before = sum(k._dispatcher is not None for k in kernels)
        nbnet.BatchNorm1D().forward(np.ones((8, 3)) * np.arange(8.0)[:, None])
        after = sum(k._dispatcher is not None for k in kernels)
        print(json.dumps({"n": len(kernels), "before": before, "after": after}))
    """)
    out = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True,
                                    text=True, check=True).stdout.strip().splitlines()[-1])
    assert out["n"] > 20 and out["before"] == 0 and 0 < out["after"] < out["n"]


_SCIPY_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, nbnet
    X = np.random.default_rng(0).normal(size=(64, 5))
    nbnet.BatchNorm1D().forward(X)
    after_step = "scipy.linalg" in sys.modules
    from numba import njit
    import numba.np.linalg as linalg, numba.np.arraymath as arraymath

    @njit
    def dots(a, b):
        return np.dot(a, b), np.dot(a[0], b[1])

    m, v = dots(X[:5], X[:5].T.copy())
    print(json.dumps({"after_step": after_step, "have_blas": arraymath._HAVE_BLAS,
                      "restored": linalg.ensure_blas is arraymath.ensure_blas
                                  and linalg.ensure_blas.__name__ == "ensure_blas",
                      "dot_ok": bool(np.allclose(m, X[:5] @ X[:5].T)
                                     and np.isclose(v, X[0] @ X[:5].T[1])),
                      "after_dot": "scipy.linalg" in sys.modules}))
""")


@pytest.mark.parametrize("defer, light, cache", [("1", "1", "warm"), ("1", "1", "empty"),
                                                 ("1", "0", "warm"), ("0", "0", "warm")])
def test_first_step_does_not_import_scipy(defer, light, cache, tmp_path):
    """numba's BLAS probe at target start-up (it imports scipy.linalg, ~0.12 s) stays out of
    nbnet's first step, and numba's own check is back afterwards: a jitted np.dot still
    finds SciPy's BLAS, for matrices and for vectors.

    From a warm cache the light loader never starts numba's compiler at all; when the
    first step compiles (empty cache), or with numba's own loading path
    (``NBNET_LIGHT_CACHE_LOAD=0``), the probe is deferred; with both off (the control),
    SciPy is imported.
    """
    pytest.importorskip("scipy")  # installed in CI (scikit-learn depends on it)
    env = {**os.environ, "NBNET_DEFER_SCIPY": defer, "NBNET_LIGHT_CACHE_LOAD": light}
    if cache == "empty":
        env["NUMBA_CACHE_DIR"] = str(tmp_path)
    else:  # this process's kernel cache, warmed for the step by a first run
        subprocess.run([sys.executable, "-c", _SCIPY_SCRIPT], env=env, capture_output=True,
                       check=True)
    out = json.loads(subprocess.run([sys.executable, "-c", _SCIPY_SCRIPT], env=env,
                                    capture_output=True, text=True, check=True).stdout)
    assert out["after_step"] is (defer == "0" and light == "0")
    assert out["have_blas"] and out["restored"] and out["dot_ok"] and out["after_dot"]


_LIGHT_LOAD_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, nbnet
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 7)).astype(np.float32)
    bn = nbnet.BatchNorm1D()
    Y = bn.forward(X)
    dX = bn.backward(Y)
    # imported by numba's compiler start-up only (loading a kernel imports the modules its
    # environment names, such as numba.np.npyimpl, but not this)
    started = "numba.np.polynomial.polynomial_functions" in sys.modules
    from numba import njit

    @njit
    def moments(a):  # a compile after the light loads: numba's full start-up runs now
        m = np.sum(a, axis=0) / a.shape[0]
        return m, np.sqrt(np.sum((a - m) ** 2, axis=0) / a.shape[0])

    m, s = moments(X.astype(np.float64))
    Z = nbnet.LayerNorm1D().forward(X.T.copy())  # and another cached kernel loads after it
    print(json.dumps({"started": started,
                      "Y": Y.tolist(), "dX": dX.tolist(), "Z": Z.tolist(),
                      "m": m.tolist(), "s": s.tolist()}))
""")


@pytest.mark.parametrize("light", ["1", "0"])
def test_cached_kernels_load_without_numba_compiler_start_up(light):
    """A new process loads cached kernels without numba's compiler start-up (the ~50
    modules and registries only compiling needs: ~0.1 s of a first step), and gets the
    same results as with numba's own loading path; a jitted function compiled afterwards,
    and another kernel loaded after that, work."""
    env = {**os.environ, "NBNET_LIGHT_CACHE_LOAD": light}
    runs = [json.loads(subprocess.run([sys.executable, "-c", _LIGHT_LOAD_SCRIPT], env=env,
                                      capture_output=True, text=True, check=True).stdout)
            for _ in range(2)]  # the first run may compile; the second loads
    first, out = runs
    assert out["started"] is (light == "0")
    X = np.random.default_rng(0).normal(size=(300, 7)).astype(np.float32)
    mean, std = X.astype(np.float64).mean(0), X.astype(np.float64).std(0)
    np.testing.assert_allclose(out["m"], mean, rtol=1e-12)
    np.testing.assert_allclose(out["s"], std, rtol=1e-12)
    np.testing.assert_allclose(out["Y"], (X - mean) / np.sqrt(std ** 2 + 1e-5), atol=1e-5)
    Xt = X.T.astype(np.float64)
    Zref = (Xt - Xt.mean(1, keepdims=True)) / np.sqrt(Xt.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out["Z"], Zref, atol=1e-5)
    for key in ("Y", "dX", "Z"):  # loaded or compiled, the same machine code
        assert out[key] == first[key]


# ----------------------------------------------------------------- output buffer pool
def test_output_pool_never_hands_out_a_buffer_someone_holds(monkeypatch, rng):
    """Large outputs are reused only once nothing outside the layer refers to them."""
    from nbnet import config
    monkeypatch.setattr(config, "OUTPUT_REUSE_BYTES", 0)  # pool every output
    X = rng.normal(size=(64, 8))
    dY = rng.normal(size=(64, 8))
    for make in (nbnet.BatchNorm1D, nbnet.LayerNorm1D):
        layer = make()
        Y1 = layer.forward(X)
        dX1 = layer.backward(dY)
        layer.flush_gradients()
        Y1_copy, dX1_copy = Y1.copy(), dX1.copy()
        Y2 = layer.forward(X)          # Y1 is held by the caller: a new buffer
        dX2 = layer.backward(dY)
        layer.flush_gradients()
        assert not np.shares_memory(Y1, Y2) and not np.shares_memory(dX1, dX2)
        view = Y2[:3]                  # a view keeps its base alive: not reused either
        addr = Y1.__array_interface__["data"][0]
        del Y1, Y2, dX1, dX2
        Y3 = layer.forward(X)
        assert not np.shares_memory(Y3, view)
        # the buffer nobody holds any more is the one handed out again
        assert Y3.__array_interface__["data"][0] == addr
        np.testing.assert_array_equal(Y3, Y1_copy)
        np.testing.assert_array_equal(layer.backward(dY), dX1_copy)


def test_output_pool_off_gives_the_same_results(monkeypatch, rng):
    from nbnet import config
    X = rng.normal(size=(300, 40)).astype(np.float32)
    dY = rng.normal(size=X.shape).astype(np.float32)
    outs = []
    for pool, reuse in ((0, 0), (2, 0)):
        monkeypatch.setattr(config, "OUTPUT_POOL", pool)
        monkeypatch.setattr(config, "OUTPUT_REUSE_BYTES", reuse)
        layer = nbnet.BatchNorm1D()
        res = []
        for _ in range(3):
            res.append(layer.forward(X).copy())
            res.append(layer.backward(dY).copy())
            layer.update()
        outs.append(res)
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)

"""BatchNorm2D, LayerNorm2D, GroupNorm, InstanceNorm2D and RMSNorm.

Checked against the float64 references of ``reference.py`` (every layout, every fused
activation), against PyTorch where installed, by finite differences, for numerical
stability, for bit-identical results across thread counts, and for error handling that
leaves the layer unchanged. Shapes stay small (serial kernel twins) except where the
parallel kernels are the point, to keep numba compile time modest.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import nbnet
import reference as ref
from conftest import rel_err

ACTS = {  # nbnet spelling -> reference name
    None: None, "relu": "relu", "leaky_relu": "leaky_relu", "elu": "elu",
    "gelu(approximate=False)": "gelu_exact", "gelu": "gelu", "tanh": "tanh", "sigmoid": "sigmoid",
}
N, H, W, C, G = 3, 4, 5, 6, 2

# --------------------------------------------------------------------------- specs
# Each spec: build(act) -> layer; shape of the layer's input; to_canon(A) maps an array
# in the layer's layout to the reference's canonical float64 view; ref_axes: axes of the
# statistics in that view; pshape: the parameters' shape broadcast in that view.


def _nchw(a):  # layer (N, C, H, W) -> (N, H, W, C)
    return np.asarray(a).transpose(0, 2, 3, 1)


SPECS = {
    "bn2d_nhwc": dict(build=lambda act: nbnet.BatchNorm2D(act_fn=act), shape=(N, H, W, C),
                      canon=lambda a: np.asarray(a), axes=(0, 1, 2), pshape=(C,)),
    "bn2d_nchw": dict(build=lambda act: nbnet.BatchNorm2D(act_fn=act, data_format="NCHW"),
                      shape=(N, C, H, W), canon=_nchw, axes=(0, 1, 2), pshape=(C,)),
    "ln2d": dict(build=lambda act: nbnet.LayerNorm2D(act_fn=act), shape=(N, H, W, C),
                 canon=lambda a: np.asarray(a), axes=(1, 2, 3), pshape=(H, W, C), paxes=(0,)),
    "gn_nhwc": dict(build=lambda act: nbnet.GroupNorm(G, act_fn=act), shape=(N, H, W, C),
                    canon=lambda a: np.asarray(a).reshape(N, H, W, G, C // G), axes=(1, 2, 4),
                    pshape=(G, C // G), paxes=(0, 1, 2)),
    "gn_nchw": dict(build=lambda act: nbnet.GroupNorm(G, act_fn=act, data_format="NCHW"),
                    shape=(N, C, H, W), canon=lambda a: _nchw(a).reshape(N, H, W, G, C // G),
                    axes=(1, 2, 4), pshape=(G, C // G), paxes=(0, 1, 2)),
    "gn_2d": dict(build=lambda act: nbnet.GroupNorm(3, act_fn=act), shape=(5, C),
                  canon=lambda a: np.asarray(a).reshape(5, 3, C // 3), axes=(2,),
                  pshape=(3, C // 3), paxes=(0,)),
    # groups of 3 on features: the one-position kernels' run-time group width (gn_2d's
    # groups of 2 take the constant-width copies)
    "gn_2d_cg3": dict(build=lambda act: nbnet.GroupNorm(2, act_fn=act), shape=(5, C),
                      canon=lambda a: np.asarray(a).reshape(5, 2, C // 2), axes=(2,),
                      pshape=(2, C // 2), paxes=(0,)),
    "in_nhwc": dict(build=lambda act: nbnet.InstanceNorm2D(affine=True, act_fn=act),
                    shape=(N, H, W, C), canon=lambda a: np.asarray(a), axes=(1, 2), pshape=(C,),
                    paxes=(0, 1, 2)),
    "in_nchw": dict(build=lambda act: nbnet.InstanceNorm2D(affine=True, act_fn=act,
                                                           data_format="NCHW"),
                    shape=(N, C, H, W), canon=_nchw, axes=(1, 2), pshape=(C,), paxes=(0, 1, 2)),
    "rms": dict(build=lambda act: nbnet.RMSNorm(act_fn=act), shape=(N, 4, 7), canon=np.asarray,
                axes=(2,), pshape=(7,), paxes=(0, 1), center=False),
}


def _setup(name, act, dtype, seed=0):
    """Layer with random (non-trivial) parameters, input, upstream gradient."""
    spec = SPECS[name]
    rng = np.random.default_rng(seed)
    layer = spec["build"](act)
    X = rng.normal(1.5, 2.0, spec["shape"]).astype(dtype)
    dY = rng.normal(size=spec["shape"]).astype(dtype)
    layer.forward(X[:2], retain_derived=False)  # build
    flat = int(np.prod(spec["pshape"]))
    param_shape = layer.parameters["scaler"].shape
    params = {"scaler": rng.uniform(0.5, 1.5, flat).reshape(param_shape).astype(dtype)}
    if "intercept" in layer.parameters:
        params["intercept"] = rng.normal(0, 0.5, flat).reshape(param_shape).astype(dtype)
    layer.set_params({"parameters": params})
    return layer, X, dY, params


def _reference(name, X, dY, params, act, eps):
    spec = SPECS[name]
    gamma = np.asarray(params["scaler"], np.float64).reshape(spec["pshape"])
    beta = np.asarray(params.get("intercept", np.zeros_like(gamma)), np.float64).reshape(spec["pshape"])
    Xc, dYc = spec["canon"](X.astype(np.float64)), spec["canon"](dY.astype(np.float64))
    center = spec.get("center", True)
    Y, mean, var = ref.norm_forward_ref(Xc, spec["axes"], gamma, beta, eps, ACTS[act], center=center)
    dX, dg, db = ref.norm_backward_ref(Xc, dYc, spec["axes"], gamma, beta, eps, ACTS[act],
                                       center=center, param_axes=spec.get("paxes"))
    # dX's natural scale: the upstream gradient through scaler * invstd (dX itself can be
    # far smaller after cancellation, e.g. groups of two values)
    dx_scale = float(np.abs(dYc * gamma / np.sqrt(var + eps)).max())
    return Y, dX, dg, db, mean, var, dx_scale


def _rel(a, r, scale=0.0):
    a = np.asarray(a, np.float64)
    r = np.asarray(r, np.float64)
    return float(np.abs(a - r).max() / max(np.abs(r).max(), scale, 1e-300))


CASES = [(n, a, np.float64) for n in SPECS for a in ACTS] + \
        [(n, a, np.float32) for n in SPECS for a in (None, "relu", "leaky_relu", "gelu")]


@pytest.mark.parametrize("name,act,dtype", CASES)
def test_matches_float64_reference(name, act, dtype):
    layer, X, dY, params = _setup(name, act, dtype)
    spec = SPECS[name]
    Y = layer.forward(X)
    dX = layer.backward(dY)
    Yr, dXr, dgr, dbr, mean, var, dx_scale = _reference(name, X, dY, params, act, layer.epsilon)
    tol = 1e-10 if dtype == np.float64 else 1e-5
    assert Y.dtype == dtype and dX.dtype == dtype and Y.shape == X.shape
    assert _rel(spec["canon"](Y), Yr) < tol
    assert _rel(spec["canon"](dX), dXr, dx_scale) < tol
    assert _rel(layer.gradients["scaler"], dgr.reshape(layer.gradients["scaler"].shape)) < tol
    if "intercept" in layer.gradients:
        assert _rel(layer.gradients["intercept"], dbr.reshape(layer.gradients["intercept"].shape)) < tol
    else:
        assert set(layer.gradients) == {"scaler"}
    if name.startswith("bn2d"):  # running statistics, numpy-ml momentum
        assert _rel(layer.parameters["running_mean"], 0.1 * mean.ravel()) < tol
        assert _rel(layer.parameters["running_var"], 0.9 + 0.1 * var.ravel()) < tol
        # inference: the running statistics, one pass
        rm, rv = (layer.parameters[k].astype(np.float64) for k in ("running_mean", "running_var"))
        Yi = layer.forward(X, retain_derived=False)
        Xc = spec["canon"](X.astype(np.float64))
        z = (Xc - rm) / np.sqrt(rv + layer.epsilon) * params["scaler"] + params["intercept"]
        assert _rel(spec["canon"](Yi), ref.act_ref(ACTS[act], z)) < tol


# --------------------------------------------------------------------------- torch
try:
    import torch
except ImportError:  # pragma: no cover
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")


def _torch_run(mod, Xt, dYt):
    Xt = Xt.clone().requires_grad_(True)
    Y = mod(Xt)
    Y.backward(dYt)
    return Y.detach().numpy(), Xt.grad.numpy()


@needs_torch
@pytest.mark.parametrize("name", ["bn2d_nhwc", "bn2d_nchw", "ln2d", "gn_nhwc", "gn_nchw",
                                  "in_nhwc", "in_nchw", "rms"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_torch(name, dtype):
    layer, X, dY, params = _setup(name, None, dtype, seed=1)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    nchw = name.endswith("nchw")
    fmt = "NCHW" if nchw else "NHWC"
    if name.startswith("in") or name.startswith("bn"):  # running statistics as torch keeps them
        if name.startswith("in"):
            layer = nbnet.InstanceNorm2D(affine=True, track_running_stats=True, momentum=0.8,
                                         unbiased_running_var=True, data_format=fmt)
        else:
            layer = nbnet.BatchNorm2D(momentum=0.8, unbiased_running_var=True, data_format=fmt)
        layer.forward(X[:2], retain_derived=False)
        layer.set_params({"parameters": params})
    Y = layer.forward(X)
    dX = layer.backward(dY)
    g = torch.tensor(np.asarray(params["scaler"]), dtype=tdt)
    b = torch.tensor(np.asarray(params.get("intercept", 0 * params["scaler"])), dtype=tdt)
    Xt, dYt = torch.tensor(X), torch.tensor(dY)
    if not nchw and X.ndim == 4 and not name.startswith("ln"):  # NHWC memory as channels_last
        Xt, dYt = Xt.permute(0, 3, 1, 2), dYt.permute(0, 3, 1, 2)
        assert Xt.is_contiguous(memory_format=torch.channels_last)
    Cn = params["scaler"].shape[0]
    if name.startswith("bn2d"):
        mod = torch.nn.BatchNorm2d(Cn, eps=layer.epsilon, momentum=0.2)  # = 1 - ours
    elif name == "ln2d":
        mod = torch.nn.LayerNorm(list(X.shape[1:]), eps=layer.epsilon)
    elif name.startswith("gn"):
        mod = torch.nn.GroupNorm(G, Cn, eps=layer.epsilon)
    elif name.startswith("in"):
        mod = torch.nn.InstanceNorm2d(Cn, eps=layer.epsilon, affine=True, momentum=0.2,
                                      track_running_stats=True)
    else:
        mod = torch.nn.RMSNorm(X.shape[-1], eps=layer.epsilon)
    mod = mod.to(tdt)
    with torch.no_grad():
        mod.weight.copy_(g)
        if getattr(mod, "bias", None) is not None:
            mod.bias.copy_(b)
    Yt, dXt = _torch_run(mod, Xt, dYt)
    back = (lambda a: a) if (nchw or X.ndim != 4 or name.startswith("ln")) else \
        (lambda a: a.transpose(0, 2, 3, 1))
    tol = 1e-10 if dtype == np.float64 else 1e-5
    assert _rel(Y, back(Yt)) < tol
    assert _rel(dX, back(dXt)) < tol
    assert _rel(layer.gradients["scaler"], mod.weight.grad.numpy()) < tol
    if "intercept" in layer.gradients:
        assert _rel(layer.gradients["intercept"], mod.bias.grad.numpy()) < tol
    if name.startswith("bn2d") or name.startswith("in"):
        assert _rel(layer.parameters["running_mean"], mod.running_mean.numpy()) < tol
        assert _rel(layer.parameters["running_var"], mod.running_var.numpy()) < tol
        mod.eval()
        layer.eval()
        assert _rel(layer.forward(X), back(mod(Xt).detach().numpy())) < tol


# ---------------------------------------------------------------- finite differences
@pytest.mark.parametrize("name", list(SPECS))
def test_finite_differences(name):
    act = "tanh"
    layer, X, dY, params = _setup(name, act, np.float64, seed=2)
    layer.forward(X)
    dX = layer.backward(dY)
    grads = {k: v.copy() for k, v in layer.gradients.items()}
    h = 1e-6

    def loss(Xv, **p):
        probe = SPECS[name]["build"](act)
        probe.forward(Xv[:2], retain_derived=False)
        probe.set_params({"parameters": {**params, **p}})
        return float(np.sum(probe.forward(Xv) * dY))

    rng = np.random.default_rng(3)
    for idx in [tuple(rng.integers(0, s) for s in X.shape) for _ in range(4)]:
        Xp, Xm = X.copy(), X.copy()
        Xp[idx] += h
        Xm[idx] -= h
        fd = (loss(Xp) - loss(Xm)) / (2 * h)
        assert abs(fd - dX[idx]) < 1e-6 * max(1.0, abs(fd))
    for key, grad in grads.items():
        for j in rng.integers(0, grad.size, 3):
            pp, pm = params[key].copy(), params[key].copy()
            pp.flat[j] += h
            pm.flat[j] -= h
            fd = (loss(X, **{key: pp}) - loss(X, **{key: pm})) / (2 * h)
            assert abs(fd - grad.flat[j]) < 1e-6 * max(1.0, abs(fd))


# --------------------------------------------------------------------------- stability
@pytest.mark.parametrize("name", list(SPECS))
def test_float32_large_mean_stability(name):
    spec = SPECS[name]
    layer = spec["build"](None)
    rng = np.random.default_rng(4)
    X = (1e4 + rng.normal(size=spec["shape"])).astype(np.float32)
    if name.startswith("bn2d"):
        layer.momentum = 0.0  # running_var = batch (biased) variance
    Y = layer.forward(X)
    Yr, *_ = _reference(name, X, np.zeros_like(X), {"scaler": layer.parameters["scaler"]},
                        None, layer.epsilon)
    assert _rel(spec["canon"](Y), Yr) < 1e-4
    if name.startswith("bn2d"):
        var64 = spec["canon"](X.astype(np.float64)).var(axis=(0, 1, 2))
        assert np.max(np.abs(layer.parameters["running_var"] - var64) / var64) <= 1e-4
    if spec.get("center", True):
        means = spec["canon"](Y.astype(np.float64)).mean(axis=spec["axes"])
        assert np.abs(means).max() <= 1e-3


SMOOTH_LAYERS = {"elu": nbnet.ELU(1.0), "gelu": nbnet.GELU(), "tanh": nbnet.Tanh(),
                 "sigmoid": nbnet.Sigmoid(), "gelu(approximate=False)": nbnet.GELU(approximate=False)}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("act", list(SMOOTH_LAYERS))
def test_smooth_act_fn_is_the_activation_layer_after_the_layer(name, act):
    """On CPU a smooth act_fn runs as the activation layers' vectorised pass after the
    normalization (fused, it was one C-library call per value): forward, dX and the
    parameter gradients equal those of the layer without act_fn followed by the
    activation layer, bit for bit, and the pre-activation output is retained as
    derived_variables["Z"] until flush_gradients."""
    fused, X, dY, params = _setup(name, act, np.float32, seed=10)
    plain = SPECS[name]["build"](None)
    plain.forward(X[:2], retain_derived=False)
    plain.set_params({"parameters": params})
    layer = SMOOTH_LAYERS[act]
    layer.flush_gradients()
    Y = fused.forward(X)
    Z = plain.forward(X)
    np.testing.assert_array_equal(Y, layer.forward(Z))
    np.testing.assert_array_equal(fused.derived_variables["Z"][0], Z)
    np.testing.assert_array_equal(fused.backward(dY), plain.backward(layer.backward(dY)))
    for k in plain.gradients:
        np.testing.assert_array_equal(fused.gradients[k], plain.gradients[k])
    np.testing.assert_array_equal(fused.forward(X, retain_derived=False),  # inference
                                  layer.forward(plain.forward(X, retain_derived=False),
                                                retain_derived=False))
    fused.flush_gradients()
    assert fused.derived_variables["Z"] == []


def test_act_fn_changed_to_a_smooth_one_between_forward_and_backward_raises():
    """A smooth act_fn set after forward has no retained pre-activation: backward raises
    and changes nothing, instead of differentiating an activation forward never ran."""
    layer, X, dY, _ = _setup("bn2d_nhwc", "relu", np.float32)
    layer.forward(X)
    layer.set_params({"hyperparameters": {"act_fn": "gelu"}})
    grads = {k: v.copy() for k, v in layer.gradients.items()}
    with pytest.raises(RuntimeError, match="act_fn was changed between forward and backward"):
        layer.backward(dY)
    for k, v in grads.items():
        np.testing.assert_array_equal(layer.gradients[k], v)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("act", [None, "relu"])
def test_float32_extreme_scale_matches_reference(name, act):
    """float32 data with a standard deviation of 1e30: the squares of its deviations pass
    float32's 3.4e38, so the overflowed float32 sums are taken again in float64, and dX
    must not form invstd**2 (1e-60) as a float32 factor. Same answers as float64."""
    layer, X, dY, params = _setup(name, act, np.float32, seed=9)
    spec = SPECS[name]
    X = (X.astype(np.float64) * 1e30).astype(np.float32)
    Y = layer.forward(X)
    dX = layer.backward(dY)
    Yr, dXr, dgr, dbr, _, _, dx_scale = _reference(name, X, dY, params, act, layer.epsilon)
    assert _rel(spec["canon"](Y), Yr) < 1e-5
    assert _rel(spec["canon"](dX), dXr, dx_scale) < 1e-5
    assert _rel(layer.gradients["scaler"], dgr.reshape(layer.gradients["scaler"].shape)) < 1e-5
    if "intercept" in layer.gradients:
        assert _rel(layer.gradients["intercept"], dbr.reshape(layer.gradients["intercept"].shape)) < 1e-5


@pytest.mark.parametrize("make,G", [(lambda: nbnet.GroupNorm(2), 2),
                                    (lambda: nbnet.InstanceNorm2D(affine=True), 8)])
def test_float32_outlier_first_value_keeps_statistics_exact(make, G):
    """GroupNorm and InstanceNorm (channels-last) take their one-pass moments around each
    group's first value; a first value far from the mean (here 0, before 16384 values at
    1e4 +- 1: 128 standard deviations away) must make them take the moments again around
    the mean they found. Mean and invstd stay within 1e-6 of float64, Y within 1e-4."""
    rng = np.random.default_rng(5)
    X = (1e4 + rng.normal(size=(2, 64, 64, 8))).astype(np.float32)
    X[:, 0, 0, :] = 0.0
    layer = make()
    Y = layer.forward(X)
    cg = 8 // G
    Xg = X.astype(np.float64).reshape(2, 64 * 64, G, cg)
    mean = Xg.mean(axis=(1, 3))
    invstd = 1.0 / np.sqrt(Xg.var(axis=(1, 3)) + layer.epsilon)
    assert np.abs(layer.derived_variables["mean"][0] - mean).max() / 1e4 < 1e-6
    assert np.abs(layer.derived_variables["invstd"][0] / invstd - 1).max() < 1e-6
    Yr = ((Xg - mean[:, None, :, None]) * invstd[:, None, :, None]).reshape(X.shape)
    assert np.abs(Y - Yr).max() < 1e-4 * np.abs(Yr).max()


@pytest.mark.parametrize("fmt", ["1D", "NCHW"])
def test_batchnorm_float32_outlier_first_value_keeps_statistics_exact(fmt):
    """BatchNorm's chunk statistics are one pass of moments shifted by the chunk's first
    row (channels-first: each channel's first value in the chunk); a shift far from the
    mean (0 before values at 1e4 +- 1, 32 to 64 standard deviations of a chunk away)
    must make the chunk take its moments again."""
    rng = np.random.default_rng(6)
    if fmt == "1D":
        X = (1e4 + rng.normal(size=(4096, 8))).astype(np.float32)
        X[0] = 0.0
        layer, axes = nbnet.BatchNorm1D(momentum=0.0), (0,)
    else:
        X = (1e4 + rng.normal(size=(16, 4, 64, 64))).astype(np.float32)
        X[:, :, 0, 0] = 0.0
        layer, axes = nbnet.BatchNorm2D(momentum=0.0, data_format="NCHW"), (0, 2, 3)
    layer.forward(X)
    X64 = X.astype(np.float64)
    assert np.abs(layer.derived_variables["mean"][0] / X64.mean(axis=axes) - 1).max() < 1e-10
    assert np.abs(layer.parameters["running_var"] / X64.var(axis=axes) - 1).max() < 1e-6


@pytest.mark.parametrize("make,shape", [(nbnet.LayerNorm1D, (16, 4096)),
                                        (nbnet.LayerNorm1D, (24, 256)),
                                        (nbnet.LayerNorm2D, (4, 16, 16, 16))])
def test_layernorm_float32_outlier_first_value_keeps_statistics_exact(make, shape):
    """LayerNorm takes each row's one-pass moments around the row's first value; a first
    value far from the mean (0 before values at 1e4 +- 1, 64 standard deviations away)
    must make the row take its moments again around the mean it found. The other rows
    (first value typical) take the one pass. (24, 256): the short rows go through the
    forward in blocks of several rows, far and typical ones mixed in each block."""
    rng = np.random.default_rng(8)
    X = (1e4 + rng.normal(size=shape)).astype(np.float32)
    X[::2].reshape(X[::2].shape[0], -1)[:, 0] = 0.0
    layer = make()
    Y = layer.forward(X)
    X2 = X.reshape(shape[0], -1).astype(np.float64)
    mean = X2.mean(axis=1)
    invstd = 1.0 / np.sqrt(X2.var(axis=1) + layer.epsilon)
    assert np.abs(layer.derived_variables["mean"][0] / mean - 1).max() < 1e-10
    assert np.abs(layer.derived_variables["invstd"][0] / invstd - 1).max() < 1e-6
    Yr = ((X2 - mean[:, None]) * invstd[:, None]).reshape(shape)
    assert np.abs(Y - Yr).max() < 1e-4 * np.abs(Yr).max()


# ------------------------------------------------------------------- determinism
_THREAD_SCRIPT = r"""
import hashlib, json, sys
import numpy as np
import nbnet
rng = np.random.default_rng(5)
out = {}
X4 = rng.normal(3, 2, (8, 16, 16, 32)).astype(np.float32)
dY4 = rng.normal(size=X4.shape).astype(np.float32)
Xr = rng.normal(3, 2, (96, 700)).astype(np.float32)
dYr = rng.normal(size=Xr.shape).astype(np.float32)
Xw = rng.normal(3, 2, (150, 2500)).astype(np.float32)  # 3 chunks x 3 column blocks
dYw = rng.normal(size=Xw.shape).astype(np.float32)
layers = {
    "bn1d_wide": (nbnet.BatchNorm1D(act_fn="relu"), Xw, dYw),
    "bn_nhwc": (nbnet.BatchNorm2D(act_fn="relu"), X4, dY4),
    "bn_nchw": (nbnet.BatchNorm2D(act_fn="relu", data_format="NCHW"), X4, dY4),
    "ln2d": (nbnet.LayerNorm2D(act_fn="relu"), X4, dY4),
    "gn_nhwc": (nbnet.GroupNorm(4, act_fn="relu"), X4, dY4),
    "gn_nchw": (nbnet.GroupNorm(4, act_fn="relu", data_format="NCHW"), X4, dY4),
    "in_nhwc": (nbnet.InstanceNorm2D(affine=True, track_running_stats=True), X4, dY4),
    "rms": (nbnet.RMSNorm(act_fn="relu"), Xr, dYr),
}
for name, (layer, X, dY) in layers.items():
    h = hashlib.sha256()
    h.update(layer.forward(X).tobytes())
    h.update(layer.backward(dY).tobytes())
    for k in sorted(layer.gradients):
        h.update(layer.gradients[k].tobytes())
    for k in sorted(layer.parameters):
        h.update(layer.parameters[k].tobytes())
    out[name] = h.hexdigest()
print(json.dumps(out))
"""


def _run_with_threads(n):
    # NBNET_SERIAL_CUTOFF=0: every kernel runs its parallel twin, whatever the size
    env = dict(os.environ, NUMBA_NUM_THREADS=str(n), NBNET_SERIAL_CUTOFF="0")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(nbnet.__file__)),
                                         env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _THREAD_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_bit_identical_across_thread_counts():
    one, two = _run_with_threads(1), _run_with_threads(2)
    assert one == two


# ----------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
def test_groupnorm_one_group_per_channel_is_instancenorm(fmt):
    rng = np.random.default_rng(6)
    X = rng.normal(2, 3, (N, H, W, C) if fmt == "NHWC" else (N, C, H, W))
    dY = rng.normal(size=X.shape)
    gn, inn = nbnet.GroupNorm(C, act_fn="relu", data_format=fmt), \
        nbnet.InstanceNorm2D(affine=True, act_fn="relu", data_format=fmt)
    assert np.array_equal(gn.forward(X), inn.forward(X))
    assert np.array_equal(gn.backward(dY), inn.backward(dY))
    assert np.array_equal(gn.gradients["scaler"], inn.gradients["scaler"])


def _groupnorm_against_reference(layer, act, X, dY, rng, canon, axes, param_axes):
    """Random affine parameters into the GroupNorm ``layer`` (built with ``act``), then a training forward, its
    backward and an inference forward of ``X``: against the float64 reference on the
    ``canon`` view (groups as the last two axes, ``(..., G, cg)``; statistics over
    ``axes``, parameter gradients summed over ``param_axes``), and inference bit-equal to
    training (the same kernel)."""
    dtype = X.dtype
    G, cg = canon(X).shape[-2:]
    layer.forward(X[:1], retain_derived=False)
    gamma = rng.uniform(0.5, 1.5, G * cg).astype(dtype)
    beta = rng.normal(0, 0.5, G * cg).astype(dtype)
    layer.set_params({"parameters": {"scaler": gamma, "intercept": beta}})
    Y = layer.forward(X)
    dX = layer.backward(dY)
    g64, b64 = (np.asarray(p, np.float64).reshape(G, cg) for p in (gamma, beta))
    Yr, _, var = ref.norm_forward_ref(canon(X), axes, g64, b64, layer.epsilon,
                                      ACTS[act])
    dXr, dgr, dbr = ref.norm_backward_ref(canon(X), canon(dY), axes, g64, b64, layer.epsilon,
                                          ACTS[act], param_axes=param_axes)
    tol = 1e-10 if dtype == np.float64 else 2e-6
    dx_scale = float(np.abs(canon(dY) * g64 / np.sqrt(var + layer.epsilon)).max())
    assert _rel(canon(Y), Yr) < tol
    assert _rel(canon(dX), dXr, dx_scale) < tol
    assert _rel(layer.gradients["scaler"], dgr.reshape(G * cg)) < tol
    assert _rel(layer.gradients["intercept"], dbr.reshape(G * cg)) < tol
    assert np.array_equal(layer.forward(X, retain_derived=False), Y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("G,groups_per_task", [(8, 1), (8, 3), (8, 8), (64, 5), (64, 64)])
def test_groupnorm_channels_last_group_blocks_match_reference(monkeypatch, G,
                                                              groups_per_task, act, dtype):
    """The channels-last kernels run tasks of a block of whole groups (channels ``j0:j1``)
    of a chunk of examples: one group per task, ragged blocks (8 groups as 3 + 3 + 2, 64
    as twelve of 5 and one of 4) and all groups in one, set through ``config.TILE_BYTES``.
    P = 19 * 18 = 342 positions: the per-channel sums walk four segments of 85 rows (a
    ROW_BLOCK block of passes and a partial one) and 2 rows left over. The first position
    of example 1 is 40 standard deviations off in its first channels, so the groups it
    starts take the far-shift second pass. ReLU and leaky ReLU are selects in X's dtype.
    Against the float64 reference: outputs, dX, both parameter gradients."""
    from nbnet import config
    rng = np.random.default_rng(12)
    Nn, Hh, Ww, Cc = 3, 19, 18, 64
    itemsize = np.dtype(dtype).itemsize
    monkeypatch.setattr(config, "TILE_BYTES", groups_per_task * (Cc // G) * itemsize)
    assert config.groups_per_task(Cc, G, itemsize) == groups_per_task
    X = rng.normal(1.5, 2.0, (Nn, Hh, Ww, Cc))
    X[1, 0, 0, :20] += 80.0
    X = X.astype(dtype)
    dY = rng.normal(size=X.shape).astype(dtype)
    monkeypatch.setattr(config, "CHUNK_BYTES", 2 * X[0].nbytes)  # chunks of 2 and 1 examples
    canon = (lambda a: np.asarray(a, np.float64).reshape(Nn, Hh, Ww, G, Cc // G))
    _groupnorm_against_reference(nbnet.GroupNorm(G, act_fn=act), act, X, dY, rng, canon,
                                 (1, 2, 4), (0, 1, 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("shape,G", [((6, 1, 2, 128), 2), ((5, 2, 2, 128), 4),
                                     ((3, 2, 4, 512), 8)])
def test_groupnorm_channels_last_runs_match_reference(monkeypatch, shape, G, act, dtype):
    """With few positions and wide groups (``P * 8 <= cg``: two positions and 64 channels
    per group, 4 and 32, 8 and 64) the channels-last forward sums each group's P runs of
    ``cg`` contiguous values as they lie instead of per-channel sums. Blocks of 1 and 3
    groups (the last ragged). The first value of example 1's first group is 80 off data of
    standard deviation 2: the 128- and 512-value groups take the second pass around their
    mean (the 128-value group of (5, 2, 2, 128) only just: 80 is 15 of its deviations).
    Against the float64 reference, and inference bit-equal to training."""
    from nbnet import config
    rng = np.random.default_rng(13)
    Cc = shape[-1]
    cg = Cc // G
    X = rng.normal(-3.0, 2.0, shape)
    X.reshape(shape[0], -1)[1, 0] += 80.0
    X = X.astype(dtype)
    dY = rng.normal(size=shape).astype(dtype)
    canon = (lambda a: np.asarray(a, np.float64).reshape(shape[0], -1, G, cg))
    for per_task in (1, 3):
        monkeypatch.setattr(config, "TILE_BYTES", per_task * cg * np.dtype(dtype).itemsize)
        _groupnorm_against_reference(nbnet.GroupNorm(G, act_fn=act), act, X, dY, rng, canon,
                                     (1, 3), (0, 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("shape,G", [((19, 64), 32), ((19, 1, 1, 128), 32), ((19, 256), 32),
                                     ((19, 96), 32), ((19, 1200), 2), ((19, 24), 24)])
def test_groupnorm_one_position_rows_match_reference(monkeypatch, shape, G, act, dtype):
    """With one position (``(N, C)`` features, 1x1 images) each example is a row of
    groups and the channels-last op runs the one-position kernels: groups of 2, 4 and 8
    channels (the copies with a constant group width), 3 (run-time width), 600 (two
    ``SUM_BLOCK`` blocks) and 1 (InstanceNorm-like: every output is beta). 19 examples in
    one chunk (the parameter-gradient accumulators flushed after 8, 16 and 19 examples)
    and in chunks of 2. Example 1's first value is 80 off data of deviation 2: the
    600-value group takes the second pass around its mean. Against the float64
    reference; inference bit-equal to training; the forward bit-identical for both
    chunkings; and the one-position kernels are the ones that ran."""
    from nbnet import config
    from nbnet.kernels.cpu import group_stats
    calls = []
    for name in ("_group_forward_rows", "_group_backward_rows"):
        kern = getattr(group_stats, name)
        spy = type("Spy", (), {
            "parallel": (lambda k: lambda self, *a: (calls.append(k), k.parallel(*a))[1])(kern),
            "serial": (lambda k: lambda self, *a: (calls.append(k), k.serial(*a))[1])(kern)})()
        monkeypatch.setattr(group_stats, name, spy)
    rng = np.random.default_rng(16)
    X = rng.normal(-3.0, 2.0, shape)
    X.reshape(shape[0], -1)[1, 0] += 80.0
    X = X.astype(dtype)
    dY = rng.normal(size=shape).astype(dtype)
    n, cg = shape[0], shape[-1] // G
    canon = (lambda a: np.asarray(a, np.float64).reshape(n, 1, G, cg))
    outputs = []
    for chunk_bytes in (1 << 22, 2 * X[0].nbytes + 2 * config.GROUP_ROW_COST * G * X.itemsize):
        monkeypatch.setattr(config, "CHUNK_BYTES", chunk_bytes)
        rpc = config.group_examples_per_chunk(1, shape[-1], G, X.itemsize)
        assert min(rpc, n) == (n if chunk_bytes == 1 << 22 else 2)
        layer = nbnet.GroupNorm(G, act_fn=act)  # the same parameters for both chunkings
        _groupnorm_against_reference(layer, act, X, dY, np.random.default_rng(17), canon,
                                     (1, 3), (0, 1))
        outputs.append(layer.forward(X, retain_derived=False))
    np.testing.assert_array_equal(*outputs)
    assert {k.__name__ for k in calls} == {"_group_forward_rows", "_group_backward_rows"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("G,per_task", [(6, 4), (24, 5), (6, 6)])
def test_groupnorm_nchw_group_blocks_match_reference(monkeypatch, G, per_task, act, dtype):
    """The channels-first kernels run tasks of one example times a block of groups
    (``config.cf_group_tiling``: 4 + 2 of 6 groups, five blocks of 5 and one of 4 of 24
    (InstanceNorm-like, one channel per group), all 6), set through CHUNK_BYTES. The first
    value of example 1 is 80 off a group of standard deviation 2: with 4 channels per
    group (256 values) the shift is 15 of the group's own deviations from its mean and
    the group takes the second pass; with one (64 values) it is 7.8, within SHIFT_LIMIT
    (one value is at most sqrt(n) deviations from the mean of n), one pass. Against the
    float64 reference."""
    from nbnet import config
    rng = np.random.default_rng(15)
    Nn, Cc, Hh, Ww = 5, 24, 8, 8
    cg, L = Cc // G, Hh * Ww
    monkeypatch.setattr(config, "CHUNK_BYTES", per_task * cg * L * np.dtype(dtype).itemsize)
    assert config.cf_group_tiling(Nn, Cc * L, G, np.dtype(dtype).itemsize) == (1, per_task)
    X = rng.normal(-2.0, 2.0, (Nn, Cc, Hh, Ww))
    X[1, 0, 0, 0] += 80.0
    X = X.astype(dtype)
    dY = rng.normal(size=X.shape).astype(dtype)
    canon = (lambda a: _nchw(np.asarray(a, np.float64)).reshape(Nn, Hh, Ww, G, cg))
    _groupnorm_against_reference(nbnet.GroupNorm(G, act_fn=act, data_format="NCHW"), act, X, dY,
                                 rng, canon, (1, 2, 4), (0, 1, 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", [None, "relu"])
def test_groupnorm_nchw_one_pixel_is_channels_last(dtype, act):
    """An (N, C, 1, 1) NCHW input is (N, C) in memory and takes the channels-last kernels:
    outputs, dX, parameter gradients and inference bit-identical to GroupNorm NHWC on
    (N, 1, 1, C) and on the (N, C) view, and close to the float64 reference."""
    rng = np.random.default_rng(14)
    Nn, Cc, Gg = 6, 256, 4
    X = rng.normal(2.0, 3.0, (Nn, Cc)).astype(dtype)
    dY = rng.normal(size=X.shape).astype(dtype)
    results = []
    for fmt, shape in (("NCHW", (Nn, Cc, 1, 1)), ("NHWC", (Nn, 1, 1, Cc)), ("NHWC", (Nn, Cc))):
        layer = nbnet.GroupNorm(Gg, act_fn=act, data_format=fmt)
        Y = layer.forward(X.reshape(shape))
        dX = layer.backward(dY.reshape(shape))
        assert Y.shape == dX.shape == shape
        Yi = layer.forward(X.reshape(shape), retain_derived=False)
        results.append([Y.reshape(Nn, Cc).copy(), dX.reshape(Nn, Cc).copy(),
                        Yi.reshape(Nn, Cc).copy(), layer.gradients["scaler"].copy(),
                        layer.gradients["intercept"].copy()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    canon = (lambda a: np.asarray(a, np.float64).reshape(Nn, Gg, Cc // Gg))
    Yr, _, _ = ref.norm_forward_ref(canon(X), (2,), np.ones((Gg, Cc // Gg)),
                                    np.zeros((Gg, Cc // Gg)), 1e-5, ACTS[act])
    assert _rel(canon(results[0][0]), Yr) < (1e-10 if dtype == np.float64 else 2e-6)


@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
def test_groupnorm_examples_per_chunk(monkeypatch, fmt):
    """Each example's statistics and outputs are its own, so the forward is bit-identical
    for any examples per chunk (``config.CHUNK_BYTES`` from one example a chunk to all
    five); the backward's parameter-gradient sums, merged chunk by chunk, match the
    float64 reference at every chunking."""
    from nbnet import config
    rng = np.random.default_rng(8)
    shape = (5, 3, 4, 8) if fmt == "NHWC" else (5, 8, 3, 4)
    X = rng.normal(1.0, 2.0, shape)
    dY = rng.normal(size=shape)
    per_example = X[0].nbytes
    outputs = []
    for chunk_bytes in (per_example, 2 * per_example, 1 << 20):
        monkeypatch.setattr(config, "CHUNK_BYTES", chunk_bytes)
        layer = nbnet.GroupNorm(4, act_fn="relu", data_format=fmt)
        outputs.append(layer.forward(X).copy())
        layer.backward(dY)
        Xc, dYc = (X, dY) if fmt == "NHWC" else (_nchw(X), _nchw(dY))
        canon = (lambda a: np.asarray(a, np.float64).reshape(5, 3, 4, 4, 2))
        ones, zeros = np.ones((4, 2)), np.zeros((4, 2))
        _, dgr, dbr = ref.norm_backward_ref(canon(Xc), canon(dYc), (1, 2, 4), ones, zeros,
                                            layer.epsilon, "relu", param_axes=(0, 1, 2))
        assert _rel(layer.gradients["scaler"], dgr.reshape(8)) < 1e-10
        assert _rel(layer.gradients["intercept"], dbr.reshape(8)) < 1e-10
    for other in outputs[1:]:
        np.testing.assert_array_equal(outputs[0], other)


@pytest.mark.parametrize("make", [lambda: nbnet.LayerNorm2D(act_fn="relu"),
                                  lambda: nbnet.RMSNorm(act_fn="relu")])
def test_row_kernels_forward_and_wide_dx_do_not_depend_on_chunking(monkeypatch, make):
    """A row's statistics, output and (on the wide path, whose parameter gradients go by
    column blocks) its dX are its own: bit-identical for one row per chunk and for all
    rows in one chunk."""
    from nbnet import config
    rng = np.random.default_rng(9)
    X = rng.normal(1.0, 2.0, (5, 6, 7, 8))
    dY = rng.normal(size=X.shape)
    row = X[0].nbytes
    results = []
    for chunk_bytes in (row, 1 << 20):
        monkeypatch.setattr(config, "CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(config, "WIDE_PARTIALS_RATIO", 0.0)  # the wide path, always
        layer = make()
        results.append((layer.forward(X).copy(), layer.backward(dY).copy(),
                         layer.gradients["scaler"].copy()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_groupnorm_one_group_is_layernorm_without_elementwise_affine():
    rng = np.random.default_rng(7)
    X = rng.normal(2, 3, (N, H, W, C))
    dY = rng.normal(size=X.shape)
    gn, ln = nbnet.GroupNorm(1, affine=False), nbnet.LayerNorm2D()
    np.testing.assert_allclose(gn.forward(X), ln.forward(X), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gn.backward(dY), ln.backward(dY), rtol=1e-12, atol=1e-12)
    assert gn.parameters == {} and gn.gradients == {}


# -------------------------------------------------------------------- errors, state
def _state(layer):
    return {k: np.array(v, copy=True) for k, v in layer.parameters.items()}, len(layer.X), \
        dict(layer.hyperparameters)


def _same(a, b):
    return a[1:] == b[1:] and a[0].keys() == b[0].keys() and \
        all(np.array_equal(a[0][k], b[0][k], equal_nan=True) for k in a[0])


@pytest.mark.parametrize("name", list(SPECS))
def test_bad_inputs_change_nothing(name):
    layer, X, dY, params = _setup(name, None, np.float64)
    layer.forward(X)
    before = _state(layer)
    fewer_features = X[:, :-1] if name.endswith("nchw") else X[..., :-1]
    bad = [X.astype(np.float32), X.astype(np.int64), X[..., None], fewer_features]
    if X.ndim == 4 and not name.startswith("rms"):
        bad.append(X.reshape(X.shape[0], -1))
    for Xb in bad:
        if name == "rms" and Xb.ndim == X.ndim + 1:
            continue  # RMSNorm takes any number of leading axes
        with pytest.raises((ValueError, TypeError)):
            layer.forward(Xb)
        assert _same(_state(layer), before)
    with pytest.raises(ValueError):
        layer.set_params({"parameters": {"scaler": np.ones(np.size(params["scaler"]) + 1)}})
    assert _same(_state(layer), before)
    with pytest.raises(ValueError):
        layer.backward(dY[:1])
    assert _same(_state(layer), before)


@pytest.mark.parametrize("name", list(SPECS))
def test_empty_batch(name):
    layer, X, dY, params = _setup(name, "relu", np.float32)
    before = _state(layer)
    Y = layer.forward(X[:0])
    assert Y.shape == X[:0].shape and Y.dtype == X.dtype
    assert layer.backward(dY[:0]).shape == X[:0].shape
    assert _same(_state(layer), (before[0], 1, before[2]))


def test_groups_must_divide_channels():
    with pytest.raises(ValueError):
        nbnet.GroupNorm(4, n_in=6)
    with pytest.raises(ValueError):
        nbnet.GroupNorm(0)
    gn = nbnet.GroupNorm(4)
    with pytest.raises(ValueError, match="does not divide"):
        gn.forward(np.ones((2, 3, 3, 6)))
    assert not gn.is_initialized and gn.parameters == {}
    with pytest.raises(ValueError):
        nbnet.GroupNorm(4, data_format="NCHW").forward(np.ones((2, 6, 4, 4)))
    with pytest.raises(ValueError):
        nbnet.GroupNorm(4, affine=False).set_params({"parameters": {"scaler": np.ones(4)}})


def test_single_value_per_statistic_raises_in_training():
    bn = nbnet.BatchNorm2D()
    with pytest.raises(ValueError, match="more than 1 value"):
        bn.forward(np.ones((1, 1, 1, 3)))
    assert not bn.is_initialized
    bn.forward(np.ones((2, 1, 1, 3)))
    assert bn.forward(np.ones((1, 1, 1, 3)), retain_derived=False).shape == (1, 1, 1, 3)
    with pytest.raises(ValueError):
        nbnet.BatchNorm2D(data_format="NCHW").forward(np.ones((1, 3, 1, 1)))
    with pytest.raises(ValueError, match="spatial"):
        nbnet.InstanceNorm2D().forward(np.ones((4, 1, 1, 3)))
    with pytest.raises(ValueError):
        nbnet.BatchNorm2D(data_format="NWHC")


def test_nan_is_contained_per_channel_and_group():
    rng = np.random.default_rng(8)
    X = rng.normal(size=(4, 3, 3, 8))
    X[1, 2, 0, 5] = np.nan
    bn = nbnet.BatchNorm2D()
    Y = bn.forward(X)
    assert np.isnan(Y[..., 5]).all() and np.isfinite(np.delete(Y, 5, axis=-1)).all()
    rm = bn.parameters["running_mean"]
    assert np.isfinite(rm).all() and rm[5] == 0.0 and (np.delete(rm, 5) != 0.0).all()
    gn = nbnet.GroupNorm(4)  # channel 5 is in group 2 (channels 4, 5) of example 1
    Y = gn.forward(X)
    assert np.isnan(Y[1, ..., 4:6]).all()
    mask = np.ones(Y.shape, bool)
    mask[1, ..., 4:6] = False
    assert np.isfinite(Y[mask]).all()
    Yc = nbnet.GroupNorm(4, data_format="NCHW").forward(np.ascontiguousarray(X.transpose(0, 3, 1, 2)))
    assert np.isnan(Yc[1, 4:6]).all() and np.isfinite(Yc[0]).all() and np.isfinite(Yc[1, :4]).all()


def test_summary_roundtrip_and_hyperparameters():
    rng = np.random.default_rng(9)
    X = rng.normal(size=(N, C, H, W)).astype(np.float32)
    for layer in (nbnet.BatchNorm2D(data_format="NCHW"), nbnet.GroupNorm(3, data_format="NCHW"),
                  nbnet.InstanceNorm2D(track_running_stats=True, data_format="NCHW"),
                  nbnet.LayerNorm2D(), nbnet.RMSNorm()):
        layer.forward(X)
        s = layer.summary()
        clone = type(layer)(**{k: v for k, v in s["hyperparameters"].items()
                               if k in ("data_format", "n_groups", "track_running_stats")})
        clone.set_params(s)
        for k, v in layer.parameters.items():
            assert np.array_equal(clone.parameters[k], v) and clone.parameters[k].dtype == np.float32
        assert np.array_equal(clone.forward(X, retain_derived=False), layer.forward(X, retain_derived=False))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("make,shape,axes", [
    (lambda: nbnet.BatchNorm1D(momentum=0.5), (6, 5), (0,)),
    (lambda: nbnet.BatchNorm2D(momentum=0.5), (3, 2, 2, 5), (0, 1, 2)),
    (lambda: nbnet.BatchNorm2D(momentum=0.5, data_format="NCHW"), (3, 5, 2, 2), (0, 2, 3)),
    (lambda: nbnet.InstanceNorm2D(track_running_stats=True, momentum=0.5), (3, 2, 2, 5),
     (1, 2))])
def test_nonfinite_batch_keeps_running_statistics(make, shape, axes, bad):
    """A batch with NaN or Inf in feature 3 leaves that feature's running statistics as
    they were (PyTorch folds the NaN in, and inference with them is NaN from then on);
    the other features take the batch as usual, against NumPy; a clean batch after it
    updates feature 3 again. (The fused and the separate column kernels, and the NCHW
    path, share the merge; the CUDA twins are checked in tests/cuda_sim.)"""
    rng = np.random.default_rng(18)
    layer = make()
    ch = 1 if len(axes) == 3 and axes[1] == 2 else -1  # the channel axis
    X = rng.normal(2.0, 3.0, shape)
    layer.forward(X)
    before = {k: layer.parameters[k].copy() for k in ("running_mean", "running_var")}
    Xb = rng.normal(-1.0, 0.5, shape)
    np.moveaxis(Xb, ch, -1)[(0,) * (len(shape) - 1) + (3,)] = bad
    Y = layer.forward(Xb)
    after = layer.parameters
    assert np.isfinite(after["running_mean"]).all() and np.isfinite(after["running_var"]).all()
    assert after["running_mean"][3] == before["running_mean"][3]
    assert after["running_var"][3] == before["running_var"][3]
    if len(axes) > 2 or axes == (0,):  # BatchNorm: the batch statistics over ``axes``
        mean = Xb.mean(axis=axes)
        expect = 0.5 * before["running_mean"] + 0.5 * mean
        others = np.arange(5) != 3
        np.testing.assert_allclose(after["running_mean"][others], expect[others], rtol=1e-12)
    assert np.isnan(np.moveaxis(Y, ch, -1)[..., 3]).any()
    layer.forward(X)  # a clean batch updates feature 3 again
    assert layer.parameters["running_mean"][3] != before["running_mean"][3]


def test_instancenorm_running_stats_used_in_eval():
    rng = np.random.default_rng(10)
    X = rng.normal(3, 2, (N, H, W, C))
    inn = nbnet.InstanceNorm2D(track_running_stats=True, momentum=0.5)
    inn.forward(X)
    mean_nc = X.mean(axis=(1, 2))
    np.testing.assert_allclose(inn.parameters["running_mean"], 0.5 * mean_nc.mean(0), rtol=1e-12)
    np.testing.assert_allclose(inn.parameters["running_var"], 0.5 + 0.5 * X.var(axis=(1, 2)).mean(0),
                               rtol=1e-12)
    inn.eval()
    rm, rv = inn.parameters["running_mean"], inn.parameters["running_var"]
    np.testing.assert_allclose(inn.forward(X), (X - rm) / np.sqrt(rv + 1e-5), rtol=1e-12, atol=1e-12)
    assert len(inn.X) == 1  # inference retained nothing new


# ------------------------------------------- row-pattern parameter gradients, both paths
@pytest.mark.parametrize("act", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("ratio", [0.0, float("inf")])
def test_row_parameter_gradients_by_columns_and_by_partials(monkeypatch, center, ratio, act, rng):
    """LayerNorm/RMSNorm reduce their parameter gradients either by column blocks
    (row_param_grads, chosen for wide, short inputs) or by per-chunk partials; ratio 0
    forces the first, inf the second. Both must match the float64 reference, with and
    without a fused activation, and both must *accumulate* over two backward calls."""
    from nbnet import config
    monkeypatch.setattr(config, "WIDE_PARTIALS_RATIO", ratio)
    monkeypatch.setattr(config, "PARAM_GRAD_COLUMNS", 7)  # several column tasks, a ragged last one
    X = rng.normal(3.0, 2.0, (37, 45))
    dY = rng.normal(size=X.shape)
    layer = (nbnet.LayerNorm1D(epsilon=1e-4, act_fn=act) if center
             else nbnet.RMSNorm(epsilon=1e-4, act_fn=act))
    layer.forward(X[:2], retain_derived=False)
    gamma = rng.uniform(0.5, 1.5, X.shape[1])
    params = {"scaler": gamma}
    if center:
        params["intercept"] = rng.normal(size=X.shape[1])
    layer.set_params({"parameters": params})
    beta = params.get("intercept", np.zeros(X.shape[1]))
    layer.forward(X)
    layer.forward(X)
    dX, dX2 = layer.backward([dY, dY])  # numpy-ml: one gradient per forward call
    np.testing.assert_array_equal(dX, dX2)
    dXr, dgr, dbr = ref.norm_backward_ref(X, dY, (1,), gamma, beta, 1e-4, ACTS[act],
                                          center=center, param_axes=(0,))
    assert rel_err(dX, dXr) < 1e-10
    assert rel_err(layer.gradients["scaler"], 2 * dgr) < 1e-10
    if center:
        assert rel_err(layer.gradients["intercept"], 2 * dbr) < 1e-10


# ------------------------------------------------ row layout: tiles of chunks and column blocks
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("serial_cutoff", [0, 1 << 40])
def test_batchnorm1d_column_tiles_match_reference(monkeypatch, dtype, act, serial_cutoff, rng):
    """Rows wider than ``config.TILE_BYTES`` are cut into column blocks, each task a chunk
    of rows times a block of columns. Tiles of 16 columns and chunks of 6 rows over a
    (23, 50) input give ragged last blocks (2 columns) and a ragged last chunk (5 rows:
    one segment pass and a row left over); training, backward, the running statistics and
    inference must match the float64 reference, from the parallel and the serial loops."""
    from nbnet import config
    it = np.dtype(dtype).itemsize
    monkeypatch.setattr(config, "TILE_BYTES", 16 * it)
    monkeypatch.setattr(config, "CHUNK_BYTES", 6 * 16 * it)
    monkeypatch.setattr(config, "SERIAL_CUTOFF", serial_cutoff)
    assert config.column_tiling(50, it) == (6, 16)
    X = rng.normal(1.5, 2.0, (23, 50)).astype(dtype)
    dY = rng.normal(size=X.shape).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, 50).astype(dtype)
    beta = rng.normal(0, 0.5, 50).astype(dtype)
    layer = nbnet.BatchNorm1D(act_fn=act)
    layer.forward(X[:2], retain_derived=False)
    layer.set_params({"parameters": {"scaler": gamma, "intercept": beta}})
    Y = layer.forward(X)
    dX = layer.backward(dY)
    Yr, mean, var = ref.norm_forward_ref(X, (0,), gamma, beta, 1e-5, ACTS[act])
    dXr, dgr, dbr = ref.norm_backward_ref(X, dY, (0,), gamma, beta, 1e-5, ACTS[act])
    tol = 1e-10 if dtype == np.float64 else 2e-6
    assert _rel(Y, Yr) < tol
    assert _rel(dX, dXr) < tol
    assert _rel(layer.gradients["scaler"], dgr) < tol
    assert _rel(layer.gradients["intercept"], dbr) < tol
    assert _rel(layer.parameters["running_mean"], 0.1 * mean.ravel()) < tol
    assert _rel(layer.parameters["running_var"], 0.9 + 0.1 * var.ravel()) < tol
    Yi = layer.forward(X, retain_derived=False)
    rm = layer.parameters["running_mean"].astype(np.float64)
    rv = layer.parameters["running_var"].astype(np.float64)
    zi = (X - rm) / np.sqrt(rv + 1e-5) * gamma + beta
    assert _rel(Yi, ref.act_ref(ACTS[act], zi)) < tol


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_blocks_do_not_change_the_bits(monkeypatch, dtype, rng):
    """Each column's sums run over its chunk's rows in the same order whatever block of
    columns the task has, so with the chunks fixed (here 8 rows), cutting the rows into
    blocks of 16, 24 or all 70 columns gives bit-identical outputs, gradients and running
    statistics (mean 1e3: a float32 shift far from zero)."""
    from nbnet import config
    it = np.dtype(dtype).itemsize
    X = rng.normal(1e3, 1.0, (61, 70)).astype(dtype)
    dY = rng.normal(size=X.shape).astype(dtype)
    results = []
    for cols in (16, 24, 70):
        monkeypatch.setattr(config, "TILE_BYTES", cols * it)
        monkeypatch.setattr(config, "CHUNK_BYTES", 8 * cols * it)
        assert config.column_tiling(70, it) == (8, cols)
        layer = nbnet.BatchNorm1D(act_fn="relu")
        out = [layer.forward(X).copy(), layer.backward(dY).copy(),
               layer.forward(X, retain_derived=False).copy()]
        out += [layer.gradients[k].copy() for k in sorted(layer.gradients)]
        out += [layer.parameters[k].copy() for k in sorted(layer.parameters)]
        results.append(out)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------- channels-first tasks: chunks and channel blocks
@pytest.mark.parametrize("chunk_bytes,shape", [(300, (5, 7, 3, 4)),      # 3 channels a task: 3, 3, 1
                                               (2000, (130, 7, 3, 4))])  # 2 whole examples a chunk
@pytest.mark.parametrize("act", [None, "relu", "tanh"])
def test_batchnorm2d_nchw_channel_blocks_and_chunks(monkeypatch, chunk_bytes, shape, act, rng):
    """BatchNorm2D NCHW splits its (N, C, H*W) view into tasks of a block of channels of a
    chunk of examples; a small CHUNK_BYTES forces ragged channel blocks or multi-example
    chunks. Training, backward, running statistics and inference must still match the
    float64 reference."""
    from nbnet import config
    from nbnet.layers.normalization import _cf_chunking
    monkeypatch.setattr(config, "CHUNK_BYTES", chunk_bytes)
    n, per_task = _cf_chunking(shape[0], shape[1], shape[2] * shape[3], 8)
    assert (per_task < shape[1]) if chunk_bytes == 300 else (n > 1 and per_task == shape[1])
    _check_batchnorm2d_nchw(rng.normal(1.5, 2.0, shape), act, rng)


def _check_batchnorm2d_nchw(X, act, rng):
    """BatchNorm2D NCHW on ``X`` (float64) against the float64 reference: training,
    backward, parameter gradients, running statistics and inference."""
    dY = rng.normal(size=X.shape)
    gamma = rng.uniform(0.5, 1.5, X.shape[1])
    beta = rng.normal(0, 0.5, X.shape[1])
    layer = nbnet.BatchNorm2D(act_fn=act, data_format="NCHW")
    layer.forward(X[:2], retain_derived=False)
    layer.set_params({"parameters": {"scaler": gamma, "intercept": beta}})
    Y = layer.forward(X)
    dX = layer.backward(dY)
    Xc, dYc = _nchw(X), _nchw(dY)
    Yr, mean, var = ref.norm_forward_ref(Xc, (0, 1, 2), gamma, beta, 1e-5, ACTS[act])
    dXr, dgr, dbr = ref.norm_backward_ref(Xc, dYc, (0, 1, 2), gamma, beta, 1e-5, ACTS[act])
    assert _rel(_nchw(Y), Yr) < 1e-10
    assert _rel(_nchw(dX), dXr) < 1e-10
    assert _rel(layer.gradients["scaler"], dgr) < 1e-10
    assert _rel(layer.gradients["intercept"], dbr) < 1e-10
    assert _rel(layer.parameters["running_mean"], 0.1 * mean.ravel()) < 1e-10
    assert _rel(layer.parameters["running_var"], 0.9 + 0.1 * var.ravel()) < 1e-10
    Yi = layer.forward(X, retain_derived=False)
    rm, rv = layer.parameters["running_mean"], layer.parameters["running_var"]
    zi = (Xc - rm) / np.sqrt(rv + 1e-5) * gamma + beta
    assert _rel(_nchw(Yi), ref.act_ref(ACTS[act], zi)) < 1e-10


@pytest.mark.parametrize("chunk_bytes", [40, 1 << 18])
@pytest.mark.parametrize("shape", [(9, 5, 2, 1), (6, 11, 3, 1), (70, 3, 2, 2)])
@pytest.mark.parametrize("act", [None, "relu"])
def test_batchnorm2d_nchw_short_runs_match_reference(monkeypatch, chunk_bytes, shape, act, rng):
    """Small images (runs of H*W = 2, 3, 4 values) through the channels-first kernels,
    which address each run by its flat offset: with the default chunking and with
    CHUNK_BYTES = 40 (ragged blocks of 2 channels, chunks of one example), training,
    backward, running statistics and inference match the float64 reference (data with
    mean 50: the shift by a chunk's first value is far for runs this short)."""
    from nbnet import config
    monkeypatch.setattr(config, "CHUNK_BYTES", chunk_bytes)
    _check_batchnorm2d_nchw(rng.normal(50.0, 2.0, shape), act, rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("N,C", [(7, 5), (96, 3000)])
def test_batchnorm2d_nchw_one_pixel_is_batchnorm1d(dtype, act, N, C, rng):
    """An (N, C, 1, 1) NCHW input (after global pooling) is an (N, C) row layout in
    memory and takes BatchNorm1D's kernels: outputs, gradients, running statistics and
    inference bit-identical to BatchNorm1D on the (N, C) view, and to BatchNorm2D NHWC
    on (N, 1, 1, C)."""
    X = rng.normal(2.0, 3.0, (N, C)).astype(dtype)
    dY = rng.normal(size=X.shape).astype(dtype)
    results = []
    for layer, shape in ((nbnet.BatchNorm2D(act_fn=act, data_format="NCHW"), (N, C, 1, 1)),
                         (nbnet.BatchNorm1D(act_fn=act), (N, C)),
                         (nbnet.BatchNorm2D(act_fn=act), (N, 1, 1, C))):
        Y = layer.forward(X.reshape(shape))
        dX = layer.backward(dY.reshape(shape))
        assert Y.shape == dX.shape == shape
        Yi = layer.forward(X.reshape(shape), retain_derived=False)
        results.append([Y.reshape(N, C).copy(), dX.reshape(N, C).copy(), Yi.reshape(N, C).copy()]
                       + [layer.gradients[k].copy() for k in sorted(layer.gradients)]
                       + [layer.parameters[k].copy() for k in sorted(layer.parameters)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    Yr, _, _ = ref.norm_forward_ref(X, (0,), np.ones(C), np.zeros(C), 1e-5, ACTS[act])
    assert _rel(results[0][0], Yr) < (1e-10 if dtype == np.float64 else 2e-6)


def test_channels_first_partials_do_not_depend_on_channel_blocks(rng):
    """Each channel's sums run over its runs in example order whatever the channel blocks,
    so the partial statistics and gradient sums are bit-identical for any
    ``channels_per_task`` (given the chunking of the examples)."""
    from nbnet.registry import get_kernel
    X = rng.normal(1e3, 1.0, (9, 7, 33)).astype(np.float32)
    dY = rng.normal(size=X.shape).astype(np.float32)
    mean = X.mean(axis=(0, 2), dtype=np.float64)
    invstd = 1.0 / X.std(axis=(0, 2), dtype=np.float64)
    g, b = np.ones(7, np.float32), np.zeros(7, np.float32)
    n_per = 4
    results = []
    for per_task in (1, 3, 7):
        pm, pm2 = np.empty((3, 7)), np.empty((3, 7))
        sg, sgx = np.empty((3, 7)), np.empty((3, 7))
        Y = np.empty_like(X)
        get_kernel("column_partial_stats_cf", "cpu")(X.size, X, n_per, per_task, pm, pm2)
        get_kernel("column_backward_reduce_cf", "cpu")(X.size, X, dY, mean, invstd, g, b, 0, 0.0,
                                                       n_per, per_task, sg, sgx)
        get_kernel("column_normalize_cf", "cpu")(X.size, X, mean, invstd, g, b, 0, 0.0, n_per,
                                                 per_task, False, Y)
        results.append((pm, pm2, sg, sgx, Y))
    for other in results[1:]:
        for a, c in zip(results[0], other):
            np.testing.assert_array_equal(a, c)
    # and the chunk statistics are right
    for k in range(3):
        chunk = X[k * n_per:(k + 1) * n_per].astype(np.float64)
        np.testing.assert_allclose(results[0][0][k], chunk.mean(axis=(0, 2)), rtol=1e-12)


# ------------------------------------------------------------- fused CPU training ops
class _SeparateKernelsBN(nbnet.BatchNorm1D):
    """BatchNorm1D with its statistics hooks overridden (by the same code), which sends
    it down the path of separate kernels, as SyncBatchNorm takes."""

    def _batch_stats(self, *args):
        return nbnet.layers.normalization._BatchNormBase._batch_stats(self, *args)

    def _sums_for_dx(self, *args):
        return nbnet.layers.normalization._BatchNormBase._sums_for_dx(self, *args)


@pytest.mark.parametrize("shape", [(7, 5), (301, 48), (1000, 300)])  # serial, ragged, parallel
@pytest.mark.parametrize("act_fn", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_training_ops_are_bit_identical_to_the_separate_kernels(monkeypatch, shape,
                                                                      act_fn, dtype, rng):
    """The CPU ``column_forward_train`` / ``column_backward_train`` (one call per pass
    pair) run the separate kernels' task bodies in the same order: outputs, running
    statistics and accumulated gradients must match them bit for bit, over two
    forward/backward pairs (the second accumulates) and an inference forward."""
    from nbnet.layers.base import LayerBase
    calls = []
    kernel = LayerBase._kernel
    monkeypatch.setattr(LayerBase, "_kernel", lambda self, op: calls.append(op) or kernel(self, op))
    X = [rng.normal(5.0, 3.0, shape).astype(dtype) for _ in range(2)]
    dY = [rng.normal(size=shape).astype(dtype) for _ in range(2)]
    results = []
    for make in (nbnet.BatchNorm1D, _SeparateKernelsBN):
        calls.clear()
        layer = make(act_fn=act_fn, momentum=0.8)
        ys = [layer.forward(x).copy() for x in X]
        dxs = [d.copy() for d in layer.backward(dY)]
        yi = layer.forward(X[0], retain_derived=False).copy()
        p, g = layer.parameters, layer.gradients
        results.append(ys + dxs + [yi, p["running_mean"].copy(), p["running_var"].copy(),
                                   g["scaler"].copy(), g["intercept"].copy()])
        fused = {"column_forward_train", "column_backward_train"} <= set(calls)
        assert fused == (make is nbnet.BatchNorm1D), sorted(set(calls))
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_partial_sums_pair_equals_two_merges_and_adds(accumulate, dtype, rng):
    """The CPU merge_partial_sums_pair (LayerNorm's parameter gradients) gives what two
    merge_partial_sums calls and two NumPy adds give, bit for bit, for gradients of any
    shape (LayerNorm2D's (H, W, C)); without ``accumulate`` the gradients stay as they were."""
    from nbnet.registry import get_kernel
    pa, pb = rng.normal(size=(2, 37, 600))
    grads = [rng.normal(size=(10, 20, 3)).astype(dtype) for _ in range(2)]
    want_a, want_b = np.empty(600), np.empty(600)
    for p, out in ((pa, want_a), (pb, want_b)):
        get_kernel("merge_partial_sums", "cpu")(p.size, p, out)
    want_grads = [g.copy() for g in grads]
    if accumulate:
        for g, out in zip(want_grads, (want_a, want_b)):
            np.add(g, out.reshape(g.shape), out=g, casting="unsafe")
    out_a, out_b = np.full(600, np.nan), np.full(600, np.nan)
    for size in (0, 1 << 30):  # the serial and the parallel loop
        got = [g.copy() for g in grads]
        get_kernel("merge_partial_sums_pair", "cpu")(size, pa, pb, out_a, out_b, *got, accumulate)
        np.testing.assert_array_equal(out_a, want_a)
        np.testing.assert_array_equal(out_b, want_b)
        for g, w in zip(got, want_grads):
            np.testing.assert_array_equal(g, w)


# ------------------------------------------------------------- streaming (non-temporal) stores
@pytest.mark.parametrize("dtype,C,tile_bytes", [(np.float32, 16, 4096), (np.float32, 48, 4096),
                                                (np.float64, 8, 4096), (np.float64, 40, 4096),
                                                (np.float32, 48, 64), (np.float64, 40, 128)])
def test_streamed_outputs_are_bit_identical(monkeypatch, dtype, C, tile_bytes, rng):
    """With ``config.STREAM_BYTES = 0`` every eligible BatchNorm output (rows of whole cache
    lines) is written with non-temporal stores; forward, backward and inference must give
    bit-for-bit what the plain stores give, with whole rows and with rows cut into column
    blocks (16 columns: three tiles a row, the last 8 float64 columns one cache line)."""
    from nbnet import config
    monkeypatch.setattr(config, "TILE_BYTES", tile_bytes)
    X = rng.normal(2.0, 3.0, (301, C)).astype(dtype)
    dY = rng.normal(size=X.shape).astype(dtype)
    results = []
    for stream_bytes in (1 << 62, 0):
        monkeypatch.setattr(config, "STREAM_BYTES", stream_bytes)
        assert config.streams(X) == (stream_bytes == 0)
        layer = nbnet.BatchNorm1D()
        Y = layer.forward(X).copy()
        dX = layer.backward(dY).copy()
        Yi = layer.forward(X, retain_derived=False).copy()
        results.append((Y, dX, Yi, layer.gradients["scaler"].copy()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_stream_copy_any_alignment_and_length(dtype, offset, rng):
    """The streaming kernels write through stream_copy at any alignment of the output row
    (plain stores up to the first 32-byte boundary, then aligned vectors, then the rest)
    and any row length, including rows shorter than one vector."""
    from nbnet.registry import get_kernel
    for C in (1, 5, 8, 64, 77):
        X = rng.normal(size=(9, C)).astype(dtype)
        mean, invstd = X.mean(axis=0, dtype=np.float64), np.full(C, 0.5)
        g, b = np.ones(C, dtype), np.zeros(C, dtype)
        ref = np.empty_like(X)
        get_kernel("column_normalize", "cpu")(X.size, X, mean, invstd, g, b, 0, 0.0, 4, C,
                                              False, ref)
        buf = np.zeros(X.size + 8, dtype)
        out = buf[offset:offset + X.size].reshape(X.shape)
        get_kernel("column_normalize", "cpu")(X.size, X, mean, invstd, g, b, 0, 0.0, 4, C,
                                              True, out)
        np.testing.assert_array_equal(out, ref)
        assert not buf[:offset].any() and not buf[offset + X.size:].any()  # nothing outside

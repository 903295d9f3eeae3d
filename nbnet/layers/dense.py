"""The fully connected layer: BLAS matmul plus one compiled epilogue each way.

Forward: ``Z = X @ W`` through the registry's ``matmul`` (NumPy's BLAS on the CPU), then
one fused pass ``Z += b; Y = f(Z)`` (``dense_forward_epilogue``). Backward: one fused pass
``dZ = dLdy * f'(Z)`` that also writes per-chunk column sums of ``dZ`` (the bias gradient,
merged in chunk order, so it is bit-identical for any thread count), then BLAS for
``dW = X.T @ dZ`` and ``dX = dZ @ W.T``. Without an activation the forward epilogue adds
the bias in place and the backward pass only sums columns (``dZ`` is ``dLdy``). On CPU a
smooth activation (ELU, GELU, tanh, sigmoid) is not fused: the epilogues add the bias and
sum the columns, and the activation layers' vectorised kernels compute ``Y = f(Z)`` and
``dZ = dLdy * f'(Z)`` as passes of their own.
"""
import math

import numpy as np

from .. import config, devices
from .._validation import check_float_array
from ..activations import LEAKY_RELU, RELU, TANH, parse_activation
from .activation import (SLOPE_FROM_OUTPUT, activation_backward_retained, activation_forward,
                         fused_activation, retained_outputs, runs_apart)
from .base import LayerBase

_F64 = np.float64

INITIALIZERS = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "std_normal",
                "trunc_normal")


def _truncated_normal(rng, mean, std, shape):
    """numpy-ml's truncated normal: redraw every value more than 2 std from the mean."""
    out = rng.normal(mean, std, size=shape)
    bad = np.abs(out - mean) > 2 * std
    while bad.any():
        out[bad] = rng.normal(mean, std, size=int(bad.sum()))
        bad = np.abs(out - mean) > 2 * std
    return out


def glorot_gain(act):
    """numpy-ml's gain for the glorot initialisers: tanh 5/3, ReLU sqrt(2),
    leaky ReLU sqrt(2 / (1 + alpha**2)), else 1.

    numpy-ml writes the leaky-ReLU gain as ``np.sqrt(2 / 1 + alpha ** 2)`` (a misplaced
    parenthesis); we use the formula it intends (PyTorch's ``calculate_gain``).
    """
    if act.code == TANH:
        return 5.0 / 3.0
    if act.code == RELU:
        return math.sqrt(2.0)
    if act.code == LEAKY_RELU:
        return math.sqrt(2.0 / (1.0 + act.alpha ** 2))
    return 1.0


def init_weights(mode, shape, act, rng):
    """A float64 ``(fan_in, fan_out)`` weight matrix drawn as numpy-ml's WeightInitializer.

    ===============  =======================================================
    mode             distribution
    ===============  =======================================================
    glorot_uniform   U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out))
    glorot_normal    truncated N(0, std), std = gain * sqrt(2 / (fan_in + fan_out))
    he_uniform       U(-b, b), b = sqrt(6 / fan_in)
    he_normal        truncated N(0, std), std = sqrt(2 / fan_in)
    std_normal       N(0, 1)
    trunc_normal     truncated N(0, 1)
    ===============  =======================================================

    "Truncated" redraws values beyond two standard deviations (numpy-ml's rule).
    """
    fan_in, fan_out = shape
    if mode == "glorot_uniform":
        b = glorot_gain(act) * math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-b, b, size=shape)
    if mode == "glorot_normal":
        return _truncated_normal(rng, 0.0, glorot_gain(act) * math.sqrt(2.0 / (fan_in + fan_out)), shape)
    if mode == "he_uniform":
        b = math.sqrt(6.0 / fan_in)
        return rng.uniform(-b, b, size=shape)
    if mode == "he_normal":
        return _truncated_normal(rng, 0.0, math.sqrt(2.0 / fan_in), shape)
    if mode == "std_normal":
        return rng.standard_normal(size=shape)
    if mode == "trunc_normal":
        return _truncated_normal(rng, 0.0, 1.0, shape)
    raise ValueError(f"unknown init {mode!r}: expected one of {', '.join(INITIALIZERS)}")


def _work(n_rows, n_cols, rows_per_chunk):
    """The size that picks a row-chunk kernel's path: 0 (serial) when the rows fit in one
    chunk, since the parallel path would start a parallel region for one task."""
    return n_rows * n_cols if n_rows > rows_per_chunk else 0


def _check_positive_int(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be None or a non-negative integer, got {seed!r}")
    return int(seed)


class FullyConnected(LayerBase):
    r"""A fully connected layer (numpy-ml's ``FullyConnected``).

    .. math::

        Y = f(X W + b)

    Parameters
    ----------
    n_out : int
        Output features.
    act_fn : str, Activation or None
        Activation fused into the epilogue (on CPU, ELU, GELU, tanh and sigmoid run as a
        pass of their own over Z; see :mod:`nbnet.activations`); None is the
        identity.
    init : str, default "glorot_uniform"
        One of glorot_uniform, glorot_normal, he_uniform, he_normal, std_normal,
        trunc_normal (numpy-ml's initialisers, see :func:`init_weights`).
    optimizer : str, dict, optimizer object or None
        ``None`` is SGD (numpy-ml's default).
    seed : int, optional
        Seeds the generator that draws ``W`` (drawn in float64, then cast to the input's
        dtype, so float32 and float64 layers with one seed hold the same values up to
        rounding). None draws fresh entropy.
    device : {"cpu", "cuda"}, optional
    n_in : int, optional
        Input features; inferred from the first input when omitted (numpy-ml's rule).

    Notes
    -----
    Shapes: ``X (N, n_in)``, ``Y (N, n_out)``, ``W (n_in, n_out)``, ``b (1, n_out)``
    (numpy-ml's), all of the input's dtype. ``derived_variables["Z"]`` holds the
    pre-activation ``X W + b`` of each retained forward call; with ``act_fn`` tanh or the
    sigmoid on CPU, ``derived_variables["Y"]`` also holds the output, which backward
    differentiates from (as PyTorch does; like the input, a retained output must not be
    modified in place before ``backward``).
    """

    _param_keys = ("W", "b")
    #: backward accepts compute_dX=False (Model skips dX for its first layer)
    _can_skip_dX = True

    def __init__(self, n_out, act_fn=None, init="glorot_uniform", optimizer=None, seed=None,
                 device=None, n_in=None):
        n_out = _check_positive_int("n_out", n_out)
        if init not in INITIALIZERS:
            raise ValueError(f"unknown init {init!r}: expected one of {', '.join(INITIALIZERS)}")
        act = parse_activation(act_fn)
        seed = _check_seed(seed)
        if n_in is not None:
            n_in = _check_positive_int("n_in", n_in)
        super().__init__(optimizer=optimizer, device=device)
        self.n_out = n_out
        self.n_in = n_in
        self.init = init
        self.act_fn = act
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.derived_variables = {"Z": []}
        self._grads_are_zero = True

    # -------------------------------------------------------------- parameters
    @property
    def hyperparameters(self):
        return {
            "layer": "FullyConnected",
            "init": self.init,
            "n_in": self.n_in,
            "n_out": self.n_out,
            "act_fn": str(self.act_fn),
            "seed": self.seed,
            "device": self.device,
            "optimizer": self.optimizer.hyperparameters,
        }

    def _init_params(self, dtype):
        W = init_weights(self.init, (self.n_in, self.n_out), self.act_fn, self._rng).astype(dtype)
        b = np.zeros((1, self.n_out), dtype)
        to = lambda a: devices.to_device(a, self.device)  # noqa: E731
        self.parameters = {"W": to(W), "b": to(b)}
        self.gradients = {"W": to(np.zeros_like(W)), "b": to(np.zeros_like(b))}
        self._grads_are_zero = True
        self.is_initialized = True

    def _init_from_params(self, params):
        W = params.get("W")
        if W is None:
            raise ValueError("FullyConnected.set_params: an unbuilt layer needs 'W' to learn n_in")
        self.n_in = int(W.shape[0])
        dtype = np.dtype(W.dtype)
        zeros_W = np.zeros((self.n_in, self.n_out), dtype)
        zeros_b = np.zeros((1, self.n_out), dtype)
        to = lambda a: devices.to_device(a, self.device)  # noqa: E731
        self.parameters = {"W": to(zeros_W), "b": to(zeros_b)}
        self.gradients = {"W": to(zeros_W.copy()), "b": to(zeros_b.copy())}
        self._grads_are_zero = True
        self.is_initialized = True

    def _expected_param_shapes(self, params):
        if self.is_initialized:
            return super()._expected_param_shapes(params)
        W = params.get("W")
        if W is None:
            raise ValueError("FullyConnected.set_params: an unbuilt layer needs 'W' to learn n_in")
        if np.ndim(W) != 2 or np.shape(W)[1] != self.n_out:
            raise ValueError(f"FullyConnected.set_params: 'W' must have shape (n_in, {self.n_out}), "
                             f"got {tuple(np.shape(W))}")
        if self.n_in is not None and np.shape(W)[0] != self.n_in:
            raise ValueError(f"FullyConnected.set_params: 'W' must have shape ({self.n_in}, "
                             f"{self.n_out}), got {tuple(np.shape(W))}")
        return {"W": tuple(np.shape(W)), "b": (1, self.n_out)}

    def _settable_hyperparameters(self):
        setters = super()._settable_hyperparameters()
        setters["act_fn"] = lambda v: setattr(self, "act_fn", parse_activation(v))
        return setters

    def flush_gradients(self):
        # Invariant: ``_grads_are_zero`` is True only while ``gradients`` hold zeros (set here
        # and at build time, cleared by the first accumulating backward), which lets that
        # backward write ``X.T @ dZ`` straight into ``gradients["W"]`` instead of adding a
        # temporary: one pass over W fewer per step.
        super().flush_gradients()
        self._grads_are_zero = True

    # -------------------------------------------------------------- forward
    def forward(self, X, retain_derived=True):
        """Y = f(X @ W + b); retains X and Z = X @ W + b in training mode."""
        X = check_float_array(X, "X", ndim=2, device=self.device)
        if self.n_in is not None and X.shape[1] != self.n_in:
            raise ValueError(f"FullyConnected was built for {self.n_in} input features, got input "
                             f"of shape {tuple(X.shape)}")
        self._check_dtype_matches(X)
        if not self.is_initialized:
            self.n_in = int(X.shape[1])
            self._init_params(np.dtype(X.dtype))
        N = X.shape[0]
        C = self.n_out
        p = self.parameters
        code, alpha = fused_activation(self.act_fn, self.device)
        Z = self._empty((N, C), X.dtype)
        self._kernel("matmul")(X, p["W"], Z)
        Y = Z if self.act_fn.code == 0 else self._empty((N, C), X.dtype)
        if N:
            rpc = config.rows_per_chunk(C, X.dtype.itemsize)
            self._kernel("dense_forward_epilogue")(_work(N, C, rpc), Z, p["b"].reshape(-1), code,
                                                   alpha, rpc, Y)
        apart = runs_apart(self.act_fn, self.device)
        if apart:  # a smooth activation, as its own pass
            activation_forward(self, self.act_fn, Z, Y)
        if self._is_training(retain_derived):
            self.X.append(X)
            self.derived_variables["Z"].append(Z)
            if apart and self.act_fn.code in SLOPE_FROM_OUTPUT:  # tanh, sigmoid: slope from Y
                self.derived_variables.setdefault("Y", []).append(Y)
        return Y

    # -------------------------------------------------------------- backward
    def backward(self, dLdy, retain_grads=True, compute_dX=True):
        """dL/dX from dL/dY; accumulates ``gradients["W"]`` and ``gradients["b"]``.

        ``compute_dX=False`` skips the ``dZ @ W.T`` product and returns None (for the
        first layer of a model, whose input needs no gradient; an nbnet extension).
        """
        grads, was_list = self._gradient_list(dLdy)
        checked = []
        for dy, X in zip(grads, self.X):
            dy = check_float_array(dy, "dLdy", ndim=2, device=self.device)
            if tuple(dy.shape) != (X.shape[0], self.n_out):
                raise ValueError(f"dLdy must have the shape of the layer's output "
                                 f"{(X.shape[0], self.n_out)}, got {tuple(dy.shape)}")
            checked.append(dy if dy.dtype == X.dtype else dy.astype(X.dtype))
        p, g = self.parameters, self.gradients
        code, alpha = fused_activation(self.act_fn, self.device)
        apart = runs_apart(self.act_fn, self.device)
        matmul, add_into = self._kernel("matmul"), self._kernel("add_into")
        out = []
        Ys = retained_outputs(self, self.act_fn, len(self.X))  # None each unless retained
        for dy, X, Z, Y in zip(checked, self.X, self.derived_variables["Z"], Ys):
            N, C = dy.shape
            rpc = config.rows_per_chunk(C, dy.dtype.itemsize)
            n_chunks = max(1, -(-N // rpc))
            partial = self._empty((n_chunks, C), _F64)
            if apart:  # a smooth activation, as its own pass
                dZ = activation_backward_retained(self, self.act_fn, Z, Y, dy,
                                                  self._empty((N, C), dy.dtype))
                if N:
                    self._kernel("column_partial_sums")(_work(N, C, rpc), dZ, rpc, partial)
            elif code == 0:
                dZ = dy
                if N:
                    self._kernel("column_partial_sums")(_work(N, C, rpc), dy, rpc, partial)
            else:
                dZ = self._empty((N, C), dy.dtype)
                if N:
                    self._kernel("dense_backward_epilogue")(_work(N, C, rpc), Z, dy, code, alpha, rpc,
                                                            dZ, partial)
            if N == 0:
                self._kernel("fill")(partial.reshape(-1), 0.0)
            if retain_grads:
                db = self._empty(C, _F64)
                self._kernel("merge_partial_sums")(n_chunks * C, partial, db)
                if self._grads_are_zero:
                    # X.T @ dZ; the gradients are zero: write, don't add
                    matmul(X, dZ, g["W"], True)
                    self._grads_are_zero = False
                else:
                    dW = self._empty(g["W"].shape, g["W"].dtype)
                    matmul(X, dZ, dW, True)  # X.T @ dZ
                    add_into(g["W"], dW)
                add_into(g["b"].reshape(-1), db)
            if compute_dX:
                dX = self._empty((N, self.n_in), dy.dtype)
                matmul(dZ, p["W"], dX, False, True)  # dZ @ W.T
                out.append(dX)
            else:
                out.append(None)
        return out if was_list else out[0]

"""Normalization layers on the two reduction patterns of DESIGN.md.

* Column statistics (one statistic per feature, reduced over the batch):
  :class:`BatchNorm1D` on ``(N, C)``.
* Row statistics (statistics per example, reduced over its features):
  :class:`LayerNorm1D` on ``(N, D)``.

Every layer validates its input completely before it touches any state, so a bad call
leaves parameters and running statistics exactly as they were.

NaN and Inf propagate, but only to what they touch: a NaN in feature ``j`` of a
BatchNorm input makes output column ``j``, ``running_mean[j]`` and ``running_var[j]``
NaN and leaves every other feature finite; a NaN in example ``i`` of a LayerNorm input
makes output row ``i`` NaN (and, in backward, the parameter gradients, which sum over
rows), leaving the other rows finite.
"""
import math

import numpy as np

from .. import config, devices
from .._validation import check_float_array
from ..activations import parse_activation
from .base import LayerBase

_F64 = np.float64


def _check_epsilon(epsilon):
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
    return float(epsilon)


def _check_momentum(momentum):
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a number in [0, 1] (numpy-ml's convention: "
                         f"running = momentum * running + (1 - momentum) * batch), got {momentum!r}")
    return float(momentum)


class _NormBase(LayerBase):
    """What every normalization layer shares: epsilon, act_fn, lazy build, dY checks."""

    #: number of input dimensions the layer accepts (an int or a tuple of ints)
    _ndim = 2

    def __init__(self, epsilon, optimizer, act_fn, device, n_in):
        super().__init__(optimizer=optimizer, device=device)
        self.epsilon = _check_epsilon(epsilon)
        self.act_fn = parse_activation(act_fn)
        self.n_in = self.n_out = None
        if n_in is not None:
            if not (isinstance(n_in, (int, np.integer)) and n_in >= 1):
                raise ValueError(f"n_in must be a positive integer, got {n_in!r}")
            self.n_in = self.n_out = int(n_in)

    def _settable_hyperparameters(self):
        setters = super()._settable_hyperparameters()
        setters["epsilon"] = lambda v: setattr(self, "epsilon", _check_epsilon(v))
        setters["act_fn"] = lambda v: setattr(self, "act_fn", parse_activation(v))
        return setters

    def _check_input(self, X, name="X"):
        X = check_float_array(X, name, ndim=self._ndim, device=self.device)
        n = self._n_features(X)
        if self.n_in is not None and n != self.n_in:
            raise ValueError(f"{type(self).__name__} was built for {self.n_in} features, got "
                             f"input of shape {tuple(X.shape)} ({n} features)")
        self._check_dtype_matches(X)
        return X

    def _n_features(self, X):
        return int(X.shape[-1])

    def _check_grads(self, dLdy):
        grads, was_list = self._gradient_list(dLdy)
        checked = []
        for dy, X in zip(grads, self.X):
            dy = check_float_array(dy, "dLdy", ndim=X.ndim, device=self.device)
            if tuple(dy.shape) != tuple(X.shape):
                raise ValueError(f"dLdy must have the shape of the layer's output "
                                 f"{tuple(X.shape)}, got {tuple(dy.shape)}")
            if dy.dtype != X.dtype:
                dy = dy.astype(X.dtype)
            checked.append(dy)
        return checked, was_list

    def _accumulate(self, name, value):
        """gradients[name] += value (value is float64; the gradient keeps its dtype)."""
        g = self.gradients[name]
        np.add(g, value, out=g, casting="unsafe")

    def _ensure_built(self, n_features, dtype):
        if not self.is_initialized:
            self.n_in = self.n_out = n_features
            self._init_params(np.dtype(dtype))
            self.is_initialized = True

    @property
    def _act(self):
        return self.act_fn.code, float(self.act_fn.alpha)


# ============================================================== column statistics

class _BatchNormBase(_NormBase):
    """BatchNorm machinery over a ``(rows, C)`` view of the input."""

    _param_keys = ("scaler", "intercept", "running_mean", "running_var")

    def __init__(self, momentum=0.9, epsilon=1e-5, optimizer=None, act_fn=None,
                 unbiased_running_var=False, device=None, n_in=None):
        super().__init__(epsilon, optimizer, act_fn, device, n_in)
        self.momentum = _check_momentum(momentum)
        self.unbiased_running_var = bool(unbiased_running_var)
        self.derived_variables = {"mean": [], "invstd": []}

    def _init_params(self, dtype):
        C = self.n_in
        ones = np.ones(C, dtype=dtype)
        zeros = np.zeros(C, dtype=dtype)
        to = lambda a: devices.to_device(a.copy(), self.device)  # noqa: E731
        self.parameters = {"scaler": to(ones), "intercept": to(zeros),
                           "running_mean": to(zeros), "running_var": to(ones)}
        self.gradients = {"scaler": to(zeros), "intercept": to(zeros)}

    def _init_from_params(self, params):
        C = int(np.asarray(params.get("scaler", params.get("running_mean"))).shape[0])
        dtype = next(iter(params.values())).dtype
        self.n_in = self.n_out = C
        self._init_params(np.dtype(dtype))
        self.is_initialized = True

    def _expected_param_shapes(self, params):
        if self.is_initialized:
            return super()._expected_param_shapes(params)
        shapes = {tuple(np.shape(v)) for v in params.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"{type(self).__name__}.set_params: parameters must be 1-D arrays "
                             f"of one length, got shapes {sorted(shapes)}")
        C = next(iter(shapes))[0] if self.n_in is None else self.n_in
        return {k: (C,) for k in self._param_keys}

    def _settable_hyperparameters(self):
        setters = super()._settable_hyperparameters()
        setters["momentum"] = lambda v: setattr(self, "momentum", _check_momentum(v))
        setters["unbiased_running_var"] = lambda v: setattr(self, "unbiased_running_var", bool(v))
        return setters

    @property
    def hyperparameters(self):
        return {
            "layer": type(self).__name__,
            "act_fn": str(self.act_fn),
            "n_in": self.n_in,
            "n_out": self.n_out,
            "epsilon": self.epsilon,
            "momentum": self.momentum,
            "unbiased_running_var": self.unbiased_running_var,
            "device": self.device,
            "optimizer": self.optimizer.hyperparameters,
        }

    def reset_running_stats(self):
        """Running mean back to 0 and running variance back to 1 (in place)."""
        if self.is_initialized:
            p = self.parameters
            dtype = p["running_mean"].dtype
            p["running_mean"] = devices.to_device(np.zeros(self.n_in, dtype), self.device)
            p["running_var"] = devices.to_device(np.ones(self.n_in, dtype), self.device)

    # -------------------------------------------------------------- views
    def _rows(self, X):
        """The ``(rows, C)`` view the column kernels run on."""
        return X.reshape(-1, X.shape[-1])

    # -------------------------------------------------------------- forward
    def forward(self, X, retain_derived=True):
        """Normalize ``X`` per feature.

        Training (``retain_derived`` true, layer trainable and in train mode) uses the
        batch mean and biased variance and updates the running statistics:
        ``running = momentum * running + (1 - momentum) * batch``. Inference uses the
        running statistics and changes nothing.

        Raises ValueError in training when a feature has a single value (PyTorch's rule).
        """
        X = self._check_input(X)
        X2 = self._rows(X)
        R, C = X2.shape
        train = self._is_training(retain_derived)
        if train and R == 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per feature "
                             f"when training, got input of shape {tuple(X.shape)}")
        self._ensure_built(C, X.dtype)
        p = self.parameters
        gamma, beta = p["scaler"], p["intercept"]
        rpc = config.rows_per_chunk(C, X.dtype.itemsize)
        code, alpha = self._act
        Y = self._empty(X.shape, X.dtype)
        if train:
            mean = self._empty(C, _F64)
            invstd = self._empty(C, _F64)
            if R > 0:
                n_chunks = -(-R // rpc)
                pm = self._empty((n_chunks, C), _F64)
                pm2 = self._empty((n_chunks, C), _F64)
                self._kernel("column_partial_stats")(R * C, X2, rpc, pm, pm2)
                self._kernel("column_merge_stats")(n_chunks * C, pm, pm2, R, rpc, self.epsilon,
                                                   self.momentum, self.unbiased_running_var,
                                                   p["running_mean"], p["running_var"], mean, invstd)
        else:
            mean, invstd = self._running_mean_invstd()
        if R > 0:
            self._kernel("column_normalize")(R * C, X2, mean, invstd, gamma, beta, code, alpha,
                                             rpc, self._rows(Y))
        if train:
            self.X.append(X)
            self.derived_variables["mean"].append(mean)
            self.derived_variables["invstd"].append(invstd)
        return Y

    def _running_mean_invstd(self):
        p = self.parameters
        if self.device == "cpu":
            mean = p["running_mean"].astype(_F64)
            invstd = 1.0 / np.sqrt(p["running_var"].astype(_F64) + self.epsilon)
            return mean, invstd
        mean = self._empty(self.n_in, _F64)
        invstd = self._empty(self.n_in, _F64)
        self._kernel("running_invstd")(self.n_in, p["running_mean"], p["running_var"],
                                       self.epsilon, mean, invstd)
        return mean, invstd

    # -------------------------------------------------------------- backward
    def backward(self, dLdy, retain_grads=True):
        """dL/dX from dL/dY, reusing the mean and invstd saved by forward.

        One fused pass reduces ``sum(g)`` and ``sum(g * xhat)`` per feature (``g`` is
        dLdy times the activation's slope), one elementwise pass writes dX:
        ``dX = scaler * invstd * (g - mean(g) - xhat * mean(g * xhat))``.
        ``gradients["scaler"] += sum(g * xhat)``, ``gradients["intercept"] += sum(g)``.
        """
        grads, was_list = self._check_grads(dLdy)
        code, alpha = self._act
        p = self.parameters
        gamma, beta = p["scaler"], p["intercept"]
        out = []
        for dy, X, mean, invstd in zip(grads, self.X, self.derived_variables["mean"],
                                       self.derived_variables["invstd"]):
            X2, dy2 = self._rows(X), self._rows(dy)
            R, C = X2.shape
            dX = self._empty(X.shape, X.dtype)
            if R > 0:
                rpc = config.rows_per_chunk(C, X.dtype.itemsize)
                n_chunks = -(-R // rpc)
                psg = self._empty((n_chunks, C), _F64)
                psgx = self._empty((n_chunks, C), _F64)
                self._kernel("column_backward_reduce")(R * C, X2, dy2, mean, invstd, gamma, beta,
                                                       code, alpha, rpc, psg, psgx)
                sum_g = self._empty(C, _F64)
                sum_gx = self._empty(C, _F64)
                merge = self._kernel("merge_partial_sums")
                merge(n_chunks * C, psg, sum_g)
                merge(n_chunks * C, psgx, sum_gx)
                self._kernel("column_backward_dx")(R * C, X2, dy2, mean, invstd, gamma, beta, code,
                                                   alpha, sum_g, sum_gx, rpc, self._rows(dX))
                if retain_grads:
                    self._accumulate("scaler", sum_gx)
                    self._accumulate("intercept", sum_g)
            out.append(dX)
        return out if was_list else out[0]


class BatchNorm1D(_BatchNormBase):
    r"""Batch normalization over the examples of a ``(N, C)`` input (numpy-ml's layer).

    .. math::

        y = f\left(\frac{x - \mu_B}{\sqrt{\sigma^2_B + \epsilon}} \cdot \text{scaler}
            + \text{intercept}\right)

    where :math:`\mu_B, \sigma^2_B` are the per-feature mean and biased variance of the
    batch in training, and the running statistics in inference, and ``f`` is the fused
    activation ``act_fn`` (identity by default).

    Parameters
    ----------
    momentum : float, default 0.9
        numpy-ml's convention: ``running = momentum * running + (1 - momentum) * batch``.
        PyTorch's ``momentum`` is ``1 - momentum`` (PyTorch 0.1 == nbnet 0.9).
    epsilon : float, default 1e-5
        Added to the variance before the square root.
    optimizer : str, dict, optimizer object or None
        ``None`` is SGD; strings such as ``"adam"`` or ``"sgd(lr=0.1, momentum=0.9)"``.
        An object is copied, so layers never share optimizer state.
    act_fn : str or None
        Activation fused into the same kernel pass (see :mod:`nbnet.activations`).
    unbiased_running_var : bool, default False
        Store the unbiased batch variance ``var * N / (N - 1)`` in ``running_var``, as
        PyTorch does; the default (biased) is numpy-ml's. Normalization in training
        always uses the biased variance.
    device : {"cpu", "cuda"}, optional
        Defaults to :func:`nbnet.get_default_device`.
    n_in : int, optional
        Number of features; inferred from the first input when omitted.

    Notes
    -----
    ``scaler`` starts at ones and ``intercept`` at zeros, as in PyTorch; numpy-ml draws
    ``scaler`` from U[0, 1). Shapes: input ``(N, C)``, output ``(N, C)``, every parameter
    ``(C,)``, all of the input's dtype (float32 or float64; the first input fixes it).
    Statistics are accumulated in float64 whatever the input dtype.
    """

    _ndim = 2


class LayerNorm1D(_NormBase):
    r"""Layer normalization over the features of each example of a ``(N, D)`` input.

    .. math::

        y_i = f\left(\frac{x_i - \mu_i}{\sqrt{\sigma^2_i + \epsilon}} \odot \text{scaler}
              + \text{intercept}\right)

    with :math:`\mu_i, \sigma^2_i` the mean and biased variance of row ``i``; ``scaler``
    and ``intercept`` are elementwise, shape ``(D,)``. Training and inference compute the
    same thing (no running statistics); training retains what backward needs.

    Parameters
    ----------
    epsilon : float, default 1e-5
    optimizer : str, dict, optimizer object or None
    act_fn : str or None
        Activation fused into the same pass.
    device : {"cpu", "cuda"}, optional
    n_in : int, optional
    """

    _ndim = 2
    _param_keys = ("scaler", "intercept")
    _center = True

    def __init__(self, epsilon=1e-5, optimizer=None, act_fn=None, device=None, n_in=None):
        super().__init__(epsilon, optimizer, act_fn, device, n_in)
        self.derived_variables = {"mean": [], "invstd": []}

    def _init_params(self, dtype):
        D = self.n_in
        to = lambda a: devices.to_device(a, self.device)  # noqa: E731
        self.parameters = {"scaler": to(np.ones(D, dtype)), "intercept": to(np.zeros(D, dtype))}
        self.gradients = {"scaler": to(np.zeros(D, dtype)), "intercept": to(np.zeros(D, dtype))}

    def _init_from_params(self, params):
        arr = next(iter(params.values()))
        self.n_in = self.n_out = int(np.shape(arr)[0])
        self._init_params(np.dtype(arr.dtype))
        self.is_initialized = True

    def _expected_param_shapes(self, params):
        if self.is_initialized:
            return super()._expected_param_shapes(params)
        shapes = {tuple(np.shape(v)) for v in params.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"{type(self).__name__}.set_params: parameters must be 1-D arrays "
                             f"of one length, got shapes {sorted(shapes)}")
        D = next(iter(shapes))[0] if self.n_in is None else self.n_in
        return {k: (D,) for k in self._param_keys}

    @property
    def hyperparameters(self):
        return {
            "layer": type(self).__name__,
            "act_fn": str(self.act_fn),
            "n_in": self.n_in,
            "n_out": self.n_out,
            "epsilon": self.epsilon,
            "device": self.device,
            "optimizer": self.optimizer.hyperparameters,
        }

    def _rows(self, X):
        return X.reshape(X.shape[0], -1)

    def forward(self, X, retain_derived=True):
        """Normalize each example over its features (same math in training and inference)."""
        X = self._check_input(X)
        X2 = self._rows(X)
        R, D = X2.shape
        self._ensure_built(self._n_features(X), X.dtype)
        p = self.parameters
        code, alpha = self._act
        Y = self._empty(X.shape, X.dtype)
        mean = self._empty(R, _F64)
        invstd = self._empty(R, _F64)
        if R > 0:
            rpc = config.rows_per_chunk(D, X.dtype.itemsize)
            self._kernel("row_forward")(R * D, X2, p["scaler"].reshape(-1), p["intercept"].reshape(-1),
                                        self.epsilon, self._center, code, alpha, rpc,
                                        self._rows(Y), mean, invstd)
        if self._is_training(retain_derived):
            self.X.append(X)
            self.derived_variables["mean"].append(mean)
            self.derived_variables["invstd"].append(invstd)
        return Y

    def backward(self, dLdy, retain_grads=True):
        """dL/dX per example, plus ``scaler``/``intercept`` gradients, in one pass."""
        grads, was_list = self._check_grads(dLdy)
        code, alpha = self._act
        p = self.parameters
        gamma, beta = p["scaler"].reshape(-1), p["intercept"].reshape(-1)
        out = []
        for dy, X, mean, invstd in zip(grads, self.X, self.derived_variables["mean"],
                                       self.derived_variables["invstd"]):
            X2, dy2 = self._rows(X), self._rows(dy)
            R, D = X2.shape
            dX = self._empty(X.shape, X.dtype)
            if R > 0:
                rpc = config.rows_per_chunk(D, X.dtype.itemsize)
                n_chunks = -(-R // rpc)
                pdg = self._empty((n_chunks, D), _F64)
                pdb = self._empty((n_chunks, D), _F64)
                self._kernel("row_backward")(R * D, X2, dy2, mean, invstd, gamma, beta, self._center,
                                             code, alpha, rpc, self._rows(dX), pdg, pdb)
                if retain_grads:
                    dgamma = self._empty(D, _F64)
                    dbeta = self._empty(D, _F64)
                    merge = self._kernel("merge_partial_sums")
                    merge(n_chunks * D, pdg, dgamma)
                    merge(n_chunks * D, pdb, dbeta)
                    self._accumulate("scaler", dgamma.reshape(self.gradients["scaler"].shape))
                    self._accumulate("intercept", dbeta.reshape(self.gradients["intercept"].shape))
            out.append(dX)
        return out if was_list else out[0]

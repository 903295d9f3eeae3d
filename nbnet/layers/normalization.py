"""Normalization layers on the reduction patterns of DESIGN.md.

* Column statistics (one statistic per feature, reduced over the batch):
  :class:`BatchNorm1D` on ``(N, C)``, :class:`BatchNorm2D` on ``(N*H*W, C)`` (NHWC) or,
  through the channels-first ``*_cf`` kernels, on ``(N, C, H*W)`` (NCHW).
* Row statistics (statistics per example, reduced over its features):
  :class:`LayerNorm1D` on ``(N, D)``, :class:`LayerNorm2D` on ``(N, H*W*C)``,
  :class:`RMSNorm` on ``(prod(leading), D)`` (``center=False``).
* Group statistics (the row pattern per channel group, per-channel affine):
  :class:`GroupNorm` and :class:`InstanceNorm2D` on ``(N, H*W, C)`` (NHWC, and ``(N, C)``)
  or ``(N, C, H*W)`` (NCHW).

Every layer validates its input completely before it touches any state, so a bad call
leaves parameters and running statistics exactly as they were. Every layer fuses its
``act_fn`` into the same kernel passes (forward in the normalising pass, the slope folded
into the backward reductions), except a smooth one (ELU, GELU, tanh, sigmoid) on CPU: that
runs as a vectorised pass of its own after the normalization (forward) and before it
(backward), with the pre-activation output retained in training as
``derived_variables["Z"]`` (see :meth:`_NormBase._act`); tanh and the sigmoid also retain
their output, ``derived_variables["Y"]``, and differentiate from it (as PyTorch does; like
the input, a retained output must not be modified in place before ``backward``).

NaN and Inf propagate, but only to what they touch: a NaN in feature ``j`` of a
BatchNorm input makes output column ``j`` NaN and leaves every other feature finite, and
``running_mean[j]`` and ``running_var[j]`` keep their values (PyTorch would fold the NaN
into them for good: one bad batch would spoil inference); a NaN in example ``i`` of a
LayerNorm/RMSNorm input makes output row ``i`` NaN (and, in backward, the parameter
gradients, which sum over rows), leaving the other rows finite; a NaN in group ``g`` of
example ``n`` of a GroupNorm/InstanceNorm input makes only that group's outputs NaN
(tracked InstanceNorm running statistics keep their values for that channel).
"""
import math

import numpy as np

from .. import config, devices
from .._validation import check_float_array
from ..activations import parse_activation
from .activation import (SLOPE_FROM_OUTPUT, activation_backward_retained, activation_forward,
                         fused_activation, retained_outputs, runs_apart)
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


def _check_data_format(data_format):
    fmt = str(data_format).upper() if isinstance(data_format, str) else data_format
    if fmt not in ("NHWC", "NCHW"):
        raise ValueError(f"data_format must be 'NHWC' (numpy-ml's layout) or 'NCHW', got {data_format!r}")
    return fmt


def _cf_chunking(N, C, L, itemsize):
    """``(examples per chunk, channels per task)`` for the channels-first ``(N, C, L)``
    column kernels (see the notes above the ``*_cf`` kernels in ``column_stats``).

    A task walks a block of channels of a chunk of examples in memory order. Whole
    examples when one fits ``config.CHUNK_BYTES`` (a statistics task whose shift was poor
    reads its data a second time, then from L2), else one example and as many channel
    planes as fit; then
    chunks small enough to leave about 64 tasks when ``N`` allows, so that every core has
    work. Shape-only, so the summation order (and every bit of the result) is independent
    of the thread count.
    """
    plane = max(1, L * itemsize)
    budget = config.CHUNK_BYTES
    per_task = C if C * plane <= budget else max(1, budget // plane)
    per = max(1, budget // (per_task * plane))
    want_chunks = -(-64 // -(-C // per_task))
    per = min(per, max(1, -(-N // want_chunks)))
    return int(max(1, min(per, N))), int(per_task)


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
                if self.device == "cpu":
                    dy = dy.astype(X.dtype)
                else:  # device arrays have no astype: cast through the host (rare path)
                    dy = devices.to_device(devices.to_host(dy).astype(X.dtype), self.device)
            checked.append(dy)
        return checked, was_list

    def _accumulate(self, name, value):
        """gradients[name] += value (value is float64; the gradient keeps its dtype)."""
        g = self.gradients[name]
        if self.device == "cpu":
            np.add(g, value, out=g, casting="unsafe")
        else:  # device arrays: one add_into launch, no host copy
            self._kernel("add_into")(g, value)

    def _init_from_params(self, params):
        """Build an unbuilt layer from the (already checked) parameter arrays of set_params."""
        arr = next(iter(params.values()))
        self.n_in = self.n_out = int(np.shape(arr)[0])
        self._init_params(np.dtype(arr.dtype))
        self.is_initialized = True

    def _expected_param_shapes(self, params):
        """``(n_in,)`` for every parameter; an unbuilt layer takes the length given."""
        if self.is_initialized:
            return super()._expected_param_shapes(params)
        shapes = {tuple(np.shape(v)) for v in params.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"{type(self).__name__}.set_params: parameters must be 1-D arrays "
                             f"of one length, got shapes {sorted(shapes)}")
        n = next(iter(shapes))[0] if self.n_in is None else self.n_in
        return {k: (n,) for k in self._param_keys}

    def _ensure_built(self, n_features, dtype):
        if not self.is_initialized:
            self.n_in = self.n_out = n_features
            self._init_params(np.dtype(dtype))
            self.is_initialized = True

    @property
    def _act(self):
        """``(code, alpha)`` of the activation the kernels fuse: ``act_fn``, or the identity
        when it runs apart (a smooth activation on CPU,
        :func:`~nbnet.layers.activation.runs_apart`)."""
        return fused_activation(self.act_fn, self.device)

    def _activation_forward(self, Z, train):
        """The layer's output from the kernels' output ``Z``: ``f(Z)`` into a new array when
        the activation runs apart (``Z`` retained for backward in training), else ``Z``."""
        if not runs_apart(self.act_fn, self.device):
            return Z
        Y = activation_forward(self, self.act_fn, Z, self._output("Y_act", Z.shape, Z.dtype))
        if train:
            self.derived_variables.setdefault("Z", []).append(Z)
            if self.act_fn.code in SLOPE_FROM_OUTPUT:  # tanh, sigmoid: the slope from Y
                self.derived_variables.setdefault("Y", []).append(Y)
        return Y

    def _activation_grads(self, grads):
        """The gradients the kernels' backward takes: ``dL/dZ = dL/dY * f'(Z)`` for each
        retained forward when the activation runs apart, else ``grads`` (checked dL/dY)."""
        if not runs_apart(self.act_fn, self.device):
            return grads
        Zs = self.derived_variables.get("Z", [])
        if len(Zs) != len(grads):
            raise RuntimeError(f"{type(self).__name__}.backward: act_fn was changed between "
                               "forward and backward; run forward again")
        Ys = retained_outputs(self, self.act_fn, len(Zs))
        return [activation_backward_retained(self, self.act_fn, Z, Y, dy, np.empty_like(dy))
                for dy, Z, Y in zip(grads, Zs, Ys)]


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
        """The ``(rows, C)`` view the column kernels run on (``X`` itself when 2-D)."""
        if X.ndim == 2:
            return X
        return X.reshape(-1, X.shape[-1])

    def _column_layout(self, X):
        """``(view, suffix, chunk, merge_rows_per_chunk, n_chunks, rows)`` for the kernels.

        Channels-last: the ``(rows, C)`` view and the column kernels, chunks of rows.
        Channels-first (BatchNorm2D NCHW): the ``(N, C, L)`` view and the ``*_cf`` kernels,
        chunks of ``n`` examples, i.e. ``n * L`` rows as far as the merge is concerned. With
        ``L = H*W = 1`` (an ``(N, C, 1, 1)`` input, e.g. after global pooling) the memory is
        an ``(N, C)`` row layout, and runs of one value would cost the channels-first
        kernels their loop overhead per value: (128, 2048, 1, 1) float32 trained 17x slower
        than PyTorch on the 2-core reference machine. Such inputs take the row layout.
        ``chunk`` is the tuple of chunking arguments the kernels take: ``(rows_per_chunk,
        cols_per_tile)`` (``config.column_tiling``) or ``(n, channels_per_task)``. ``rows``
        is the number of values per channel.
        """
        if getattr(self, "data_format", "NHWC") == "NCHW":
            N, C = X.shape[0], X.shape[1]
            L = math.prod(X.shape[2:])
            if L != 1:
                V = X.reshape(N, C, L)
                n, per_task = _cf_chunking(N, C, L, X.dtype.itemsize)
                return V, "_cf", (n, per_task), n * L, -(-N // n), N * L
            V = X.reshape(N, C)
        else:
            V = self._rows(X)
        R, C = V.shape
        rpc, cols = config.column_tiling(C, X.dtype.itemsize)
        return V, "", (rpc, cols), rpc, -(-R // rpc), R

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
        C = self._n_features(X)
        V, sfx, chunk, merge_rpc, n_chunks, R = self._column_layout(X)
        train = self._is_training(retain_derived)
        if train:
            self._check_train_rows(R, X.shape)
        self._ensure_built(C, X.dtype)
        p = self.parameters
        gamma, beta = p["scaler"], p["intercept"]
        code, alpha = self._act
        Y = self._output("Y", X.shape, X.dtype)
        fused = train and self._fused(sfx, R)
        if fused:
            # batch statistics, running-stat update and normalisation in one op (CPU: one
            # call for the three passes; CUDA: 2 launches, GPU-sized chunks, reused
            # scratch, see docs/cuda.md)
            mean, invstd = self._empty(C, _F64), self._empty(C, _F64)
            self._kernel("column_forward_train")(V.size, V, gamma, beta, code, alpha, self.epsilon,
                                                 self.momentum, self.unbiased_running_var,
                                                 p["running_mean"], p["running_var"], mean, invstd,
                                                 Y.reshape(V.shape))
        elif train:
            mean, invstd = self._batch_stats(V, sfx, chunk, merge_rpc, n_chunks, R, C, X.shape)
        else:
            mean, invstd = self._running_mean_invstd()
        if R > 0 and not fused:
            self._kernel("column_normalize" + sfx)(V.size, V, mean, invstd, gamma, beta, code,
                                                   alpha, *chunk, config.streams(V),
                                                   Y.reshape(V.shape))
        if train:
            self.X.append(X)
            self.derived_variables["mean"].append(mean)
            self.derived_variables["invstd"].append(invstd)
        return self._activation_forward(Y, train)

    def _fused(self, sfx, R):
        """True when the fused column ops (``column_forward_train``,
        ``column_backward_train``) apply: the row layout (channels-last), a non-empty
        batch, and neither statistics hook overridden (SyncBatchNorm merges across ranks
        between the passes)."""
        cls = type(self)
        return (not sfx and R > 0
                and cls._batch_stats is _BatchNormBase._batch_stats
                and cls._sums_for_dx is _BatchNormBase._sums_for_dx)

    def _check_train_rows(self, R, shape):
        if R == 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per feature "
                             f"when training, got input of shape {tuple(shape)}")

    def _batch_stats(self, V, sfx, chunk, merge_rpc, n_chunks, R, C, shape):
        """Batch ``mean``/``invstd`` (float64, ``(C,)``); updates the running statistics.

        One pass of per-chunk moments over the ``V`` view, then one Chan merge that also
        folds the batch into the running statistics. (SyncBatchNorm overrides this to merge
        the moments of every rank.)
        """
        p = self.parameters
        mean = self._empty(C, _F64)
        invstd = self._empty(C, _F64)
        if R > 0:
            pm = self._empty((n_chunks, C), _F64)
            pm2 = self._empty((n_chunks, C), _F64)
            self._kernel("column_partial_stats" + sfx)(V.size, V, *chunk, pm, pm2)
            self._kernel("column_merge_stats")(n_chunks * C, pm, pm2, R, merge_rpc, self.epsilon,
                                               self.momentum, self.unbiased_running_var,
                                               p["running_mean"], p["running_var"], mean, invstd)
        return mean, invstd

    def _sums_for_dx(self, sum_g, sum_gx, R):
        """The column sums the dx pass divides by the local row count ``R``.

        Identity here; SyncBatchNorm all-reduces them and rescales by ``R / N_global``.
        """
        return sum_g, sum_gx

    def _running_mean_invstd(self):
        p = self.parameters
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
        grads = self._activation_grads(grads)
        code, alpha = self._act
        p = self.parameters
        gamma, beta = p["scaler"], p["intercept"]
        out = []
        for dy, X, mean, invstd in zip(grads, self.X, self.derived_variables["mean"],
                                       self.derived_variables["invstd"]):
            C = self._n_features(X)
            V, sfx, chunk, _, n_chunks, R = self._column_layout(X)
            dyv = dy.reshape(V.shape)
            dX = self._output("dX", X.shape, X.dtype)
            if R == 0:  # an empty batch (or an empty rank under SyncBatchNorm)
                self._sums_for_dx(np.zeros(C), np.zeros(C), R)
                out.append(dX)
                continue
            if self._fused(sfx, R):
                # reduce, merge, gradient accumulation and dX in one op (CPU: one call;
                # CUDA: 2 launches)
                self._kernel("column_backward_train")(V.size, V, dyv, mean, invstd, gamma, beta,
                                                      code, alpha, self.gradients["scaler"],
                                                      self.gradients["intercept"],
                                                      bool(retain_grads), dX.reshape(V.shape))
                out.append(dX)
                continue
            psg = self._empty((n_chunks, C), _F64)
            psgx = self._empty((n_chunks, C), _F64)
            self._kernel("column_backward_reduce" + sfx)(V.size, V, dyv, mean, invstd, gamma,
                                                         beta, code, alpha, *chunk, psg, psgx)
            sum_g = self._empty(C, _F64)
            sum_gx = self._empty(C, _F64)
            # both merges and the (local) gradient accumulation in one call (CUDA: backward
            # = reduce, merge, dx: 3 launches, no host synchronisation)
            self._kernel("merge_partial_sums_pair")(
                n_chunks * C, psg, psgx, sum_g, sum_gx, self.gradients["intercept"],
                self.gradients["scaler"], bool(retain_grads))
            dx_sum_g, dx_sum_gx = self._sums_for_dx(sum_g, sum_gx, R)
            self._kernel("column_backward_dx" + sfx)(V.size, V, dyv, mean, invstd, gamma, beta,
                                                     code, alpha, dx_sum_g, dx_sum_gx, *chunk,
                                                     config.streams(V), dX.reshape(V.shape))
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
        Activation applied to the output: fused into the kernel passes (identity, ReLU,
        leaky ReLU, and every activation on CUDA), or its own vectorised pass on CPU for
        ELU, GELU, tanh and sigmoid (see :func:`nbnet.layers.activation.runs_apart`).
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
        Activation applied to the output: fused into the kernel passes (identity, ReLU,
        leaky ReLU, and every activation on CUDA), or its own vectorised pass on CPU for
        ELU, GELU, tanh and sigmoid (see :func:`nbnet.layers.activation.runs_apart`).
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
        if X.ndim == 2:
            return X
        return X.reshape(X.shape[0], math.prod(X.shape[1:]))

    def _build_for(self, X):
        self._ensure_built(self._n_features(X), X.dtype)

    def _gamma_beta(self):
        """Flat ``(D,)`` scaler and intercept (zeros for a layer without an intercept)."""
        p = self.parameters
        gamma = p["scaler"]
        if gamma.ndim != 1:  # LayerNorm2D's (H, W, C)
            gamma = gamma.reshape(-1)
        if "intercept" in p:
            beta = p["intercept"]
            return gamma, (beta if beta.ndim == 1 else beta.reshape(-1))
        return gamma, self._zeros(gamma.shape[0], gamma.dtype)

    def forward(self, X, retain_derived=True):
        """Normalize each example over its features (same math in training and inference)."""
        X = self._check_input(X)
        X2 = self._rows(X)
        R, D = X2.shape
        self._build_for(X)
        gamma, beta = self._gamma_beta()
        code, alpha = self._act
        Y = self._output("Y", X.shape, X.dtype)
        mean = self._empty(R, _F64)
        invstd = self._empty(R, _F64)
        if R > 0 and D > 0:
            # each row whole in one task: any chunking gives the same bits, and without
            # MIN_CHUNK_ROWS a few very long rows still make one task each
            # (LayerNorm2D (4,16,16,512) float32 was one task)
            rpc = config.examples_per_chunk(D, X.dtype.itemsize)
            self._kernel("row_forward")(R * D, X2, gamma, beta, self.epsilon, self._center, code,
                                        alpha, rpc, Y.reshape(X2.shape), mean, invstd)
        train = self._is_training(retain_derived)
        if train:
            self.X.append(X)
            self.derived_variables["mean"].append(mean)
            self.derived_variables["invstd"].append(invstd)
        return self._activation_forward(Y, train)

    def _wide_param_grads(self, R, D, itemsize):
        """True when the parameter gradients are cheaper by column blocks
        (:func:`~nbnet.kernels.cpu.row_stats.row_param_grads`) than by per-chunk
        partials: CPU, and partials at least ``config.WIDE_PARTIALS_RATIO`` of the
        input's bytes (few rows, very wide: LayerNorm2D on images)."""
        if self.device != "cpu":
            return False
        n_chunks = -(-R // config.rows_per_chunk(D, itemsize))
        # one chunk: the partials would only be copied by the merge (small batches)
        return n_chunks == 1 or 2 * n_chunks * D * 8 >= config.WIDE_PARTIALS_RATIO * R * D * itemsize

    def backward(self, dLdy, retain_grads=True):
        """dL/dX per example, plus the parameter gradients, in one pass."""
        grads, was_list = self._check_grads(dLdy)
        grads = self._activation_grads(grads)
        code, alpha = self._act
        gamma, beta = self._gamma_beta()
        out = []
        for dy, X, mean, invstd in zip(grads, self.X, self.derived_variables["mean"],
                                       self.derived_variables["invstd"]):
            X2 = self._rows(X)
            dy2 = dy.reshape(X2.shape)
            R, D = X2.shape
            dX = self._output("dX", X.shape, X.dtype)
            if R > 0 and D > 0 and self._wide_param_grads(R, D, X.dtype.itemsize):
                # wide, short input: parameter gradients by column blocks, no partials; dX
                # row by row, so (as in forward) any chunking gives the same bits
                empty = self._empty((0, D), _F64)
                self._kernel("row_backward")(R * D, X2, dy2, mean, invstd, gamma, beta, self._center,
                                             code, alpha, config.examples_per_chunk(D, X.dtype.itemsize),
                                             dX.reshape(X2.shape), empty, empty)
                if retain_grads:  # summed straight into the gradient arrays
                    dgamma = self.gradients["scaler"].reshape(D)
                    dbeta = (self.gradients["intercept"].reshape(D) if "intercept" in self.gradients
                             else np.zeros(D, dgamma.dtype))  # RMSNorm: no intercept
                    self._kernel("row_param_grads")(R * D, X2, dy2, mean, invstd, gamma, beta,
                                                    code, alpha, config.PARAM_GRAD_COLUMNS, True,
                                                    dgamma, dbeta)
            elif R > 0 and D > 0:
                rpc = config.rows_per_chunk(D, X.dtype.itemsize)
                n_chunks = -(-R // rpc)
                pdg = self._empty((n_chunks, D), _F64)
                pdb = self._empty((n_chunks, D), _F64)
                self._kernel("row_backward")(R * D, X2, dy2, mean, invstd, gamma, beta, self._center,
                                             code, alpha, rpc, dX.reshape(X2.shape), pdg, pdb)
                if retain_grads and "intercept" in self.gradients:
                    # both merges and both accumulations in one call (CUDA: backward = 2
                    # launches)
                    self._kernel("merge_partial_sums_pair")(
                        n_chunks * D, pdg, pdb, self._empty(D, _F64), self._empty(D, _F64),
                        self.gradients["scaler"], self.gradients["intercept"], True)
                elif retain_grads:  # RMSNorm: no intercept
                    dgamma = self._empty(D, _F64)
                    self._kernel("merge_partial_sums")(n_chunks * D, pdg, dgamma)
                    self._accumulate("scaler", dgamma.reshape(self.gradients["scaler"].shape))
            out.append(dX)
        return out if was_list else out[0]


# ======================================================== BatchNorm2D (column pattern)

class BatchNorm2D(_BatchNormBase):
    r"""Batch normalization of images, per channel over ``(N, H, W)`` (numpy-ml's layer).

    .. math::

        y_{nhwc} = f\left(\frac{x_{nhwc} - \mu_c}{\sqrt{\sigma^2_c + \epsilon}}
            \cdot \text{scaler}_c + \text{intercept}_c\right)

    where :math:`\mu_c, \sigma^2_c` are the mean and biased variance of channel ``c``
    over the ``N * H * W`` values of the batch in training, and the running statistics in
    inference; ``f`` is the fused activation ``act_fn`` (identity by default).

    Parameters
    ----------
    momentum : float, default 0.9
        numpy-ml's convention: ``running = momentum * running + (1 - momentum) * batch``.
        PyTorch's ``momentum`` is ``1 - momentum`` (PyTorch 0.1 == nbnet 0.9).
    epsilon : float, default 1e-5
        Added to the variance before the square root.
    optimizer : str, dict, optimizer object or None
        ``None`` is SGD; strings such as ``"adam"``.
    act_fn : str or None
        Activation applied to the output: fused into the kernel passes (identity, ReLU,
        leaky ReLU, and every activation on CUDA), or its own vectorised pass on CPU for
        ELU, GELU, tanh and sigmoid (see :func:`nbnet.layers.activation.runs_apart`).
    unbiased_running_var : bool, default False
        Store the unbiased batch variance ``var * M / (M - 1)`` (``M = N*H*W``) in
        ``running_var``, as PyTorch does; the default (biased) is numpy-ml's.
    data_format : {"NHWC", "NCHW"}, default "NHWC"
        ``"NHWC"``: input ``(N, H, W, C)`` (numpy-ml's layout), reduced as the
        ``(N*H*W, C)`` column pattern. ``"NCHW"``: input ``(N, C, H, W)``, reduced in
        place as ``(N, C, H*W)`` by the channels-first kernels (contiguous runs of
        ``H*W`` per channel; no transpose copy).
    device : {"cpu", "cuda"}, optional
    n_in : int, optional
        Number of channels; inferred from the first input when omitted.

    Notes
    -----
    Shapes: input and output ``(N, H, W, C)`` or ``(N, C, H, W)``; ``scaler``,
    ``intercept``, ``running_mean``, ``running_var`` are ``(C,)``, of the input's dtype.
    Statistics accumulate in float64 (per-chunk two-pass, Chan merge). Training with a
    single value per channel (``N*H*W == 1``) raises ValueError; an empty batch gives an
    empty output and leaves the running statistics unchanged. A NaN in channel ``c``
    makes only output channel ``c`` NaN; ``running_mean[c]`` and ``running_var[c]`` keep
    their values.
    """

    _ndim = 4

    def __init__(self, momentum=0.9, epsilon=1e-5, optimizer=None, act_fn=None,
                 unbiased_running_var=False, data_format="NHWC", device=None, n_in=None):
        fmt = _check_data_format(data_format)
        super().__init__(momentum, epsilon, optimizer, act_fn, unbiased_running_var, device, n_in)
        self.data_format = fmt

    def _n_features(self, X):
        return int(X.shape[1] if self.data_format == "NCHW" else X.shape[-1])

    @property
    def hyperparameters(self):
        hp = super().hyperparameters
        hp["data_format"] = self.data_format
        return hp


# ================================================== row pattern: LayerNorm2D, RMSNorm

class LayerNorm2D(LayerNorm1D):
    r"""Layer normalization of each example of an ``(N, H, W, C)`` input over ``(H, W, C)``.

    numpy-ml's LayerNorm2D:

    .. math::

        y_n = f\left(\frac{x_n - \mu_n}{\sqrt{\sigma^2_n + \epsilon}} \odot \text{scaler}
              + \text{intercept}\right)

    with :math:`\mu_n, \sigma^2_n` the mean and biased variance of the ``H*W*C`` values of
    example ``n``; ``scaler`` and ``intercept`` are elementwise, shape ``(H, W, C)``.
    Training and inference compute the same thing; it runs the row kernels of
    :class:`LayerNorm1D` on the ``(N, H*W*C)`` view.

    Parameters
    ----------
    epsilon : float, default 1e-5
    optimizer : str, dict, optimizer object or None
    act_fn : str or None
        Activation applied to the output: fused into the kernel passes (identity, ReLU,
        leaky ReLU, and every activation on CUDA), or its own vectorised pass on CPU for
        ELU, GELU, tanh and sigmoid (see :func:`nbnet.layers.activation.runs_apart`).
    device : {"cpu", "cuda"}, optional

    Notes
    -----
    ``n_in``/``n_out`` are the channel count ``C``; the first input fixes ``(H, W, C)`` and
    later inputs must match it. ``scaler`` starts at ones (numpy-ml draws U[0, 1)).
    A NaN in example ``n`` makes output example ``n`` NaN (and the parameter gradients,
    which sum over examples); other examples stay finite.
    """

    _ndim = 4

    def __init__(self, epsilon=1e-5, optimizer=None, act_fn=None, device=None):
        super().__init__(epsilon, optimizer, act_fn, device, None)
        self._feature_shape = None

    def _check_input(self, X, name="X"):
        X = super()._check_input(X, name)
        if self._feature_shape is not None and tuple(X.shape[1:]) != self._feature_shape:
            raise ValueError(f"{type(self).__name__} was built for examples of shape "
                             f"{self._feature_shape}, got input of shape {tuple(X.shape)}")
        return X

    def _build_for(self, X):
        if not self.is_initialized:
            self._feature_shape = tuple(int(d) for d in X.shape[1:])
        self._ensure_built(self._n_features(X), X.dtype)

    def _init_params(self, dtype):
        shape = self._feature_shape
        to = lambda a: devices.to_device(a, self.device)  # noqa: E731
        self.parameters = {"scaler": to(np.ones(shape, dtype)), "intercept": to(np.zeros(shape, dtype))}
        self.gradients = {"scaler": to(np.zeros(shape, dtype)), "intercept": to(np.zeros(shape, dtype))}

    def _init_from_params(self, params):
        arr = next(iter(params.values()))
        self._feature_shape = tuple(int(d) for d in np.shape(arr))
        self.n_in = self.n_out = self._feature_shape[-1]
        self._init_params(np.dtype(arr.dtype))
        self.is_initialized = True

    def _expected_param_shapes(self, params):
        if self.is_initialized:
            return LayerBase._expected_param_shapes(self, params)
        shapes = {tuple(np.shape(v)) for v in params.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise ValueError(f"{type(self).__name__}.set_params: parameters must be 3-D (H, W, C) "
                             f"arrays of one shape, got shapes {sorted(shapes)}")
        return {k: next(iter(shapes)) for k in self._param_keys}


class RMSNorm(LayerNorm1D):
    r"""Root-mean-square normalization over the last axis (Zhang & Sennrich, 2019).

    .. math::

        y = f\left(\frac{x}{\sqrt{\tfrac{1}{D}\sum_j x_j^2 + \epsilon}} \odot \text{scaler}\right)

    over the last axis of length ``D``, for any number of leading axes (PyTorch's
    ``RMSNorm(D)``). No mean is subtracted and there is no intercept: ``parameters`` and
    ``gradients`` hold ``scaler`` (shape ``(D,)``, ones at first) only. It runs the row
    kernels with ``center=False`` on the ``(prod(leading), D)`` view.

    Parameters
    ----------
    epsilon : float, default 1e-6
    optimizer : str, dict, optimizer object or None
    act_fn : str or None
        Activation applied to the output: fused into the kernel passes (identity, ReLU,
        leaky ReLU, and every activation on CUDA), or its own vectorised pass on CPU for
        ELU, GELU, tanh and sigmoid (see :func:`nbnet.layers.activation.runs_apart`).
    device : {"cpu", "cuda"}, optional
    n_in : int, optional
        ``D``; inferred from the first input when omitted.

    Notes
    -----
    Input of shape ``(..., D)`` (1-D included), output of the same shape and dtype. A NaN
    in a row makes that output row NaN (and, in backward, ``gradients["scaler"]``).
    """

    _ndim = tuple(range(1, 33))
    _param_keys = ("scaler",)
    _center = False

    def __init__(self, epsilon=1e-6, optimizer=None, act_fn=None, device=None, n_in=None):
        super().__init__(epsilon, optimizer, act_fn, device, n_in)

    def _init_params(self, dtype):
        D = self.n_in
        to = lambda a: devices.to_device(a, self.device)  # noqa: E731
        self.parameters = {"scaler": to(np.ones(D, dtype))}
        self.gradients = {"scaler": to(np.zeros(D, dtype))}

    def _rows(self, X):
        D = int(X.shape[-1])
        return X.reshape(math.prod(X.shape[:-1]), D)


# ================================================= group pattern: GroupNorm, InstanceNorm

class GroupNorm(_NormBase):
    r"""Group normalization (Wu & He, 2018): statistics per example and channel group.

    The ``C`` channels are split into ``n_groups`` groups of ``C // n_groups`` consecutive
    channels; each example's group is normalized over its channels and spatial positions:

    .. math::

        y_{n,c,\cdot} = f\left(\frac{x_{n,c,\cdot} - \mu_{n,g(c)}}
            {\sqrt{\sigma^2_{n,g(c)} + \epsilon}} \cdot \text{scaler}_c
            + \text{intercept}_c\right)

    with :math:`\mu_{n,g}, \sigma^2_{n,g}` the mean and biased variance of the
    ``H * W * C / n_groups`` values of group ``g`` of example ``n``. ``n_groups=1`` is
    LayerNorm over ``(H, W, C)`` with a per-channel affine; ``n_groups=C`` is
    :class:`InstanceNorm2D`. Training and inference compute the same thing.

    Parameters
    ----------
    n_groups : int
        Must divide the channel count (ValueError otherwise, before anything changes).
    epsilon : float, default 1e-5
    affine : bool, default True
        Learn a per-channel ``scaler`` (ones) and ``intercept`` (zeros), shape ``(C,)``.
        Without it the layer has no parameters.
    optimizer : str, dict, optimizer object or None
    act_fn : str or None
        Activation applied to the output: fused into the kernel passes (identity, ReLU,
        leaky ReLU, and every activation on CUDA), or its own vectorised pass on CPU for
        ELU, GELU, tanh and sigmoid (see :func:`nbnet.layers.activation.runs_apart`).
    data_format : {"NHWC", "NCHW"}, default "NHWC"
        Layout of 4-D input: ``(N, H, W, C)`` or ``(N, C, H, W)``. 2-D input ``(N, C)`` is
        accepted either way.
    device : {"cpu", "cuda"}, optional
    n_in : int, optional
        Channel count ``C``; inferred from the first input when omitted.

    Notes
    -----
    The kernels view NHWC input as ``(N, H*W, C)`` (per-channel float64 sums along the
    contiguous axis, combined per group) and NCHW input as ``(N, C, H*W)`` (each group a
    contiguous block); two passes over the cached example or group, float64 statistics.
    Channels-last work is parallel over examples, channels-first over (example, group).
    An empty batch gives an empty output. A NaN in group ``g`` of example ``n`` makes
    only that group's outputs NaN (and, in backward, the parameter gradients of the
    group's channels); every other group and example stays finite.
    """

    _ndim = (2, 4)
    _param_keys = ("scaler", "intercept")

    def __init__(self, n_groups, epsilon=1e-5, affine=True, optimizer=None, act_fn=None,
                 data_format="NHWC", device=None, n_in=None):
        if n_groups is not None and not (isinstance(n_groups, (int, np.integer))
                                         and not isinstance(n_groups, bool) and n_groups >= 1):
            raise ValueError(f"n_groups must be a positive integer, got {n_groups!r}")
        fmt = _check_data_format(data_format)
        super().__init__(epsilon, optimizer, act_fn, device, n_in)
        self.n_groups = None if n_groups is None else int(n_groups)
        self.affine = bool(affine)
        self.data_format = fmt
        if self.n_in is not None:
            self._groups(self.n_in)
        self.derived_variables = {"mean": [], "invstd": []}

    # -------------------------------------------------------------- layout and state
    def _groups(self, C):
        G = C if self.n_groups is None else self.n_groups
        if C % G != 0:
            raise ValueError(f"{type(self).__name__}: n_groups={G} does not divide the "
                             f"{C} channels")
        return G

    def _n_features(self, X):
        if X.ndim == 4 and self.data_format == "NCHW":
            return int(X.shape[1])
        return int(X.shape[-1])

    def _check_input(self, X, name="X"):
        X = super()._check_input(X, name)
        self._groups(self._n_features(X))
        return X

    def _view(self, X):
        """``(V, channels_first)``: ``(N, C, L)`` for NCHW, else ``(N, P, C)``. NCHW images
        of one pixel are ``(N, C)`` in memory, as NHWC ones: they take the channels-last
        kernels (runs of one value cost the channels-first ones a call per channel:
        GroupNorm(32) (64, 4096, 1, 1) float32 training step 3.0 ms against PyTorch's
        1.34 ms on the 2-core reference machine)."""
        N, C = int(X.shape[0]), self._n_features(X)
        if X.ndim == 4 and self.data_format == "NCHW":
            L = math.prod(X.shape[2:])
            if L != 1:
                return X.reshape(N, C, L), True
            return X.reshape(N, 1, C), False
        return X.reshape(N, math.prod(X.shape[1:-1]), C), False

    def _held_keys(self):
        return ("scaler", "intercept") if self.affine else ()

    def _init_params(self, dtype):
        C = self.n_in
        to = lambda a: devices.to_device(a, self.device)  # noqa: E731
        self.parameters, self.gradients = {}, {}
        if self.affine:
            self.parameters = {"scaler": to(np.ones(C, dtype)), "intercept": to(np.zeros(C, dtype))}
            self.gradients = {"scaler": to(np.zeros(C, dtype)), "intercept": to(np.zeros(C, dtype))}
        self._unit = None
        self._dtype = np.dtype(dtype)

    def _check_dtype_matches(self, X):
        dtype = self._param_dtype() or getattr(self, "_dtype", None)
        if dtype is not None and np.dtype(X.dtype) != dtype:
            raise TypeError(f"{type(self).__name__} was built for {dtype} input (by its first "
                            f"input) but got {np.dtype(X.dtype)}; pass {dtype} data")

    def _expected_param_shapes(self, params):
        held = self._held_keys()
        extra = sorted(k for k in params if k not in held)
        if extra:
            raise ValueError(f"{type(self).__name__}.set_params: this layer holds no parameter(s) "
                             f"{extra} (it holds {list(held)})")
        if self.is_initialized:
            return super()._expected_param_shapes(params)
        shapes = {tuple(np.shape(v)) for v in params.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"{type(self).__name__}.set_params: parameters must be 1-D arrays "
                             f"of one length, got shapes {sorted(shapes)}")
        C = next(iter(shapes))[0] if self.n_in is None else self.n_in
        self._groups(C)
        return {k: (C,) for k in held}

    def _gamma_beta(self, C, dtype):
        if self.affine:
            return self.parameters["scaler"], self.parameters["intercept"]
        if self._unit is None or self._unit[0].shape[0] != C or self._unit[0].dtype != dtype:
            self._unit = (devices.to_device(np.ones(C, dtype), self.device), self._zeros(C, dtype))
        return self._unit

    @property
    def hyperparameters(self):
        return {
            "layer": type(self).__name__,
            "act_fn": str(self.act_fn),
            "n_in": self.n_in,
            "n_out": self.n_out,
            "n_groups": self.n_groups,
            "epsilon": self.epsilon,
            "affine": self.affine,
            "data_format": self.data_format,
            "device": self.device,
            "optimizer": self.optimizer.hyperparameters,
        }

    # -------------------------------------------------------------- hooks (InstanceNorm)
    def _uses_running_stats(self, train):
        return False

    def _check_spatial(self, X, V, cf):
        pass

    def _after_batch_stats(self, mean, invstd, count):
        pass

    # -------------------------------------------------------------- forward
    def forward(self, X, retain_derived=True):
        """Normalize each example's channel groups (see the class docstring)."""
        X = self._check_input(X)
        C = self._n_features(X)
        G = self._groups(C)
        V, cf = self._view(X)
        N = V.shape[0]
        train = self._is_training(retain_derived)
        running = self._uses_running_stats(train)
        if not running:
            self._check_spatial(X, V, cf)
        self._ensure_built(C, X.dtype)
        gamma, beta = self._gamma_beta(C, X.dtype)
        code, alpha = self._act
        Y = self._output("Y", X.shape, X.dtype)
        Yv = Y.reshape(V.shape)
        if running:
            mean, invstd = self._running_mean_invstd()
            if V.size > 0:
                if cf:
                    n, per_task = _cf_chunking(N, C, V.shape[2], X.dtype.itemsize)
                    self._kernel("column_normalize_cf")(V.size, V, mean, invstd, gamma, beta,
                                                        code, alpha, n, per_task, False, Yv)
                else:
                    V2 = V.reshape(-1, C)
                    rpc, cols = config.column_tiling(C, X.dtype.itemsize)
                    self._kernel("column_normalize")(V.size, V2, mean, invstd, gamma, beta, code,
                                                     alpha, rpc, cols, config.streams(V2),
                                                     Yv.reshape(V2.shape))
            return self._activation_forward(Y, False)
        mean = self._empty((N, G), _F64)
        invstd = self._empty((N, G), _F64)
        if V.size > 0:
            if cf:
                self._kernel("group_forward_cf")(V.size, V, gamma, beta, G, self.epsilon, code,
                                                 alpha, Yv, mean, invstd)
            else:
                rpc = config.group_examples_per_chunk(V.shape[1], C, G, X.dtype.itemsize)
                self._kernel("group_forward_cl")(V.size, V, gamma, beta, G, self.epsilon, code,
                                                 alpha, rpc, Yv, mean, invstd)
            if train:
                self._after_batch_stats(mean, invstd, V.size // (N * C))
        if train:
            self.X.append(X)
            self.derived_variables["mean"].append(mean)
            self.derived_variables["invstd"].append(invstd)
        return self._activation_forward(Y, train)

    # -------------------------------------------------------------- backward
    def backward(self, dLdy, retain_grads=True):
        """dL/dX per example and group, plus ``scaler``/``intercept`` gradients.

        With ``h = g * scaler`` (``g`` is dLdy times the activation's slope) and the
        means taken over each example's group: ``dX = invstd * (h - mean(h) - xhat *
        mean(h * xhat))``; ``gradients["scaler"] += sum(g * xhat)`` and
        ``gradients["intercept"] += sum(g)`` over examples and positions, per channel.
        """
        grads, was_list = self._check_grads(dLdy)
        grads = self._activation_grads(grads)
        code, alpha = self._act
        out = []
        for dy, X, mean, invstd in zip(grads, self.X, self.derived_variables["mean"],
                                       self.derived_variables["invstd"]):
            C = self._n_features(X)
            G = self._groups(C)
            V, cf = self._view(X)
            N = V.shape[0]
            gamma, beta = self._gamma_beta(C, X.dtype)
            dX = self._output("dX", X.shape, X.dtype)
            if V.size > 0:
                rpc = (config.examples_per_chunk(V.size // N, X.dtype.itemsize) if cf else
                       config.group_examples_per_chunk(V.shape[1], C, G, X.dtype.itemsize))
                n_chunks = -(-N // rpc)
                pdg = self._empty((n_chunks, C), _F64)
                pdb = self._empty((n_chunks, C), _F64)
                op = "group_backward_cf" if cf else "group_backward_cl"
                self._kernel(op)(V.size, V, dy.reshape(V.shape), mean, invstd, gamma, beta, G,
                                 code, alpha, rpc, dX.reshape(V.shape), pdg, pdb)
                if retain_grads and self.affine:  # both merges and accumulations in one call
                    self._kernel("merge_partial_sums_pair")(
                        n_chunks * C, pdg, pdb, self._empty(C, _F64), self._empty(C, _F64),
                        self.gradients["scaler"], self.gradients["intercept"], True)
            out.append(dX)
        return out if was_list else out[0]


class InstanceNorm2D(GroupNorm):
    r"""Instance normalization: each channel of each example over its ``H * W`` positions.

    :class:`GroupNorm` with one channel per group:

    .. math::

        y_{n,c,\cdot} = f\left(\frac{x_{n,c,\cdot} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c}
            + \epsilon}} \cdot \text{scaler}_c + \text{intercept}_c\right)

    Parameters
    ----------
    epsilon : float, default 1e-5
    affine : bool, default False
        Learn a per-channel ``scaler``/``intercept`` (PyTorch's default is also False).
    track_running_stats : bool, default False
        Keep ``running_mean``/``running_var`` (shape ``(C,)``), updated in training with
        the batch average of the instance statistics, ``running = momentum * running +
        (1 - momentum) * mean_n(stat_n)``, and use them in inference (PyTorch's
        ``InstanceNorm2d(track_running_stats=True)``). Without it inference uses the
        instance statistics, like training.
    momentum : float, default 0.9
        numpy-ml's convention; PyTorch's ``momentum`` is ``1 - momentum``.
    unbiased_running_var : bool, default False
        Store unbiased instance variances (``var * L / (L - 1)``, ``L = H*W``) in
        ``running_var``, as PyTorch does.
    optimizer, act_fn, data_format, device, n_in
        As for :class:`GroupNorm`.

    Notes
    -----
    Input ``(N, H, W, C)`` (or ``(N, C, H, W)`` with ``data_format="NCHW"``). Computing
    instance statistics of a single position (``H * W == 1``) raises ValueError, as in
    PyTorch. A NaN in channel ``c`` of example ``n`` makes only output ``(n, c)`` NaN;
    tracked ``running_mean[c]``/``running_var[c]`` keep their values through that batch.
    """

    _ndim = 4
    _param_keys = ("scaler", "intercept", "running_mean", "running_var")

    def __init__(self, epsilon=1e-5, affine=False, track_running_stats=False, momentum=0.9,
                 unbiased_running_var=False, optimizer=None, act_fn=None, data_format="NHWC",
                 device=None, n_in=None):
        self.momentum = _check_momentum(momentum)
        self.track_running_stats = bool(track_running_stats)
        self.unbiased_running_var = bool(unbiased_running_var)
        super().__init__(None, epsilon, affine, optimizer, act_fn, data_format, device, n_in)

    def _held_keys(self):
        keys = super()._held_keys()
        return keys + (("running_mean", "running_var") if self.track_running_stats else ())

    def _init_params(self, dtype):
        super()._init_params(dtype)
        if self.track_running_stats:
            C = self.n_in
            self.parameters["running_mean"] = devices.to_device(np.zeros(C, dtype), self.device)
            self.parameters["running_var"] = devices.to_device(np.ones(C, dtype), self.device)

    def _settable_hyperparameters(self):
        setters = super()._settable_hyperparameters()
        setters["momentum"] = lambda v: setattr(self, "momentum", _check_momentum(v))
        setters["unbiased_running_var"] = lambda v: setattr(self, "unbiased_running_var", bool(v))
        return setters

    @property
    def hyperparameters(self):
        hp = super().hyperparameters
        del hp["n_groups"]  # one group per channel
        hp.update(track_running_stats=self.track_running_stats, momentum=self.momentum,
                  unbiased_running_var=self.unbiased_running_var)
        return hp

    def _uses_running_stats(self, train):
        return self.track_running_stats and not train

    def _check_spatial(self, X, V, cf):
        L = V.shape[2] if cf else V.shape[1]
        if L == 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 spatial element per "
                             f"channel, got input of shape {tuple(X.shape)}")

    def _running_mean_invstd(self):
        if self.device != "cpu":
            return _BatchNormBase._running_mean_invstd(self)
        p = self.parameters
        mean = p["running_mean"].astype(_F64)
        invstd = 1.0 / np.sqrt(p["running_var"].astype(_F64) + self.epsilon)
        return mean, invstd

    def _after_batch_stats(self, mean, invstd, count):
        if not self.track_running_stats:
            return
        if self.device != "cpu":
            # tracked instance statistics on a GPU: small (N, C) arrays through the host
            mean, invstd = devices.to_host(mean), devices.to_host(invstd)
        # var from invstd: float64 round trip, relative error ~1e-16 * (var + eps) / var
        var = 1.0 / (invstd * invstd) - self.epsilon
        if self.unbiased_running_var:
            var = var * (count / (count - 1))
        m = self.momentum
        p = self.parameters
        batches = (("running_mean", mean.mean(axis=0)), ("running_var", var.mean(axis=0)))
        # a channel with NaN or Inf in any example keeps its running statistics (as BatchNorm)
        ok = np.isfinite(batches[0][1]) & np.isfinite(batches[1][1])
        for key, batch in batches:
            old = devices.to_host(p[key]) if self.device != "cpu" else p[key]
            new = np.where(ok, m * old.astype(_F64) + (1.0 - m) * batch, old)
            if self.device != "cpu":
                p[key] = devices.to_device(new.astype(old.dtype), self.device)
                continue
            p[key][...] = new

"""Losses: numpy-ml's ``SquaredError`` and ``CrossEntropy``, plus a stable logits form.

numpy-ml's API is kept: ``loss(y, y_pred)`` returns a float and ``grad(y, y_pred, ...)``
an array shaped like ``y_pred``. Two nbnet additions:

* ``reduction``: ``"sum"`` (numpy-ml's, the default) or ``"mean"`` (divided by the number
  of examples ``N = y_pred.shape[0]``; what :class:`nbnet.Model` uses, so the learning rate
  does not depend on the batch size).
* ``CrossEntropy(from_logits=True)`` takes raw scores ``z`` and computes
  ``-sum y * log_softmax(z)`` as ``lse(z) * sum(y) - sum(y * z)`` with
  ``lse(z) = m + log(sum(exp(z - m)))``, ``m = max(z)``: every exponent is <= 0, so it is
  finite for any finite logits (``log(softmax(z) + eps)`` loses everything below eps ~
  2.2e-16 and is capped at -log(eps) = 36). Its gradient with respect to ``z`` is
  ``softmax(z) * sum(y) - y``. This is the form :class:`nbnet.Model` uses for
  ``loss="cross_entropy"``.

Targets ``y`` may be one-hot (or any distribution) rows shaped like ``y_pred``, or, for
CrossEntropy, integer class labels of shape ``(N,)``. Every call validates its inputs
and raises ``ValueError`` for mismatched shapes, labels out of range, or NaN, naming
the offending argument.
"""
import numpy as np

from . import devices
from ._validation import check_finite
from .registry import get_kernel

_BLOCK = 1 << 14


def _device_of(x):
    return "cuda" if devices.is_device_array(x) and not isinstance(x, np.ndarray) else "cpu"


def _check_reduction(reduction):
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' (numpy-ml's) or 'mean', got {reduction!r}")
    return reduction


def _as_float(name, x, dtype=None):
    if devices.is_device_array(x) and not isinstance(x, np.ndarray):
        x = devices.to_host(x)
    arr = np.asarray(x)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
    if dtype is None:
        dtype = arr.dtype if arr.dtype in (np.float32, np.float64) else np.float64
    return np.ascontiguousarray(arr, dtype=dtype)


def _check_finite(name, arr):
    check_finite(name, arr, "; training diverged? try a smaller learning rate"
                 if name == "y_pred" else "")


def _check_logits(z):
    """Logits may hold -inf (a masked class: softmax 0, no gradient), not NaN or +inf, and
    every row needs a finite logit. Returns the -inf mask, or None when there is none."""
    if np.isfinite(z).all():
        return None
    bad = np.isnan(z) | np.isposinf(z)
    if bad.any():
        where = np.argwhere(bad)[0].tolist()
        what = "NaN" if np.isnan(z).any() else "+inf"
        raise ValueError(f"y_pred contains {what} (at index {where}); logits may be finite or "
                         "-inf (masked); training diverged? try a smaller learning rate")
    masked = np.isneginf(z)
    empty = masked.all(axis=1)
    if empty.any():
        raise ValueError(f"y_pred row {int(np.argmax(empty))} has no finite logit (every class "
                         "is -inf, masked): its softmax is undefined")
    return masked


def _check_probabilities(p):
    """``CrossEntropy(from_logits=False)`` reads ``y_pred`` as probabilities: a value
    outside [0, 1] (beyond a few ulps of rounding) is almost always logits passed to the
    probability form, which would give a finite, wrong (even negative) loss."""
    if p.size == 0:
        return
    slack = 16 * np.finfo(p.dtype).eps
    lo, hi = float(p.min()), float(p.max())
    if lo < -slack or hi > 1.0 + slack:
        bad = p < -slack if lo < -slack else p > 1.0 + slack
        where = np.argwhere(bad)[0].tolist()
        raise ValueError(f"CrossEntropy(from_logits=False) takes probabilities in [0, 1]; y_pred "
                         f"holds {float(p[tuple(where)]):.6g} at index {where} (values in [{lo:.4g}, "
                         f"{hi:.4g}]). For logits use CrossEntropy(from_logits=True)")


def _check_targets_unmasked(hit):
    """Target weight on a -inf logit makes the loss infinite: say where."""
    if hit.any():
        where = np.argwhere(hit)[0].tolist()
        raise ValueError(f"the target puts weight on a -inf logit (y_pred at {where}): the loss "
                         "would be infinite; a masked class cannot be the target")


class _Loss:
    name = "loss"

    def __init__(self, reduction="sum"):
        self.reduction = _check_reduction(reduction)

    def __call__(self, y, y_pred):
        return self.loss(y, y_pred)

    def _scale(self, n):
        return 1.0 / n if (self.reduction == "mean" and n) else 1.0

    @property
    def hyperparameters(self):
        return {"id": type(self).__name__, "reduction": self.reduction}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items() if k != "id")
        return f"{type(self).__name__}({args})"

    __str__ = __repr__


class SquaredError(_Loss):
    r"""Squared error, numpy-ml's: :math:`L = \tfrac12 \sum (\hat y - y)^2`.

    With ``reduction="mean"`` the sum is divided by the number of rows N (so it is half
    of PyTorch's ``MSELoss(reduction="sum") / N``; ``MSELoss(reduction="mean")`` divides by
    every element and drops the 1/2).

    ``grad(y, y_pred, z=None, act_fn=None)`` is numpy-ml's ``(y_pred - y) * act_fn.grad(z)``
    (the gradient at the pre-activation ``z``); without ``act_fn`` it is the gradient with
    respect to ``y_pred``.
    """

    name = "squared_error"

    def _prep(self, y, y_pred):
        y_pred = _as_float("y_pred", y_pred)
        y = _as_float("y", y, dtype=y_pred.dtype)
        if y.shape != y_pred.shape:
            if y.ndim == 1 and y_pred.ndim == 2 and y_pred.shape[1] == 1 and y.shape[0] == y_pred.shape[0]:
                y = y.reshape(-1, 1)
            else:
                raise ValueError(f"y must have the shape of y_pred {y_pred.shape}, got {y.shape}")
        _check_finite("y", y)
        _check_finite("y_pred", y_pred)
        return y, y_pred

    def _run(self, y, y_pred, want_grad):
        y, y_pred = self._prep(y, y_pred)
        n = y_pred.size
        N = y_pred.shape[0] if y_pred.ndim else 1
        scale = self._scale(N)
        partial = np.empty(max(1, -(-n // _BLOCK)), np.float64)
        partial[:] = 0.0
        grad = np.empty(y_pred.shape if want_grad else 0, y_pred.dtype)
        if n:
            get_kernel("squared_error", "cpu")(n, y_pred.reshape(-1), y.reshape(-1), scale, _BLOCK,
                                               partial, grad.reshape(-1))
        return float(partial.sum()) * scale, grad

    def loss(self, y, y_pred):
        return self._run(y, y_pred, False)[0]

    def grad(self, y, y_pred, z=None, act_fn=None):
        g = self._run(y, y_pred, True)[1]
        if act_fn is not None:
            if z is None:
                raise ValueError("SquaredError.grad: act_fn needs the pre-activation z")
            g = g * np.asarray(act_fn.grad(z))
        return g

    def loss_and_grad(self, y, y_pred):
        """``(loss, dL/dy_pred)`` in one pass (what :class:`nbnet.Model` calls)."""
        return self._run(y, y_pred, True)


class CrossEntropy(_Loss):
    r"""Cross-entropy :math:`L = -\sum_i \sum_c y_{ic} \log p_{ic}`.

    Parameters
    ----------
    from_logits : bool, default False
        False (numpy-ml's): ``y_pred`` holds probabilities ``p`` (softmax outputs);
        ``loss = -sum(y * log(p + eps))`` and ``grad(y, y_pred) = y_pred - y``, which,
        as in numpy-ml, is the gradient with respect to the *softmax input* (valid when
        ``p`` came from a softmax). True: ``y_pred`` holds logits ``z``; the loss is the
        stable ``lse(z) * sum(y) - sum(y * z)`` and the gradient (with respect to ``z``)
        ``softmax(z) * sum(y) - y``. PyTorch's ``CrossEntropyLoss`` is
        ``CrossEntropy(from_logits=True, reduction="mean")``. Logits may be ``-inf`` to
        mask a class (its softmax and gradient are 0), as long as each row keeps a finite
        logit and no target weight falls on a masked class (either raises
        ``ValueError``); NaN and ``+inf`` are rejected.
    reduction : {"sum", "mean"}, default "sum"

    Targets: one-hot/probability rows shaped like ``y_pred``, or integer labels ``(N,)``.
    """

    name = "cross_entropy"

    def __init__(self, from_logits=False, reduction="sum"):
        super().__init__(reduction)
        self.from_logits = bool(from_logits)

    @property
    def hyperparameters(self):
        return {"id": "CrossEntropy", "from_logits": self.from_logits, "reduction": self.reduction}

    def _prep(self, y, y_pred):
        y_pred = _as_float("y_pred", y_pred)
        if y_pred.ndim != 2:
            raise ValueError(f"y_pred must be 2-D (N, n_classes), got shape {y_pred.shape}")
        masked = None
        if self.from_logits:
            masked = _check_logits(y_pred)
        else:
            _check_finite("y_pred", y_pred)
        y_arr = np.asarray(devices.to_host(y) if devices.is_device_array(y) else y)
        N, C = y_pred.shape
        if y_arr.ndim == 1:
            if y_arr.shape[0] != N:
                raise ValueError(f"y has {y_arr.shape[0]} labels but y_pred has {N} rows")
            if y_arr.dtype.kind == "f":
                _check_finite("y", y_arr)
                if not np.all(y_arr == np.round(y_arr)):
                    raise ValueError("1-D y must hold integer class labels, got non-integer values")
            elif y_arr.dtype.kind not in "iub":
                raise TypeError(f"y must hold integer class labels or one-hot rows, got dtype {y_arr.dtype}")
            labels = y_arr.astype(np.int64)
            if N and (labels.min() < 0 or labels.max() >= C):
                raise ValueError(f"class labels must be in [0, {C}), got values in "
                                 f"[{labels.min()}, {labels.max()}]")
            if masked is not None:
                onehot = np.zeros_like(masked)
                onehot[np.arange(N), labels] = True
                _check_targets_unmasked(masked & onehot)
            if not self.from_logits:  # values last, once the shapes are known to be right
                _check_probabilities(y_pred)
            return np.ascontiguousarray(labels), y_pred
        y = _as_float("y", y_arr, dtype=y_pred.dtype)
        if y.shape != y_pred.shape:
            raise ValueError(f"y must have the shape of y_pred {y_pred.shape} (one-hot) or be 1-D "
                             f"labels of length {N}, got {y.shape}")
        _check_finite("y", y)
        if masked is not None:
            _check_targets_unmasked(masked & (y != 0))
        if not self.from_logits:
            _check_probabilities(y_pred)
        return y, y_pred

    def _run(self, y, y_pred, want_grad):
        T, y_pred = self._prep(y, y_pred)
        N, C = y_pred.shape
        scale = self._scale(N)
        labels = T.ndim == 1
        if self.from_logits:
            rows = np.empty(N, np.float64)
            grad = np.empty((N, C) if want_grad else (0, C), y_pred.dtype)
            if N:
                op = "softmax_xent_labels" if labels else "softmax_xent_onehot"
                get_kernel(op, "cpu")(N * C, y_pred, T, scale, rows, grad)
            return float(rows.sum()) * scale, grad
        eps = np.finfo(float).eps
        if labels:
            picked = y_pred[np.arange(N), T].astype(np.float64)
            loss = -float(np.sum(np.log(picked + eps)))
        else:
            loss = -float(np.sum(T.astype(np.float64) * np.log(y_pred.astype(np.float64) + eps)))
        grad = None
        if want_grad:
            grad = y_pred.copy()
            if labels:
                grad[np.arange(N), T] -= 1
            else:
                grad -= T
            if scale != 1.0:
                grad *= y_pred.dtype.type(scale)
        return loss * scale, grad

    def loss(self, y, y_pred):
        return self._run(y, y_pred, False)[0]

    def grad(self, y, y_pred, **kwargs):
        """Gradient with respect to the logits (see the class docstring)."""
        return self._run(y, y_pred, True)[1]

    def loss_and_grad(self, y, y_pred):
        """``(loss, dL/dlogits)`` in one pass (what :class:`nbnet.Model` calls)."""
        return self._run(y, y_pred, True)


_ALIASES = {
    "cross_entropy": lambda: CrossEntropy(from_logits=True, reduction="mean"),
    "crossentropy": lambda: CrossEntropy(from_logits=True, reduction="mean"),
    "ce": lambda: CrossEntropy(from_logits=True, reduction="mean"),
    "squared_error": lambda: SquaredError(reduction="mean"),
    "squarederror": lambda: SquaredError(reduction="mean"),
    "mse": lambda: SquaredError(reduction="mean"),
}


def get_loss(spec):
    """A loss object from a name, a hyperparameter dict, or an object.

    ``"cross_entropy"`` is ``CrossEntropy(from_logits=True, reduction="mean")`` and
    ``"squared_error"`` (``"mse"``) is ``SquaredError(reduction="mean")``: the forms a
    model trains with. A dict is a loss's ``hyperparameters``. Any object with
    ``loss(y, y_pred)`` and ``grad(y, y_pred)`` methods is returned as is.
    """
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_").replace(" ", "_")
        if key not in _ALIASES:
            raise ValueError(f"unknown loss {spec!r}: expected 'cross_entropy' or 'squared_error' "
                             "(or a loss object)")
        return _ALIASES[key]()
    if isinstance(spec, dict):
        hp = dict(spec)
        kind = hp.pop("id", None)
        cls = {"CrossEntropy": CrossEntropy, "SquaredError": SquaredError}.get(kind)
        if cls is None:
            raise ValueError(f"unknown loss id {kind!r}")
        return cls(**hp)
    if hasattr(spec, "loss") and hasattr(spec, "grad"):
        return spec
    raise TypeError(f"loss must be 'cross_entropy', 'squared_error' or an object with loss() and "
                    f"grad(), got {type(spec).__name__}")


__all__ = ["SquaredError", "CrossEntropy", "get_loss"]

"""Activation layers: elementwise kernels (and a row kernel for Softmax).

Each elementwise layer is also a numpy-ml activation object: ``fn(z)`` and ``grad(x)``
compute ``f`` and ``f'`` (``layer(z)`` is ``fn(z)``), so it can be passed wherever numpy-ml
passes an activation (``SquaredError.grad(y, y_pred, z, act_fn)``, ``act_fn=`` of other
layers). As layers they keep numpy-ml's contract: ``forward`` retains its input in
training mode and ``backward`` returns ``dLdy * f'(X)``; they have no parameters.

Precision: float64 input is computed in float64 (exp, expm1, tanh, erf within 1-16 ulp
of the C library). On CPU, float32 input of the smooth activations (ELU, GELU, Sigmoid,
Tanh) is computed in float32, as PyTorch does: exp, expm1, tanh and erf within 4 float32
ulp (``nbnet/kernels/cpu/vector_math.py``), twice the SIMD width of float64. Formulas of the
form ``1 + erf(..)`` / ``1 + tanh(..)`` (GELU) keep an absolute error of ~1e-7 there,
so GELU of a large negative float32 input is exact to ~1e-7 absolute, not relative.
"""
import numpy as np

from .. import activations as A
from .._validation import check_float_array
from .base import LayerBase

#: elements per parallel block of the elementwise kernels (any value gives the same bits)
_BLOCK = 1 << 14


def runs_apart(activation, device):
    """True when a normalization or dense layer's ``act_fn`` runs as its own pass
    (:func:`activation_forward` / :func:`activation_backward`) instead of fused into the
    layer's kernels: a smooth activation (ELU, GELU, tanh, sigmoid) on CPU. Fused, it was
    one C-library call per value in every pass: BatchNorm1D(act_fn="gelu") training at
    (2048, 1024) float32 took 67 ms, against 4 ms as the normalization then this pass
    (which costs one more read and write of the output). The piecewise-linear ones are
    selects, free to fuse; on CUDA every activation stays fused. (Checked on every
    forward and backward call: the code test comes first, so the common piecewise case
    costs one attribute read.)"""
    return activation.code > A.LEAKY_RELU and device == "cpu"


def fused_activation(activation, device):
    """``(code, alpha)`` that a layer's own kernels fuse: the activation's, or the identity
    when it :func:`runs_apart`."""
    if runs_apart(activation, device):
        return 0, 0.0
    return activation.code, float(activation.alpha)


def activation_forward(layer, activation, X, Y):
    """``Y = f(X)`` elementwise with the kernels of ``layer``'s device (vectorised; float32
    computed in float32). ``Y`` should not be ``X``: on the same memory the loop fails
    LLVM's no-overlap check and runs scalar (4x slower measured)."""
    if X.size:
        layer._kernel("act_forward")(X.size, X.reshape(-1), activation.code,
                                     float(activation.alpha), _BLOCK, Y.reshape(-1))
    return Y


def activation_backward(layer, activation, X, dy, dX):
    """``dX = dy * f'(X)`` elementwise (``X`` the activation's input; ``dX`` a separate
    array, as for :func:`activation_forward`)."""
    if X.size:
        layer._kernel("act_backward")(X.size, X.reshape(-1), dy.reshape(-1), activation.code,
                                      float(activation.alpha), _BLOCK, dX.reshape(-1))
    return dX


def activation_backward_from_output(layer, activation, Y, dy, dX):
    """``dX = dy * f'(z)`` from the activation's output ``Y = f(z)`` (tanh and the sigmoid
    only: :data:`SLOPE_FROM_OUTPUT`); no ``exp`` to evaluate again."""
    if Y.size:
        layer._kernel("act_backward_from_output")(Y.size, Y.reshape(-1), dy.reshape(-1),
                                                  activation.code, _BLOCK, dX.reshape(-1))
    return dX


#: The activations whose slope is a function of their value: ``1 - y**2`` (tanh) and
#: ``y * (1 - y)`` (the sigmoid), the formulas their slope from ``z`` uses anyway.
SLOPE_FROM_OUTPUT = frozenset((A.TANH, A.SIGMOID))


def activation_backward_retained(layer, activation, Z, Y, dy, dX):
    """``dX = dy * f'(Z)`` for a layer that ran ``f`` as its own pass: from the retained
    output ``Y = f(Z)`` when the slope is a function of it (:data:`SLOPE_FROM_OUTPUT`; the
    same bits, without evaluating ``exp`` again), else from ``Z``. ``Y`` None: from ``Z``."""
    if Y is not None and activation.code in SLOPE_FROM_OUTPUT:
        return activation_backward_from_output(layer, activation, Y, dy, dX)
    return activation_backward(layer, activation, Z, dy, dX)


def retained_outputs(layer, activation, n):
    """The outputs a layer retained for :func:`activation_backward_retained` (its
    ``derived_variables["Y"]``), one per retained forward call, or ``[None] * n`` when the
    activation differentiates from ``z`` or the list does not match the ``n`` retained
    inputs (a subclass that did not retain them)."""
    Ys = layer.derived_variables.get("Y", [])
    if activation.code in SLOPE_FROM_OUTPUT and len(Ys) == n:
        return Ys
    return [None] * n


def _check_alpha(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class _ElementwiseActivation(LayerBase):
    """An activation layer over any input shape (float32/float64), elementwise."""

    def __init__(self, activation, device=None):
        super().__init__(optimizer=None, device=device)
        self.activation = activation
        self.act_fn = activation
        self.is_initialized = True

    @property
    def hyperparameters(self):
        hp = {"layer": type(self).__name__}
        hp.update(self._init_kwargs())
        hp["device"] = self.device
        return hp

    def _init_kwargs(self):
        return {}

    def __str__(self):
        return str(self.activation)

    # numpy-ml activation-object API
    def __call__(self, z):
        return self.fn(z)

    def fn(self, z):
        """f(z), same shape and dtype (inference; retains nothing)."""
        return self.forward(z, retain_derived=False)

    def grad(self, x):
        """f'(x), elementwise."""
        X = check_float_array(x, "x", device=self.device)
        ones = np.ones(X.shape, X.dtype) if self.device == "cpu" else None
        return self._apply_backward(X, ones if ones is not None else _ones_like(self, X))

    # layer API
    def forward(self, X, retain_derived=True):
        """``f(X)``. In training, retains ``X`` (and, for tanh and the sigmoid, the output:
        their backward differentiates from it, as PyTorch's does, instead of evaluating
        ``exp`` again). Like ``X``, a retained output must not be modified in place before
        ``backward``."""
        X = check_float_array(X, "X", device=self.device)
        Y = activation_forward(self, self.activation, X, self._output("Y", X.shape, X.dtype))
        if self._is_training(retain_derived):
            self.X.append(X)
            if self.activation.code in SLOPE_FROM_OUTPUT:
                self.derived_variables.setdefault("Y", []).append(Y)
        return Y

    def backward(self, dLdy, retain_grads=True):
        grads, was_list = self._gradient_list(dLdy)
        Ys = retained_outputs(self, self.activation, len(self.X))
        out = []
        for dy, X, Y in zip(grads, self.X, Ys):
            dy = check_float_array(dy, "dLdy", device=self.device)
            if tuple(dy.shape) != tuple(X.shape):
                raise ValueError(f"dLdy must have the shape of the layer's output "
                                 f"{tuple(X.shape)}, got {tuple(dy.shape)}")
            dy = dy if dy.dtype == X.dtype else dy.astype(X.dtype)
            out.append(activation_backward_retained(self, self.activation, X, Y, dy,
                                                    self._output("dX", X.shape, X.dtype)))
        return out if was_list else out[0]

    def _apply_backward(self, X, dy):
        return activation_backward(self, self.activation, X, dy,
                                   self._output("dX", X.shape, X.dtype))


def _ones_like(layer, X):
    from .. import devices
    out = devices.empty(X.shape, X.dtype, layer.device)
    layer._kernel("fill")(out.reshape(-1), 1.0)
    return out


class Identity(_ElementwiseActivation):
    """f(z) = z."""

    def __init__(self, device=None):
        super().__init__(A.Activation(A.IDENTITY), device)


class ReLU(_ElementwiseActivation):
    """f(z) = max(z, 0); f'(0) = 0 (numpy-ml's and PyTorch's convention)."""

    def __init__(self, device=None):
        super().__init__(A.Activation(A.RELU), device)


class LeakyReLU(_ElementwiseActivation):
    """f(z) = z if z > 0 else alpha * z (numpy-ml's default alpha 0.3)."""

    def __init__(self, alpha=0.3, device=None):
        self.alpha = _check_alpha("alpha", alpha)
        super().__init__(A.Activation(A.LEAKY_RELU, self.alpha), device)

    def _init_kwargs(self):
        return {"alpha": self.alpha}


class ELU(_ElementwiseActivation):
    """f(z) = z if z > 0 else alpha * (exp(z) - 1)."""

    def __init__(self, alpha=1.0, device=None):
        self.alpha = _check_alpha("alpha", alpha)
        super().__init__(A.Activation(A.ELU, self.alpha), device)

    def _init_kwargs(self):
        return {"alpha": self.alpha}


class GELU(_ElementwiseActivation):
    """Gaussian error linear unit; ``approximate=True`` (numpy-ml's default) is the tanh form
    ``0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))``, False the exact ``z Phi(z)``."""

    def __init__(self, approximate=True, device=None):
        self.approximate = bool(approximate)
        super().__init__(A.Activation(A.GELU_TANH if self.approximate else A.GELU_EXACT), device)

    def _init_kwargs(self):
        return {"approximate": self.approximate}


class Tanh(_ElementwiseActivation):
    """f(z) = tanh(z)."""

    def __init__(self, device=None):
        super().__init__(A.Activation(A.TANH), device)


class Sigmoid(_ElementwiseActivation):
    """f(z) = 1 / (1 + exp(-z)), evaluated without overflow for any z."""

    def __init__(self, device=None):
        super().__init__(A.Activation(A.SIGMOID), device)


class Softmax(LayerBase):
    r"""Softmax along ``dim`` (numpy-ml's ``Softmax(dim=-1)`` layer).

    .. math:: y_i = \exp(x_i - m) / \sum_j \exp(x_j - m), \quad m = \max_j x_j

    Subtracting the row maximum makes every exponent <= 0, so no finite input
    overflows. Backward: ``dX = Y * (dY - sum(dY * Y, dim))``.

    For classification, prefer ending a model with logits and using
    ``CrossEntropy(from_logits=True)`` (what :class:`nbnet.Model` does; a trailing Softmax
    in a Model with a cross-entropy loss is fused into the loss during training).
    """

    def __init__(self, dim=-1, device=None):
        if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, (int, np.integer)):
            raise ValueError(f"dim must be an integer, got {dim!r}")
        super().__init__(optimizer=None, device=device)
        self.dim = int(dim)
        self.derived_variables = {"Y": []}
        self.is_initialized = True

    @property
    def hyperparameters(self):
        return {"layer": "Softmax", "dim": self.dim, "device": self.device}

    def _axis(self, X):
        if not -X.ndim <= self.dim < X.ndim:
            raise ValueError(f"Softmax(dim={self.dim}) needs an input with more than "
                             f"{self.dim if self.dim >= 0 else -self.dim - 1} dimensions, got shape "
                             f"{tuple(X.shape)}")
        return self.dim % X.ndim

    def _rows(self, X, axis):
        """A C-contiguous (rows, D) view/copy with the softmax axis last."""
        if axis == X.ndim - 1:
            return X.reshape(-1, X.shape[-1]) if X.ndim else X.reshape(1, 1)
        return np.ascontiguousarray(np.moveaxis(X, axis, -1)).reshape(-1, X.shape[axis])

    def _unrows(self, Y2, X, axis):
        if axis == X.ndim - 1:
            return Y2.reshape(X.shape)
        moved = list(X.shape)
        moved.append(moved.pop(axis))
        return np.ascontiguousarray(np.moveaxis(Y2.reshape(moved), -1, axis))

    def forward(self, X, retain_derived=True):
        X = check_float_array(X, "X", device=self.device)
        axis = self._axis(X)
        X2 = self._rows(X, axis)
        Y2 = self._empty(X2.shape, X.dtype)
        if X2.size:
            self._kernel("softmax_forward")(X2.size, X2, Y2)
        Y = self._unrows(Y2, X, axis)
        if self._is_training(retain_derived):
            self.X.append(X)
            self.derived_variables["Y"].append(Y)
        return Y

    def backward(self, dLdy, retain_grads=True):
        grads, was_list = self._gradient_list(dLdy)
        out = []
        for dy, X, Y in zip(grads, self.X, self.derived_variables["Y"]):
            dy = check_float_array(dy, "dLdy", device=self.device)
            if tuple(dy.shape) != tuple(X.shape):
                raise ValueError(f"dLdy must have the shape of the layer's output "
                                 f"{tuple(X.shape)}, got {tuple(dy.shape)}")
            dy = dy if dy.dtype == X.dtype else dy.astype(X.dtype)
            axis = self._axis(X)
            Y2, dy2 = self._rows(Y, axis), self._rows(dy, axis)
            dX2 = self._empty(Y2.shape, X.dtype)
            if Y2.size:
                self._kernel("softmax_backward")(Y2.size, Y2, dy2, dX2)
            out.append(self._unrows(dX2, X, axis))
        return out if was_list else out[0]


ACTIVATION_LAYERS = {cls.__name__: cls for cls in
                     (Identity, ReLU, LeakyReLU, ELU, GELU, Tanh, Sigmoid, Softmax)}


def activation_layer(act):
    """The elementwise layer for an :class:`nbnet.activations.Activation` (or spec string)."""
    act = A.parse_activation(act)
    c = act.code
    if c == A.IDENTITY:
        return Identity()
    if c == A.RELU:
        return ReLU()
    if c == A.LEAKY_RELU:
        return LeakyReLU(act.alpha)
    if c == A.ELU:
        return ELU(act.alpha)
    if c in (A.GELU_TANH, A.GELU_EXACT):
        return GELU(approximate=c == A.GELU_TANH)
    if c == A.TANH:
        return Tanh()
    return Sigmoid()

"""Slow float64 NumPy references for the training ops (dense layer, activations as layers,
softmax, losses, dropout) and a central-difference gradient helper.

Written from the textbook formulas, independently of the kernels. Activation values and
slopes come from :mod:`tests.reference` (``act_ref``/``act_grad_ref``).
"""
import numpy as np

from reference import act_grad_ref, act_ref  # noqa: F401  (re-exported)


def dense_forward_ref(X, W, b, act=None, alpha=None):
    """(Y, Z): Z = X W + b, Y = f(Z), float64."""
    X, W, b = (np.asarray(a, np.float64) for a in (X, W, b))
    Z = X @ W + b.reshape(1, -1)
    return act_ref(act, Z, alpha), Z


def dense_backward_ref(X, W, Z, dY, act=None, alpha=None):
    """(dX, dW, db) by the chain rule; db has shape (1, n_out) (numpy-ml's)."""
    X, W, Z, dY = (np.asarray(a, np.float64) for a in (X, W, Z, dY))
    dZ = dY * act_grad_ref(act, Z, alpha)
    return dZ @ W.T, X.T @ dZ, dZ.sum(axis=0, keepdims=True)


def softmax_ref(X, axis=-1):
    X = np.asarray(X, np.float64)
    e = np.exp(X - X.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_backward_ref(X, dY, axis=-1):
    """Full Jacobian-vector product: dX_i = sum_j dY_j * Y_j * (delta_ij - Y_i)."""
    Y = softmax_ref(X, axis)
    dY = np.asarray(dY, np.float64)
    return Y * (dY - (dY * Y).sum(axis=axis, keepdims=True))


def log_softmax_ref(Z):
    Z = np.asarray(Z, np.float64)
    m = Z.max(axis=1, keepdims=True)
    return Z - m - np.log(np.exp(Z - m).sum(axis=1, keepdims=True))


def one_hot(labels, n_classes):
    out = np.zeros((len(labels), n_classes))
    out[np.arange(len(labels)), labels] = 1.0
    return out


def cross_entropy_logits_ref(T, Z, reduction="sum"):
    """(loss, dL/dZ) for target rows T and logits Z."""
    T = np.asarray(T, np.float64)
    loss = -(T * log_softmax_ref(Z)).sum()
    grad = softmax_ref(Z) * T.sum(axis=1, keepdims=True) - T
    n = Z.shape[0] if reduction == "mean" else 1
    return loss / n, grad / n


def cross_entropy_probs_ref(T, P):
    """numpy-ml's: -sum(T log(P + eps)), gradient P - T."""
    T, P = np.asarray(T, np.float64), np.asarray(P, np.float64)
    return -(T * np.log(P + np.finfo(float).eps)).sum(), P - T


def squared_error_ref(T, Y, reduction="sum"):
    T, Y = np.asarray(T, np.float64), np.asarray(Y, np.float64)
    n = Y.shape[0] if reduction == "mean" else 1
    return 0.5 * ((Y - T) ** 2).sum() / n, (Y - T) / n


def dropout_ref(X, keep_mask, p):
    return np.asarray(X, np.float64) * keep_mask / (1.0 - p)


def numerical_grad(f, x, eps=1e-6):
    """Central differences of the scalar function f at x (float64, x perturbed in place
    and restored)."""
    g = np.zeros_like(x, dtype=np.float64)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g

"""Slow, obviously-correct float64 NumPy references for every op.

Written from the textbook formulas, independently of the kernels (different algebra:
the backward references use the classic chain rule through mean and variance, not the
fused ``g - mean(g) - xhat * mean(g * xhat)`` form the kernels use).
"""
import math

import numpy as np

_erf = np.frompyfunc(math.erf, 1, 1)


def act_ref(name, z, alpha=None):
    """f(z) in float64 for the activation names of nbnet.activations."""
    z = np.asarray(z, dtype=np.float64)
    if name in (None, "identity"):
        return z.copy()
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "leaky_relu":
        a = 0.3 if alpha is None else alpha
        return np.where(z > 0, z, a * z)
    if name == "elu":
        a = 1.0 if alpha is None else alpha
        return np.where(z > 0, z, a * (np.exp(np.minimum(z, 0)) - 1.0))
    if name == "gelu_exact":
        return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)).astype(np.float64))
    if name == "gelu":  # numpy-ml's default: the tanh approximation
        return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))
    if name == "tanh":
        return np.tanh(z)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    raise ValueError(name)


def act_grad_ref(name, z, alpha=None):
    """f'(z) in float64 (closed forms from calculus; kinks take the left slope at 0)."""
    z = np.asarray(z, dtype=np.float64)
    if name in (None, "identity"):
        return np.ones_like(z)
    if name == "relu":
        return np.where(z > 0, 1.0, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, 0.3 if alpha is None else alpha)
    if name == "elu":
        a = 1.0 if alpha is None else alpha
        return np.where(z > 0, 1.0, a * np.exp(np.minimum(z, 0)))
    if name == "gelu_exact":
        cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)).astype(np.float64))
        return cdf + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    if name == "gelu":
        c = math.sqrt(2.0 / math.pi)
        t = np.tanh(c * (z + 0.044715 * z ** 3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t ** 2) * c * (1.0 + 3 * 0.044715 * z ** 2)
    if name == "tanh":
        return 1.0 - np.tanh(z) ** 2
    if name == "sigmoid":
        s = act_ref("sigmoid", z)
        return s * (1.0 - s)
    raise ValueError(name)


def norm_forward_ref(X, axes, gamma, beta, eps, act=None, alpha=None, center=True):
    """Normalize X over ``axes``; gamma/beta broadcast against X.

    Returns (Y, mean, var) with mean/var keeping dims; biased variance; for
    ``center=False`` (RMSNorm) mean is 0 and var is the mean square.
    """
    X = np.asarray(X, dtype=np.float64)
    mean = X.mean(axis=axes, keepdims=True) if center else np.zeros_like(X.mean(axis=axes, keepdims=True))
    var = ((X - mean) ** 2).mean(axis=axes, keepdims=True)
    xhat = (X - mean) / np.sqrt(var + eps)
    z = xhat * np.asarray(gamma, np.float64) + np.asarray(beta, np.float64)
    return act_ref(act, z, alpha), mean, var


def norm_backward_ref(X, dY, axes, gamma, beta, eps, act=None, alpha=None, center=True,
                      param_axes=None):
    """Classic chain rule through mean and variance, float64.

    Returns (dX, dgamma, dbeta); parameter gradients are summed over ``param_axes``
    (the axes along which gamma is broadcast), keeping gamma's shape.
    """
    X = np.asarray(X, dtype=np.float64)
    dY = np.asarray(dY, dtype=np.float64)
    gamma = np.asarray(gamma, np.float64)
    beta = np.asarray(beta, np.float64)
    n = np.prod([X.shape[a] for a in np.atleast_1d(axes)])
    mean = X.mean(axis=axes, keepdims=True) if center else 0.0 * X.mean(axis=axes, keepdims=True)
    var = ((X - mean) ** 2).mean(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (X - mean) * invstd
    z = xhat * gamma + beta
    g = dY * act_grad_ref(act, z, alpha)
    dxhat = g * gamma
    dvar = np.sum(dxhat * (X - mean) * -0.5 * invstd ** 3, axis=axes, keepdims=True)
    if center:
        dmean = np.sum(-dxhat * invstd, axis=axes, keepdims=True) + \
            dvar * np.sum(-2.0 * (X - mean), axis=axes, keepdims=True) / n
        dX = dxhat * invstd + dvar * 2.0 * (X - mean) / n + dmean / n
    else:
        dX = dxhat * invstd + dvar * 2.0 * X / n
    if param_axes is None:
        param_axes = tuple(i for i in range(X.ndim) if gamma.ndim == 0 or
                           (i < X.ndim - gamma.ndim or gamma.shape[i - (X.ndim - gamma.ndim)] == 1))
    dgamma = np.sum(g * xhat, axis=param_axes).reshape(gamma.shape)
    dbeta = np.sum(g, axis=param_axes).reshape(np.shape(beta))
    return dX, dgamma, dbeta


def batchnorm_ref(X, gamma, beta, eps, act=None, alpha=None):
    """BatchNorm over every axis but the last (NHWC / (N, C))."""
    axes = tuple(range(X.ndim - 1))
    return norm_forward_ref(X, axes, gamma, beta, eps, act, alpha)


def layernorm_ref(X, gamma, beta, eps, act=None, alpha=None, center=True):
    """LayerNorm over every axis but the first."""
    axes = tuple(range(1, X.ndim))
    return norm_forward_ref(X, axes, gamma, beta, eps, act, alpha, center)

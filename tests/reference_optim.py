"""Slow float64 NumPy references of numpy-ml's optimizer rules and schedulers.

Written from numpy-ml's formulas, independently of nbnet: whole-array NumPy expressions
(``np.linalg.norm`` for clipping, ``grad * t / norm`` as numpy-ml writes it) and, for
the King scheduler, numpy-ml's normal equations ``inv(X.T @ X) @ X.T @ y``. Every
function returns new arrays; nothing is updated in place.
"""
import math

import numpy as np


def f64(x):
    return np.array(x, dtype=np.float64)


def clip_ref(grad, clip_norm):
    """numpy-ml: ``if norm(g) > clip_norm: g = g * clip_norm / norm(g)``."""
    grad = f64(grad)
    t = np.inf if clip_norm is None else clip_norm
    norm = np.linalg.norm(grad)
    if norm > t:
        grad = grad * t / norm
    return grad


def sgd_ref(param, grad, cache, lr, momentum=0.0, clip_norm=None):
    """Returns ``(param, cache)`` after numpy-ml's SGD step."""
    grad = clip_ref(grad, clip_norm)
    update = momentum * f64(cache) + lr * grad
    return f64(param) - update, update


def adagrad_ref(param, grad, cache, lr, eps=1e-7, clip_norm=None):
    grad = clip_ref(grad, clip_norm)
    cache = f64(cache) + grad ** 2
    return f64(param) - lr * grad / (np.sqrt(cache) + eps), cache


def rmsprop_ref(param, grad, cache, lr, decay=0.9, eps=1e-7, clip_norm=None):
    grad = clip_ref(grad, clip_norm)
    cache = decay * f64(cache) + (1 - decay) * grad ** 2
    return f64(param) - lr * grad / (np.sqrt(cache) + eps), cache


def adam_ref(param, grad, state, lr, decay1=0.9, decay2=0.999, eps=1e-7, clip_norm=None):
    """``state = {"t", "mean", "var"}``; returns ``(param, new_state)``."""
    grad = clip_ref(grad, clip_norm)
    t = state["t"] + 1
    var = decay2 * f64(state["var"]) + (1 - decay2) * grad ** 2
    mean = decay1 * f64(state["mean"]) + (1 - decay1) * grad
    v_hat = var / (1 - decay2 ** t)
    m_hat = mean / (1 - decay1 ** t)
    return f64(param) - lr * m_hat / (np.sqrt(v_hat) + eps), {"t": t, "mean": mean, "var": var}


# ------------------------------------------------------------------ schedulers

def exponential_lr_ref(step, initial_lr=0.01, stage_length=500, staircase=False, decay=0.1):
    stage = step / stage_length
    if staircase:
        stage = np.floor(stage)
    return initial_lr * decay ** stage


def noam_lr_ref(step, model_dim=512, scale_factor=1, warmup_steps=4000):
    return scale_factor * model_dim ** (-0.5) * min(step ** (-0.5), step * warmup_steps ** (-1.5))


def _gaussian_cdf(x, mean, var):
    eps = np.finfo(float).eps
    return (1 + math.erf((x - mean) / np.sqrt(var + eps) / np.sqrt(2))) / 2


class KingRef:
    """numpy-ml's KingScheduler algorithm, normal equations and all."""

    def __init__(self, initial_lr=0.01, patience=1000, decay=0.99):
        self.current_lr, self.patience, self.decay = initial_lr, patience, decay
        self.max_history = int(np.ceil(1.1 * (patience + 1)))
        self.loss_history = []

    @staticmethod
    def _p_decreasing(lh, i):
        loss = lh[i:]
        n = len(loss)
        X = np.c_[np.ones(n), np.arange(i, len(lh))]
        intercept, slope = np.linalg.inv(X.T @ X) @ X.T @ loss
        pred = slope * X[:, 1] + intercept
        loss_var = np.sum((loss - pred) ** 2) / (n - 2)
        return _gaussian_cdf(0, slope, 12 * loss_var / (n ** 3 - n))

    def _steps_without_decrease(self, robust=False):
        lh = np.array(self.loss_history)
        if robust:
            lh = np.array([v for v in lh if v <= np.quantile(lh, 0.9)])
        n = len(lh)
        i = max(0, n - self.patience - 1)
        return n - i if self._p_decreasing(lh, i) < 0.51 else 0

    def __call__(self, step, cur_loss):
        self.loss_history.append(cur_loss)
        if len(self.loss_history) < self.patience:
            return self.current_lr
        self.loss_history = self.loss_history[-self.max_history:]
        if (self._steps_without_decrease() > self.patience
                and self._steps_without_decrease(robust=True) > self.patience):
            self.current_lr *= self.decay
        return self.current_lr

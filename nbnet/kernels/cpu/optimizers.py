"""Optimizer kernels: elementwise parameter updates and the clip-norm reduction.

Every kernel works on flat, C-contiguous 1-D views (``param.reshape(-1)``), so one
compiled specialisation per dtype serves every parameter shape. The state arrays
(``cache``, ``mean``, ``var``) have the parameter's dtype and length, and so does the
arithmetic (the float64 scalars are rounded once to the parameter's dtype), as in
PyTorch's CPU optimizers. Widening float32 elements to float64 measured 5x slower at one
thread (1M elements: 1.5 ms against 0.30 ms, the memory floor) for no gain in what is
stored: each state value is rounded to float32 when stored either way.

Parallel layout: ``prange`` over fixed-size blocks of ``block`` elements. Each block
loops over *slices* (``param[start:stop]``, index from 0): indexing the full arrays with
``i`` in ``range(start, stop)`` makes numba emit a negative-index check per element,
which stops LLVM from vectorising the loop (measured 8x slower for Adam). The updates
are elementwise (element ``i`` reads and writes only index ``i`` of each array), so any
block size gives the same bits; the block only sets the scheduling granularity.

Gradient clipping (numpy-ml's rule: ``grad *= clip_norm / ||grad||_2`` when
``||grad||_2 > clip_norm``) needs one reduction, :func:`sum_of_squares`, and then a
``scale`` scalar that every update kernel applies to the gradient as it loads it, so a
clipped step still reads each array once and never writes a scaled copy of the gradient.
``scale = 1.0`` means no clipping.

Determinism of the reduction: :func:`sum_of_squares` splits the array into chunks of
``chunk`` elements (chosen by the caller from the dtype alone, never from the thread
count), writes one float64 partial per chunk, then adds the partials in chunk order.
The summation order, and every bit of the result, is therefore fixed by the length, for
any ``NUMBA_NUM_THREADS``.

All scalars (learning rate, decays, eps, scale, block sizes) are arguments: the kernels
read no globals, so ``cache=True`` holds.
"""
import math

import numpy as np
from numba import prange

from ._jit import kernel


@kernel
def sum_of_squares(x, chunk, partial, out):
    """``out[0] = sum(x**2)`` in float64, deterministic for any thread count.

    x : (n,) float32/float64, C-contiguous.
    chunk : elements per chunk (> 0).
    partial : (ceil(n / chunk),) float64, written: the sum of chunk ``k``.
    out : (1,) float64, written: the partials added in chunk order (0.0 when n == 0).
    """
    n = x.shape[0]
    n_chunks = partial.shape[0]
    for k in prange(n_chunks):
        start = k * chunk
        stop = min(start + chunk, n)
        xs = x[start:stop]
        s = 0.0
        for i in range(xs.shape[0]):
            v = np.float64(xs[i])
            s += v * v
        partial[k] = s
    total = 0.0
    for k in range(n_chunks):
        total += partial[k]
    out[0] = total


@kernel
def sgd_update(param, grad, cache, lr, momentum, scale, block):
    """numpy-ml's SGD step, in place.

    ``update = momentum * cache + lr * (scale * grad)``; ``cache = update``;
    ``param -= update``. With ``momentum = 0`` the cache still receives the update
    (numpy-ml keeps it that way).

    param, grad, cache : (n,) same dtype, C-contiguous; param and cache are updated.
    """
    n = param.shape[0]
    T = param.dtype.type
    mom = T(momentum)
    lr_scale = T(lr * scale)
    n_blocks = (n + block - 1) // block
    for b in prange(n_blocks):
        start = b * block
        stop = min(start + block, n)
        p, g, c = param[start:stop], grad[start:stop], cache[start:stop]
        for i in range(p.shape[0]):
            u = mom * c[i] + lr_scale * g[i]
            c[i] = u
            p[i] = p[i] - u


@kernel
def adagrad_update(param, grad, cache, lr, eps, scale, block):
    """numpy-ml's AdaGrad step, in place.

    ``g = scale * grad``; ``cache += g**2``; ``param -= lr * g / (sqrt(cache) + eps)``.
    """
    n = param.shape[0]
    T = param.dtype.type
    lr_t, eps_t, scale_t = T(lr), T(eps), T(scale)
    n_blocks = (n + block - 1) // block
    for b in prange(n_blocks):
        start = b * block
        stop = min(start + block, n)
        p, gr, ca = param[start:stop], grad[start:stop], cache[start:stop]
        for i in range(p.shape[0]):
            g = scale_t * gr[i]
            c = ca[i] + g * g
            ca[i] = c
            p[i] = p[i] - lr_t * g / (math.sqrt(c) + eps_t)


@kernel
def rmsprop_update(param, grad, cache, lr, decay, eps, scale, block):
    """numpy-ml's RMSProp step, in place.

    ``g = scale * grad``; ``cache = decay * cache + (1 - decay) * g**2``;
    ``param -= lr * g / (sqrt(cache) + eps)``.
    """
    n = param.shape[0]
    T = param.dtype.type
    lr_t, eps_t, scale_t = T(lr), T(eps), T(scale)
    decay_t, one_minus_decay = T(decay), T(1.0 - decay)
    n_blocks = (n + block - 1) // block
    for b in prange(n_blocks):
        start = b * block
        stop = min(start + block, n)
        p, gr, ca = param[start:stop], grad[start:stop], cache[start:stop]
        for i in range(p.shape[0]):
            g = scale_t * gr[i]
            c = decay_t * ca[i] + one_minus_decay * (g * g)
            ca[i] = c
            p[i] = p[i] - lr_t * g / (math.sqrt(c) + eps_t)


@kernel
def adam_update(param, grad, mean, var, lr, decay1, decay2, eps, bias1, bias2, scale, block):
    """numpy-ml's Adam step, in place, for one parameter at its step ``t``.

    ``g = scale * grad``; ``mean = decay1 * mean + (1 - decay1) * g``;
    ``var = decay2 * var + (1 - decay2) * g**2``; ``m_hat = mean / bias1``;
    ``v_hat = var / bias2``; ``param -= lr * m_hat / (sqrt(v_hat) + eps)``, where the
    caller passes the bias corrections ``bias1 = 1 - decay1**t``, ``bias2 = 1 - decay2**t``.
    The bias corrections are folded into two scalars,
    ``lr * m_hat / (sqrt(v_hat) + eps) = (lr / bias1) * mean / (sqrt(var) / sqrt(bias2) + eps)``,
    so each element costs one square root and one division.
    """
    n = param.shape[0]
    T = param.dtype.type
    d1, d2 = T(decay1), T(decay2)
    one_minus_d1, one_minus_d2 = T(1.0 - decay1), T(1.0 - decay2)
    step = T(lr / bias1)
    inv_sqrt_bias2 = T(1.0 / math.sqrt(bias2))
    eps_t, scale_t = T(eps), T(scale)
    n_blocks = (n + block - 1) // block
    for b in prange(n_blocks):
        start = b * block
        stop = min(start + block, n)
        p, gr = param[start:stop], grad[start:stop]
        mn, vr = mean[start:stop], var[start:stop]
        for i in range(p.shape[0]):
            g = scale_t * gr[i]
            m = d1 * mn[i] + one_minus_d1 * g
            v = d2 * vr[i] + one_minus_d2 * (g * g)
            mn[i] = m
            vr[i] = v
            p[i] = p[i] - step * m / (math.sqrt(v) * inv_sqrt_bias2 + eps_t)


#: Op name -> kernel; merged into :data:`nbnet.kernels.cpu.KERNELS` by the package.
OPTIMIZER_KERNELS = {
    "sum_of_squares": sum_of_squares,
    "sgd_update": sgd_update,
    "adagrad_update": adagrad_update,
    "rmsprop_update": rmsprop_update,
    "adam_update": adam_update,
}

#: The name the package's ``__init__`` merges (same dict).
KERNELS = OPTIMIZER_KERNELS

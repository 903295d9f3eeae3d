"""CUDA twins of :mod:`nbnet.kernels.cpu.row_stats` (LayerNorm1D/2D, RMSNorm).

Forward: one 1-D block per row; threads stride along the row, float64 partial sums are
combined by a fixed shared-memory tree (:func:`block_sum`), two passes (mean, then squared
deviations; the second read hits L1/L2), then the normalised row is written.

Backward: one block per CPU row chunk (the ``[n_chunks, D]`` partial buffers keep the CPU
layout); the block walks its rows in order, thread ``t`` owns columns ``t, t + B, ...`` of
the chunk's partial rows (no two threads write one element), and the per-row sums
``sum(h)``/``sum(h * xhat)`` are tree reductions. Deterministic, no atomics.
"""
import math

from ._common import (launch, MAX_THREADS, F64, act_slope, act_value, block_size, block_sum,
                      block_sum_pair, cuda)


@cuda.jit
def _row_forward(X, gamma, beta, eps, center, code, alpha, Y, mean, invstd):
    R, D = X.shape
    i = cuda.blockIdx.x
    t = cuda.threadIdx.x
    B = cuda.blockDim.x
    buf = cuda.shared.array(MAX_THREADS, F64)
    inv_d = 1.0 / D
    m = 0.0
    if center:
        s = 0.0
        for j in range(t, D, B):
            s += X[i, j]
        m = block_sum(buf, s, t, B) * inv_d
    ss = 0.0
    for j in range(t, D, B):
        d = X[i, j] - m
        ss += d * d
    r = 1.0 / math.sqrt(block_sum(buf, ss, t, B) * inv_d + eps)
    if t == 0:
        mean[i] = m
        invstd[i] = r
    for j in range(t, D, B):
        z = (X[i, j] - m) * r * gamma[j] + beta[j]
        if code != 0:
            z = act_value(code, alpha, z)
        Y[i, j] = z


def row_forward(size, X, gamma, beta, eps, center, code, alpha, rows_per_chunk, Y, mean, invstd):
    R = X.shape[0]
    if R == 0:
        return
    launch(_row_forward, R, block_size(), X, gamma, beta, float(eps), bool(center), int(code),
                                  float(alpha), Y, mean, invstd)


@cuda.jit
def _row_backward(X, dY, mean, invstd, gamma, beta, center, code, alpha, rows_per_chunk,
                  dX, partial_dgamma, partial_dbeta):
    R, D = X.shape
    k = cuda.blockIdx.x
    t = cuda.threadIdx.x
    B = cuda.blockDim.x
    ba = cuda.shared.array(MAX_THREADS, F64)
    bb = cuda.shared.array(MAX_THREADS, F64)
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, R)
    inv_d = 1.0 / D
    for j in range(t, D, B):
        partial_dgamma[k, j] = 0.0
        partial_dbeta[k, j] = 0.0
    for i in range(start, stop):
        m = mean[i]
        r = invstd[i]
        s_h = 0.0
        s_hx = 0.0
        for j in range(t, D, B):
            xhat = (X[i, j] - m) * r
            g = F64(dY[i, j])
            if code != 0:
                g *= act_slope(code, alpha, xhat * gamma[j] + beta[j])
            h = g * gamma[j]
            s_h += h
            s_hx += h * xhat
            partial_dgamma[k, j] += g * xhat
            partial_dbeta[k, j] += g
        s_h, s_hx = block_sum_pair(ba, bb, s_h, s_hx, t, B)
        mh = s_h * inv_d if center else 0.0
        mhx = s_hx * inv_d
        for j in range(t, D, B):
            xhat = (X[i, j] - m) * r
            g = F64(dY[i, j])
            if code != 0:
                g *= act_slope(code, alpha, xhat * gamma[j] + beta[j])
            dX[i, j] = r * (g * gamma[j] - mh - xhat * mhx)


def row_backward(size, X, dY, mean, invstd, gamma, beta, center, code, alpha, rows_per_chunk,
                 dX, partial_dgamma, partial_dbeta):
    n_chunks = partial_dgamma.shape[0]
    launch(_row_backward, n_chunks, block_size(), X, dY, mean, invstd, gamma, beta, bool(center),
                                          int(code), float(alpha), int(rows_per_chunk), dX,
                                          partial_dgamma, partial_dbeta)


KERNELS = {
    "row_forward": row_forward,
    "row_backward": row_backward,
}

"""Row statistics: statistics within each row, reduced over its columns.

Serves LayerNorm1D ``(N, D)``, LayerNorm2D ``(N, H*W*C)`` and RMSNorm (``center=False``:
no mean is subtracted and the "variance" is the mean square).

Parallel layout: ``prange`` over row chunks of ``rows_per_chunk`` rows. A row's statistics
depend on that row alone, so forward is one pass per row (read once from memory, then
again from L1/L2 for the squared deviations and the output); the parameter gradients
reduce over rows, so backward writes per-chunk ``[n_chunks, D]`` partials merged in chunk
order, exactly as the column pattern does. Chunking depends only on the shape, so results
are bit-identical for any thread count.

Numerics: float64 accumulation, two passes over the cached row (mean, then squared
deviations around it), never E[x^2] - E[x]^2.
"""
import math

import numpy as np
from numba import prange

from ._jit import kernel
from .activations import act_row
from .column_stats import slope_inplace


@kernel
def row_forward(X, gamma, beta, eps, center, code, alpha, rows_per_chunk, Y, mean, invstd):
    """Y[i] = f((X[i] - mean_i) * invstd_i * gamma + beta), elementwise affine.

    X, Y : (R, D); gamma, beta : (D,); mean, invstd : (R,) float64, written.
    With ``center`` false (RMSNorm) ``mean_i = 0`` and ``invstd_i = 1/sqrt(mean(x^2)+eps)``.
    """
    R, D = X.shape
    n_chunks = (R + rows_per_chunk - 1) // rows_per_chunk
    inv_d = 1.0 / D
    for k in prange(n_chunks):
        start = k * rows_per_chunk
        stop = min(start + rows_per_chunk, R)
        tmp = np.empty(D, np.float64)
        for i in range(start, stop):
            m = 0.0
            if center:
                s = 0.0
                for j in range(D):
                    s += X[i, j]
                m = s * inv_d
            ss = 0.0
            for j in range(D):
                d = X[i, j] - m
                ss += d * d
            r = 1.0 / math.sqrt(ss * inv_d + eps)
            mean[i] = m
            invstd[i] = r
            for j in range(D):
                tmp[j] = (X[i, j] - m) * r * gamma[j] + beta[j]
            act_row(code, alpha, tmp)
            for j in range(D):
                Y[i, j] = tmp[j]


@kernel
def row_backward(X, dY, mean, invstd, gamma, beta, center, code, alpha, rows_per_chunk,
                 dX, partial_dgamma, partial_dbeta):
    """Input gradient per row, parameter-gradient partials per chunk, in one pass.

    With ``xhat = (x - mean) * invstd`` and ``h = g * gamma`` (``g`` is dY times the
    activation slope):

        dx = invstd * (h - mean(h) - xhat * mean(h * xhat))   (center)
        dx = invstd * (h - xhat * mean(h * xhat))             (RMSNorm)

    ``partial_dgamma[k] = sum over the chunk's rows of g * xhat``, ``partial_dbeta[k] =
    sum of g`` (float64, merged by :func:`merge_partial_sums`).
    """
    R, D = X.shape
    n_chunks = partial_dgamma.shape[0]
    inv_d = 1.0 / D
    for k in prange(n_chunks):
        start = k * rows_per_chunk
        stop = min(start + rows_per_chunk, R)
        pdg = partial_dgamma[k]
        pdb = partial_dbeta[k]
        for j in range(D):
            pdg[j] = 0.0
            pdb[j] = 0.0
        g = np.empty(D, np.float64)
        first = start
        if code == 0:
            # No activation: read dY directly, two rows per pass over the partials, so
            # the float64 read-modify-write of pdg/pdb (the bulk of this kernel's work)
            # is paid once per pair of rows.
            first = start + (stop - start) // 2 * 2
            for i in range(start, first, 2):
                x0, x1 = X[i], X[i + 1]
                dy0, dy1 = dY[i], dY[i + 1]
                m0, r0, m1, r1 = mean[i], invstd[i], mean[i + 1], invstd[i + 1]
                s_h0 = 0.0
                s_hx0 = 0.0
                s_h1 = 0.0
                s_hx1 = 0.0
                for j in range(D):
                    g0 = np.float64(dy0[j])
                    g1 = np.float64(dy1[j])
                    xh0 = (x0[j] - m0) * r0
                    xh1 = (x1[j] - m1) * r1
                    gm = np.float64(gamma[j])
                    s_h0 += g0 * gm
                    s_hx0 += g0 * gm * xh0
                    s_h1 += g1 * gm
                    s_hx1 += g1 * gm * xh1
                    pdg[j] += g0 * xh0 + g1 * xh1
                    pdb[j] += g0 + g1
                mh0 = s_h0 * inv_d if center else 0.0
                mh1 = s_h1 * inv_d if center else 0.0
                mhx0 = s_hx0 * inv_d
                mhx1 = s_hx1 * inv_d
                dx0, dx1 = dX[i], dX[i + 1]
                for j in range(D):
                    gm = np.float64(gamma[j])
                    dx0[j] = r0 * (dy0[j] * gm - mh0 - (x0[j] - m0) * r0 * mhx0)
                    dx1[j] = r1 * (dy1[j] * gm - mh1 - (x1[j] - m1) * r1 * mhx1)
        for i in range(first, stop):
            m = mean[i]
            r = invstd[i]
            if code == 0:
                for j in range(D):
                    g[j] = dY[i, j]
            else:
                for j in range(D):
                    g[j] = (X[i, j] - m) * r * gamma[j] + beta[j]
                slope_inplace(code, alpha, g)  # branch-free for ReLU-like codes
                for j in range(D):
                    g[j] *= dY[i, j]
            s_h = 0.0
            s_hx = 0.0
            for j in range(D):
                xhat = (X[i, j] - m) * r
                h = g[j] * gamma[j]
                s_h += h
                s_hx += h * xhat
                pdg[j] += g[j] * xhat
                pdb[j] += g[j]
            mh = s_h * inv_d if center else 0.0
            mhx = s_hx * inv_d
            for j in range(D):
                xhat = (X[i, j] - m) * r
                dX[i, j] = r * (g[j] * gamma[j] - mh - xhat * mhx)


KERNELS = {
    "row_forward": row_forward,
    "row_backward": row_backward,
}

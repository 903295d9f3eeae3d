"""Group statistics: the row pattern generalised to channel groups (GroupNorm, InstanceNorm).

Each example's ``C`` channels are split into ``G = n_groups`` groups of ``cg = C // G``
consecutive channels; statistics are taken per example and group, over the group's
``P * cg`` values, and the affine transform is per *channel* (``gamma``/``beta`` of
shape ``(C,)``). Two views cover every layout without a transpose:

* channels-last ``(N, P, C)`` (NHWC with ``P = H*W``, or ``(N, C)`` with ``P = 1``):
  the groups interleave along the contiguous axis, so the kernels accumulate one
  float64 sum *per channel* along ``C`` (a contiguous, vectorised inner loop), then
  combine the ``cg`` channel sums of each group;
* channels-first ``(N, C, L)`` (NCHW, ``L = H*W``): group ``g`` of example ``n`` is the
  contiguous block ``X[n, g*cg:(g+1)*cg, :]``.

Parallel layout. Channels-last: ``prange`` over chunks of ``rows_per_chunk`` examples;
channels-first: over ``(chunk, group)`` tasks, which keeps both cores busy when ``G`` is
large and ``N`` is small. Statistics of an example depend on that example alone; the
parameter gradients reduce over examples, so backward writes per-chunk ``[n_chunks, C]``
partials (task ``(k, g)`` owns columns ``g*cg:(g+1)*cg`` of row ``k``) merged in chunk
order by :func:`~nbnet.kernels.cpu.column_stats.merge_partial_sums`. Chunking depends
only on the shape, so results are bit-identical for any thread count.

Numerics: float64 accumulation and two passes over the cached example or group (mean,
then squared deviations around it), never E[x^2] - E[x]^2; for float32 data of mean
1e4 and unit variance the one-pass form keeps no correct digit of the variance.

NaN containment: a NaN anywhere in group ``g`` of example ``n`` makes ``mean[n, g]``,
``invstd[n, g]`` and that group's outputs NaN; other groups and examples stay finite.
"""
import math

import numpy as np
from numba import prange

from ._jit import kernel
from .activations import act_row
from .column_stats import slope_inplace


@kernel
def group_forward_cl(X, gamma, beta, n_groups, eps, code, alpha, rows_per_chunk, Y, mean,
                     invstd):
    """Y = f((X - mean_ng) * invstd_ng * gamma_c + beta_c), channels-last.

    X, Y : (N, P, C) float32/float64, C-contiguous; gamma, beta : (C,);
    mean, invstd : (N, G) float64, written (biased variance).
    """
    N, P, C = X.shape
    cg = C // n_groups
    inv_cnt = 1.0 / (P * cg)
    n_chunks = (N + rows_per_chunk - 1) // rows_per_chunk
    for k in prange(n_chunks):
        start = k * rows_per_chunk
        stop = min(start + rows_per_chunk, N)
        acc = np.empty(C, np.float64)
        mc = np.empty(C, np.float64)      # the group mean, per channel
        scale = np.empty(C, np.float64)   # invstd * gamma, per channel
        tmp = np.empty(C, np.float64)
        for n in range(start, stop):
            # pass 1: per-channel sums along the contiguous axis -> group means
            for c in range(C):
                acc[c] = 0.0
            for p in range(P):
                for c in range(C):
                    acc[c] += X[n, p, c]
            for g in range(n_groups):
                s = 0.0
                for c in range(g * cg, (g + 1) * cg):
                    s += acc[c]
                m = s * inv_cnt
                mean[n, g] = m
                for c in range(g * cg, (g + 1) * cg):
                    mc[c] = m
            # pass 2 (cached example): squared deviations around the group mean
            for c in range(C):
                acc[c] = 0.0
            for p in range(P):
                for c in range(C):
                    d = X[n, p, c] - mc[c]
                    acc[c] += d * d
            for g in range(n_groups):
                s = 0.0
                for c in range(g * cg, (g + 1) * cg):
                    s += acc[c]
                r = 1.0 / math.sqrt(s * inv_cnt + eps)
                invstd[n, g] = r
                for c in range(g * cg, (g + 1) * cg):
                    scale[c] = r * gamma[c]
            # pass 3: normalise, affine, activation
            for p in range(P):
                for c in range(C):
                    tmp[c] = (X[n, p, c] - mc[c]) * scale[c] + beta[c]
                act_row(code, alpha, tmp)
                for c in range(C):
                    Y[n, p, c] = tmp[c]


@kernel
def group_backward_cl(X, dY, mean, invstd, gamma, beta, n_groups, code, alpha, rows_per_chunk,
                      dX, partial_dgamma, partial_dbeta):
    """Input gradient per example; parameter-gradient partials per chunk (channels-last).

    With ``xhat = (x - mean_ng) * invstd_ng``, ``g = dY * f'(xhat * gamma + beta)`` and
    ``h = g * gamma``, over the ``M = P * cg`` values of each group:

        dx = invstd_ng * (h - mean(h) - xhat * mean(h * xhat))

    Both group means come from per-channel sums ``sum_p g`` and ``sum_p g * xhat``
    (``mean(h) = sum_c gamma_c * sum_p g / M``), which are also what the parameter
    gradients need: ``partial_dgamma[k, c] = sum of g * xhat``, ``partial_dbeta[k, c] =
    sum of g`` over the chunk's examples.
    """
    N, P, C = X.shape
    cg = C // n_groups
    inv_cnt = 1.0 / (P * cg)
    n_chunks = partial_dgamma.shape[0]
    for k in prange(n_chunks):
        start = k * rows_per_chunk
        stop = min(start + rows_per_chunk, N)
        pdg = partial_dgamma[k]
        pdb = partial_dbeta[k]
        for c in range(C):
            pdg[c] = 0.0
            pdb[c] = 0.0
        mc = np.empty(C, np.float64)
        rc = np.empty(C, np.float64)
        ag = np.empty(C, np.float64)
        agx = np.empty(C, np.float64)
        slope = np.empty(C, np.float64)
        for n in range(start, stop):
            for g in range(n_groups):
                for c in range(g * cg, (g + 1) * cg):
                    mc[c] = mean[n, g]
                    rc[c] = invstd[n, g]
            for c in range(C):
                ag[c] = 0.0
                agx[c] = 0.0
            if code == 0:
                for p in range(P):
                    for c in range(C):
                        gv = np.float64(dY[n, p, c])
                        ag[c] += gv
                        agx[c] += gv * ((X[n, p, c] - mc[c]) * rc[c])
            else:
                for p in range(P):
                    for c in range(C):
                        slope[c] = ((X[n, p, c] - mc[c]) * rc[c]) * gamma[c] + beta[c]
                    slope_inplace(code, alpha, slope)
                    for c in range(C):
                        xhat = (X[n, p, c] - mc[c]) * rc[c]
                        gv = dY[n, p, c] * slope[c]
                        ag[c] += gv
                        agx[c] += gv * xhat
            for c in range(C):
                pdg[c] += agx[c]
                pdb[c] += ag[c]
            # per-group means of h and h * xhat, spread back per channel (reuse ag/agx)
            for g in range(n_groups):
                sh = 0.0
                shx = 0.0
                for c in range(g * cg, (g + 1) * cg):
                    sh += gamma[c] * ag[c]
                    shx += gamma[c] * agx[c]
                for c in range(g * cg, (g + 1) * cg):
                    ag[c] = sh * inv_cnt
                    agx[c] = shx * inv_cnt
            if code == 0:
                for p in range(P):
                    for c in range(C):
                        xhat = (X[n, p, c] - mc[c]) * rc[c]
                        dX[n, p, c] = rc[c] * (dY[n, p, c] * gamma[c] - ag[c] - xhat * agx[c])
            else:
                for p in range(P):
                    for c in range(C):
                        slope[c] = ((X[n, p, c] - mc[c]) * rc[c]) * gamma[c] + beta[c]
                    slope_inplace(code, alpha, slope)
                    for c in range(C):
                        xhat = (X[n, p, c] - mc[c]) * rc[c]
                        gv = dY[n, p, c] * slope[c]
                        dX[n, p, c] = rc[c] * (gv * gamma[c] - ag[c] - xhat * agx[c])


@kernel
def group_forward_cf(X, gamma, beta, n_groups, eps, code, alpha, Y, mean, invstd):
    """Channels-first twin of :func:`group_forward_cl`: X, Y : (N, C, L).

    One task per ``(example, group)``: its ``cg * L`` values are contiguous, read once
    from memory and twice more from cache.
    """
    N, C, L = X.shape
    cg = C // n_groups
    inv_cnt = 1.0 / (L * cg)
    for t in prange(N * n_groups):
        n = t // n_groups
        g = t - n * n_groups
        c0 = g * cg
        c1 = c0 + cg
        s = 0.0
        for c in range(c0, c1):
            for j in range(L):
                s += X[n, c, j]
        m = s * inv_cnt
        s2 = 0.0
        for c in range(c0, c1):
            for j in range(L):
                d = X[n, c, j] - m
                s2 += d * d
        r = 1.0 / math.sqrt(s2 * inv_cnt + eps)
        mean[n, g] = m
        invstd[n, g] = r
        if code == 0:
            for c in range(c0, c1):
                sc = r * gamma[c]
                bc = np.float64(beta[c])
                for j in range(L):
                    Y[n, c, j] = (X[n, c, j] - m) * sc + bc
        else:
            tmp = np.empty(L, np.float64)
            for c in range(c0, c1):
                sc = r * gamma[c]
                bc = np.float64(beta[c])
                for j in range(L):
                    tmp[j] = (X[n, c, j] - m) * sc + bc
                act_row(code, alpha, tmp)
                for j in range(L):
                    Y[n, c, j] = tmp[j]


@kernel
def group_backward_cf(X, dY, mean, invstd, gamma, beta, n_groups, code, alpha, rows_per_chunk,
                      dX, partial_dgamma, partial_dbeta):
    """Channels-first twin of :func:`group_backward_cl`: X, dY, dX : (N, C, L).

    One task per ``(chunk of rows_per_chunk examples, group)``; it owns columns
    ``g*cg:(g+1)*cg`` of row ``k`` of the partial buffers.
    """
    N, C, L = X.shape
    cg = C // n_groups
    inv_cnt = 1.0 / (L * cg)
    n_chunks = partial_dgamma.shape[0]
    for t in prange(n_chunks * n_groups):
        k = t // n_groups
        g = t - k * n_groups
        c0 = g * cg
        c1 = c0 + cg
        start = k * rows_per_chunk
        stop = min(start + rows_per_chunk, N)
        for c in range(c0, c1):
            partial_dgamma[k, c] = 0.0
            partial_dbeta[k, c] = 0.0
        slope = np.empty(L, np.float64)
        for n in range(start, stop):
            m = mean[n, g]
            r = invstd[n, g]
            sh = 0.0
            shx = 0.0
            for c in range(c0, c1):
                gc = np.float64(gamma[c])
                bc = np.float64(beta[c])
                sg = 0.0
                sgx = 0.0
                if code == 0:
                    for j in range(L):
                        gv = np.float64(dY[n, c, j])
                        sg += gv
                        sgx += gv * ((X[n, c, j] - m) * r)
                else:
                    for j in range(L):
                        slope[j] = ((X[n, c, j] - m) * r) * gc + bc
                    slope_inplace(code, alpha, slope)
                    for j in range(L):
                        xhat = (X[n, c, j] - m) * r
                        gv = dY[n, c, j] * slope[j]
                        sg += gv
                        sgx += gv * xhat
                partial_dgamma[k, c] += sgx
                partial_dbeta[k, c] += sg
                sh += gc * sg
                shx += gc * sgx
            mh = sh * inv_cnt
            mhx = shx * inv_cnt
            for c in range(c0, c1):
                gc = np.float64(gamma[c])
                bc = np.float64(beta[c])
                if code == 0:
                    for j in range(L):
                        xhat = (X[n, c, j] - m) * r
                        dX[n, c, j] = r * (dY[n, c, j] * gc - mh - xhat * mhx)
                else:
                    for j in range(L):
                        slope[j] = ((X[n, c, j] - m) * r) * gc + bc
                    slope_inplace(code, alpha, slope)
                    for j in range(L):
                        xhat = (X[n, c, j] - m) * r
                        dX[n, c, j] = r * (dY[n, c, j] * slope[j] * gc - mh - xhat * mhx)


KERNELS = {
    "group_forward_cl": group_forward_cl,
    "group_backward_cl": group_backward_cl,
    "group_forward_cf": group_forward_cf,
    "group_backward_cf": group_backward_cf,
}

"""CUDA twins of :mod:`nbnet.kernels.cpu.group_stats` (GroupNorm, InstanceNorm2D).

Forward: one 1-D block per (example, group); threads stride over the group's values
(``(P, cg)`` channels-last, ``(cg, L)`` channels-first), two tree-reduced float64 passes
(mean, squared deviations), then the normalised values are written.

Backward: one block per (CPU chunk of examples, group). For each example of the chunk and
each channel of the group, the block tree-reduces ``sum(g)`` and ``sum(g * xhat)`` over
the channel's positions; thread 0 adds them to row ``k`` of the partial buffers (the CPU
layout, merged by ``merge_partial_sums``), every thread accumulates the group sums of
``h = g * gamma``; a last pass writes dX. No atomics; fixed order.
"""
import math

from ._common import (launch, MAX_THREADS, F64, act_slope, act_value, block_size, block_sum,
                      block_sum_pair, cuda)


@cuda.jit(device=True)
def _at(X, n, g, idx, cg, L, cf):
    """(channel, position) of flat index ``idx`` within group ``g``."""
    if cf:
        cc = idx // L
        return g * cg + cc, idx - cc * L
    p = idx // cg
    return g * cg + (idx - p * cg), p


@cuda.jit
def _group_forward(X, gamma, beta, n_groups, eps, code, alpha, Y, mean, invstd, cf):
    # X viewed as (N, P, C) (cf False) or (N, C, L) (cf True)
    N = X.shape[0]
    C = X.shape[1] if cf else X.shape[2]
    L = X.shape[2] if cf else X.shape[1]
    cg = C // n_groups
    total = cg * L
    task = cuda.blockIdx.x
    n = task // n_groups
    g = task - n * n_groups
    t = cuda.threadIdx.x
    B = cuda.blockDim.x
    buf = cuda.shared.array(MAX_THREADS, F64)
    s = 0.0
    for idx in range(t, total, B):
        c, p = _at(X, n, g, idx, cg, L, cf)
        s += X[n, c, p] if cf else X[n, p, c]
    m = block_sum(buf, s, t, B) / total
    s2 = 0.0
    for idx in range(t, total, B):
        c, p = _at(X, n, g, idx, cg, L, cf)
        d = (X[n, c, p] if cf else X[n, p, c]) - m
        s2 += d * d
    r = 1.0 / math.sqrt(block_sum(buf, s2, t, B) / total + eps)
    if t == 0:
        mean[n, g] = m
        invstd[n, g] = r
    for idx in range(t, total, B):
        c, p = _at(X, n, g, idx, cg, L, cf)
        x = X[n, c, p] if cf else X[n, p, c]
        z = (x - m) * (r * gamma[c]) + F64(beta[c])
        if code != 0:
            z = act_value(code, alpha, z)
        if cf:
            Y[n, c, p] = z
        else:
            Y[n, p, c] = z


def group_forward_cl(size, X, gamma, beta, n_groups, eps, code, alpha, rows_per_chunk, Y, mean,
                     invstd):
    N = X.shape[0]
    if N:
        launch(_group_forward, N * n_groups, block_size(), X, gamma, beta, int(n_groups), float(eps),
                                                   int(code), float(alpha), Y, mean, invstd, False)


def group_forward_cf(size, X, gamma, beta, n_groups, eps, code, alpha, Y, mean, invstd):
    N = X.shape[0]
    if N:
        launch(_group_forward, N * n_groups, block_size(), X, gamma, beta, int(n_groups), float(eps),
                                                   int(code), float(alpha), Y, mean, invstd, True)


@cuda.jit
def _group_backward(X, dY, mean, invstd, gamma, beta, n_groups, code, alpha, rows_per_chunk,
                    dX, partial_dgamma, partial_dbeta, cf):
    N = X.shape[0]
    C = X.shape[1] if cf else X.shape[2]
    L = X.shape[2] if cf else X.shape[1]
    cg = C // n_groups
    total = cg * L
    inv_cnt = 1.0 / total
    task = cuda.blockIdx.x
    k = task // n_groups
    g = task - k * n_groups
    t = cuda.threadIdx.x
    B = cuda.blockDim.x
    ba = cuda.shared.array(MAX_THREADS, F64)
    bb = cuda.shared.array(MAX_THREADS, F64)
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, N)
    c0 = g * cg
    if t == 0:
        for c in range(c0, c0 + cg):
            partial_dgamma[k, c] = 0.0
            partial_dbeta[k, c] = 0.0
    for n in range(start, stop):
        m = mean[n, g]
        r = invstd[n, g]
        sh = 0.0
        shx = 0.0
        for c in range(c0, c0 + cg):
            gc = F64(gamma[c])
            bc = F64(beta[c])
            sg = 0.0
            sgx = 0.0
            for p in range(t, L, B):
                x = X[n, c, p] if cf else X[n, p, c]
                xhat = (x - m) * r
                gv = F64(dY[n, c, p] if cf else dY[n, p, c])
                if code != 0:
                    gv *= act_slope(code, alpha, xhat * gc + bc)
                sg += gv
                sgx += gv * xhat
            sg, sgx = block_sum_pair(ba, bb, sg, sgx, t, B)
            if t == 0:
                partial_dgamma[k, c] += sgx
                partial_dbeta[k, c] += sg
            sh += gc * sg
            shx += gc * sgx
        mh = sh * inv_cnt
        mhx = shx * inv_cnt
        for idx in range(t, total, B):
            c, p = _at(X, n, g, idx, cg, L, cf)
            x = X[n, c, p] if cf else X[n, p, c]
            xhat = (x - m) * r
            gv = F64(dY[n, c, p] if cf else dY[n, p, c])
            if code != 0:
                gv *= act_slope(code, alpha, xhat * gamma[c] + beta[c])
            v = r * (gv * gamma[c] - mh - xhat * mhx)
            if cf:
                dX[n, c, p] = v
            else:
                dX[n, p, c] = v


def _backward(X, dY, mean, invstd, gamma, beta, n_groups, code, alpha, rows_per_chunk, dX,
              partial_dgamma, partial_dbeta, cf):
    n_chunks = partial_dgamma.shape[0]
    if n_chunks:
        launch(_group_backward, n_chunks * n_groups, block_size(), 
            X, dY, mean, invstd, gamma, beta, int(n_groups), int(code), float(alpha),
            int(rows_per_chunk), dX, partial_dgamma, partial_dbeta, cf)


def group_backward_cl(size, X, dY, mean, invstd, gamma, beta, n_groups, code, alpha,
                      rows_per_chunk, dX, partial_dgamma, partial_dbeta):
    _backward(X, dY, mean, invstd, gamma, beta, n_groups, code, alpha, rows_per_chunk, dX,
              partial_dgamma, partial_dbeta, False)


def group_backward_cf(size, X, dY, mean, invstd, gamma, beta, n_groups, code, alpha,
                      rows_per_chunk, dX, partial_dgamma, partial_dbeta):
    _backward(X, dY, mean, invstd, gamma, beta, n_groups, code, alpha, rows_per_chunk, dX,
              partial_dgamma, partial_dbeta, True)


KERNELS = {
    "group_forward_cl": group_forward_cl,
    "group_backward_cl": group_backward_cl,
    "group_forward_cf": group_forward_cf,
    "group_backward_cf": group_backward_cf,
}

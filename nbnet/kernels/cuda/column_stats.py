"""CUDA twins of :mod:`nbnet.kernels.cpu.column_stats` (BatchNorm1D/2D), same names and
argument lists.

Layout: the CPU chunking is kept exactly (chunk ``k`` of ``rows_per_chunk`` rows owns row
``k`` of every ``[n_chunks, C]`` partial buffer), so the CPU merge arithmetic and the
layer code are shared. A CUDA block is a tile of ``TX`` adjacent columns by ``TY`` row
lanes; grid axis x walks the chunks, axis y the column tiles. Lane ``ty`` of a chunk reads
rows ``start + ty, start + ty + TY, ...``, and the lanes are combined by a fixed pairwise
tree in shared memory. Statistics are float64, two passes over the chunk (sum -> chunk
mean, then squared deviations around it; the second pass hits L2), merged with Chan's
update; never E[x^2] - E[x]^2.

Merges: one block per column tile; lane ``ty`` Chan-merges chunks ``ty, ty + TY, ...`` in
order, then the lanes merge pairwise in a fixed tree. No atomics anywhere, so results are
bit-identical run to run (they depend on ``config.CUDA_BLOCK``, not on scheduling).

``merge_partial_sums_pair``: both backward merges and the gradient accumulation in one
launch (BatchNorm backward: reduce, merge, dx = 3 launches); the CPU has a twin since
round 11.
"""
import math

import numpy as np

from ._common import (MAX_THREADS, F64, act_slope, act_value, block_size, block_sum,
                      block_sum_pair, chan_tree, column_plan, column_tile, cuda, lane_tree,
                      launch, merge_tile, n_blocks, workspace)

# ---------------------------------------------------------------- channels-last (R, C)
# ``stream`` (column_normalize, column_backward_dx and their channels-first twins: write the
# output with non-temporal stores on the CPU) is accepted and ignored: GPU stores to global
# memory do not read the line first. So is ``cols_per_tile`` (the CPU tasks' column
# blocks): the blocks here are tiles of TX columns already, and per column the arithmetic
# does not depend on the blocks.


@cuda.jit
def _partial_stats(X, rows_per_chunk, partial_mean, partial_m2):
    R, C = X.shape
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    TX = cuda.blockDim.x
    TY = cuda.blockDim.y
    k = cuda.blockIdx.x
    j = cuda.blockIdx.y * TX + tx
    lane = ty * TX + tx
    buf = cuda.shared.array(MAX_THREADS, F64)
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, R)
    s = 0.0
    if j < C:
        for i in range(start + ty, stop, TY):
            s += X[i, j]
    buf[lane] = s
    cuda.syncthreads()
    lane_tree(buf, tx, ty, TX, TY)
    m = buf[tx] / (stop - start)
    cuda.syncthreads()
    s2 = 0.0
    if j < C:
        for i in range(start + ty, stop, TY):
            d = X[i, j] - m
            s2 += d * d
    buf[lane] = s2
    cuda.syncthreads()
    lane_tree(buf, tx, ty, TX, TY)
    if ty == 0 and j < C:
        partial_mean[k, j] = m
        partial_m2[k, j] = buf[tx]


def column_partial_stats(size, X, rows_per_chunk, cols_per_tile, partial_mean, partial_m2):
    n_chunks, C = partial_mean.shape
    TX, TY = column_tile()
    launch(_partial_stats, (n_chunks, n_blocks(C, TX)), (TX, TY), X, rows_per_chunk, partial_mean,
                                                          partial_m2)


@cuda.jit
def _merge_stats(partial_mean, partial_m2, n_rows, rows_per_chunk, eps, momentum, unbiased,
                 running_mean, running_var, mean, invstd):
    n_chunks, C = partial_mean.shape
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    TX = cuda.blockDim.x
    TY = cuda.blockDim.y
    j = cuda.blockIdx.x * TX + tx
    lane = ty * TX + tx
    cnt = cuda.shared.array(MAX_THREADS, F64)
    mu = cuda.shared.array(MAX_THREADS, F64)
    q = cuda.shared.array(MAX_THREADS, F64)
    n_a = 0.0
    m_a = 0.0
    q_a = 0.0
    if j < C:
        for k in range(ty, n_chunks, TY):
            n_b = min(rows_per_chunk, n_rows - k * rows_per_chunk) * 1.0
            n = n_a + n_b
            delta = partial_mean[k, j] - m_a
            m_a += delta * (n_b / n)
            q_a += partial_m2[k, j] + delta * delta * (n_a * n_b / n)
            n_a = n
    cnt[lane] = n_a
    mu[lane] = m_a
    q[lane] = q_a
    cuda.syncthreads()
    chan_tree(cnt, mu, q, tx, ty, TX, TY)
    if ty == 0 and j < C:
        m = mu[tx]
        var = q[tx] / n_rows
        mean[j] = m
        invstd[j] = 1.0 / math.sqrt(var + eps)
        if momentum >= 0.0 and math.isfinite(m) and math.isfinite(var):  # (see the CPU twin)
            batch_var = var * n_rows / (n_rows - 1) if unbiased else var
            running_mean[j] = momentum * running_mean[j] + (1.0 - momentum) * m
            running_var[j] = momentum * running_var[j] + (1.0 - momentum) * batch_var


def column_merge_stats(size, partial_mean, partial_m2, n_rows, rows_per_chunk, eps, momentum,
                       unbiased, running_mean, running_var, mean, invstd):
    C = partial_mean.shape[1]
    TX, TY = merge_tile()
    launch(_merge_stats, n_blocks(C, TX), (TX, TY), partial_mean, partial_m2, int(n_rows),
                                            int(rows_per_chunk), float(eps), float(momentum),
                                            bool(unbiased), running_mean, running_var, mean,
                                            invstd)


@cuda.jit
def _normalize(X, mean, invstd, gamma, beta, code, alpha, rows_per_chunk, Y):
    R, C = X.shape
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    TY = cuda.blockDim.y
    j = cuda.blockIdx.y * cuda.blockDim.x + tx
    if j >= C:
        return
    start = cuda.blockIdx.x * rows_per_chunk
    stop = min(start + rows_per_chunk, R)
    m = mean[j]
    scale = invstd[j] * gamma[j]
    shift = F64(beta[j])
    if code == 0:
        for i in range(start + ty, stop, TY):
            Y[i, j] = (X[i, j] - m) * scale + shift
    else:
        for i in range(start + ty, stop, TY):
            Y[i, j] = act_value(code, alpha, (X[i, j] - m) * scale + shift)


def column_normalize(size, X, mean, invstd, gamma, beta, code, alpha, rows_per_chunk, cols_per_tile,
                     stream, Y):
    R, C = X.shape
    TX, TY = column_tile()
    launch(_normalize, (n_blocks(R, rows_per_chunk), n_blocks(C, TX)), (TX, TY), 
        X, mean, invstd, gamma, beta, int(code), float(alpha), int(rows_per_chunk), Y)


@cuda.jit
def _backward_reduce(X, dY, mean, invstd, gamma, beta, code, alpha, rows_per_chunk,
                     partial_sum_g, partial_sum_gx):
    R, C = X.shape
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    TX = cuda.blockDim.x
    TY = cuda.blockDim.y
    k = cuda.blockIdx.x
    j = cuda.blockIdx.y * TX + tx
    lane = ty * TX + tx
    bg = cuda.shared.array(MAX_THREADS, F64)
    bgx = cuda.shared.array(MAX_THREADS, F64)
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, R)
    sg = 0.0
    sgx = 0.0
    if j < C:
        m = mean[j]
        r = invstd[j]
        gj = F64(gamma[j])
        bj = F64(beta[j])
        for i in range(start + ty, stop, TY):
            xhat = (X[i, j] - m) * r
            g = F64(dY[i, j])
            if code != 0:
                g *= act_slope(code, alpha, xhat * gj + bj)
            sg += g
            sgx += g * xhat
    bg[lane] = sg
    bgx[lane] = sgx
    cuda.syncthreads()
    lane_tree(bg, tx, ty, TX, TY)
    lane_tree(bgx, tx, ty, TX, TY)
    if ty == 0 and j < C:
        partial_sum_g[k, j] = bg[tx]
        partial_sum_gx[k, j] = bgx[tx]


def column_backward_reduce(size, X, dY, mean, invstd, gamma, beta, code, alpha, rows_per_chunk,
                           cols_per_tile, partial_sum_g, partial_sum_gx):
    n_chunks, C = partial_sum_g.shape
    TX, TY = column_tile()
    launch(_backward_reduce, (n_chunks, n_blocks(C, TX)), (TX, TY), 
        X, dY, mean, invstd, gamma, beta, int(code), float(alpha), int(rows_per_chunk),
        partial_sum_g, partial_sum_gx)


@cuda.jit
def _merge_sums(partial_a, partial_b, out_a, out_b, grad_a, grad_b, two, accumulate):
    n_chunks, C = partial_a.shape
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    TX = cuda.blockDim.x
    TY = cuda.blockDim.y
    j = cuda.blockIdx.x * TX + tx
    lane = ty * TX + tx
    ba = cuda.shared.array(MAX_THREADS, F64)
    bb = cuda.shared.array(MAX_THREADS, F64)
    sa = 0.0
    sb = 0.0
    if j < C:
        for k in range(ty, n_chunks, TY):
            sa += partial_a[k, j]
            if two:
                sb += partial_b[k, j]
    ba[lane] = sa
    bb[lane] = sb
    cuda.syncthreads()
    lane_tree(ba, tx, ty, TX, TY)
    if two:
        lane_tree(bb, tx, ty, TX, TY)
    if ty == 0 and j < C:
        out_a[j] = ba[tx]
        if accumulate:
            grad_a[j] = grad_a[j] + ba[tx]
        if two:
            out_b[j] = bb[tx]
            if accumulate:
                grad_b[j] = grad_b[j] + bb[tx]


def merge_partial_sums(size, partial, out):
    """out[j] = sum over chunks of partial[k, j] (fixed order: lanes, then a tree)."""
    C = partial.shape[1]
    TX, TY = merge_tile()
    launch(_merge_sums, n_blocks(C, TX), (TX, TY), partial, partial, out, out, out, out, False, False)


def merge_partial_sums_pair(size, partial_a, partial_b, out_a, out_b, grad_a, grad_b,
                            accumulate):
    """``out_a``/``out_b`` = merged partials (float64); when ``accumulate``,
    also ``grad_a += out_a`` and ``grad_b += out_b`` (cast to the gradients' dtype).

    One launch instead of two merges and two ``add_into`` calls.
    """
    C = partial_a.shape[1]
    TX, TY = merge_tile()
    launch(_merge_sums, n_blocks(C, TX), (TX, TY), partial_a, partial_b, out_a, out_b,
                                           grad_a.reshape(-1), grad_b.reshape(-1), True,
                                           bool(accumulate))


@cuda.jit
def _backward_dx(X, dY, mean, invstd, gamma, beta, code, alpha, sum_g, sum_gx, rows_per_chunk,
                 dX):
    R, C = X.shape
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    TY = cuda.blockDim.y
    j = cuda.blockIdx.y * cuda.blockDim.x + tx
    if j >= C:
        return
    start = cuda.blockIdx.x * rows_per_chunk
    stop = min(start + rows_per_chunk, R)
    inv_r = 1.0 / R
    m = mean[j]
    r = invstd[j]
    gj = F64(gamma[j])
    bj = F64(beta[j])
    scale = gj * r
    mg = sum_g[j] * inv_r
    mgx = sum_gx[j] * inv_r
    for i in range(start + ty, stop, TY):
        xhat = (X[i, j] - m) * r
        g = F64(dY[i, j])
        if code != 0:
            g *= act_slope(code, alpha, xhat * gj + bj)
        dX[i, j] = scale * (g - mg - xhat * mgx)


def column_backward_dx(size, X, dY, mean, invstd, gamma, beta, code, alpha, sum_g, sum_gx,
                       rows_per_chunk, cols_per_tile, stream, dX):
    R, C = X.shape
    TX, TY = column_tile()
    launch(_backward_dx, (n_blocks(R, rows_per_chunk), n_blocks(C, TX)), (TX, TY), 
        X, dY, mean, invstd, gamma, beta, int(code), float(alpha), sum_g, sum_gx,
        int(rows_per_chunk), dX)


# ------------------------------------------------------------- channels-first (N, C, L)
# One block per (chunk, channel) task: its n_per_chunk runs of L contiguous values are
# reduced by a 1-D block (threads stride along the flattened runs), two passes, tree sums.
# ``channels_per_task`` (how the CPU kernels group channels into one task, for memory-order
# traversal) is accepted and ignored: a GPU block per channel already reads whole runs.


@cuda.jit
def _partial_stats_cf(X, n_per_chunk, partial_mean, partial_m2):
    N, C, L = X.shape
    t = cuda.threadIdx.x
    B = cuda.blockDim.x
    task = cuda.blockIdx.x
    k = task // C
    c = task - k * C
    buf = cuda.shared.array(MAX_THREADS, F64)
    start = k * n_per_chunk
    stop = min(start + n_per_chunk, N)
    total = (stop - start) * L
    s = 0.0
    for idx in range(t, total, B):
        n = start + idx // L
        s += X[n, c, idx - (idx // L) * L]
    m = block_sum(buf, s, t, B) / total
    s2 = 0.0
    for idx in range(t, total, B):
        n = start + idx // L
        d = X[n, c, idx - (idx // L) * L] - m
        s2 += d * d
    q = block_sum(buf, s2, t, B)
    if t == 0:
        partial_mean[k, c] = m
        partial_m2[k, c] = q


def column_partial_stats_cf(size, X, n_per_chunk, channels_per_task, partial_mean, partial_m2):
    n_chunks, C = partial_mean.shape
    launch(_partial_stats_cf, n_chunks * C, block_size(), X, int(n_per_chunk), partial_mean, partial_m2)


@cuda.jit
def _normalize_cf(X, mean, invstd, gamma, beta, code, alpha, Y):
    N, C, L = X.shape
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i >= N * C * L:
        return
    row = i // L
    j = i - row * L
    n = row // C
    c = row - n * C
    z = (X[n, c, j] - mean[c]) * (invstd[c] * gamma[c]) + F64(beta[c])
    if code != 0:
        z = act_value(code, alpha, z)
    Y[n, c, j] = z


def column_normalize_cf(size, X, mean, invstd, gamma, beta, code, alpha, n_per_chunk,
                        channels_per_task, stream, Y):
    B = block_size()
    launch(_normalize_cf, n_blocks(X.size, B), B, X, mean, invstd, gamma, beta, int(code), float(alpha), Y)


@cuda.jit
def _backward_reduce_cf(X, dY, mean, invstd, gamma, beta, code, alpha, n_per_chunk,
                        partial_sum_g, partial_sum_gx):
    N, C, L = X.shape
    t = cuda.threadIdx.x
    B = cuda.blockDim.x
    task = cuda.blockIdx.x
    k = task // C
    c = task - k * C
    ba = cuda.shared.array(MAX_THREADS, F64)
    bb = cuda.shared.array(MAX_THREADS, F64)
    start = k * n_per_chunk
    stop = min(start + n_per_chunk, N)
    total = (stop - start) * L
    m = mean[c]
    r = invstd[c]
    gc = F64(gamma[c])
    bc = F64(beta[c])
    sg = 0.0
    sgx = 0.0
    for idx in range(t, total, B):
        n = start + idx // L
        jj = idx - (idx // L) * L
        xhat = (X[n, c, jj] - m) * r
        g = F64(dY[n, c, jj])
        if code != 0:
            g *= act_slope(code, alpha, xhat * gc + bc)
        sg += g
        sgx += g * xhat
    tg, tgx = block_sum_pair(ba, bb, sg, sgx, t, B)
    if t == 0:
        partial_sum_g[k, c] = tg
        partial_sum_gx[k, c] = tgx


def column_backward_reduce_cf(size, X, dY, mean, invstd, gamma, beta, code, alpha, n_per_chunk,
                              channels_per_task, partial_sum_g, partial_sum_gx):
    n_chunks, C = partial_sum_g.shape
    launch(_backward_reduce_cf, n_chunks * C, block_size(), 
        X, dY, mean, invstd, gamma, beta, int(code), float(alpha), int(n_per_chunk),
        partial_sum_g, partial_sum_gx)


@cuda.jit
def _backward_dx_cf(X, dY, mean, invstd, gamma, beta, code, alpha, sum_g, sum_gx, dX):
    N, C, L = X.shape
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i >= N * C * L:
        return
    row = i // L
    j = i - row * L
    n = row // C
    c = row - n * C
    inv_r = 1.0 / (N * L)
    r = invstd[c]
    gc = F64(gamma[c])
    xhat = (X[n, c, j] - mean[c]) * r
    g = F64(dY[n, c, j])
    if code != 0:
        g *= act_slope(code, alpha, xhat * gc + F64(beta[c]))
    dX[n, c, j] = (gc * r) * (g - sum_g[c] * inv_r - xhat * (sum_gx[c] * inv_r))


def column_backward_dx_cf(size, X, dY, mean, invstd, gamma, beta, code, alpha, sum_g, sum_gx,
                          n_per_chunk, channels_per_task, stream, dX):
    B = block_size()
    launch(_backward_dx_cf, n_blocks(X.size, B), B, X, dY, mean, invstd, gamma, beta, int(code),
                                            float(alpha), sum_g, sum_gx, dX)


KERNELS = {
    "column_partial_stats": column_partial_stats,
    "column_merge_stats": column_merge_stats,
    "column_normalize": column_normalize,
    "column_backward_reduce": column_backward_reduce,
    "column_backward_dx": column_backward_dx,
    "merge_partial_sums": merge_partial_sums,
    "merge_partial_sums_pair": merge_partial_sums_pair,
    "column_partial_stats_cf": column_partial_stats_cf,
    "column_normalize_cf": column_normalize_cf,
    "column_backward_reduce_cf": column_backward_reduce_cf,
    "column_backward_dx_cf": column_backward_dx_cf,
}


# ------------------------------------- fused BatchNorm ops (CPU twins: kernels/cpu/column_stats.py)
# Training step of the channels-last column pattern in 2 + 2 launches:
#   forward : column_forward_train  = _fused_stats (per-chunk Welford/Chan partials;
#                                       _fused_stats_shifted for float32 input)
#                                     + _fused_merge_normalize (every block merges the
#                                       partials of its column tile, then normalizes)
#   backward: column_backward_train = _fused_backward_reduce (per-chunk sum(g), sum(g*xhat))
#                                     + _fused_merge_backward_dx (every block merges the
#                                       partials of its tile, then writes dX)
# Chunking from column_plan (GPU-sized, not the CPU's): a block is (row chunk, 32-column
# tile), TY row lanes per tile stride the rows, 4 rows per iteration (independent loads in
# flight). Every block of a tile merges the same partials in the same fixed order, so they
# all hold identical statistics; blocks of chunk 0 alone write mean/invstd, the running
# statistics and the parameter gradients. No atomics: bits depend on the shape and
# CUDA_BLOCK only. Partial buffers are reused scratch (_common.workspace).


@cuda.jit(device=True, inline=True)
def _slope(code, alpha, z):
    """f'(z): ReLU and leaky ReLU as inline selects (no call into ``act_slope`` for the
    common activations), the rest through ``act_slope``. Same values as ``act_slope``.

    Added in round 4 against a CUDA_ERROR_ILLEGAL_ADDRESS that a ReLU BatchNorm backward
    raised on an H200 then; in round 15 neither this form nor ``act_slope`` faulted on an
    H200, under compute-sanitizer either (docs/cuda.md).
    """
    if code == 1:
        return 1.0 if z > 0.0 else z - z
    if code == 2:
        return 1.0 if z > 0.0 else alpha + (z - z)
    return act_slope(code, alpha, z)


@cuda.jit(device=True)
def _store_chan_partials(n_a, m_a, q_a, k, j, C, partial_mean, partial_m2):
    """The statistics passes' end: every thread's ``(count, mean, M2)`` of its row lane,
    merged over the ``TY`` lanes of each column by :func:`~._common.chan_tree` (fixed
    order), then ``partial_mean[k, j]``, ``partial_m2[k, j]`` for chunk ``k``. Every thread
    of the block must call it (it holds barriers)."""
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    TX = cuda.blockDim.x
    TY = cuda.blockDim.y
    lane = ty * TX + tx
    cnt = cuda.shared.array(MAX_THREADS, F64)
    mu = cuda.shared.array(MAX_THREADS, F64)
    q = cuda.shared.array(MAX_THREADS, F64)
    cnt[lane] = n_a
    mu[lane] = m_a
    q[lane] = q_a
    cuda.syncthreads()
    chan_tree(cnt, mu, q, tx, ty, TX, TY)
    if ty == 0 and j < C:
        partial_mean[k, j] = mu[tx]
        partial_m2[k, j] = q[tx]


@cuda.jit
def _fused_stats(X, rows_per_chunk, partial_mean, partial_m2):
    R, C = X.shape
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    TX = cuda.blockDim.x
    TY = cuda.blockDim.y
    k = cuda.blockIdx.x
    j = cuda.blockIdx.y * TX + tx
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, R)
    n_a = 0.0
    m_a = 0.0
    q_a = 0.0
    if j < C:
        i = start + ty
        while i + 3 * TY < stop:
            # four rows: exact local mean and M2, then one Chan update (one division)
            x0 = F64(X[i, j])
            x1 = F64(X[i + TY, j])
            x2 = F64(X[i + 2 * TY, j])
            x3 = F64(X[i + 3 * TY, j])
            mb = ((x0 + x1) + (x2 + x3)) * 0.25
            d0 = x0 - mb
            d1 = x1 - mb
            d2 = x2 - mb
            d3 = x3 - mb
            qb = (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            n = n_a + 4.0
            delta = mb - m_a
            m_a += delta * (4.0 / n)
            q_a += qb + delta * delta * (n_a * 4.0 / n)
            n_a = n
            i += 4 * TY
        while i < stop:
            x0 = F64(X[i, j])
            n = n_a + 1.0
            delta = x0 - m_a
            m_a += delta / n
            q_a += delta * (x0 - m_a)
            n_a = n
            i += TY
    _store_chan_partials(n_a, m_a, q_a, k, j, C, partial_mean, partial_m2)


@cuda.jit
def _fused_stats_shifted(X, rows_per_chunk, partial_mean, partial_m2):
    """``_fused_stats`` for float32 input: float64 shifted sums, no division in the loop.

    Each lane sums ``d = x - K`` and ``d * d`` over its rows, 8 at a time, with ``K`` the
    chunk's first value of the column (the same for every lane), then turns them into
    ``(count, mean, M2)``: ``mean = K + s / n``, ``M2 = ss - s * (s / n)``. The Chan tree
    merges the lanes as in ``_fused_stats``.

    Why: Welford's update divides once per 4 rows; on an H200 that arithmetic between
    the loads held this pass to 2.2-2.4 TB/s, against 3.97 TB/s for a copy. Shifted sums
    took it from 0.227 to 0.150 ms at (262144, 512) (round 15; docs/cuda.md).

    Numerics (float32 input only): ``x - K`` is exact in float64, and ``M2 = ss - s * s / n``
    loses about ``(1 + k**2) * n * 2**-53`` relative to M2, where ``k`` is how many
    standard deviations ``K`` lies from the lane's mean. ``K`` is a value of the chunk, so
    ``k`` is at most about ``sqrt(rows_per_chunk)`` (Samuelson's inequality): at 4096 rows
    a chunk, at most ~2e-10 relative, far below float32's 6e-8, whatever the offset of
    the data. Float64 input keeps Welford, where this bound would be felt.
    """
    R, C = X.shape
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    TX = cuda.blockDim.x
    TY = cuda.blockDim.y
    k = cuda.blockIdx.x
    j = cuda.blockIdx.y * TX + tx
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, R)
    n_a = 0.0
    m_a = 0.0
    q_a = 0.0
    i = start + ty
    if j < C and i < stop:
        K = F64(X[start, j])
        s = 0.0
        ss = 0.0
        n = 0
        while i + 7 * TY < stop:
            d0 = F64(X[i, j]) - K
            d1 = F64(X[i + TY, j]) - K
            d2 = F64(X[i + 2 * TY, j]) - K
            d3 = F64(X[i + 3 * TY, j]) - K
            d4 = F64(X[i + 4 * TY, j]) - K
            d5 = F64(X[i + 5 * TY, j]) - K
            d6 = F64(X[i + 6 * TY, j]) - K
            d7 = F64(X[i + 7 * TY, j]) - K
            s += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            ss += (((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3))
                   + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)))
            n += 8
            i += 8 * TY
        while i < stop:
            d0 = F64(X[i, j]) - K
            s += d0
            ss += d0 * d0
            n += 1
            i += TY
        n_a = F64(n)
        dm = s / n_a
        m_a = K + dm
        q_a = max(ss - s * dm, 0.0)  # equal values: rounding must not make M2 negative
    _store_chan_partials(n_a, m_a, q_a, k, j, C, partial_mean, partial_m2)


@cuda.jit
def _fused_merge_normalize(X, partial_mean, partial_m2, rows_per_chunk, eps, momentum, unbiased,
                           running_mean, running_var, gamma, beta, code, alpha, mean, invstd, Y):
    R, C = X.shape
    n_chunks = partial_mean.shape[0]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    TX = cuda.blockDim.x
    TY = cuda.blockDim.y
    k = cuda.blockIdx.x
    j = cuda.blockIdx.y * TX + tx
    lane = ty * TX + tx
    cnt = cuda.shared.array(MAX_THREADS, F64)
    mu = cuda.shared.array(MAX_THREADS, F64)
    q = cuda.shared.array(MAX_THREADS, F64)
    col_mean = cuda.shared.array(32, F64)
    col_scale = cuda.shared.array(32, F64)
    col_shift = cuda.shared.array(32, F64)
    # merge: lane ty takes chunks ty, ty + TY, ... in order (Chan), then the lane tree
    n_a = 0.0
    m_a = 0.0
    q_a = 0.0
    if j < C:
        for kk in range(ty, n_chunks, TY):
            n_b = F64(min(rows_per_chunk, R - kk * rows_per_chunk))
            n = n_a + n_b
            delta = partial_mean[kk, j] - m_a
            m_a += delta * (n_b / n)
            q_a += partial_m2[kk, j] + delta * delta * (n_a * n_b / n)
            n_a = n
    cnt[lane] = n_a
    mu[lane] = m_a
    q[lane] = q_a
    cuda.syncthreads()
    chan_tree(cnt, mu, q, tx, ty, TX, TY)
    if ty == 0 and j < C:
        m = mu[tx]
        var = q[tx] / R
        r = 1.0 / math.sqrt(var + eps)
        col_mean[tx] = m
        col_scale[tx] = r * gamma[j]
        col_shift[tx] = F64(beta[j])
        if k == 0:
            mean[j] = m
            invstd[j] = r
            if momentum >= 0.0 and math.isfinite(m) and math.isfinite(var):  # (CPU twin)
                batch_var = var * R / (R - 1) if unbiased else var
                running_mean[j] = momentum * running_mean[j] + (1.0 - momentum) * m
                running_var[j] = momentum * running_var[j] + (1.0 - momentum) * batch_var
    cuda.syncthreads()
    if j >= C:
        return
    m = col_mean[tx]
    scale = col_scale[tx]
    shift = col_shift[tx]
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, R)
    i = start + ty
    if code == 0:
        while i + 3 * TY < stop:
            x0 = X[i, j]
            x1 = X[i + TY, j]
            x2 = X[i + 2 * TY, j]
            x3 = X[i + 3 * TY, j]
            Y[i, j] = (x0 - m) * scale + shift
            Y[i + TY, j] = (x1 - m) * scale + shift
            Y[i + 2 * TY, j] = (x2 - m) * scale + shift
            Y[i + 3 * TY, j] = (x3 - m) * scale + shift
            i += 4 * TY
        while i < stop:
            Y[i, j] = (X[i, j] - m) * scale + shift
            i += TY
    else:
        while i < stop:
            Y[i, j] = act_value(code, alpha, (X[i, j] - m) * scale + shift)
            i += TY


def column_forward_train(size, X, gamma, beta, code, alpha, eps, momentum, unbiased,
                         running_mean, running_var, mean, invstd, Y):
    """Fused BatchNorm training forward on an ``(R, C)`` view: batch statistics
    (``mean``, ``invstd`` float64; running statistics updated in place with numpy-ml's
    ``momentum``), then ``Y = f((X - mean) * invstd * gamma + beta)``. Two launches."""
    R, C = X.shape
    if R == 0 or C == 0:
        return
    rpc, n_chunks, TX, TY = column_plan(R, C)
    pm = workspace("bn_mean", (n_chunks, C))
    pm2 = workspace("bn_m2", (n_chunks, C))
    grid = (n_chunks, n_blocks(C, TX))
    stats = _fused_stats_shifted if X.dtype == np.float32 else _fused_stats
    launch(stats, grid, (TX, TY), X, rpc, pm, pm2)
    launch(_fused_merge_normalize, grid, (TX, TY), X, pm, pm2, rpc, float(eps), float(momentum),
           bool(unbiased), running_mean, running_var, gamma, beta, int(code), float(alpha), mean,
           invstd, Y)


@cuda.jit
def _fused_backward_reduce(X, dY, mean, invstd, gamma, beta, code, alpha, rows_per_chunk,
                           partial_sum_g, partial_sum_gx):
    R, C = X.shape
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    TX = cuda.blockDim.x
    TY = cuda.blockDim.y
    k = cuda.blockIdx.x
    j = cuda.blockIdx.y * TX + tx
    lane = ty * TX + tx
    bg = cuda.shared.array(MAX_THREADS, F64)
    bgx = cuda.shared.array(MAX_THREADS, F64)
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, R)
    sg = 0.0
    sgx = 0.0
    if j < C:
        m = mean[j]
        r = invstd[j]
        i = start + ty
        if code == 0:
            while i + 3 * TY < stop:
                g0 = F64(dY[i, j])
                g1 = F64(dY[i + TY, j])
                g2 = F64(dY[i + 2 * TY, j])
                g3 = F64(dY[i + 3 * TY, j])
                h0 = (X[i, j] - m) * r
                h1 = (X[i + TY, j] - m) * r
                h2 = (X[i + 2 * TY, j] - m) * r
                h3 = (X[i + 3 * TY, j] - m) * r
                sg += (g0 + g1) + (g2 + g3)
                sgx += (g0 * h0 + g1 * h1) + (g2 * h2 + g3 * h3)
                i += 4 * TY
            while i < stop:
                g0 = F64(dY[i, j])
                sg += g0
                sgx += g0 * ((X[i, j] - m) * r)
                i += TY
        else:
            gj = F64(gamma[j])
            bj = F64(beta[j])
            while i < stop:
                xhat = (X[i, j] - m) * r
                g0 = F64(dY[i, j]) * _slope(code, alpha, xhat * gj + bj)
                sg += g0
                sgx += g0 * xhat
                i += TY
    bg[lane] = sg
    bgx[lane] = sgx
    cuda.syncthreads()
    lane_tree(bg, tx, ty, TX, TY)
    lane_tree(bgx, tx, ty, TX, TY)
    if ty == 0 and j < C:
        partial_sum_g[k, j] = bg[tx]
        partial_sum_gx[k, j] = bgx[tx]


@cuda.jit
def _fused_merge_backward_dx(X, dY, mean, invstd, gamma, beta, code, alpha, partial_sum_g,
                             partial_sum_gx, rows_per_chunk, grad_gamma, grad_beta, accumulate,
                             dX):
    R, C = X.shape
    n_chunks = partial_sum_g.shape[0]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    TX = cuda.blockDim.x
    TY = cuda.blockDim.y
    k = cuda.blockIdx.x
    j = cuda.blockIdx.y * TX + tx
    lane = ty * TX + tx
    bg = cuda.shared.array(MAX_THREADS, F64)
    bgx = cuda.shared.array(MAX_THREADS, F64)
    sg = 0.0
    sgx = 0.0
    if j < C:
        for kk in range(ty, n_chunks, TY):
            sg += partial_sum_g[kk, j]
            sgx += partial_sum_gx[kk, j]
    bg[lane] = sg
    bgx[lane] = sgx
    cuda.syncthreads()
    lane_tree(bg, tx, ty, TX, TY)
    lane_tree(bgx, tx, ty, TX, TY)
    if j >= C:
        return
    total_g = bg[tx]
    total_gx = bgx[tx]
    if k == 0 and ty == 0 and accumulate:
        grad_beta[j] = grad_beta[j] + total_g
        grad_gamma[j] = grad_gamma[j] + total_gx
    inv_r = 1.0 / R
    m = mean[j]
    r = invstd[j]
    gj = F64(gamma[j])
    bj = F64(beta[j])
    scale = gj * r
    mg = total_g * inv_r
    mgx = total_gx * inv_r
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, R)
    i = start + ty
    if code == 0:
        while i + 3 * TY < stop:
            g0 = F64(dY[i, j])
            g1 = F64(dY[i + TY, j])
            g2 = F64(dY[i + 2 * TY, j])
            g3 = F64(dY[i + 3 * TY, j])
            h0 = (X[i, j] - m) * r
            h1 = (X[i + TY, j] - m) * r
            h2 = (X[i + 2 * TY, j] - m) * r
            h3 = (X[i + 3 * TY, j] - m) * r
            dX[i, j] = scale * (g0 - mg - h0 * mgx)
            dX[i + TY, j] = scale * (g1 - mg - h1 * mgx)
            dX[i + 2 * TY, j] = scale * (g2 - mg - h2 * mgx)
            dX[i + 3 * TY, j] = scale * (g3 - mg - h3 * mgx)
            i += 4 * TY
        while i < stop:
            h0 = (X[i, j] - m) * r
            dX[i, j] = scale * (F64(dY[i, j]) - mg - h0 * mgx)
            i += TY
    else:
        while i < stop:
            xhat = (X[i, j] - m) * r
            g0 = F64(dY[i, j]) * _slope(code, alpha, xhat * gj + bj)
            dX[i, j] = scale * (g0 - mg - xhat * mgx)
            i += TY


def column_backward_train(size, X, dY, mean, invstd, gamma, beta, code, alpha, grad_gamma,
                          grad_beta, accumulate, dX):
    """Fused BatchNorm backward on an ``(R, C)`` view: per-chunk ``sum(g)`` and
    ``sum(g * xhat)``, then (merged in every block, fixed order) ``dX`` and, when
    ``accumulate``, ``grad_beta += sum(g)``, ``grad_gamma += sum(g * xhat)``. Two launches."""
    R, C = X.shape
    if R == 0 or C == 0:
        return
    rpc, n_chunks, TX, TY = column_plan(R, C)
    psg = workspace("bn_sum_g", (n_chunks, C))
    psgx = workspace("bn_sum_gx", (n_chunks, C))
    grid = (n_chunks, n_blocks(C, TX))
    launch(_fused_backward_reduce, grid, (TX, TY), X, dY, mean, invstd, gamma, beta, int(code),
           float(alpha), rpc, psg, psgx)
    launch(_fused_merge_backward_dx, grid, (TX, TY), X, dY, mean, invstd, gamma, beta, int(code),
           float(alpha), psg, psgx, rpc, grad_gamma.reshape(-1), grad_beta.reshape(-1),
           bool(accumulate), dX)


KERNELS["column_forward_train"] = column_forward_train
KERNELS["column_backward_train"] = column_backward_train

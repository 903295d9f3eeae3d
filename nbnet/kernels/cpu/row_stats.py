"""Row statistics: statistics within each row, reduced over its columns.

Serves LayerNorm1D ``(N, D)``, LayerNorm2D ``(N, H*W*C)`` and RMSNorm (``center=False``:
no mean is subtracted and the "variance" is the mean square).

Parallel layout: ``prange`` over row chunks of ``rows_per_chunk`` rows. A row's statistics
depend on that row alone, so forward is one pass per row (read once from memory, then
again from L1/L2 for the squared deviations and the output); the parameter gradients
reduce over rows, so backward writes per-chunk ``[n_chunks, D]`` partials merged in chunk
order, exactly as the column pattern does. Chunking depends only on the shape, so results
are bit-identical for any thread count.

Numerics: never E[x^2] - E[x]^2. Each row is reduced in one pass of *shifted moments*,
computed in the input's dtype and accumulated in float64:

1. ``s = x[0]``, the row's first value (any value of the data is a shift within a few
   standard deviations of the mean, as a rule);
2. ``d = x - s`` (exact when x is within a factor 2 of s, Sterbenz), and the sums
   ``sd = sum(d)``, ``sdd = sum(d*d)``; then ``mean = s + sd/D`` and
   ``M2 = sdd - sd*sd/D``, exact algebra around any shift, which loses about ``1 + K**2``
   roundings when the shift is K standard deviations from the mean: when K exceeds
   ``SHIFT_LIMIT`` the row takes its moments again around the mean it found (it is in
   L1) (:func:`~nbnet.kernels.cpu.block_sums.shifted_result`). (The earlier form, a first
   pass for the mean and moments around it, read every row once more: 30% more time for
   the statistics of a row in cache at D = 64 and 1024.)
3. the output uses ``xhat = (x - m0) * invstd - c``, ``m0`` the float64 mean rounded to
   the input's dtype and ``c = (mean - m0) * invstd``: the float64 mean enters as a
   small correction applied *after* the scaling, so no reassociation can fold it into
   ``m0`` (there is no ``x - (m0 + ...)`` to form) and the kernels keep "reassoc" for
   their row sums.

Sums over a row run in blocks of ``SUM_BLOCK`` columns in the input's dtype (vectorised,
about 16 terms per SIMD lane) and are accumulated in float64 across blocks, so the
float32 rounding of a sum never grows with the row length. Everything runs 8 or 16 lanes
wide without float32 <-> float64 conversions in the inner loops; for float64 inputs it is
plain float64 throughout.
"""
import math

import numpy as np
from numba import prange

from ._jit import helper, kernel, task_body
from .activations import piecewise_slopes, reject_smooth
from .block_sums import ROW_BLOCK, SUM_BLOCK, block_shifted_moments, shifted_result

#: Bytes of rows per block of the forward's three loops (at most ``ROW_BLOCK`` rows, at
#: least one): small enough that the block is still in L1 when its outputs are written.
#: With 16 KiB blocks (four 1024-value float32 rows) a serial (2048, 1024) float32 forward
#: read 400-580 us against 380-420 us row by row (one set of noisy runs, 8 KiB matched row
#: by row), as if the output loop found the block in L2.
_STATS_BLOCK_BYTES = 8192

#: Row segments :func:`row_param_grads` walks side by side (the pass is written out for
#: four), in column blocks of at least ``_SEGMENT_COLUMNS`` values. Serial, float32, min
#: of 5000 calls on the 2-core reference machine: (128, 64) 3.05 us row by row against
#: 4.78 us in segments, (128, 256) 6.5 against 7.3 us, (256, 1024) 40 us either way;
#: (32, 65536) in blocks of 2048 on 2 threads 256-294 against 173-188 us.
_STREAMS = 4
_SEGMENT_COLUMNS = 1024


@helper
def _row_shift(m, r, buf):
    """``(m0, r, c)`` of one row in the dtype of ``buf`` (written to ``buf[0:3]``): the
    shift ``m0 = mean`` rounded, ``invstd``, and ``c = (mean - m0) * invstd``, so that
    ``xhat = (x - m0) * r - c`` (see the module notes)."""
    buf[0] = m
    buf[1] = r
    buf[2] = (m - buf[0]) * r
    return buf[0], buf[1], buf[2]


@helper
def _row_stats(x, s, center, eps, inv_d):
    """``(mean, invstd, far)`` of one row from its moments around the shift ``s`` (x's
    dtype; :func:`~nbnet.kernels.cpu.block_sums.shifted_result`). ``far`` is true when
    ``s`` lies more than ``SHIFT_LIMIT`` standard deviations from the mean: the caller
    then takes the moments again around the mean rounded to x's dtype. The first pass
    shifts by the row's first value. RMSNorm (``center`` false, ``s = 0``): ``mean = 0``,
    ``invstd = 1/sqrt(mean(x^2) + eps)``, never far.

    The caller picks the shift and this makes one call of the moments for both forms:
    with a call in each branch, the row's view lived on two paths and numba's
    reference-count pruning left an ``NRT_incref``/``NRT_decref`` call pair in every row
    (seen in the assembly); a 64-wide float32 row went from 29 to 23 ns (serial
    ``row_forward``).
    """
    sd, sdd = block_shifted_moments(x, 0, x.shape[0], s)
    if center:
        mean, m2, far = shifted_result(np.float64(s), sd, sdd, inv_d)
        return mean, 1.0 / math.sqrt(m2 * inv_d + eps), far
    return 0.0, 1.0 / math.sqrt(sdd * inv_d + eps), False


@task_body
def _row_forward_task(k, X, gamma, beta, eps, center, code, alpha, rows_per_chunk, Y, mean,
                      invstd):
    """Task ``k`` of :func:`row_forward` (the ``prange`` body; see ``task_body``).

    Blocks of ``nb`` rows (at most ``ROW_BLOCK``, and at most ``_STATS_BLOCK_BYTES``
    unless one row is larger), in three loops: the one-pass statistics of every row of
    the block, the second pass of the (rare) rows whose shift was far, then the outputs,
    while the block is still in L1. The first loop holds no second pass: its body is the
    row's vectorised sums and a few scalar operations, short enough for the processor to
    overlap the latency chains of neighbouring rows (horizontal sums, square root,
    division). (LLVM does not unroll it: one square root per iteration in the assembly.)
    Row by row, with the second pass in the same loop, a 64-wide float32 row cost 34 ns
    and its statistics alone 19 ns (10.6 without that branch in a standalone loop).
    Serial ``row_forward`` on the 2-core reference machine, float32, min of 3000 calls:
    (1024, 64) 35.7-37.2 us row by row, 28.3-30.0 us in these blocks, 23.7-23.8 us once
    :func:`_row_stats` also stopped paying a reference-count call pair per row; (1024,
    256) 61.4-64.9 -> 51.2-55.6 us; (2048, 1024) the same within noise. Same bits.
    """
    R, D = X.shape
    inv_d = 1.0 / D
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, R)
    nb = max(1, min(ROW_BLOCK, _STATS_BLOCK_BYTES // max(1, D * X.itemsize)))
    far = np.empty(nb, np.bool_)
    kc = np.empty(3, X.dtype)  # m0, invstd and c in X's dtype (_row_shift)
    reject_smooth(code)
    _, neg = piecewise_slopes(code, alpha, kc)
    for i0 in range(start, stop, nb):
        i1 = min(i0 + nb, stop)
        for i in range(i0, i1):
            x = X[i]
            mean[i], invstd[i], far[i - i0] = _row_stats(x, x[0] if center else x[0] - x[0],
                                                         center, eps, inv_d)
        for i in range(i0, i1):
            if far[i - i0]:  # again, around the mean rounded to X's dtype
                kc[0] = mean[i]
                mean[i], invstd[i], _ = _row_stats(X[i], kc[0], True, eps, inv_d)
        for i in range(i0, i1):
            m0, rr, cc = _row_shift(mean[i], invstd[i], kc)
            x = X[i]
            y = Y[i]
            if code == 0:
                for j in range(D):
                    y[j] = ((x[j] - m0) * rr - cc) * gamma[j] + beta[j]
            else:  # ReLU, leaky ReLU: a select in X's dtype
                for j in range(D):
                    z = ((x[j] - m0) * rr - cc) * gamma[j] + beta[j]
                    y[j] = z if z > 0.0 else z * neg  # z * neg keeps NaN a NaN


@kernel
def row_forward(X, gamma, beta, eps, center, code, alpha, rows_per_chunk, Y, mean, invstd):
    """Y[i] = f((X[i] - mean_i) * invstd_i * gamma + beta), elementwise affine.

    X, Y : (R, D); gamma, beta : (D,); mean, invstd : (R,) float64, written.
    With ``center`` false (RMSNorm) ``mean_i = 0`` and ``invstd_i = 1/sqrt(mean(x^2)+eps)``.
    """
    R, D = X.shape
    n_chunks = (R + rows_per_chunk - 1) // rows_per_chunk
    for k in prange(n_chunks):
        _row_forward_task(np.int64(k), X, gamma, beta, eps, center, code, alpha,
                          rows_per_chunk, Y, mean, invstd)


@task_body
def _row_backward_task(k, X, dY, mean, invstd, gamma, beta, center, code, alpha,
                       rows_per_chunk, dX, partial_dgamma, partial_dbeta):
    """Task ``k`` of :func:`row_backward` (the ``prange`` body; see ``task_body``)."""
    R, D = X.shape
    inv_d = 1.0 / D
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, R)
    # Empty partial buffers (shape (0, D)): the parameter gradients come from
    # row_param_grads instead.
    with_partials = partial_dgamma.shape[0] > 0
    pdg = partial_dgamma[k] if with_partials else partial_dgamma.ravel()
    pdb = partial_dbeta[k] if with_partials else partial_dbeta.ravel()
    for j in range(pdg.shape[0]):
        pdg[j] = 0.0
        pdb[j] = 0.0
    # One row at a time in X's dtype. The parameter-gradient sums go into block
    # accumulators of X's dtype, flushed into the float64 partials every ROW_BLOCK rows
    # (so the float64 read-modify-write is paid once per block); the row sums run in
    # blocks of SUM_BLOCK columns. With ReLU / leaky ReLU, g = dY * f'(z) is formed first
    # into a row buffer (in L1/L2), and the rest runs as without an activation.
    reject_smooth(code)
    kc = np.empty(5, X.dtype)  # per-row constants rounded once to X's dtype
    _, neg = piecewise_slopes(code, alpha, kc)
    gs = np.empty(D if code != 0 else 0, X.dtype)
    n_acc = D if with_partials else 0
    acc_g = np.empty(n_acc, X.dtype)
    acc_gx = np.empty(n_acc, X.dtype)
    for i0 in range(start, stop, ROW_BLOCK):
        for j in range(n_acc):
            acc_g[j] = 0.0
            acc_gx[j] = 0.0
        for i in range(i0, min(i0 + ROW_BLOCK, stop)):
            ri = invstd[i]
            m0, rr, cc = _row_shift(mean[i], ri, kc)
            x, gy, dx = X[i], dY[i], dX[i]
            if code != 0:
                for j in range(D):
                    z = ((x[j] - m0) * rr - cc) * gamma[j] + beta[j]
                    g = gy[j]
                    # g * (neg + (z - z)): NaN where z is NaN, as the slope is
                    gs[j] = g if z > 0.0 else g * (neg + (z - z))
                gy = gs
            s_h = 0.0
            s_hx = 0.0
            for b in range(0, D, SUM_BLOCK):
                e = min(b + SUM_BLOCK, D)
                # slices, so that the block loop vectorises
                xb, gb, gmb = x[b:e], gy[b:e], gamma[b:e]
                h = m0 - m0
                hx = m0 - m0
                for j in range(e - b):
                    hh = gb[j] * gmb[j]
                    h += hh
                    hx += hh * ((xb[j] - m0) * rr - cc)
                s_h += h
                s_hx += hx
            # dx = r * (h - mh - xhat * mhx) = (g * gamma) * r + k0 - k1 * xhat with
            # k0 = -r * mh, k1 = r * mhx and xhat = (x - m0) * r - c formed in the loop.
            # (Folding the xhat's r into k1, r * r * mhx, underflows float32 for rows
            # with a standard deviation past ~1e19.)
            mh = s_h * inv_d if center else 0.0
            mhx = s_hx * inv_d
            kc[3] = -ri * mh
            kc[4] = ri * mhx
            k0, k1 = kc[3], kc[4]
            # the dx loop also feeds the block accumulators: it is elementwise (no
            # reduction), so it vectorises; mixing the stores into the reduction
            # loop above stopped that one vectorising.
            if with_partials:
                for j in range(D):
                    g = gy[j]
                    xh = (x[j] - m0) * rr - cc
                    dx[j] = ((g * gamma[j]) * rr + k0) - k1 * xh
                    acc_g[j] += g
                    acc_gx[j] += g * xh
            else:  # parameter gradients come from row_param_grads
                for j in range(D):
                    dx[j] = ((gy[j] * gamma[j]) * rr + k0) - k1 * ((x[j] - m0) * rr - cc)
        if with_partials:
            for j in range(D):
                pdg[j] += acc_gx[j]
                pdb[j] += acc_g[j]


@kernel
def row_backward(X, dY, mean, invstd, gamma, beta, center, code, alpha, rows_per_chunk,
                 dX, partial_dgamma, partial_dbeta):
    """Input gradient per row, parameter-gradient partials per chunk, in one pass.

    With ``xhat = (x - mean) * invstd`` and ``h = g * gamma`` (``g`` is dY times the
    activation slope):

        dx = invstd * (h - mean(h) - xhat * mean(h * xhat))   (center)
        dx = invstd * (h - xhat * mean(h * xhat))             (RMSNorm)

    ``partial_dgamma[k] = sum over the chunk's rows of g * xhat``, ``partial_dbeta[k] =
    sum of g`` (float64, merged by :func:`merge_partial_sums`). ``xhat`` is formed as
    ``(x - m0) * invstd - c`` with the shift ``m0 = mean`` rounded to X's dtype (see the
    module notes). Partial buffers of shape ``(0, D)`` skip the parameter-gradient sums
    (the caller runs :func:`row_param_grads`; allowed only without an activation).
    """
    R, D = X.shape
    n_chunks = (R + rows_per_chunk - 1) // rows_per_chunk
    for k in prange(n_chunks):
        _row_backward_task(np.int64(k), X, dY, mean, invstd, gamma, beta, center, code,
                           alpha, rows_per_chunk, dX, partial_dgamma, partial_dbeta)


@helper
def _row_param_sums(X, dY, mean, invstd, i, q, j0, j1, gm, bt, code, neg, k, acc_g, acc_gx):
    """Add the terms of columns ``j0:j1`` of rows ``i, i + q, i + 2q, i + 3q`` (four
    segments of the rows, walked side by side) to the block accumulators: ``acc_g += g``,
    ``acc_gx += g * xhat``, the four rows' terms added pairwise (``(a + b) + (c + d)``),
    so that each accumulator load and store serves four values (one row per pass stored
    two accumulators per value and was bound by those stores). ``g = dY * f'(z)``, ``z``
    formed as row_forward forms it (see :func:`_row_backward_task`)."""
    w = j1 - j0
    a0, r0, c0 = _row_shift(mean[i], invstd[i], k)
    a1, r1, c1 = _row_shift(mean[i + q], invstd[i + q], k)
    a2, r2, c2 = _row_shift(mean[i + 2 * q], invstd[i + 2 * q], k)
    a3, r3, c3 = _row_shift(mean[i + 3 * q], invstd[i + 3 * q], k)
    # Row views (2-D indexing, X[i + q, j0 + j], did not vectorise: 5x slower). With
    # the views and the four row constants a pass costs some 50 ns more than its loop
    # ((128, 64) float32: 32 passes, 1.7 us): why narrow blocks take the rows one at a
    # time.
    x0 = X[i, j0:j1]
    x1 = X[i + q, j0:j1]
    x2 = X[i + 2 * q, j0:j1]
    x3 = X[i + 3 * q, j0:j1]
    g0 = dY[i, j0:j1]
    g1 = dY[i + q, j0:j1]
    g2 = dY[i + 2 * q, j0:j1]
    g3 = dY[i + 3 * q, j0:j1]
    if code == 0:
        for j in range(w):
            e0 = (x0[j] - a0) * r0 - c0
            e1 = (x1[j] - a1) * r1 - c1
            e2 = (x2[j] - a2) * r2 - c2
            e3 = (x3[j] - a3) * r3 - c3
            h0 = g0[j]
            h1 = g1[j]
            h2 = g2[j]
            h3 = g3[j]
            acc_g[j] += (h0 + h1) + (h2 + h3)
            acc_gx[j] += (h0 * e0 + h1 * e1) + (h2 * e2 + h3 * e3)
    else:
        for j in range(w):
            e0 = (x0[j] - a0) * r0 - c0
            e1 = (x1[j] - a1) * r1 - c1
            e2 = (x2[j] - a2) * r2 - c2
            e3 = (x3[j] - a3) * r3 - c3
            z0 = e0 * gm[j] + bt[j]
            z1 = e1 * gm[j] + bt[j]
            z2 = e2 * gm[j] + bt[j]
            z3 = e3 * gm[j] + bt[j]
            h0 = g0[j] if z0 > 0.0 else g0[j] * (neg + (z0 - z0))
            h1 = g1[j] if z1 > 0.0 else g1[j] * (neg + (z1 - z1))
            h2 = g2[j] if z2 > 0.0 else g2[j] * (neg + (z2 - z2))
            h3 = g3[j] if z3 > 0.0 else g3[j] * (neg + (z3 - z3))
            acc_g[j] += (h0 + h1) + (h2 + h3)
            acc_gx[j] += (h0 * e0 + h1 * e1) + (h2 * e2 + h3 * e3)


@task_body
def _row_param_grads_task(t, X, dY, mean, invstd, gamma, beta, code, alpha, cols_per_task,
                          accumulate, dgamma, dbeta):
    """Task ``t`` of :func:`row_param_grads` (the ``prange`` body; see ``task_body``)."""
    R, D = X.shape
    j0 = t * cols_per_task
    j1 = min(j0 + cols_per_task, D)
    w = j1 - j0
    sg = np.zeros(w, np.float64)
    sgx = np.zeros(w, np.float64)
    acc_g = np.empty(w, X.dtype)
    acc_gx = np.empty(w, X.dtype)
    k = np.empty(3, X.dtype)
    reject_smooth(code)
    _, neg = piecewise_slopes(code, alpha, k)
    gm = gamma[j0:j1]
    bt = beta[j0:j1]
    # Rows in four segments walked side by side, one row of each per pass (then the rows
    # left over, one at a time): each accumulator load and store serves four rows (see
    # _row_param_sums). Blocks narrower than _SEGMENT_COLUMNS take every row one at a
    # time: there the setup of the four-row loop costs more than its stores save.
    q = R // _STREAMS if w >= _SEGMENT_COLUMNS else 0
    for i0 in range(0, q, ROW_BLOCK):
        for j in range(w):
            acc_g[j] = 0.0
            acc_gx[j] = 0.0
        for i in range(i0, min(i0 + ROW_BLOCK, q)):
            _row_param_sums(X, dY, mean, invstd, i, q, j0, j1, gm, bt, code, neg, k, acc_g,
                            acc_gx)
        for j in range(w):
            sg[j] += acc_g[j]
            sgx[j] += acc_gx[j]
    for i0 in range(_STREAMS * q, R, ROW_BLOCK):
        for j in range(w):
            acc_g[j] = 0.0
            acc_gx[j] = 0.0
        for i in range(i0, min(i0 + ROW_BLOCK, R)):
            m0, rr, cc = _row_shift(mean[i], invstd[i], k)
            x = X[i, j0:j1]
            g = dY[i, j0:j1]
            if code == 0:
                for j in range(w):
                    acc_g[j] += g[j]
                    acc_gx[j] += g[j] * ((x[j] - m0) * rr - cc)
            else:  # g * f'(z), z formed as row_forward forms it (see _row_backward_task)
                for j in range(w):
                    xh = (x[j] - m0) * rr - cc
                    z = xh * gm[j] + bt[j]
                    gj = g[j] if z > 0.0 else g[j] * (neg + (z - z))
                    acc_g[j] += gj
                    acc_gx[j] += gj * xh
        for j in range(w):
            sg[j] += acc_g[j]
            sgx[j] += acc_gx[j]
    og = dgamma[j0:j1]
    ob = dbeta[j0:j1]
    if accumulate:
        for j in range(w):
            og[j] = og[j] + sgx[j]
            ob[j] = ob[j] + sg[j]
    else:
        for j in range(w):
            og[j] = sgx[j]
            ob[j] = sg[j]


@kernel
def row_param_grads(X, dY, mean, invstd, gamma, beta, code, alpha, cols_per_task, accumulate,
                    dgamma, dbeta):
    """Parameter gradients of the row pattern, reduced over rows by column blocks.

    ``dgamma[j] (+)= sum_i g[i, j] * xhat[i, j]``, ``dbeta[j] (+)= sum_i g[i, j]`` with
    ``g = dY * f'(xhat * gamma + beta)`` (``f`` the identity, ReLU or leaky ReLU of
    ``code``), summed in float64 and stored in the outputs' dtype: added to them when
    ``accumulate`` is true (the layer's gradient arrays), written otherwise.

    For wide, short inputs (LayerNorm2D: 32 rows of 65,536 values) per-chunk
    ``[n_chunks, D]`` partials cost as much memory traffic as X itself; here each task
    owns ``cols_per_task`` columns and walks every row in order, so there are no
    partials and no merge, and the result is the same for any thread count.
    :func:`row_backward` then runs with empty partial buffers and skips these sums.
    """
    R, D = X.shape
    n_tasks = (D + cols_per_task - 1) // cols_per_task
    for t in prange(n_tasks):
        _row_param_grads_task(np.int64(t), X, dY, mean, invstd, gamma, beta, code, alpha,
                              cols_per_task, accumulate, dgamma, dbeta)


KERNELS = {
    "row_forward": row_forward,
    "row_backward": row_backward,
    "row_param_grads": row_param_grads,
}

"""Column statistics: one statistic per column, reduced over rows.

Serves BatchNorm1D ``(N, C)``, BatchNorm2D channels-last ``(N*H*W, C)``, and (through the
``*_cf`` channels-first twins at the end of the module) BatchNorm2D NCHW ``(N, C, H*W)``
and InstanceNorm2D's running-statistics inference.

Parallel layout (the rule of DESIGN.md): ``prange`` runs over *tiles*: a chunk of
``rows_per_chunk`` rows times a block of ``cols_per_tile`` columns (the whole row unless
a row is wider than ``config.TILE_BYTES``). Task ``t = k * n_blocks + b`` owns columns
``b * cols_per_tile`` on of chunk ``k``, and those columns of row ``k`` of every
``[n_chunks, C]`` partial buffer, so no two threads ever write the same element; the
inner loop runs along the tile's part of a row (contiguous, vectorised). Both sizes
come from the shape alone (:func:`nbnet.config.column_tiling`), so the summation order,
and every bit of the result, is the same for any thread count. A column's sums do not
depend on the other columns of its tile, so the column blocks change no bits either
(only the chunk height does), except that the second pass around a far shift (below)
is taken by a whole tile. Column blocks keep wide inputs parallel and their partial
buffers small: with whole rows, (256, 16384) float32 had chunks of 4 rows and partials
as large as the input.

Numerics: statistics accumulate in float64. Each chunk is reduced in one pass of
*shifted moments* around its first row ``s`` (``sum(x - s)``, ``sum((x - s)**2)``, from
which ``mean = s + sum(x - s) / n`` and ``M2 = sum((x - s)**2) - sum(x - s)**2 / n``
exactly), taken again around the found mean while the chunk sits in L2 when some
column's shift was more than ``SHIFT_LIMIT`` standard deviations off (see
:mod:`~nbnet.kernels.cpu.block_sums`); chunks are combined with Chan et al.'s pairwise
update

    n = n_a + n_b,  delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,
    M2 = M2_a + M2_b + delta**2 * n_a * n_b / n,

never with E[x^2] - E[x]^2, which loses every digit for float32 data with mean 1e4 and
unit variance (the two terms agree to ~8 digits, float32 has ~7).

Inputs are computed in their own dtype (float32 runs 8-16 lanes wide with no
conversions): the passes add rows into per-column accumulators of the input's dtype,
which are flushed into the float64 partial rows every ``ROW_BLOCK`` passes
(:mod:`~nbnet.kernels.cpu.block_sums`). A block adds at most ``ROW_BLOCK`` roundings of
its own magnitude (a pass adds four rows pairwise, ``(a + b) + (c + d)``, see below);
with the shift within a few standard deviations of the mean (a row of the data is, as a
rule) that keeps M2 to ~1e-6 of itself in float32, and the mean to ~1e-7 of a standard
deviation at mean 1e4. (The earlier two-pass form, a float32 sum for the mean then
moments around it, read each chunk twice: BatchNorm1D (4096, 1024) float32 statistics
0.55-0.6 -> 0.35-0.45 ms in one pass.)

The sums walk a chunk as four row *segments* side by side, one row of each per pass
(:func:`segment_moments`): the accumulators' loads and stores, not memory, bound a pass
of one row at a time, and four segments are four long sequential streams for the
hardware prefetcher. (Four *adjacent* rows per pass were 1.3x faster in cache
((4096, 1024)) but 2x slower from DRAM ((65536, 256)) on the 2-core Zen 4 reference
machine: each stream ended after one row. Segments: the statistics pass at (4096, 1024)
float32 0.38 -> 0.25-0.28 ms, the backward sums 0.68-0.72 -> 0.57 ms, with ReLU
0.95-1.02 -> 0.64 ms, 2 threads, min of 60 calls, old and new code alternated.)

Every elementwise pass subtracts the float64 mean in two parts: ``m0 = float32(mean)``
inside the loop, where ``x - m0`` is exact for x within a factor 2 of the mean (Sterbenz),
and the remainder ``mean - m0`` (half an ulp of the mean at most) in float64, folded into
a per-column constant after the scaling: ``z = (x - m0) * scale + (beta - (mean - m0) *
scale)``, ``sum(g * (x - mean)) = sum(g * (x - m0)) - (mean - m0) * sum(g)``. That keeps
the float64 mean to ~1e-14 at the cost of one float32 subtraction; rounding the mean to
float32 alone would shift every output by up to 5e-4 standard deviations at mean 1e4,
and folding the whole mean (``x * scale - mean * scale``) would round a product of the
mean's size. (An earlier form, ``(x - hi) - lo`` with the mean as two floats, cost one
more load and subtraction per element: 15-30% of these kernels in cache.) The kernels
compile with ``ordered=True`` (no "reassoc"), so LLVM keeps the written order of
``(x - m0) * scale + shift`` instead of expanding it into the cancelling ``x * scale -
m0 * scale``. For float64 inputs ``m0`` is the mean and every remainder is 0.
"""
import math

import numpy as np
from numba import prange

from ... import config
from ._jit import helper, kernel, subroutine, task_body, wraps_kernel
from .block_sums import (ROW_BLOCK, SUM_BLOCK, block_shifted_moments, rescue_columns,
                         shifted_result)
from .activations import piecewise_slopes, reject_smooth
from .streaming import store_fence, stream_copy


@helper
def _affine_factors(mean, invstd, gamma, beta, m0, scale, shift):
    """The per-column factors of ``z = (x - m0) * scale + shift`` in X's dtype: the shift
    ``m0 = mean`` rounded to X's dtype, ``scale = invstd * gamma`` and ``shift = beta -
    (mean - m0) * scale``, the last two computed in float64 and rounded once. Hoisted out of
    the loops over X (once per call in the row layout, :func:`_column_factors`; once per
    task in the channels-first one), so the inner loops are sub, FMA.

    Only the float64 remainder ``(mean - m0) * scale`` (at most half an ulp of the mean,
    times scale) is folded into ``shift``, where its rounding is an ulp of ``beta``: folding
    the whole mean instead (``x * scale + (beta - mean * scale)``) would round
    ``mean * scale`` and cost ~5e-4 standard deviations at mean 1e4 in float32.
    """
    for j in range(mean.shape[0]):
        m0[j] = mean[j]
        sc = invstd[j] * gamma[j]
        shift[j] = beta[j] - (mean[j] - m0[j]) * sc
        scale[j] = sc


@subroutine(ordered=True)
def _column_factors(mean, invstd, gamma, beta, dtype):
    """:func:`_affine_factors` into three new ``(C,)`` arrays of ``dtype``: ``m0, scale,
    shift``. The row-layout kernels compute them once per call, before their ``prange``
    loop, and every task reads the same arrays. Computed in each task, as before, they
    cost 0.7-0.8 us per task at C = 1024 (the loop and three allocations; measured on the
    2-core reference VM): 32 tasks per thread and pass at (4096, 1024) float32, ~2% of a
    BatchNorm1D training step.
    """
    C = mean.shape[0]
    m0 = np.empty(C, dtype)
    scale = np.empty(C, dtype)
    shift = np.empty(C, dtype)
    _affine_factors(mean, invstd, gamma, beta, m0, scale, shift)
    return m0, scale, shift


@subroutine(ordered=True)
def _dx_factors(mean, invstd, gamma, m0, sum_g, sum_gx, R, dtype):
    """The per-column constants ``k0, k1`` (``(C,)`` arrays of ``dtype``) of the dx pass.

    ``dX = scale * (g - mg - (x - mean) * kx)`` with ``x - mean = (x - m0) - (mean - m0)``
    is ``dX = (g * scale + k0) - kx * ((x - m0) * scale)``, with ``k1 = kx = invstd *
    mean(g * xhat)`` and ``k0 = scale * ((mean - m0) * kx - mg)`` computed in float64 and
    rounded once. (``kx`` times ``(x - m0) * scale``, not the product ``scale * kx``: that
    one scales as ``invstd**2`` and underflows float32 for data with a standard deviation
    past ~1e19.)
    """
    C = mean.shape[0]
    k0 = np.empty(C, dtype)
    k1 = np.empty(C, dtype)
    inv_r = 1.0 / R
    for j in range(C):
        sc = invstd[j] * gamma[j]
        kx = sum_gx[j] * inv_r * invstd[j]
        k0[j] = sc * ((mean[j] - m0[j]) * kx - sum_g[j] * inv_r)
        k1[j] = kx
    return k0, k1


#: Row segments that :func:`segment_moments` walks side by side (the pass is written out
#: for four).
_STREAMS = 4

# Columns per task in the merge kernels: merges run in parallel over column blocks, each
# block walking the chunks in order, so the merge order is fixed too.
_MERGE_BLOCK = 256


# Inside a tile, column ``j0 + j`` (and, in the channels-first kernels, element ``j`` of the
# run at flat offset ``o = (n * C + c) * L``) is read at the unsigned index
# ``np.uint64(j0 + j)``: numba checks a signed index for wraparound (``j0 + j < 0``), which
# stops LLVM vectorising the loop, and takes an unsigned one as it is. The alternatives
# cost more: a slice per row, ``X[i, j0:j1]``, its bounds arithmetic on every row (25% of a
# sum over 64-wide float32 rows); a view per run, ``X[n, c]``, the reference counting of
# each view (a call pair that LLVM cannot drop from the channels-first loops), 6x the
# arithmetic on runs of 4 values (2x2 images). (Written out at each use: an inlined helper
# costs numba a copy of its IR per call site, which is compile time.)


@helper
def tile_of(t, R, C, rows_per_chunk, cols_per_tile):
    """``(k, start, stop, j0, j1)`` of task ``t``: its chunk ``k`` (rows ``start:stop``) and
    its columns ``j0:j1``. Task ``t = k * n_blocks + b`` owns column block ``b`` of chunk
    ``k`` (see the module notes). The channels-first tasks are the same tiles of examples
    and channels: ``tile_of(t, N, C, n_per_chunk, channels_per_task)``."""
    n_blocks = (C + cols_per_tile - 1) // cols_per_tile
    k = t // n_blocks
    j0 = (t - k * n_blocks) * cols_per_tile
    start = k * rows_per_chunk
    return k, start, min(start + rows_per_chunk, R), j0, min(j0 + cols_per_tile, C)


@helper
def count_tiles(R, C, rows_per_chunk, cols_per_tile):
    """The number of tasks (tiles) of an ``(R, C)`` input: chunks times column blocks."""
    return ((R + rows_per_chunk - 1) // rows_per_chunk) * ((C + cols_per_tile - 1)
                                                          // cols_per_tile)


@helper
def segment_moments(X, G, mode, start, stop, j0, j1, m0, scale, shift, one, neg, acc, acc2,
                     s1, s2):
    """Per-column sums of the tile ``X[start:stop, j0:j1]`` added into the float64 ``s1``,
    ``s2``: with ``d = x - m0``,

    * ``mode`` 0: ``sum(d)`` and ``sum(d**2)`` (the forward's shifted moments; ``G``,
      ``scale``, ``shift`` and ``neg`` are not read);
    * ``mode`` 1: ``sum(g)`` and ``sum(g * d)`` with ``g`` the rows of ``G`` (the
      backward's sums);
    * ``mode`` 2: the same with ``g = G * f'(z)``, ``z = d * scale + shift`` the forward's
      pre-activation and ``f`` ReLU / leaky ReLU (``one``, ``neg``: the slopes right and
      left of 0, in X's dtype) as a select; a NaN ``z`` gives a NaN ``g``.

    ``m0``, ``scale``, ``shift``, ``acc``, ``acc2``, ``s1`` and ``s2`` are the tile's own
    (element ``j`` is column ``j0 + j`` of X and G, read at an unsigned index).

    The rows split into ``_STREAMS`` equal segments walked side by side, one row of each
    per pass, so every load and store of the accumulators (``acc``, ``acc2``: X's dtype,
    flushed into float64 every ``ROW_BLOCK`` passes) serves four values; then the rows
    left over, in one block. Four *adjacent* rows per pass were 2x slower from DRAM (see
    the module notes); four segments are four long sequential streams. ``mode`` is a
    constant at each call site, so the selects fold away.
    """
    w = j1 - j0
    q = (stop - start) // _STREAMS
    for i0 in range(start, start + q, ROW_BLOCK):
        for j in range(w):
            acc[j] = 0.0
            acc2[j] = 0.0
        for i in range(i0, min(i0 + ROW_BLOCK, start + q)):
            for j in range(w):
                c = np.uint64(j0 + j)
                m = m0[j]
                d0 = X[i, c] - m
                d1 = X[i + q, c] - m
                d2 = X[i + 2 * q, c] - m
                d3 = X[i + 3 * q, c] - m
                if mode == 0:
                    h0, h1, h2, h3 = d0, d1, d2, d3
                else:
                    h0 = G[i, c]
                    h1 = G[i + q, c]
                    h2 = G[i + 2 * q, c]
                    h3 = G[i + 3 * q, c]
                    if mode == 2:
                        sc = scale[j]
                        sh = shift[j]
                        z0 = d0 * sc + sh
                        z1 = d1 * sc + sh
                        z2 = d2 * sc + sh
                        z3 = d3 * sc + sh
                        h0 = h0 * (one if z0 > 0.0 else neg + (z0 - z0))
                        h1 = h1 * (one if z1 > 0.0 else neg + (z1 - z1))
                        h2 = h2 * (one if z2 > 0.0 else neg + (z2 - z2))
                        h3 = h3 * (one if z3 > 0.0 else neg + (z3 - z3))
                acc[j] += (h0 + h1) + (h2 + h3)
                acc2[j] += (h0 * d0 + h1 * d1) + (h2 * d2 + h3 * d3)
        for j in range(w):
            s1[j] += acc[j]
            s2[j] += acc2[j]
    for j in range(w):
        acc[j] = 0.0
        acc2[j] = 0.0
    for i in range(start + _STREAMS * q, stop):  # fewer than _STREAMS rows
        for j in range(w):
            c = np.uint64(j0 + j)
            d = X[i, c] - m0[j]
            if mode == 0:
                h = d
            else:
                h = G[i, c]
                if mode == 2:
                    z = d * scale[j] + shift[j]
                    h = h * (one if z > 0.0 else neg + (z - z))
            acc[j] += h
            acc2[j] += h * d
    for j in range(w):
        s1[j] += acc[j]
        s2[j] += acc2[j]


@task_body(ordered=True)
def _column_partial_stats_task(t, X, rows_per_chunk, cols_per_tile, partial_mean, partial_m2):
    """Task ``t`` of :func:`column_partial_stats` (the ``prange`` body; see ``task_body``):
    the moments of one tile (:func:`tile_of`)."""
    k, start, stop, j0, j1 = tile_of(t, X.shape[0], X.shape[1], rows_per_chunk, cols_per_tile)
    w = j1 - j0
    pm = partial_mean[k, j0:j1]
    pm2 = partial_m2[k, j0:j1]
    inv_n = 1.0 / (stop - start)
    m0 = np.empty(w, X.dtype)  # the shift: the chunk's first row
    for j in range(w):
        m0[j] = X[start, np.uint64(j0 + j)]
    acc = np.empty(w, X.dtype)  # block accumulators in X's dtype
    acc2 = np.empty(w, X.dtype)
    sd = np.empty(w, np.float64)
    for attempt in range(2):
        for j in range(w):
            sd[j] = 0.0
            pm2[j] = 0.0
        segment_moments(X, X, 0, start, stop, j0, j1, m0, m0, m0, m0[0], m0[0], acc, acc2,
                         sd, pm2)
        rescue_columns(X, start, stop, j0, m0, sd, pm2)  # float32 squares that overflowed
        far = False
        for j in range(w):
            pm[j], pm2[j], far_j = shifted_result(np.float64(m0[j]), sd[j], pm2[j], inv_n)
            far = far or far_j
        if not far:
            break
        for j in range(w):  # again, around the mean just found (the tile is in L2)
            m0[j] = pm[j]


@kernel(ordered=True)
def column_partial_stats(X, rows_per_chunk, cols_per_tile, partial_mean, partial_m2):
    """Per-chunk mean and sum of squared deviations of each column.

    X : (R, C) float32/float64, C-contiguous.
    partial_mean, partial_m2 : (n_chunks, C) float64, written; ``n_chunks =
    ceil(R / rows_per_chunk)``.

    One pass of moments shifted by the chunk's first row, a second around the found mean
    when a column's shift was further than ``SHIFT_LIMIT`` standard deviations away (see
    the module notes), per tile of ``rows_per_chunk`` rows and ``cols_per_tile`` columns.
    """
    R, C = X.shape
    for t in prange(count_tiles(R, C, rows_per_chunk, cols_per_tile)):
        _column_partial_stats_task(np.int64(t), X, rows_per_chunk, cols_per_tile, partial_mean,
                                   partial_m2)


@helper
def _chan_merge_block(partial_mean, partial_m2, n_rows, rows_per_chunk, j0, j1, mean, m2):
    """Chan-merge the chunks of columns ``j0:j1`` in chunk order into ``mean``/``m2``.

    Every chunk holds ``rows_per_chunk`` rows except the last (``n_rows`` in all). The
    column loops run over slices (indexing ``range(j0, j1)`` does not vectorise).
    """
    n_chunks = partial_mean.shape[0]
    mb = mean[j0:j1]
    m2b = m2[j0:j1]
    w0 = j1 - j0
    pm0 = partial_mean[0, j0:j1]
    pq0 = partial_m2[0, j0:j1]
    for j in range(w0):
        mb[j] = pm0[j]
        m2b[j] = pq0[j]
    n_a = float(min(rows_per_chunk, n_rows))
    for k in range(1, n_chunks):
        n_b = float(min(rows_per_chunk, n_rows - k * rows_per_chunk))
        n = n_a + n_b
        w = n_b / n
        c = n_a * n_b / n
        pmk = partial_mean[k, j0:j1]
        pqk = partial_m2[k, j0:j1]
        for j in range(w0):
            delta = pmk[j] - mb[j]
            mb[j] += delta * w
            m2b[j] += pqk[j] + delta * delta * c
        n_a = n


@task_body
def _column_merge_stats_task(b, partial_mean, partial_m2, n_rows, rows_per_chunk, eps,
                             momentum, unbiased, running_mean, running_var, mean, invstd):
    """Task ``b`` of :func:`column_merge_stats` (the ``prange`` body; see ``task_body``)."""
    C = partial_mean.shape[1]
    j0 = b * _MERGE_BLOCK
    j1 = min(j0 + _MERGE_BLOCK, C)
    # invstd holds M2 until the end of the merge
    _chan_merge_block(partial_mean, partial_m2, n_rows, rows_per_chunk, j0, j1, mean, invstd)
    for j in range(j0, j1):
        var = invstd[j] / n_rows
        invstd[j] = 1.0 / math.sqrt(var + eps)
        # a column whose batch holds NaN or Inf keeps its running statistics (one bad batch
        # would otherwise leave them NaN for good; its outputs are NaN either way)
        if momentum >= 0.0 and math.isfinite(mean[j]) and math.isfinite(var):
            batch_var = var * n_rows / (n_rows - 1) if unbiased else var
            running_mean[j] = momentum * running_mean[j] + (1.0 - momentum) * mean[j]
            running_var[j] = momentum * running_var[j] + (1.0 - momentum) * batch_var


@kernel
def column_merge_stats(partial_mean, partial_m2, n_rows, rows_per_chunk, eps,
                       momentum, unbiased, running_mean, running_var, mean, invstd):
    """Chan-merge the chunk statistics; update the running statistics in place.

    Writes ``mean`` and ``invstd = 1/sqrt(var + eps)`` (float64, biased variance) and sets
    ``running = momentum * running + (1 - momentum) * batch``, where the batch variance is
    the biased one, or the unbiased ``var * n / (n - 1)`` when ``unbiased`` is true.
    Skips the running update when ``momentum`` is negative (used by callers that keep no
    running statistics), and for columns whose batch mean or variance is not finite (a
    NaN or Inf in the batch): those keep their running statistics.
    """
    C = partial_mean.shape[1]
    n_blocks = (C + _MERGE_BLOCK - 1) // _MERGE_BLOCK
    for b in prange(n_blocks):
        _column_merge_stats_task(np.int64(b), partial_mean, partial_m2, n_rows,
                                 rows_per_chunk, eps, momentum, unbiased, running_mean,
                                 running_var, mean, invstd)


@task_body
def _column_merge_moments_task(b, partial_mean, partial_m2, n_rows, rows_per_chunk, mean, m2):
    """Task ``b`` of :func:`column_merge_moments` (the ``prange`` body; see ``task_body``)."""
    C = partial_mean.shape[1]
    j0 = b * _MERGE_BLOCK
    j1 = min(j0 + _MERGE_BLOCK, C)
    _chan_merge_block(partial_mean, partial_m2, n_rows, rows_per_chunk, j0, j1, mean, m2)


@kernel
def column_merge_moments(partial_mean, partial_m2, n_rows, rows_per_chunk, mean, m2):
    """Chan-merge the chunk statistics into per-column ``mean`` and ``m2`` (the sum of
    squared deviations), without finalising: the moments another merge (across MPI ranks,
    in SyncBatchNorm) combines further."""
    C = partial_mean.shape[1]
    n_blocks = (C + _MERGE_BLOCK - 1) // _MERGE_BLOCK
    for b in prange(n_blocks):
        _column_merge_moments_task(np.int64(b), partial_mean, partial_m2, n_rows,
                                   rows_per_chunk, mean, m2)


@task_body(ordered=True)
def _column_normalize_task(t, X, m0, scale, shift, code, alpha, rows_per_chunk, cols_per_tile,
                           stream, Y):
    """Task ``t`` of :func:`column_normalize` (the ``prange`` body; see ``task_body``): one
    tile (:func:`tile_of`)."""
    R, C = X.shape
    k, start, stop, j0, j1 = tile_of(t, R, C, rows_per_chunk, cols_per_tile)
    w = j1 - j0
    mb = m0[j0:j1]
    sb = scale[j0:j1]
    hb = shift[j0:j1]
    if code <= 2:  # identity, ReLU, leaky ReLU: in X's dtype
        if code == 0 and stream:  # each row through an L1 buffer, then streamed out
            row = np.empty(w, X.dtype)
            for i in range(start, stop):
                for j in range(w):
                    row[j] = (X[i, np.uint64(j0 + j)] - mb[j]) * sb[j] + hb[j]
                stream_copy(row, Y, i * C + j0)
            store_fence()
        elif code == 0:
            for i in range(start, stop):
                for j in range(w):
                    c = np.uint64(j0 + j)
                    Y[i, c] = (X[i, c] - mb[j]) * sb[j] + hb[j]
        else:
            one, neg = piecewise_slopes(code, alpha, m0)
            for i in range(start, stop):
                for j in range(w):
                    c = np.uint64(j0 + j)
                    z = (X[i, c] - mb[j]) * sb[j] + hb[j]
                    Y[i, c] = z if z > 0.0 else z * neg  # z * neg keeps NaN a NaN
    else:
        reject_smooth(code)


@kernel(ordered=True)
def column_normalize(X, mean, invstd, gamma, beta, code, alpha, rows_per_chunk, cols_per_tile,
                     stream, Y):
    """Y = f((X - mean) * invstd * gamma + beta), per column; one pass.

    Training passes the batch ``mean``/``invstd``; inference passes the running ones.
    ``f`` is the identity, ReLU or leaky ReLU (as selects; a smooth ``code`` raises, see
    :mod:`~nbnet.kernels.cpu.activations`); the pass runs in the input's dtype as
    ``(x - m0) * scale + shift`` (:func:`_affine_factors`, see the module notes).
    ``stream`` (no activation only): write Y with non-temporal stores
    (:mod:`~nbnet.kernels.cpu.streaming`), for outputs that will not stay in the caches.
    """
    R, C = X.shape
    m0, scale, shift = _column_factors(mean, invstd, gamma, beta, X.dtype)
    for t in prange(count_tiles(R, C, rows_per_chunk, cols_per_tile)):
        # Chunks in memory order, like every other kernel: the thread pool splits the loop
        # into one contiguous block per thread, so each core writes the part of Y that it
        # (and the kernels before it) touched last. Taking the chunks in reverse (once done
        # to reuse the tail of X the statistics pass left in the caches) handed each core
        # the other core's cache lines: a BatchNorm2D (32,32,32,64) inference right after a
        # ReLU layer's kernel took 1.76 ms instead of 0.16 ms on the 2-core reference VM.
        _column_normalize_task(np.int64(t), X, m0, scale, shift, code, alpha, rows_per_chunk,
                               cols_per_tile, stream, Y)


@task_body(ordered=True)
def _column_backward_reduce_task(t, X, dY, mean, invstd, m0, scale, shift, code, alpha,
                                 rows_per_chunk, cols_per_tile, partial_sum_g, partial_sum_gx):
    """Task ``t`` of :func:`column_backward_reduce` (the ``prange`` body; see ``task_body``):
    one tile (:func:`tile_of`)."""
    k, start, stop, j0, j1 = tile_of(t, X.shape[0], X.shape[1], rows_per_chunk, cols_per_tile)
    w = j1 - j0
    sg = partial_sum_g[k, j0:j1]
    sgx = partial_sum_gx[k, j0:j1]
    for j in range(w):
        sg[j] = 0.0
        sgx[j] = 0.0
    if code <= 2:  # identity, ReLU, leaky ReLU: in X's dtype
        mb = m0[j0:j1]
        sb = scale[j0:j1]
        hb = shift[j0:j1]
        acc_g = np.empty(w, X.dtype)  # block accumulators in X's dtype
        acc_gx = np.empty(w, X.dtype)
        one, neg = piecewise_slopes(code, alpha, m0)
        if code == 0:
            segment_moments(X, dY, 1, start, stop, j0, j1, mb, sb, hb, one, neg, acc_g, acc_gx,
                             sg, sgx)
        else:  # g = dY * f'(z), the slope as a select
            segment_moments(X, dY, 2, start, stop, j0, j1, mb, sb, hb, one, neg, acc_g, acc_gx,
                             sg, sgx)
        meanb = mean[j0:j1]
        ib = invstd[j0:j1]
        for j in range(w):  # sum(g * (x - mean)) = sum(g * (x - m0)) - (mean - m0) * sum(g)
            sgx[j] = (sgx[j] - (meanb[j] - mb[j]) * sg[j]) * ib[j]
    else:
        reject_smooth(code)


@kernel(ordered=True)
def column_backward_reduce(X, dY, mean, invstd, gamma, beta, code, alpha, rows_per_chunk,
                           cols_per_tile, partial_sum_g, partial_sum_gx):
    """Per-chunk sums of ``g`` and ``g * xhat`` per column, in one pass over X and dY.

    ``xhat = (x - mean) * invstd``; ``g = dY * f'(xhat * gamma + beta)`` is the gradient
    at the normalised-and-scaled value (``g = dY`` without an activation; ReLU and leaky
    ReLU only, as selects). In the input's dtype: ``sum(g * (x - m0))`` over blocks of
    ``ROW_BLOCK`` passes of four rows (:func:`segment_moments`), accumulated in float64,
    then ``sum(g * (x - mean)) = sum(g * (x - m0)) - (mean - m0) * sum(g)`` and the
    scaling by ``invstd`` once per chunk.
    """
    R, C = X.shape
    m0, scale, shift = _column_factors(mean, invstd, gamma, beta, X.dtype)
    for t in prange(count_tiles(R, C, rows_per_chunk, cols_per_tile)):
        _column_backward_reduce_task(np.int64(t), X, dY, mean, invstd, m0, scale, shift, code,
                                     alpha, rows_per_chunk, cols_per_tile, partial_sum_g,
                                     partial_sum_gx)


@helper
def _merge_columns(partial, j0, j1, out):
    """``out[j0:j1]`` = the sum over chunks ``k`` of ``partial[k, j0:j1]``, in chunk order."""
    ob = out[j0:j1]  # slices: indexing range(j0, j1) does not vectorise
    for j in range(j1 - j0):
        ob[j] = 0.0
    for k in range(partial.shape[0]):
        pk = partial[k, j0:j1]
        for j in range(j1 - j0):
            ob[j] += pk[j]


@task_body
def _merge_partial_sums_task(b, partial, out):
    """Task ``b`` of :func:`merge_partial_sums` (the ``prange`` body; see ``task_body``)."""
    j0 = b * _MERGE_BLOCK
    _merge_columns(partial, j0, min(j0 + _MERGE_BLOCK, partial.shape[1]), out)


@kernel
def merge_partial_sums(partial, out):
    """out[j] = sum over chunks k of partial[k, j], in chunk order (deterministic)."""
    n_chunks, C = partial.shape
    n_blocks = (C + _MERGE_BLOCK - 1) // _MERGE_BLOCK
    for b in prange(n_blocks):
        _merge_partial_sums_task(np.int64(b), partial, out)


@task_body
def _merge_partial_sums_pair_task(b, partial_a, partial_b, out_a, out_b, grad_a, grad_b,
                                  accumulate):
    """Task ``b`` of :func:`merge_partial_sums_pair` (the ``prange`` body)."""
    j0 = b * _MERGE_BLOCK
    j1 = min(j0 + _MERGE_BLOCK, partial_a.shape[1])
    _merge_columns(partial_a, j0, j1, out_a)
    _merge_columns(partial_b, j0, j1, out_b)
    if accumulate:  # the float64 sums rounded once to the gradients' dtype
        for j in range(j0, j1):
            grad_a[j] += out_a[j]
            grad_b[j] += out_b[j]


@kernel
def _merge_partial_sums_pair(partial_a, partial_b, out_a, out_b, grad_a, grad_b, accumulate):
    """:func:`merge_partial_sums` of two partial buffers, and the gradient accumulation,
    in one call (see :func:`merge_partial_sums_pair`)."""
    n_blocks = (partial_a.shape[1] + _MERGE_BLOCK - 1) // _MERGE_BLOCK
    for b in prange(n_blocks):
        _merge_partial_sums_pair_task(np.int64(b), partial_a, partial_b, out_a, out_b, grad_a,
                                      grad_b, accumulate)


@wraps_kernel(_merge_partial_sums_pair)
def merge_partial_sums_pair(size, partial_a, partial_b, out_a, out_b, grad_a, grad_b,
                            accumulate):
    """``out_a``/``out_b`` = the merged partials (float64, chunk order); when
    ``accumulate``, also ``grad_a += out_a`` and ``grad_b += out_b`` (any shape of ``C``
    values, rounded once to their dtype). The CPU twin of the CUDA op: one call instead
    of two merges and two NumPy adds (LayerNorm's parameter gradients)."""
    _merge_partial_sums_pair(size, partial_a, partial_b, out_a, out_b, grad_a.reshape(-1),
                             grad_b.reshape(-1), bool(accumulate))


@task_body(ordered=True)
def _column_backward_dx_task(t, X, dY, m0, scale, shift, k0, k1, code, alpha, rows_per_chunk,
                             cols_per_tile, stream, dX):
    """Task ``t`` of :func:`column_backward_dx` (the ``prange`` body; see ``task_body``): one
    tile (:func:`tile_of`)."""
    R, C = X.shape
    k, start, stop, j0, j1 = tile_of(t, R, C, rows_per_chunk, cols_per_tile)
    w = j1 - j0
    mb = m0[j0:j1]
    sb = scale[j0:j1]
    k0b = k0[j0:j1]
    k1b = k1[j0:j1]
    if code <= 2:  # identity, ReLU, leaky ReLU: in X's dtype
        if code == 0 and stream:  # each row through an L1 buffer, then streamed out
            row = np.empty(w, X.dtype)
            for i in range(start, stop):
                for j in range(w):
                    c = np.uint64(j0 + j)
                    row[j] = (dY[i, c] * sb[j] + k0b[j]) - k1b[j] * ((X[i, c] - mb[j]) * sb[j])
                stream_copy(row, dX, i * C + j0)
            store_fence()
        elif code == 0:
            for i in range(start, stop):
                for j in range(w):
                    c = np.uint64(j0 + j)
                    dX[i, c] = (dY[i, c] * sb[j] + k0b[j]) - k1b[j] * ((X[i, c] - mb[j]) * sb[j])
        else:
            hb = shift[j0:j1]
            one, neg = piecewise_slopes(code, alpha, m0)
            for i in range(start, stop):
                for j in range(w):
                    c = np.uint64(j0 + j)
                    d = X[i, c] - mb[j]
                    z = d * sb[j] + hb[j]
                    g = dY[i, c] * (one if z > 0.0 else neg + (z - z))
                    dX[i, c] = (g * sb[j] + k0b[j]) - k1b[j] * (d * sb[j])
    else:
        reject_smooth(code)


@kernel(ordered=True)
def column_backward_dx(X, dY, mean, invstd, gamma, beta, code, alpha, sum_g, sum_gx,
                       rows_per_chunk, cols_per_tile, stream, dX):
    """dX = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)), per column.

    ``sum_g``/``sum_gx`` are the merged column sums of :func:`column_backward_reduce`
    (float64). The means divide by the row count R of X. Without an activation the pass
    runs in the input's dtype: ``dX = (g * scale + k0) - k1 * ((x - m0) * scale)`` with
    per-column ``scale = gamma * invstd``, ``k1 = invstd * mean(g * xhat)`` and ``k0 = scale *
    ((mean - m0) * invstd * mean(g * xhat) - mean(g))``, computed in float64 and rounded
    once.
    """
    R, C = X.shape
    m0, scale, shift = _column_factors(mean, invstd, gamma, beta, X.dtype)
    k0, k1 = _dx_factors(mean, invstd, gamma, m0, sum_g, sum_gx, R, X.dtype)
    for t in prange(count_tiles(R, C, rows_per_chunk, cols_per_tile)):
        _column_backward_dx_task(np.int64(t), X, dY, m0, scale, shift, k0, k1, code, alpha,
                                 rows_per_chunk, cols_per_tile, stream, dX)


# ------------------------------------------------------------- fused training steps
#
# A BatchNorm1D training step called seven kernels in the row layout (forward:
# statistics, merge, normalize; backward: sums, two merges, dx), each a numba dispatch
# (~1.5 us), a parallel region (~2.4 us) and the layer's Python around it. The two
# kernels below run the same task bodies, in the same order, on the same chunks, from one
# call each: the CPU twins of the CUDA ops of the same names and arguments. Same bits as
# the separate kernels (tests/test_normalization_family.py checks it); SyncBatchNorm,
# which merges across ranks between the passes, keeps the separate ones.
#
# The merges run serially in the fused kernels. The separate merge kernels go parallel
# only from n_chunks * C >= config.SERIAL_CUTOFF ((8192, 1024) float32 and larger), where
# a parallel merge saves ~1% of the step, and the two parallel merge loops cost compile
# time: compiling the default float32 set (a process run to its exit, the 2-core reference
# VM in a slow hour) took 18.0-19.5 s with them, 15.9-17.1 s without, and 16.0-17.1 s for
# the separate kernels alone, measured alternately.


@kernel(ordered=True)
def _column_forward_train(X, gamma, beta, code, alpha, eps, momentum, unbiased, running_mean,
                          running_var, rows_per_chunk, cols_per_tile, stream, mean, invstd, Y):
    """:func:`column_partial_stats`, :func:`column_merge_stats` and :func:`column_normalize`
    in one call (see :func:`column_forward_train`)."""
    R, C = X.shape
    n_chunks = (R + rows_per_chunk - 1) // rows_per_chunk
    n_tiles = count_tiles(R, C, rows_per_chunk, cols_per_tile)
    pm = np.empty((n_chunks, C), np.float64)
    pm2 = np.empty((n_chunks, C), np.float64)
    for t in prange(n_tiles):
        _column_partial_stats_task(np.int64(t), X, rows_per_chunk, cols_per_tile, pm, pm2)
    for b in range((C + _MERGE_BLOCK - 1) // _MERGE_BLOCK):  # serial: see the notes above
        _column_merge_stats_task(np.int64(b), pm, pm2, R, rows_per_chunk, eps, momentum,
                                 unbiased, running_mean, running_var, mean, invstd)
    m0, scale, shift = _column_factors(mean, invstd, gamma, beta, X.dtype)
    for t in prange(n_tiles):
        _column_normalize_task(np.int64(t), X, m0, scale, shift, code, alpha, rows_per_chunk,
                               cols_per_tile, stream, Y)


@wraps_kernel(_column_forward_train)
def column_forward_train(size, X, gamma, beta, code, alpha, eps, momentum, unbiased,
                         running_mean, running_var, mean, invstd, Y):
    """BatchNorm training forward on an ``(R, C)`` view (``R >= 1``), in one call: the batch
    statistics (``mean``, ``invstd`` float64, written), the running statistics updated in
    place (numpy-ml's ``momentum``; ``unbiased``: the running variance takes ``var * R /
    (R - 1)``), then ``Y = f((X - mean) * invstd * gamma + beta)``.

    The CPU twin of the CUDA op of the same name; the chunking and streaming that the
    separate kernels take as arguments come from :mod:`nbnet.config`, as the layer would
    pass them.
    """
    rpc, cols = config.column_tiling(X.shape[1], X.dtype.itemsize)
    _column_forward_train(size, X, gamma, beta, code, alpha, eps, momentum, unbiased,
                          running_mean, running_var, rpc, cols, config.streams(X), mean, invstd,
                          Y)


@kernel(ordered=True)
def _column_backward_train(X, dY, mean, invstd, gamma, beta, code, alpha, grad_gamma,
                           grad_beta, accumulate, rows_per_chunk, cols_per_tile, stream, dX):
    """:func:`column_backward_reduce`, :func:`merge_partial_sums_pair` (both merges and the
    gradient accumulation) and :func:`column_backward_dx` in one call (see
    :func:`column_backward_train`)."""
    R, C = X.shape
    n_chunks = (R + rows_per_chunk - 1) // rows_per_chunk
    n_tiles = count_tiles(R, C, rows_per_chunk, cols_per_tile)
    psg = np.empty((n_chunks, C), np.float64)
    psgx = np.empty((n_chunks, C), np.float64)
    m0, scale, shift = _column_factors(mean, invstd, gamma, beta, X.dtype)
    for t in prange(n_tiles):
        _column_backward_reduce_task(np.int64(t), X, dY, mean, invstd, m0, scale, shift, code,
                                     alpha, rows_per_chunk, cols_per_tile, psg, psgx)
    sum_g = np.empty(C, np.float64)
    sum_gx = np.empty(C, np.float64)
    for b in range((C + _MERGE_BLOCK - 1) // _MERGE_BLOCK):  # serial: see the notes above
        _merge_partial_sums_pair_task(np.int64(b), psg, psgx, sum_g, sum_gx, grad_beta,
                                      grad_gamma, accumulate)
    k0, k1 = _dx_factors(mean, invstd, gamma, m0, sum_g, sum_gx, R, X.dtype)
    for t in prange(n_tiles):
        _column_backward_dx_task(np.int64(t), X, dY, m0, scale, shift, k0, k1, code, alpha,
                                 rows_per_chunk, cols_per_tile, stream, dX)


@wraps_kernel(_column_backward_train)
def column_backward_train(size, X, dY, mean, invstd, gamma, beta, code, alpha, grad_gamma,
                          grad_beta, accumulate, dX):
    """BatchNorm backward on an ``(R, C)`` view (``R >= 1``), in one call: ``sum(g)`` and
    ``sum(g * xhat)`` per column, ``dX`` from them, and when ``accumulate``
    ``grad_beta += sum(g)``, ``grad_gamma += sum(g * xhat)``.

    The CPU twin of the CUDA op of the same name (chunking and streaming from
    :mod:`nbnet.config`, as for :func:`column_forward_train`).
    """
    rpc, cols = config.column_tiling(X.shape[1], X.dtype.itemsize)
    _column_backward_train(size, X, dY, mean, invstd, gamma, beta, code, alpha, grad_gamma,
                           grad_beta, bool(accumulate), rpc, cols, config.streams(X), dX)


# ------------------------------------------------------------- channels-first (N, C, L)
#
# BatchNorm2D NCHW views its input as ``(N, C, L)`` (``L = H*W``): channel ``c`` of
# example ``n`` is the contiguous run ``X[n, c, :]``. Transposing to ``(N*L, C)`` would
# cost a full copy per call, so these kernels reduce the runs in place.
#
# A *task* is a block of ``channels_per_task`` channels of a chunk of ``n_per_chunk``
# examples: task ``t = k * n_blocks + b`` owns channels ``c0 = b * channels_per_task`` up
# to ``c1`` of examples ``k * n_per_chunk`` up to the chunk's end, and element ``[k, c]``
# of every partial buffer for those channels. It walks its values in *memory order*:
# example by example, the slab ``X[n, c0:c1, :]`` (contiguous) channel after channel, so
# every stream is sequential for the hardware prefetcher. (A task of one channel across
# the chunk's examples reads runs ``C * L`` values apart; with runs of 1 KiB
# ((64, 256, 16, 16) float32) that made inference 2x slower than PyTorch on the 2-core
# reference machine.) The layer picks both sizes from the shape alone
# (``_cf_chunking`` in :mod:`nbnet.layers.normalization`): whole examples when one fits
# ``config.CHUNK_BYTES``, so that a reduction task's data stays in L2 for its second
# pass. The merge is the column pattern's :func:`column_merge_stats` /
# :func:`merge_partial_sums` with ``rows = N * L`` and ``rows_per_chunk = n_per_chunk *
# L``; each channel's sums run over its runs in example order whatever the channel
# blocks, so results are bit-identical for any thread count. The innermost loop always
# runs along a contiguous run (vectorised).


@helper
def _cf_factors(X, mean, invstd, gamma, beta, code, alpha, c0, w):
    """``(m0, a, b, neg)`` for channels ``c0:c0 + w``: the factors of ``z = (x - m0) * a +
    b`` in X's dtype (``m0`` the mean rounded, ``a = invstd * gamma``, ``b = beta - (mean -
    m0) * a``; see :func:`_affine_factors`), and the activation's slope left of 0 (ReLU,
    leaky ReLU; a smooth ``code`` raises)."""
    reject_smooth(code)
    m0 = np.empty(w, X.dtype)
    a = np.empty(w, X.dtype)
    b = np.empty(w, X.dtype)
    for c in range(w):
        m = mean[c0 + c]
        scale = invstd[c0 + c] * gamma[c0 + c]
        m0[c] = m
        a[c] = scale
        b[c] = beta[c0 + c] - (m - m0[c]) * scale
    _, neg = piecewise_slopes(code, alpha, m0)
    return m0, a, b, neg


@helper
def cf_slope_run(Xf, Gf, o, L, mc, ac, bc, neg, out):
    """``out[:L] = g * f'(z)`` along the run at flat offset ``o`` of ``Xf``/``Gf``
    (unsigned indices), ``z = (x - mc) * ac + bc`` formed as the forward forms it (so the
    slope agrees with the output); ReLU / leaky ReLU as a select, ``neg`` the slope left
    of 0 (NaN where ``z`` is NaN: ``g * (neg + (z - z))``)."""
    for j in range(L):
        v = np.uint64(o + j)
        z = (Xf[v] - mc) * ac + bc
        g = Gf[v]
        out[j] = g if z > 0.0 else g * (neg + (z - z))


@helper
def cf_normalize_run(Xf, Yf, o, L, mc, ac, bc, code, neg):
    """``Yf = f((Xf - mc) * ac + bc)`` along the run of ``L`` values at flat offset ``o``
    (unsigned indices), in X's dtype: ``f`` the identity (``code`` 0) or ReLU / leaky
    ReLU as a select (``neg`` the slope left of 0)."""
    if code == 0:
        for j in range(L):
            v = np.uint64(o + j)
            Yf[v] = (Xf[v] - mc) * ac + bc
    else:
        for j in range(L):
            v = np.uint64(o + j)
            z = (Xf[v] - mc) * ac + bc
            Yf[v] = z if z > 0.0 else z * neg  # z * neg keeps NaN a NaN


@helper
def run_grad_sums(Xf, Gf, gs, og, o, L, mc, act):
    """``(sum(g), sum(g * (x - mc)))`` along the run of ``L`` values at flat offset ``o``
    of ``Xf`` (float64; unsigned indices): ``g`` the values of ``Gf`` there, or with
    ``act`` those of the buffer ``gs`` from ``og`` on (``dY * f'(z)``,
    :func:`cf_slope_run`). Blocks
    of ``SUM_BLOCK`` values summed in X's dtype (vectorised where the caller compiles with
    "reassoc"), added up in float64."""
    s1 = 0.0
    s2 = 0.0
    for b in range(0, L, SUM_BLOCK):
        p1 = mc - mc
        p2 = mc - mc
        ob = o + b
        if act:
            for j in range(min(SUM_BLOCK, L - b)):
                g = gs[np.uint64(og + b + j)]
                p1 += g
                p2 += g * (Xf[np.uint64(ob + j)] - mc)
        else:
            for j in range(min(SUM_BLOCK, L - b)):
                v = np.uint64(ob + j)
                g = Gf[v]
                p1 += g
                p2 += g * (Xf[v] - mc)
        s1 += p1
        s2 += p2
    return s1, s2


@task_body
def _column_partial_stats_cf_task(t, X, n_per_chunk, channels_per_task, partial_mean,
                                  partial_m2):
    """Task ``t`` of :func:`column_partial_stats_cf` (the ``prange`` body; see ``task_body``)."""
    N, C, L = X.shape
    k, start, stop, c0, c1 = tile_of(t, N, C, n_per_chunk, channels_per_task)
    w = c1 - c0
    cnt = (stop - start) * L
    inv_cnt = 1.0 / cnt
    Xf = X.reshape(-1)
    m0 = np.empty(w, X.dtype)  # the shift: each channel's first value in the chunk
    for c in range(w):
        m0[c] = Xf[np.uint64((start * C + c0 + c) * L)]
    sd = np.empty(w, np.float64)
    sdd = np.empty(w, np.float64)
    for attempt in range(2):
        for c in range(w):
            sd[c] = 0.0
            sdd[c] = 0.0
        for n in range(start, stop):
            o = (n * C + c0) * L
            for c in range(w):
                s1, s2 = block_shifted_moments(Xf, o + c * L, L, m0[c])
                sd[c] += s1
                sdd[c] += s2
        far = False
        for c in range(w):
            m, m2, far_c = shifted_result(np.float64(m0[c]), sd[c], sdd[c], inv_cnt)
            partial_mean[k, c0 + c] = m
            partial_m2[k, c0 + c] = m2
            far = far or far_c
        if not far:
            break
        for c in range(w):  # again, around the mean just found
            m0[c] = partial_mean[k, c0 + c]


@kernel
def column_partial_stats_cf(X, n_per_chunk, channels_per_task, partial_mean, partial_m2):
    """Channels-first twin of :func:`column_partial_stats`.

    X : (N, C, L) float32/float64, C-contiguous.
    partial_mean, partial_m2 : (n_chunks, C) float64, written; ``n_chunks =
    ceil(N / n_per_chunk)``; entry ``[k, c]`` holds the mean and the sum of squared
    deviations of channel ``c`` over the chunk's ``n_per_chunk * L`` values.

    One pass of shifted moments per channel, ``sum(x - m0)`` and ``sum((x - m0)^2)``
    (input-dtype blocks along the runs, vectorised with "reassoc", float64 across blocks)
    around ``m0`` = the channel's first value in the chunk; a second pass around the
    found mean when the shift was further than ``SHIFT_LIMIT`` standard deviations away
    (as :func:`column_partial_stats`).
    """
    N, C, L = X.shape
    for t in prange(count_tiles(N, C, n_per_chunk, channels_per_task)):
        _column_partial_stats_cf_task(np.int64(t), X, n_per_chunk, channels_per_task,
                                      partial_mean, partial_m2)


@task_body
def _column_normalize_cf_task(t, X, mean, invstd, gamma, beta, code, alpha, n_per_chunk,
                              channels_per_task, Y):
    """Task ``t`` of :func:`column_normalize_cf` (the ``prange`` body; see ``task_body``)."""
    N, C, L = X.shape
    k, start, stop, c0, c1 = tile_of(t, N, C, n_per_chunk, channels_per_task)
    w = c1 - c0
    m0, a, b, neg = _cf_factors(X, mean, invstd, gamma, beta, code, alpha, c0, w)
    Xf = X.reshape(-1)
    Yf = Y.reshape(-1)
    for n in range(start, stop):
        for c in range(w):
            cf_normalize_run(Xf, Yf, (n * C + c0 + c) * L, L, m0[c], a[c], b[c], code, neg)


@kernel
def column_normalize_cf(X, mean, invstd, gamma, beta, code, alpha, n_per_chunk,
                        channels_per_task, stream, Y):
    """Channels-first twin of :func:`column_normalize`: Y = f((X - mean) * invstd * gamma + beta).

    X, Y : (N, C, L); mean, invstd : (C,) float64; gamma, beta : (C,). Without an
    activation, in X's dtype as ``(x - m0) * scale + shift'`` with ``m0`` the mean
    rounded to X's dtype and ``shift' = beta - (mean - m0) * scale`` (the float64 mean
    enters after the scaling, see :func:`column_partial_stats_cf`). ``stream`` is accepted
    for the channels-last twin's sake and ignored.
    """
    N, C, L = X.shape
    for t in prange(count_tiles(N, C, n_per_chunk, channels_per_task)):
        _column_normalize_cf_task(np.int64(t), X, mean, invstd, gamma, beta, code, alpha,
                                  n_per_chunk, channels_per_task, Y)


@task_body
def _column_backward_reduce_cf_task(t, X, dY, mean, invstd, gamma, beta, code, alpha,
                                    n_per_chunk, channels_per_task, partial_sum_g,
                                    partial_sum_gx):
    """Task ``t`` of :func:`column_backward_reduce_cf` (the ``prange`` body; see ``task_body``)."""
    N, C, L = X.shape
    k, start, stop, c0, c1 = tile_of(t, N, C, n_per_chunk, channels_per_task)
    w = c1 - c0
    sg = np.zeros(w, np.float64)
    sgx = np.zeros(w, np.float64)
    # with ReLU / leaky ReLU, g = dY * f'(z) is formed first into a run buffer of X's
    # dtype, and the sums run as without an activation
    m0, a, b, neg = _cf_factors(X, mean, invstd, gamma, beta, code, alpha, c0, w)
    Xf = X.reshape(-1)
    Gf = dY.reshape(-1)
    gs = np.empty(L if code != 0 else 0, X.dtype)
    for n in range(start, stop):
        for c in range(w):
            o = (n * C + c0 + c) * L
            mc = m0[c]
            if code != 0:
                cf_slope_run(Xf, Gf, o, L, mc, a[c], b[c], neg, gs)
            s1, s2 = run_grad_sums(Xf, Gf, gs, 0, o, L, mc, code != 0)
            sg[c] += s1
            sgx[c] += s2
    for c in range(w):
        sgx[c] = invstd[c0 + c] * (sgx[c] - (mean[c0 + c] - m0[c]) * sg[c])
    for c in range(w):
        partial_sum_g[k, c0 + c] = sg[c]
        partial_sum_gx[k, c0 + c] = sgx[c]


@kernel
def column_backward_reduce_cf(X, dY, mean, invstd, gamma, beta, code, alpha, n_per_chunk,
                              channels_per_task, partial_sum_g, partial_sum_gx):
    """Channels-first twin of :func:`column_backward_reduce` (X, dY : (N, C, L)).

    Without an activation: ``sum(g)`` and ``sum(g * (x - m0))`` in input-dtype blocks
    (``m0`` the mean rounded to X's dtype), then ``sum(g * xhat) = invstd * (sum(g * (x -
    m0)) - (mean - m0) * sum(g))`` in float64.
    """
    N, C, L = X.shape
    for t in prange(count_tiles(N, C, n_per_chunk, channels_per_task)):
        _column_backward_reduce_cf_task(np.int64(t), X, dY, mean, invstd, gamma, beta,
                                        code, alpha, n_per_chunk, channels_per_task,
                                        partial_sum_g, partial_sum_gx)


@task_body(ordered=True)  # no "reassoc": it would fold k1 * ((x - m0) * a) into (k1 * a) * ...
def _column_backward_dx_cf_task(t, X, dY, mean, invstd, gamma, beta, code, alpha, sum_g,
                                sum_gx, n_per_chunk, channels_per_task, dX):
    """Task ``t`` of :func:`column_backward_dx_cf` (the ``prange`` body; see ``task_body``)."""
    N, C, L = X.shape
    k, start, stop, c0, c1 = tile_of(t, N, C, n_per_chunk, channels_per_task)
    w = c1 - c0
    inv_r = 1.0 / (N * L)
    # dX = g * a + k0 - k1 * ((x - m0) * a), per-channel factors rounded once to X's
    # dtype (k1 = invstd * mgx: a * k1 would underflow float32 past std ~1e19); with ReLU /
    # leaky ReLU, g = dY * f'(z) formed first into a run buffer of X's dtype
    m0, a, sh, neg = _cf_factors(X, mean, invstd, gamma, beta, code, alpha, c0, w)
    k0 = np.empty(w, X.dtype)
    k1 = np.empty(w, X.dtype)
    gs = np.empty(L if code != 0 else 0, X.dtype)
    for c in range(w):  # (a[c] is scale, rounded)
        m = mean[c0 + c]
        r = invstd[c0 + c]
        scale = np.float64(gamma[c0 + c]) * r
        mg = sum_g[c0 + c] * inv_r
        mgx = sum_gx[c0 + c] * inv_r
        cc = (m - m0[c]) * r
        k0[c] = scale * (cc * mgx - mg)
        k1[c] = r * mgx
    Xf = X.reshape(-1)
    Gf = dY.reshape(-1)
    Df = dX.reshape(-1)
    for n in range(start, stop):
        for c in range(w):
            o = (n * C + c0 + c) * L
            mc, ac, k0c, k1c = m0[c], a[c], k0[c], k1[c]
            if code == 0:
                for j in range(L):
                    v = np.uint64(o + j)
                    Df[v] = (Gf[v] * ac + k0c) - k1c * ((Xf[v] - mc) * ac)
            else:  # g = dY * f'(z) from the run buffer
                cf_slope_run(Xf, Gf, o, L, mc, ac, sh[c], neg, gs)
                for j in range(L):
                    v = np.uint64(o + j)
                    Df[v] = (gs[j] * ac + k0c) - k1c * ((Xf[v] - mc) * ac)


@kernel
def column_backward_dx_cf(X, dY, mean, invstd, gamma, beta, code, alpha, sum_g, sum_gx,
                          n_per_chunk, channels_per_task, stream, dX):
    """Channels-first twin of :func:`column_backward_dx`; the means divide by N * L.

    Without an activation, in X's dtype: ``dX = g * scale + k0 - k1 * ((x - m0) * scale)``
    with ``xhat = (x - m0) * invstd - c``, ``k1 = invstd * mgx`` and
    ``k0 = scale * (c * mgx - mg)`` (float64 constants rounded once). ``stream`` is
    accepted for the channels-last twin's sake and ignored.
    """
    N, C, L = X.shape
    for t in prange(count_tiles(N, C, n_per_chunk, channels_per_task)):
        _column_backward_dx_cf_task(np.int64(t), X, dY, mean, invstd, gamma, beta, code,
                                    alpha, sum_g, sum_gx, n_per_chunk, channels_per_task, dX)


KERNELS = {
    "column_partial_stats": column_partial_stats,
    "column_merge_stats": column_merge_stats,
    "column_merge_moments": column_merge_moments,
    "column_normalize": column_normalize,
    "column_backward_reduce": column_backward_reduce,
    "column_backward_dx": column_backward_dx,
    "column_forward_train": column_forward_train,
    "column_backward_train": column_backward_train,
    "merge_partial_sums": merge_partial_sums,
    "merge_partial_sums_pair": merge_partial_sums_pair,
    "column_partial_stats_cf": column_partial_stats_cf,
    "column_normalize_cf": column_normalize_cf,
    "column_backward_reduce_cf": column_backward_reduce_cf,
    "column_backward_dx_cf": column_backward_dx_cf,
}

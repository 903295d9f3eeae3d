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

With one position (``P = 1``: GroupNorm on ``(N, C)`` features, 1x1 images) each example
is a row of ``G`` contiguous groups, and the channels-last ops run the row pattern of
:mod:`~nbnet.kernels.cpu.row_stats` group by group instead (``_group_forward_rows``,
``_group_backward_rows``: tasks of a chunk of examples, per-group statistics vectorised
across the groups).

Parallel layout: ``prange`` over tasks of a chunk of examples times a block of whole
groups, channels-last (``config.groups_per_task``: about ``config.TILE_BYTES`` of
channels) and channels-first (``config.cf_group_tiling``: about ``config.CHUNK_BYTES`` a
task) alike, which keeps both cores busy when N is small and C or G large. Statistics of
an example depend on that example alone; the parameter gradients reduce over examples,
so backward writes per-chunk ``[n_chunks, C]`` partials (a task owns its groups' columns
of row ``k``) merged in chunk order by
:func:`~nbnet.kernels.cpu.column_stats.merge_partial_sums`. Chunking depends only on the
shape, so results are bit-identical for any thread count.

Numerics: float64 accumulation, never E[x^2] - E[x]^2 (for float32 data of mean 1e4 and
unit variance that form keeps no correct digit of the variance). Statistics are moments
shifted by each group's first value, taken again around the found mean when that shift
was more than ``SHIFT_LIMIT`` standard deviations off (see :func:`_group_forward_cl_task`):
channels-last as per-channel sums over positions (or, for a few positions of wide groups,
each group's runs directly), channels-first over the group's contiguous block.

Both layouts compute in the input's dtype the way the column kernels do (see
:mod:`~nbnet.kernels.cpu.column_stats`): block sums of the input's dtype flushed into
float64 (channels-last: per-channel block accumulators flushed every ``ROW_BLOCK``
passes, a pass adding one position from each of four segments of the example, see
:func:`~nbnet.kernels.cpu.column_stats.segment_moments`; channels-first: ``SUM_BLOCK``
values along a run), and the group mean subtracted as ``x - m0`` (``m0`` the mean rounded
to X's dtype) with the float64 remainder ``mean - m0`` folded into per-channel constants,
the same factors in both layouts. The tasks compile with ``ordered=True``; their
reductions run in "reassoc" subroutines (:func:`_run_moments`, :func:`_block_grad_sums`,
:func:`_group_sums`, :func:`_group_dots`).

NaN containment: a NaN anywhere in group ``g`` of example ``n`` makes ``mean[n, g]``,
``invstd[n, g]`` and that group's outputs NaN; other groups and examples stay finite.
"""
import math

import numpy as np
from numba import prange

from ... import config
from ._jit import helper, kernel, subroutine, task_body, wraps_kernel
from .activations import piecewise_slopes, reject_smooth
from .block_sums import (ROW_BLOCK, SUM_BLOCK, block_shifted_moments, moments64,
                         rescue_columns, shifted_result)
from .column_stats import (cf_normalize_run, cf_slope_run, count_tiles, run_grad_sums,
                           segment_moments, tile_of)


# Channels-last kernels. A task is a chunk of ``rows_per_chunk`` examples times a block of
# ``groups_per_task`` whole groups: channels ``j0:j1``, a contiguous run of every position
# (:func:`~nbnet.kernels.cpu.column_stats.tile_of` over examples and groups). Each
# example's ``(P, C)`` values are the column pattern's rows and columns: the per-channel
# sums over positions are :func:`~nbnet.kernels.cpu.column_stats.segment_moments` over
# the block's columns (four row segments side by side, block accumulators in X's dtype
# flushed into float64), then a group's sums add its ``cg`` channel sums. Every
# per-channel array of a task is the block's width (at most ``config.TILE_BYTES`` of X's
# dtype, unless one group is wider), so it stays in L1 whatever C is.
#
# (Round 13's kernels took whole examples per task, with the per-channel factors and
# accumulators tiled ``512 // C`` positions wide: with C = 4096 or 8192 and a few
# positions, an example's ~15 passes over C-long arrays, two integer divisions per
# channel and the serial float64 group sums cost more than its data. GroupNorm(32)
# (2, 2, 2, 8192) float32 inference: 0.17 ms against PyTorch's 0.054 ms on the 2-core
# reference machine.)


#: The channels-last forward takes a group's statistics from its ``P`` runs of ``cg``
#: contiguous values directly (``block_shifted_moments``, one call per run) when ``P *
#: _RUN_RATIO <= cg``, and from per-channel sums over the positions otherwise
#: (``segment_moments``: a dozen passes over the block's per-channel arrays per example,
#: which a few positions of data do not pay for, but no per-run cost). Serial kernel on
#: the 2-core reference machine, float32: (16, 8, 4096) 258 -> 199 us by runs (cg = 128);
#: (32, 8, 1024) 166 us by runs against 123 us by channel sums (cg = 32); (1024, 1, 256)
#: 712 against 820 us (cg = 8, one position).
_RUN_RATIO = 8
#: The channels-last backward writes dX by runs under the same rule, for groups of at least
#: this many channels (the factor arrays it spares cost less than a loop per run of fewer).
#: The kernel (2 threads), float32, alternated with the per-channel path: (16, 4, 4096) 141-146 ->
#: 125-130 us, with ReLU 184 -> 156-168 us; (64, 1, 4096) 298-318 -> 270-287 us; (128, 2,
#: 1024) ReLU 225-248 -> 196-220 us (cg = 32); cg = 16 and 32 with one position: the same;
#: (1024, 1, 256) (cg = 8): 517-531 -> 573-581 us, hence the floor.
_RUN_MIN_CHANNELS = 16


@subroutine
def _run_moments(x, o, n, m0):
    """:func:`~nbnet.kernels.cpu.block_sums.block_shifted_moments` compiled with
    "reassoc": its block sums are reductions, which an ``ordered`` task would run as one
    chain of dependent adds (half the time of a (64, 4096) float32 forward, scalar)."""
    return block_shifted_moments(x, o, n, m0)


@subroutine
def _group_sums(s1, s2, cg, out1, out2):
    """``out1[g], out2[g]`` = the sums of ``s1``, ``s2`` over channels ``g*cg:(g+1)*cg``
    (float64). Compiled with "reassoc", so the loop is a vectorised reduction: written
    in order inside an ``ordered`` task, each group's two sums were one chain of
    dependent adds (~4 cycles per channel)."""
    for g in range(out1.shape[0]):
        a = 0.0
        b = 0.0
        for j in range(cg):
            c = np.uint64(g * cg + j)  # (unsigned: a signed index stops vectorisation)
            a += s1[c]
            b += s2[c]
        out1[g] = a
        out2[g] = b


@subroutine
def _group_dots(wt, s1, s2, cg, out1, out2):
    """``out1[g], out2[g]`` = the sums of ``wt * s1``, ``wt * s2`` over channels
    ``g*cg:(g+1)*cg`` (float64; see :func:`_group_sums`)."""
    for g in range(out1.shape[0]):
        a = 0.0
        b = 0.0
        for j in range(cg):
            c = np.uint64(g * cg + j)
            a += wt[c] * s1[c]
            b += wt[c] * s2[c]
        out1[g] = a
        out2[g] = b


@helper
def _fill_groups(values, cg, out):
    """``out[g*cg:(g+1)*cg] = values[g]`` for every group (per group, no division per
    channel: ``out[j] = values[j // cg]`` cost ~37 us per 16K channels)."""
    for g in range(values.shape[0]):
        v = values[g]
        for j in range(cg):
            out[np.uint64(g * cg + j)] = v


@helper
def _group_affine(mean_g, inv_g, cg, gamma, beta, m0, scale, shift):
    """Per-channel factors of the output ``z = (x - m0) * scale + shift`` for a block of
    groups: ``m0`` the group mean rounded to X's dtype, ``scale = invstd * gamma`` and
    ``shift = beta - (mean - m0) * scale`` (the float64 remainder folded in; see
    column_stats._affine_factors). ``mean_g``, ``inv_g``: the block's group means and
    invstd (float64); ``gamma``, ``beta`` and the outputs: the block's channels. The
    forward and the activation slopes of the backward both take them from here, so a
    slope always agrees with the output it belongs to."""
    for g in range(mean_g.shape[0]):
        m = mean_g[g]
        r = inv_g[g]
        a = g * cg
        m0[a] = m
        mr = m0[a]  # the mean rounded to X's dtype
        rem = m - mr
        for j in range(cg):
            c = np.uint64(a + j)
            m0[c] = mr
            sc = r * gamma[c]
            scale[c] = sc
            shift[c] = beta[c] - rem * sc


@task_body(ordered=True)
def _group_forward_cl_task(t, X, gamma, beta, n_groups, eps, code, alpha, rows_per_chunk,
                           groups_per_task, Y, mean, invstd):
    """Task ``t`` of :func:`group_forward_cl` (the ``prange`` body; see ``task_body``): the
    groups ``g0:g1`` (channels ``j0:j1``) of chunk ``k`` of examples.

    Statistics in one pass: shifted moments around the group's first value, ``d = x -
    x0``: ``mean = x0 + sum(d) / n`` and ``M2 = sum(d^2) - sum(d)^2 / n`` are exact for any
    shift, and lose only ~``(1 + K^2)`` float32 roundings of M2 when the shift is ``K``
    standard deviations from the mean. A value drawn from the group is a few standard
    deviations away at most, as a rule; when some group's shift is more than
    ``SHIFT_LIMIT`` away (a constant border, an outlier first pixel) the block's moments
    are taken again around the means just found, as the two-pass form would. (Two passes
    every time cost 15-20% more: GroupNorm(32) (32,32,32,64) float32 forward 0.39 ->
    0.32 ms on the 2-core reference machine.)
    """
    N, P, C = X.shape
    cg = C // n_groups
    inv_cnt = 1.0 / (P * cg)
    k, start, stop, g0, g1 = tile_of(t, N, n_groups, rows_per_chunk, groups_per_task)
    j0 = g0 * cg
    j1 = g1 * cg
    w = j1 - j0
    m0 = np.empty(w, X.dtype)         # the shift, per channel, in X's dtype
    sc = np.empty(w, X.dtype)         # invstd * gamma
    sh = np.empty(w, X.dtype)         # beta - (mean - m0) * sc
    acc = np.empty(w, X.dtype)        # block accumulators (segment_moments)
    acc2 = np.empty(w, X.dtype)
    s1 = np.empty(w, np.float64)      # per-channel sums of d and d**2
    s2 = np.empty(w, np.float64)
    sd = np.empty(g1 - g0, np.float64)  # per-group sums (sdd: then M2)
    sdd = np.empty(g1 - g0, np.float64)
    shift0 = np.empty(g1 - g0, X.dtype)  # per-group shift
    reject_smooth(code)
    one, neg = piecewise_slopes(code, alpha, m0)
    xf = X.reshape(N * P * C)
    for n in range(start, stop):
        Xn = X[n]
        Yn = Y[n]
        mn = mean[n, g0:g1]
        rn = invstd[n, g0:g1]
        if P * _RUN_RATIO <= cg:  # each group's P runs of cg values, summed as they lie
            for g in range(g1 - g0):
                o = n * P * C + j0 + g * cg
                x0 = xf[o]
                for attempt in range(2):
                    t1 = 0.0
                    t2 = 0.0
                    for p in range(P):
                        u1, u2 = _run_moments(xf, o + p * C, cg, x0)
                        t1 += u1
                        t2 += u2
                    mn[g], sdd[g], far = shifted_result(np.float64(x0), t1, t2, inv_cnt)
                    if not far:
                        break
                    m0[0] = mn[g]  # again, around the mean just found (in X's dtype)
                    x0 = m0[0]
        else:
            for g in range(g1 - g0):  # the shift: the group's first value
                shift0[g] = Xn[0, j0 + g * cg]
            for attempt in range(2):
                _fill_groups(shift0, cg, m0)
                for j in range(w):
                    s1[j] = 0.0
                    s2[j] = 0.0
                segment_moments(Xn, Xn, 0, 0, P, j0, j1, m0, m0, m0, one, neg, acc, acc2, s1,
                                s2)
                rescue_columns(Xn, 0, P, j0, m0, s1, s2)  # float32 squares that overflowed
                _group_sums(s1, s2, cg, sd, sdd)
                far = False
                for g in range(g1 - g0):  # (no branch: vectorised across groups)
                    mn[g], sdd[g], far_g = shifted_result(shift0[g], sd[g], sdd[g], inv_cnt)
                    far = far | far_g
                if not far:
                    break
                for g in range(g1 - g0):  # again, around the means just found
                    m0[g * cg] = mn[g]
                    shift0[g] = m0[g * cg]
        for g in range(g1 - g0):  # sdd: the groups' M2
            rn[g] = 1.0 / math.sqrt(sdd[g] * inv_cnt + eps)
        _group_affine(mn, rn, cg, gamma[j0:j1], beta[j0:j1], m0, sc, sh)
        for p in range(P):
            if code == 0:
                for j in range(w):
                    c = np.uint64(j0 + j)
                    Yn[p, c] = (Xn[p, c] - m0[j]) * sc[j] + sh[j]
            else:
                for j in range(w):
                    c = np.uint64(j0 + j)
                    z = (Xn[p, c] - m0[j]) * sc[j] + sh[j]
                    Yn[p, c] = z if z > 0.0 else z * neg  # z * neg keeps NaN a NaN


# One position (GroupNorm on ``(N, C)`` features, or NHWC images of 1x1): each example is
# a row of ``G`` contiguous groups of ``cg`` values, and the kernels are the row pattern
# of :mod:`~nbnet.kernels.cpu.row_stats` applied group by group, with the affine
# parameters of the group's channels. The per-channel machinery above (sums over
# positions per channel, factor arrays filled per example, a call per group) is there to
# make many positions cheap; with one position it was the whole cost: float32, 2 threads,
# on the 2-core reference machine, GroupNorm(32) (64, 4096) forward kernel 91 us (copy of
# X: 29 us), and (1024, 64) (two channels a group) 403 us, serial, for 256 KiB.


@helper
def _group_shifts(mf, rf, mo, m0, rr, cc):
    """Every group's ``m0`` (the mean rounded to X's dtype), ``r`` and ``c = (mean - m0) *
    r`` in X's dtype (the arrays ``m0``, ``rr``, ``cc``) from the example's statistics
    ``mf[mo:]``, ``rf[mo:]``, as :func:`~nbnet.kernels.cpu.row_stats._row_shift` forms them
    for one row: one loop across the groups instead of a round trip through memory per
    group."""
    for g in range(m0.shape[0]):
        i = np.uint64(mo + g)
        m0[g] = mf[i]
        rr[g] = rf[i]
        cc[g] = (mf[i] - m0[g]) * rf[i]


@helper
def _short_group_moments(xf, xo, cg, sh, s1, s2):
    """Every group's moments around its first value for groups of at most ``SUM_BLOCK``
    values (an example at flat offset ``xo`` of ``xf``): ``sh[g]`` the shift, ``s1[g]``,
    ``s2[g]`` the sums of ``x - sh[g]`` and its squares, each one block in X's dtype, as
    :func:`~nbnet.kernels.cpu.block_sums.block_shifted_moments` forms them (the same
    bits), with its overflow check once for the example, across the groups (vectorised),
    instead of per group with its block loop: serial (1024, 256) float32 forward in groups
    of 8, 439 -> 337 us on the 2-core reference machine (groups of 2: 211 -> 177 us)."""
    for g in range(sh.shape[0]):
        o = xo + g * cg
        m0 = xf[np.uint64(o)]
        sh[g] = m0
        p1 = m0 - m0
        p2 = m0 - m0
        for j in range(cg):
            d = xf[np.uint64(o + j)] - m0
            p1 += d
            p2 += d * d
        s1[g] = p1
        s2[g] = p2
    finite = True
    for g in range(sh.shape[0]):  # (no branch: vectorised)
        finite = finite & math.isfinite(s1[g]) & math.isfinite(s2[g])
    if not finite:  # float32 squares that overflowed (block_sums notes): again in float64
        for g in range(sh.shape[0]):
            if not (math.isfinite(s1[g]) and math.isfinite(s2[g])):
                o = xo + g * cg
                s1[g], s2[g] = moments64(xf[o:o + cg], sh[g])


@helper
def _group_rows_example(xf, yf, xo, mf, rf, mo, gamma, beta, cg, eps, code, neg, far, s1, s2,
                        sh, rr, cc):
    """One example of :func:`_group_rows_forward_task`: its ``C`` values at flat offset
    ``xo`` of ``xf``, ``yf``, its groups' statistics at ``mo`` of ``mf``, ``rf`` (written);
    the other arrays are the task's per-group buffers. Flat arrays and offsets rather than
    views of the example: a view per example cost numba a reference-count call pair (eight
    calls an example in the assembly)."""
    n_groups = sh.shape[0]
    inv_cnt = 1.0 / cg
    if cg <= SUM_BLOCK:
        _short_group_moments(xf, xo, cg, sh, s1, s2)
    else:
        for g in range(n_groups):
            o = xo + g * cg
            sh[g] = xf[np.uint64(o)]
            s1[g], s2[g] = block_shifted_moments(xf, o, cg, sh[g])
    any_far = False
    for g in range(n_groups):  # (no branch: vectorised across groups)
        i = np.uint64(mo + g)
        mf[i], m2, far[g] = shifted_result(np.float64(sh[g]), s1[g], s2[g], inv_cnt)
        rf[i] = 1.0 / math.sqrt(m2 * inv_cnt + eps)
        any_far = any_far | far[g]
    if any_far:
        for g in range(n_groups):
            if far[g]:  # again, around the mean rounded to X's dtype
                i = np.uint64(mo + g)
                sh[g] = mf[i]
                u1, u2 = block_shifted_moments(xf, xo + g * cg, cg, sh[g])
                m, m2, _ = shifted_result(np.float64(sh[g]), u1, u2, inv_cnt)
                mf[i] = m
                rf[i] = 1.0 / math.sqrt(m2 * inv_cnt + eps)
    _group_shifts(mf, rf, mo, sh, rr, cc)
    for g in range(n_groups):
        m0 = sh[g]
        r = rr[g]
        c0 = cc[g]
        o = g * cg
        if code == 0:
            for j in range(cg):
                c = np.uint64(o + j)
                v = np.uint64(xo + o + j)
                yf[v] = ((xf[v] - m0) * r - c0) * gamma[c] + beta[c]
        else:  # ReLU, leaky ReLU: a select in X's dtype
            for j in range(cg):
                c = np.uint64(o + j)
                v = np.uint64(xo + o + j)
                z = ((xf[v] - m0) * r - c0) * gamma[c] + beta[c]
                yf[v] = z if z > 0.0 else z * neg  # z * neg keeps NaN a NaN


@task_body
def _group_rows_forward_task(k, X, gamma, beta, n_groups, eps, code, alpha, rows_per_chunk, Y,
                             mean, invstd):
    """Task ``k`` of :func:`group_forward_rows` (the ``prange`` body; see ``task_body``):
    examples ``k * rows_per_chunk`` on. Per example (:func:`_group_rows_example`), loops
    over its groups, as the row forward takes its blocks of rows: the one-pass shifted
    moments of every group (around its first value, input-dtype blocks summed in
    float64); every group's mean and invstd in one loop across the groups (vectorised:
    square roots and divisions 4 to 8 at a time); the second pass of the (rare) groups
    whose shift was more than ``SHIFT_LIMIT`` standard deviations off; then the outputs
    ``((x - m0) * r - c) * gamma + beta`` while the example is in L1 (``m0`` the mean
    rounded to X's dtype, ``c = (mean - m0) * r``, as the row kernels form it).

    Groups of 2, 4 and 8 channels take copies of the example's code with ``cg`` a
    constant, whose loops over a group's values LLVM unrolls: the loops of a run-time
    count, set up for two values each, cost ~5 ns a group (serial, float32, (1024, 64) in
    groups of 2 on the 2-core reference machine: forward 403 -> 238 us, backward 440 ->
    175 us)."""
    N, C = X.shape
    cg = C // n_groups
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, N)
    xf = X.reshape(N * C)
    yf = Y.reshape(N * C)
    mf = mean.reshape(N * n_groups)
    rf = invstd.reshape(N * n_groups)
    far = np.empty(n_groups, np.bool_)
    s1 = np.empty(n_groups, np.float64)  # per group: the moments around the shift
    s2 = np.empty(n_groups, np.float64)
    sh = np.empty(n_groups, X.dtype)    # the shift; then m0, r, c (_group_shifts)
    rr = np.empty(n_groups, X.dtype)
    cc = np.empty(n_groups, X.dtype)
    reject_smooth(code)
    _, neg = piecewise_slopes(code, alpha, sh)
    for n in range(start, stop):
        xo = n * C
        mo = n * n_groups
        if cg == 2:
            _group_rows_example(xf, yf, xo, mf, rf, mo, gamma, beta, 2, eps, code, neg, far, s1,
                                s2, sh, rr, cc)
        elif cg == 4:
            _group_rows_example(xf, yf, xo, mf, rf, mo, gamma, beta, 4, eps, code, neg, far, s1,
                                s2, sh, rr, cc)
        elif cg == 8:
            _group_rows_example(xf, yf, xo, mf, rf, mo, gamma, beta, 8, eps, code, neg, far, s1,
                                s2, sh, rr, cc)
        else:
            _group_rows_example(xf, yf, xo, mf, rf, mo, gamma, beta, cg, eps, code, neg, far, s1,
                                s2, sh, rr, cc)


@kernel
def _group_forward_rows(X, gamma, beta, n_groups, eps, code, alpha, rows_per_chunk, Y, mean,
                        invstd):
    """:func:`group_forward_cl` for one position: X, Y : (N, C)."""
    N, C = X.shape
    for k in prange((N + rows_per_chunk - 1) // rows_per_chunk):
        _group_rows_forward_task(np.int64(k), X, gamma, beta, n_groups, eps, code, alpha,
                                 rows_per_chunk, Y, mean, invstd)


@helper
def _group_rows_grad_example(xf, gf, df, xo, mf, rf, mo, gamma, beta, cg, code, neg, gs, sh, rr,
                             cc, k0, k1, acc_g, acc_gx):
    """One example of :func:`_group_rows_backward_task`: its ``C`` values at flat offset
    ``xo`` of ``xf``, ``gf``, ``df``, its groups' statistics at ``mo`` of ``mf``, ``rf``; the
    other arrays are the task's buffers (``gs``: the example's ``g`` with an activation;
    per group ``sh``, ``rr``, ``cc``, ``k0``, ``k1``; per channel the accumulators)."""
    n_groups = sh.shape[0]
    inv_cnt = 1.0 / cg
    _group_shifts(mf, rf, mo, sh, rr, cc)
    go = xo  # where the example's g is: dY, or the buffer from 0 with an activation
    if code != 0:
        for g in range(n_groups):
            m0 = sh[g]
            r = rr[g]
            c0 = cc[g]
            o = g * cg
            for j in range(cg):
                c = np.uint64(o + j)
                v = np.uint64(xo + o + j)
                z = ((xf[v] - m0) * r - c0) * gamma[c] + beta[c]
                gv = gf[v]
                # g * (neg + (z - z)): NaN where z is NaN, as the slope is
                gs[c] = gv if z > 0.0 else gv * (neg + (z - z))
        gf = gs
        go = 0
    for g in range(n_groups):
        m0 = sh[g]
        r = rr[g]
        c0 = cc[g]
        o = g * cg
        t1 = 0.0
        t2 = 0.0
        for b in range(0, cg, SUM_BLOCK):
            ob = o + b
            h = m0 - m0
            hx = m0 - m0
            for j in range(min(SUM_BLOCK, cg - b)):
                c = np.uint64(ob + j)
                hh = gf[np.uint64(go + ob + j)] * gamma[c]
                h += hh
                hx += hh * ((xf[np.uint64(xo + ob + j)] - m0) * r - c0)
            t1 += h
            t2 += hx
        # dx = r * (h - mean(h) - xhat * mean(h * xhat)) = (g * gamma) * r + k0 - k1 *
        # xhat with k0 = -r * mean(h), k1 = r * mean(h * xhat). (Folding the xhat's r into
        # k1, r * r * mean(h * xhat), underflows float32 for groups with a standard
        # deviation past ~1e19.)
        ri = rf[np.uint64(mo + g)]
        k0[g] = -ri * (t1 * inv_cnt)
        k1[g] = ri * (t2 * inv_cnt)
        a0 = k0[g]
        a1 = k1[g]
        for j in range(cg):
            c = np.uint64(o + j)
            v = np.uint64(xo + o + j)
            gv = gf[np.uint64(go + o + j)]
            xh = (xf[v] - m0) * r - c0
            df[v] = ((gv * gamma[c]) * r + a0) - a1 * xh
            acc_g[c] += gv
            acc_gx[c] += gv * xh


@task_body
def _group_rows_backward_task(k, X, dY, mean, invstd, gamma, beta, n_groups, code, alpha,
                              rows_per_chunk, dX, partial_dgamma, partial_dbeta):
    """Task ``k`` of :func:`group_backward_rows` (the ``prange`` body; see ``task_body``):
    examples ``k * rows_per_chunk`` on, and row ``k`` of the partial buffers.

    Per example (:func:`_group_rows_grad_example`), as the row backward takes a row, group
    by group: with ReLU / leaky ReLU ``g = dY * f'(z)`` formed first into an example
    buffer; each group's sums of ``h = g * gamma`` and ``h * xhat`` (``xhat = (x - m0) * r
    - c``, blocks of ``SUM_BLOCK`` in X's dtype, float64 across them); then ``dx = (h * r +
    k0) - k1 * xhat`` with ``k0 = -r * mean(h)``, ``k1 = r * mean(h * xhat)``, the loop
    that also adds ``g`` and ``g * xhat`` into per-channel accumulators of X's dtype,
    flushed into the float64 partials every ``ROW_BLOCK`` examples. Groups of 2, 4 and 8
    channels take copies with ``cg`` a constant, as in the forward."""
    N, C = X.shape
    cg = C // n_groups
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, N)
    pdg = partial_dgamma[k]
    pdb = partial_dbeta[k]
    for j in range(C):
        pdg[j] = 0.0
        pdb[j] = 0.0
    xf = X.reshape(N * C)
    gf = dY.reshape(N * C)
    df = dX.reshape(N * C)
    mf = mean.reshape(N * n_groups)
    rf = invstd.reshape(N * n_groups)
    gs = np.empty(C if code != 0 else 0, X.dtype)
    sh = np.empty(n_groups, X.dtype)  # per group: m0, r, c; k0, k1 (X's dtype)
    rr = np.empty(n_groups, X.dtype)
    cc = np.empty(n_groups, X.dtype)
    k0 = np.empty(n_groups, X.dtype)
    k1 = np.empty(n_groups, X.dtype)
    acc_g = np.empty(C, X.dtype)
    acc_gx = np.empty(C, X.dtype)
    reject_smooth(code)
    _, neg = piecewise_slopes(code, alpha, sh)
    for n0 in range(start, stop, ROW_BLOCK):
        for j in range(C):
            acc_g[j] = 0.0
            acc_gx[j] = 0.0
        for n in range(n0, min(n0 + ROW_BLOCK, stop)):
            xo = n * C
            mo = n * n_groups
            if cg == 2:
                _group_rows_grad_example(xf, gf, df, xo, mf, rf, mo, gamma, beta, 2, code, neg,
                                         gs, sh, rr, cc, k0, k1, acc_g, acc_gx)
            elif cg == 4:
                _group_rows_grad_example(xf, gf, df, xo, mf, rf, mo, gamma, beta, 4, code, neg,
                                         gs, sh, rr, cc, k0, k1, acc_g, acc_gx)
            elif cg == 8:
                _group_rows_grad_example(xf, gf, df, xo, mf, rf, mo, gamma, beta, 8, code, neg,
                                         gs, sh, rr, cc, k0, k1, acc_g, acc_gx)
            else:
                _group_rows_grad_example(xf, gf, df, xo, mf, rf, mo, gamma, beta, cg, code, neg,
                                         gs, sh, rr, cc, k0, k1, acc_g, acc_gx)
        for j in range(C):
            pdg[j] += acc_gx[j]
            pdb[j] += acc_g[j]


@kernel
def _group_backward_rows(X, dY, mean, invstd, gamma, beta, n_groups, code, alpha,
                         rows_per_chunk, dX, partial_dgamma, partial_dbeta):
    """:func:`group_backward_cl` for one position: X, dY, dX : (N, C)."""
    N, C = X.shape
    for k in prange((N + rows_per_chunk - 1) // rows_per_chunk):
        _group_rows_backward_task(np.int64(k), X, dY, mean, invstd, gamma, beta, n_groups, code,
                                  alpha, rows_per_chunk, dX, partial_dgamma, partial_dbeta)


def _loops(kern, size, N, n_groups, rows_per_chunk, groups_per_task):
    """``kern.parallel`` from ``config.GROUP_SERIAL_CUTOFF`` elements and two tasks on,
    else ``kern.serial``."""
    n_tasks = -(-N // rows_per_chunk) * -(-n_groups // groups_per_task)
    return kern.parallel if size >= config.GROUP_SERIAL_CUTOFF and n_tasks > 1 else kern.serial


def _rows_loops(kern, size, N, rows_per_chunk):
    """``kern.parallel`` from ``config.GROUP_SERIAL_CUTOFF`` elements and two chunks of
    examples on, else ``kern.serial`` (the one-position kernels)."""
    return kern.parallel if size >= config.GROUP_SERIAL_CUTOFF and N > rows_per_chunk else kern.serial


@kernel(ordered=True)
def _group_forward_cl(X, gamma, beta, n_groups, eps, code, alpha, rows_per_chunk,
                      groups_per_task, Y, mean, invstd):
    """:func:`group_forward_cl` with the block of groups per task given."""
    N, P, C = X.shape
    for t in prange(count_tiles(N, n_groups, rows_per_chunk, groups_per_task)):
        _group_forward_cl_task(np.int64(t), X, gamma, beta, n_groups, eps, code, alpha,
                               rows_per_chunk, groups_per_task, Y, mean, invstd)


@wraps_kernel(_group_forward_cl, _group_forward_rows)
def group_forward_cl(size, X, gamma, beta, n_groups, eps, code, alpha, rows_per_chunk, Y, mean,
                     invstd):
    """Y = f((X - mean_ng) * invstd_ng * gamma_c + beta_c), channels-last.

    X, Y : (N, P, C) float32/float64, C-contiguous; gamma, beta : (C,);
    mean, invstd : (N, G) float64, written (biased variance). Tasks of ``rows_per_chunk``
    examples times ``config.groups_per_task`` groups.
    """
    N, P, C = X.shape
    if P == 1:  # rows of groups (see _group_forward_rows)
        _rows_loops(_group_forward_rows, size, N, rows_per_chunk)(
            X.reshape(N, C), gamma, beta, n_groups, eps, code, alpha, rows_per_chunk,
            Y.reshape(N, C), mean, invstd)
        return
    gpt = config.groups_per_task(C, n_groups, X.dtype.itemsize)
    _loops(_group_forward_cl, size, N, n_groups, rows_per_chunk, gpt)(
        X, gamma, beta, n_groups, eps, code, alpha, rows_per_chunk, gpt, Y, mean, invstd)


@task_body(ordered=True)
def _group_backward_cl_task(t, X, dY, mean, invstd, gamma, beta, n_groups, code, alpha,
                            rows_per_chunk, groups_per_task, dX, partial_dgamma, partial_dbeta):
    """Task ``t`` of :func:`group_backward_cl` (the ``prange`` body; see ``task_body``): the
    groups ``g0:g1`` (channels ``j0:j1``) of chunk ``k`` of examples, and columns ``j0:j1``
    of row ``k`` of the partial buffers.

    In X's dtype: per-channel sums of g and g * (x - m0) (m0 the mean rounded to X's
    dtype) by :func:`~nbnet.kernels.cpu.column_stats.segment_moments`, flushed into
    float64; then sum(g * (x - mean)) = sum(g * (x - m0)) - (mean - m0) * sum(g), times
    invstd once per channel. With ReLU / leaky ReLU, both passes form ``g = dY * f'(z)``
    as they go, ``z`` recomputed from the forward's per-channel scale and shift (one
    multiply-add and a select per value: cheaper than writing ``g`` into a buffer and
    reading it twice, as round 9's kernel did). With few positions and wide groups
    (``P * _RUN_RATIO <= cg``, ``cg >= _RUN_MIN_CHANNELS``) dX is written by runs of a
    group's channels (:func:`_dx_runs`), with the per-group factors as scalars.
    """
    N, P, C = X.shape
    cg = C // n_groups
    inv_cnt = 1.0 / (P * cg)
    k, start, stop, g0, g1 = tile_of(t, N, n_groups, rows_per_chunk, groups_per_task)
    j0 = g0 * cg
    j1 = g1 * cg
    w = j1 - j0
    gm = gamma[j0:j1]
    pdg = partial_dgamma[k, j0:j1]
    pdb = partial_dbeta[k, j0:j1]
    for j in range(w):
        pdg[j] = 0.0
        pdb[j] = 0.0
    ag = np.empty(w, np.float64)      # per channel: sum(g), sum(g * xhat)
    agx = np.empty(w, np.float64)
    mh = np.empty(g1 - g0, np.float64)   # per group: mean(h), mean(h * xhat)
    mhx = np.empty(g1 - g0, np.float64)
    m0 = np.empty(w, X.dtype)
    sc = np.empty(w, X.dtype)         # the forward's scale and shift (the activation's slope)
    sh = np.empty(w, X.dtype)
    fa = np.empty(w, X.dtype)
    fb = np.empty(w, X.dtype)
    fq = np.empty(w, X.dtype)
    fr = np.empty(w, X.dtype)
    acc = np.empty(w, X.dtype)
    acc2 = np.empty(w, X.dtype)
    gb = np.empty(g1 - g0, X.dtype)   # per group: fb, fq, fr of the runs path
    gq = np.empty(g1 - g0, X.dtype)
    gr = np.empty(g1 - g0, X.dtype)
    reject_smooth(code)
    one, neg = piecewise_slopes(code, alpha, m0)
    runs = P * _RUN_RATIO <= cg and cg >= _RUN_MIN_CHANNELS
    for n in range(start, stop):
        Xn = X[n]
        Gn = dY[n]
        Dn = dX[n]
        mn = mean[n, g0:g1]
        rn = invstd[n, g0:g1]
        _group_affine(mn, rn, cg, gm, beta[j0:j1], m0, sc, sh)
        for j in range(w):
            ag[j] = 0.0
            agx[j] = 0.0
        if code == 0:
            segment_moments(Xn, Gn, 1, 0, P, j0, j1, m0, sc, sh, one, neg, acc, acc2, ag, agx)
        else:
            segment_moments(Xn, Gn, 2, 0, P, j0, j1, m0, sc, sh, one, neg, acc, acc2, ag, agx)
        for g in range(g1 - g0):  # sum(g * (x - mean)) * invstd, per group's channels
            r = rn[g]
            dm = mn[g] - m0[g * cg]
            for j in range(cg):
                c = np.uint64(g * cg + j)
                agx[c] = (agx[c] - dm * ag[c]) * r
                pdg[c] += agx[c]
                pdb[c] += ag[c]
        # per-group sums of h = g * gamma and h * xhat
        _group_dots(gm, ag, agx, cg, mh, mhx)
        # dx = rc * (g * gamma - mh - xhat * mhx) = g * a + b - ((x - m0) * rc) * q,
        # q = rc * mhx, with x - mean = (x - m0) - (mean - m0) and the float64
        # remainder folded into b. (rc * q as one factor underflows float32 for
        # groups with a standard deviation past ~1e19.)
        for g in range(g1 - g0):
            r = rn[g]
            q = r * (mhx[g] * inv_cnt)
            b = (mn[g] - m0[g * cg]) * r * q - r * (mh[g] * inv_cnt)
            for j in range(cg):
                c = np.uint64(g * cg + j)
                fa[c] = r * gm[c]
            if runs:  # the group's factors as scalars of X's dtype: the same roundings
                gb[g] = b
                gq[g] = q
                gr[g] = r
            else:
                for j in range(cg):
                    c = np.uint64(g * cg + j)
                    fb[c] = b
                    fq[c] = q
                    fr[c] = r
        if runs:  # few positions, wide groups: the output by runs of a group's channels
            _dx_runs(Xn, Gn, Dn, j0, cg, m0, fa, gb, gq, gr, sc, sh, code, neg)
            continue
        for p in range(P):
            if code == 0:
                for j in range(w):
                    c = np.uint64(j0 + j)
                    Dn[p, c] = (Gn[p, c] * fa[j] + fb[j]) - ((Xn[p, c] - m0[j]) * fr[j]) * fq[j]
            else:
                for j in range(w):
                    c = np.uint64(j0 + j)
                    d = Xn[p, c] - m0[j]
                    z = d * sc[j] + sh[j]
                    gv = Gn[p, c] if z > 0.0 else Gn[p, c] * (neg + (z - z))
                    Dn[p, c] = (gv * fa[j] + fb[j]) - (d * fr[j]) * fq[j]


@helper
def _dx_runs(Xn, Gn, Dn, j0, cg, m0, fa, gb, gq, gr, sc, sh, code, neg):
    """The channels-last backward's output for one example by runs: for each position and
    group, ``dx = (g * fa + b) - ((x - m0) * r) * q`` over the group's ``cg`` contiguous
    channels, with ``b, q, r`` the group's scalars (``gb, gq, gr``, X's dtype) and ``fa``,
    ``m0``, ``sc``, ``sh`` the block's per-channel arrays. The per-channel path reads six
    arrays per value; with a few positions their fills and reads cost more than the
    data."""
    P = Xn.shape[0]
    for p in range(P):
        for g in range(gb.shape[0]):
            a = g * cg
            mg = m0[a]
            b = gb[g]
            q = gq[g]
            r = gr[g]
            if code == 0:
                for j in range(cg):
                    i = np.uint64(a + j)
                    c = np.uint64(j0 + a + j)
                    Dn[p, c] = (Gn[p, c] * fa[i] + b) - ((Xn[p, c] - mg) * r) * q
            else:
                for j in range(cg):
                    i = np.uint64(a + j)
                    c = np.uint64(j0 + a + j)
                    d = Xn[p, c] - mg
                    z = d * sc[i] + sh[i]
                    gv = Gn[p, c] if z > 0.0 else Gn[p, c] * (neg + (z - z))
                    Dn[p, c] = (gv * fa[i] + b) - (d * r) * q


@kernel(ordered=True)
def _group_backward_cl(X, dY, mean, invstd, gamma, beta, n_groups, code, alpha, rows_per_chunk,
                       groups_per_task, dX, partial_dgamma, partial_dbeta):
    """:func:`group_backward_cl` with the block of groups per task given."""
    N, P, C = X.shape
    for t in prange(count_tiles(N, n_groups, rows_per_chunk, groups_per_task)):
        _group_backward_cl_task(np.int64(t), X, dY, mean, invstd, gamma, beta, n_groups,
                                code, alpha, rows_per_chunk, groups_per_task, dX,
                                partial_dgamma, partial_dbeta)


@wraps_kernel(_group_backward_cl, _group_backward_rows)
def group_backward_cl(size, X, dY, mean, invstd, gamma, beta, n_groups, code, alpha,
                      rows_per_chunk, dX, partial_dgamma, partial_dbeta):
    """Input gradient per example; parameter-gradient partials per chunk (channels-last).

    With ``xhat = (x - mean_ng) * invstd_ng``, ``g = dY * f'(xhat * gamma + beta)`` and
    ``h = g * gamma``, over the ``M = P * cg`` values of each group:

        dx = invstd_ng * (h - mean(h) - xhat * mean(h * xhat))

    Both group means come from per-channel sums ``sum_p g`` and ``sum_p g * xhat``
    (``mean(h) = sum_c gamma_c * sum_p g / M``), which are also what the parameter
    gradients need: ``partial_dgamma[k, c] = sum of g * xhat``, ``partial_dbeta[k, c] =
    sum of g`` over the chunk's examples (``rows_per_chunk`` of them; the partials have
    one row per chunk).
    """
    N, P, C = X.shape
    if P == 1:  # rows of groups (see _group_backward_rows)
        _rows_loops(_group_backward_rows, size, N, rows_per_chunk)(
            X.reshape(N, C), dY.reshape(N, C), mean, invstd, gamma, beta, n_groups, code, alpha,
            rows_per_chunk, dX.reshape(N, C), partial_dgamma, partial_dbeta)
        return
    gpt = config.groups_per_task(C, n_groups, X.dtype.itemsize)
    _loops(_group_backward_cl, size, N, n_groups, rows_per_chunk, gpt)(
        X, dY, mean, invstd, gamma, beta, n_groups, code, alpha, rows_per_chunk, gpt, dX,
        partial_dgamma, partial_dbeta)


@subroutine
def _block_grad_sums(Xf, Gf, gs, o, L, cg, m0, act, sg, sgd):
    """``sg[c], sgd[c] = (sum(g), sum(g * (x - m0[c // cg])))`` for each channel ``c`` of
    a block of groups (``len(m0)`` groups of ``cg`` channels, runs of ``L`` values from
    flat offset ``o``; with ``act``, ``g`` from ``gs[c * L:]``):
    :func:`~nbnet.kernels.cpu.column_stats.run_grad_sums` compiled with "reassoc"
    (vectorised reductions) for the ``ordered`` channels-first backward. One call per
    example and block of groups, not per channel: a call costs about as much as the sums
    of a short run (its arrays are passed field by field). GroupNorm(32) (256,512,4,4)
    float32 training step 2.06-2.2 -> 1.5-1.7 ms on the 2-core reference machine."""
    for i in range(m0.shape[0]):
        mc = m0[i]
        for c in range(i * cg, (i + 1) * cg):
            sg[c], sgd[c] = run_grad_sums(Xf, Gf, gs, c * L, o + c * L, L, mc, act)


@task_body(ordered=True)
def _group_forward_cf_task(t, X, gamma, beta, n_groups, eps, code, alpha, rows_per_chunk,
                           groups_per_task, Y, mean, invstd):
    """Task ``t`` of :func:`group_forward_cf` (the ``prange`` body; see ``task_body``): the
    groups ``g0:g1`` of a chunk of examples (:func:`~nbnet.kernels.cpu.column_stats.
    tile_of`); group ``g`` of example ``n`` is the ``cg * L`` contiguous values at flat
    offset ``o``.

    Statistics in one pass of shifted moments around the group's first value
    (:func:`_run_moments`: input-dtype blocks, float64 across them), a second around the
    mean when that shift was more than ``SHIFT_LIMIT`` standard deviations off; the
    output ``(x - m0) * a + b`` in X's dtype per channel run (``m0`` the mean rounded to
    X's dtype, ``a = invstd * gamma``, ``b = beta - (mean - m0) * a``: the channels-last
    kernels' factors, so both layouts agree)."""
    N, C, L = X.shape
    cg = C // n_groups
    inv_cnt = 1.0 / (L * cg)
    k, start, stop, g0, g1 = tile_of(t, N, n_groups, rows_per_chunk, groups_per_task)
    Xf = X.reshape(-1)
    Yf = Y.reshape(-1)
    f = np.empty(3, X.dtype)  # values rounded to X's dtype
    reject_smooth(code)
    _, neg = piecewise_slopes(code, alpha, f)
    for n in range(start, stop):
        for g in range(g0, g1):
            o = (n * C + g * cg) * L
            x0 = Xf[np.uint64(o)]
            for attempt in range(2):
                s1, s2 = _run_moments(Xf, o, cg * L, x0)
                m, m2, far = shifted_result(np.float64(x0), s1, s2, inv_cnt)
                if not far:
                    break
                f[0] = m  # again, around the mean just found
                x0 = f[0]
            r = 1.0 / math.sqrt(m2 * inv_cnt + eps)
            mean[n, g] = m
            invstd[n, g] = r
            f[0] = m
            mc = f[0]
            rem = m - mc
            for c in range(g * cg, (g + 1) * cg):
                sc = r * gamma[c]
                f[1] = sc
                f[2] = beta[c] - rem * sc
                cf_normalize_run(Xf, Yf, o + (c - g * cg) * L, L, mc, f[1], f[2], code, neg)


@kernel(ordered=True)
def _group_forward_cf(X, gamma, beta, n_groups, eps, code, alpha, rows_per_chunk,
                      groups_per_task, Y, mean, invstd):
    """:func:`group_forward_cf` with its tasks' sizes given."""
    N, C, L = X.shape
    for t in prange(count_tiles(N, n_groups, rows_per_chunk, groups_per_task)):
        _group_forward_cf_task(np.int64(t), X, gamma, beta, n_groups, eps, code, alpha,
                               rows_per_chunk, groups_per_task, Y, mean, invstd)


@wraps_kernel(_group_forward_cf)
def group_forward_cf(size, X, gamma, beta, n_groups, eps, code, alpha, Y, mean, invstd):
    """Channels-first twin of :func:`group_forward_cl`: X, Y : (N, C, L).

    Tasks of a chunk of examples times a block of groups, about ``config.CHUNK_BYTES``
    (``config.cf_group_tiling``); each group's ``cg * L`` values are contiguous, read
    once from memory and once more from cache.
    """
    N, C, L = X.shape
    rpc, gpt = config.cf_group_tiling(N, C * L, n_groups, X.dtype.itemsize)
    _loops(_group_forward_cf, size, N, n_groups, rpc, gpt)(
        X, gamma, beta, n_groups, eps, code, alpha, rpc, gpt, Y, mean, invstd)


@task_body(ordered=True)
def _group_backward_cf_task(t, X, dY, mean, invstd, gamma, beta, n_groups, code, alpha,
                            rows_per_chunk, groups_per_task, dX, partial_dgamma,
                            partial_dbeta):
    """Task ``t`` of :func:`group_backward_cf` (the ``prange`` body; see ``task_body``):
    the groups ``g0:g1`` (channels ``j0:`` on) of chunk ``k`` of examples, and those
    columns of row ``k`` of the partial buffers.

    Per channel run, in X's dtype with the forward's factors: ``sum(g)`` and ``sum(g * (x
    - m0))`` (:func:`_block_grad_sums`, one call per example and block), then ``sum(g *
    xhat) = (sum(g * (x - m0)) - (mean - m0) * sum(g)) * invstd``; with ReLU / leaky ReLU
    ``g = dY * f'(z)`` formed first into the block's buffer (``z`` as the forward forms
    it), which the dx pass reads too. Then ``dx = (g * a + b) - ((x - m0) * r) * q`` as the channels-last
    kernel forms it."""
    N, C, L = X.shape
    cg = C // n_groups
    inv_cnt = 1.0 / (L * cg)
    k, start, stop, g0, g1 = tile_of(t, N, n_groups, rows_per_chunk, groups_per_task)
    for c in range(g0 * cg, g1 * cg):
        partial_dgamma[k, c] = 0.0
        partial_dbeta[k, c] = 0.0
    Xf = X.reshape(-1)
    Gf = dY.reshape(-1)
    Df = dX.reshape(-1)
    f = np.empty(6, X.dtype)  # values rounded to X's dtype
    w = (g1 - g0) * cg
    m0 = np.empty(g1 - g0, X.dtype)  # the block's group means rounded to X's dtype
    gs = np.empty(w * L if code != 0 else 0, X.dtype)  # the block's dY * f'(z)
    sg = np.empty(w, np.float64)  # per channel of the block: sum(g), sum(g * (x - m0))
    sgd = np.empty(w, np.float64)
    reject_smooth(code)
    _, neg = piecewise_slopes(code, alpha, f)
    act = code != 0
    j0 = g0 * cg
    for n in range(start, stop):
        o0 = (n * C + j0) * L  # the block's first run
        for i in range(g1 - g0):  # the group means in X's dtype, and with act g = dY * f'(z)
            m = mean[n, g0 + i]
            m0[i] = m
            if act:
                r = invstd[n, g0 + i]
                rem = m - m0[i]
                for c in range(i * cg, (i + 1) * cg):
                    sc = r * gamma[j0 + c]
                    f[1] = sc
                    f[2] = beta[j0 + c] - rem * sc
                    cf_slope_run(Xf, Gf, o0 + c * L, L, m0[i], f[1], f[2], neg,
                                 gs[c * L:(c + 1) * L])
        _block_grad_sums(Xf, Gf, gs, o0, L, cg, m0, act, sg, sgd)
        for g in range(g0, g1):
            c0 = g * cg
            m = mean[n, g]
            r = invstd[n, g]
            mc = m0[g - g0]
            rem = m - mc
            o = (n * C + c0) * L
            s_h = 0.0
            s_hx = 0.0
            for c in range(c0, c0 + cg):
                u = c - j0
                sgx = (sgd[u] - rem * sg[u]) * r
                partial_dgamma[k, c] += sgx
                partial_dbeta[k, c] += sg[u]
                s_h += gamma[c] * sg[u]
                s_hx += gamma[c] * sgx
            # dx = r * (g * gamma - mean(h) - xhat * mean(h * xhat)) = (g * a + b) - ((x - m0)
            # * r) * q, q = r * mean(h * xhat), the float64 remainder folded into b (r * q as
            # one factor underflows float32 for groups with a standard deviation past ~1e19)
            q = r * (s_hx * inv_cnt)
            f[3] = rem * r * q - r * (s_h * inv_cnt)
            f[4] = r
            f[5] = q
            fb = f[3]
            fr = f[4]
            fq = f[5]
            for c in range(c0, c0 + cg):
                oc = o + (c - c0) * L
                f[1] = r * gamma[c]
                fa = f[1]
                if act:  # g = dY * f'(z) from the buffer
                    gb = (c - j0) * L
                    for j in range(L):
                        v = np.uint64(oc + j)
                        Df[v] = (gs[np.uint64(gb + j)] * fa + fb) - ((Xf[v] - mc) * fr) * fq
                else:
                    for j in range(L):
                        v = np.uint64(oc + j)
                        Df[v] = (Gf[v] * fa + fb) - ((Xf[v] - mc) * fr) * fq


@kernel(ordered=True)
def _group_backward_cf(X, dY, mean, invstd, gamma, beta, n_groups, code, alpha, rows_per_chunk,
                       groups_per_task, dX, partial_dgamma, partial_dbeta):
    """:func:`group_backward_cf` with its tasks' blocks of groups given."""
    N, C, L = X.shape
    for t in prange(count_tiles(N, n_groups, rows_per_chunk, groups_per_task)):
        _group_backward_cf_task(np.int64(t), X, dY, mean, invstd, gamma, beta, n_groups,
                                code, alpha, rows_per_chunk, groups_per_task, dX,
                                partial_dgamma, partial_dbeta)


@wraps_kernel(_group_backward_cf)
def group_backward_cf(size, X, dY, mean, invstd, gamma, beta, n_groups, code, alpha,
                      rows_per_chunk, dX, partial_dgamma, partial_dbeta):
    """Channels-first twin of :func:`group_backward_cl`: X, dY, dX : (N, C, L).

    Tasks of a chunk of ``rows_per_chunk`` examples times a block of groups (about
    ``config.CHUNK_BYTES``, ``config.cf_group_tiling``); a task owns its groups' columns of
    row ``k`` of the partial buffers.
    """
    N, C, L = X.shape
    _, gpt = config.cf_group_tiling(rows_per_chunk, C * L, n_groups, X.dtype.itemsize)
    _loops(_group_backward_cf, size, N, n_groups, rows_per_chunk, gpt)(
        X, dY, mean, invstd, gamma, beta, n_groups, code, alpha, rows_per_chunk, gpt, dX,
        partial_dgamma, partial_dbeta)


KERNELS = {
    "group_forward_cl": group_forward_cl,
    "group_backward_cl": group_backward_cl,
    "group_forward_cf": group_forward_cf,
    "group_backward_cf": group_backward_cf,
}

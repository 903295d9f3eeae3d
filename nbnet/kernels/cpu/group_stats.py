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

Numerics: float64 accumulation, never E[x^2] - E[x]^2 (for float32 data of mean 1e4 and
unit variance that form keeps no correct digit of the variance). Channels-first groups
take two passes over the cached group (mean, then squared deviations around it);
channels-last examples take one pass of moments shifted by each group's first value,
and a second around the found mean when that shift was more than ``SHIFT_LIMIT``
standard deviations off (see :func:`_group_forward_cl_task`).

Channels-last kernels compute in the input's dtype the way the column kernels do (see
:mod:`~nbnet.kernels.cpu.column_stats`): per-channel block accumulators of the input's
dtype flushed into float64 every ``ROW_BLOCK`` passes (a pass adds one tile from each of
four segments of the example, see :func:`_channel_sums`), and the group mean subtracted
as ``x - m0`` (``m0`` the mean rounded to X's dtype) with the float64 remainder ``mean -
m0`` folded into per-channel constants; they compile with ``ordered=True``.

NaN containment: a NaN anywhere in group ``g`` of example ``n`` makes ``mean[n, g]``,
``invstd[n, g]`` and that group's outputs NaN; other groups and examples stay finite.
"""
import math

import numpy as np
from numba import prange

from ._jit import helper, kernel, task_body
from .activations import piecewise_slopes, reject_smooth
from .block_sums import ROW_BLOCK, rescue_columns, shifted_result


#: Values per tile in the channels-last kernels (a whole number of positions, see
#: _group_forward_cl_task).
_TILE = 512

#: Segments of an example's tiles that :func:`_channel_sums` walks side by side (the
#: pass is written out for four).
_STREAMS = 4


@helper
def _tile(src, dst):
    """dst[t * C + c] = src[c] for every whole copy of ``src`` (length C) in ``dst``."""
    C = src.shape[0]
    for t in range(dst.shape[0] // C):
        d = dst[t * C:(t + 1) * C]
        for c in range(C):
            d[c] = src[c]


@helper
def _fold(src, dst):
    """dst[c] = sum over t of src[t * C + c] (float64), for a tiled accumulator."""
    C = dst.shape[0]
    for c in range(C):
        dst[c] = 0.0
    for t in range(src.shape[0] // C):
        s = src[t * C:(t + 1) * C]
        for c in range(C):
            dst[c] += s[c]


@helper
def _channel_sums(xf, gf, mode, P, C, kp, m0, m0_t, sc, sc_t, sh, sh_t, neg, blk, blk2, acc_t,
                  acc2_t, acc, acc2):
    """Per-channel sums of one example (``xf``, ``gf``: P positions of C channels, flat),
    float64, into ``acc`` and ``acc2``: with ``d = x - m0``,

    * ``mode`` 0 (the forward's shifted moments): ``sum(d)`` and ``sum(d**2)`` (``gf``,
      ``sc``, ``sh`` and ``neg`` are not read);
    * ``mode`` 1 (the backward): ``sum(g)`` and ``sum(g * d)``, ``g`` the values of ``gf``;
    * ``mode`` 2 (the backward through ReLU / leaky ReLU): the same with ``g = gf *
      f'(z)``, ``z = d * sc + sh`` the forward's pre-activation (formed as
      :func:`_affine_tiles` forms it, so a slope agrees with its output) and ``neg`` the
      slope left of 0, as a select; a NaN ``z`` gives a NaN ``g``.

    In X's dtype over tiles of ``kp`` positions (``m0_t``, ``sc_t``, ``sh_t``: the
    per-channel factors tiled ``kp`` times): the example's whole tiles split into
    ``_STREAMS`` equal segments, walked side by side, one tile of each per pass, so every
    accumulator load and store serves ``_STREAMS`` values; blocks of ``ROW_BLOCK`` passes
    are flushed into float64. Then the tiles past the segments one at a time, and the
    positions past the last whole tile. ``mode`` is a constant at each call site, so the
    selects fold away and each caller gets the loop it would have written alone.

    Why segments: a pass of one tile at a time is bound by its two accumulator
    load-add-store streams, not by memory (GroupNorm(32) (32,32,32,64) float32 forward
    on the 2-core reference machine: statistics 137 us, the output pass 130 us, a copy of
    X 206 us). Four *adjacent* tiles per pass were as fast in cache but 1.4-1.6x slower
    from DRAM (each 2 KiB stream ends before the prefetcher has learnt it); four
    segments are four long sequential streams, and the statistics pass is 2x faster in
    cache and from DRAM alike (137 -> 66 us at (32,32,32,64), 720 -> 420 us at
    (128,32,32,64), prototype loops, 2 threads).
    """
    W = kp * C
    n_tiles = P // kp
    q = n_tiles // _STREAMS           # tiles per segment
    for j in range(W):
        acc_t[j] = 0.0
        acc2_t[j] = 0.0
    for t0 in range(0, q, ROW_BLOCK):
        for j in range(W):
            blk[j] = 0.0
            blk2[j] = 0.0
        for t in range(t0, min(t0 + ROW_BLOCK, q)):
            a = t * W
            b = a + q * W
            c = b + q * W
            e = c + q * W
            x0 = xf[a:a + W]
            x1 = xf[b:b + W]
            x2 = xf[c:c + W]
            x3 = xf[e:e + W]
            g0 = gf[a:a + W]
            g1 = gf[b:b + W]
            g2 = gf[c:c + W]
            g3 = gf[e:e + W]
            for j in range(W):
                m = m0_t[j]
                d0 = x0[j] - m
                d1 = x1[j] - m
                d2 = x2[j] - m
                d3 = x3[j] - m
                if mode == 0:
                    h0, h1, h2, h3 = d0, d1, d2, d3
                else:
                    h0 = g0[j]
                    h1 = g1[j]
                    h2 = g2[j]
                    h3 = g3[j]
                    if mode == 2:
                        s = sc_t[j]
                        f = sh_t[j]
                        z0 = d0 * s + f
                        z1 = d1 * s + f
                        z2 = d2 * s + f
                        z3 = d3 * s + f
                        h0 = h0 if z0 > 0.0 else h0 * (neg + (z0 - z0))
                        h1 = h1 if z1 > 0.0 else h1 * (neg + (z1 - z1))
                        h2 = h2 if z2 > 0.0 else h2 * (neg + (z2 - z2))
                        h3 = h3 if z3 > 0.0 else h3 * (neg + (z3 - z3))
                blk[j] += (h0 + h1) + (h2 + h3)
                blk2[j] += (h0 * d0 + h1 * d1) + (h2 * d2 + h3 * d3)
        for j in range(W):
            acc_t[j] += blk[j]
            acc2_t[j] += blk2[j]
    for j in range(W):
        blk[j] = 0.0
        blk2[j] = 0.0
    for t in range(_STREAMS * q, n_tiles):  # fewer than _STREAMS tiles: one block
        _tile_sums(xf[t * W:(t + 1) * W], gf[t * W:(t + 1) * W], mode, m0_t, sc_t, sh_t, neg,
                   blk, blk2)
    for j in range(W):
        acc_t[j] += blk[j]
        acc2_t[j] += blk2[j]
    _fold(acc_t, acc)
    _fold(acc2_t, acc2)
    for p in range(n_tiles * kp, P):
        _tile_sums(xf[p * C:(p + 1) * C], gf[p * C:(p + 1) * C], mode, m0, sc, sh, neg, acc,
                   acc2)


@helper
def _tile_sums(xs, gs, mode, m0, sc, sh, neg, acc, acc2):
    """``acc += h``, ``acc2 += h * d`` over one tile (or one position: factors of the
    tile's length), ``d = xs - m0`` and ``h`` as in :func:`_channel_sums`."""
    for j in range(m0.shape[0]):
        d = xs[j] - m0[j]
        if mode == 0:
            h = d
        else:
            h = gs[j]
            if mode == 2:
                z = d * sc[j] + sh[j]
                h = h if z > 0.0 else h * (neg + (z - z))
        acc[j] += h
        acc2[j] += h * d


@helper
def _group_affine(mc, inv, cg, gamma, beta, m0, scale, shift):
    """Per-channel factors of the output ``z = (x - m0) * scale + shift`` of one example:
    ``m0`` the group mean ``mc`` rounded to X's dtype, ``scale = invstd * gamma`` and
    ``shift = beta - (mean - m0) * scale`` (the float64 remainder folded in; see
    column_stats._affine_factors). ``inv``: the example's invstd per group. The forward
    and the activation slopes of the backward both take them from here, so a slope
    always agrees with the output it belongs to."""
    for c in range(mc.shape[0]):
        m0[c] = mc[c]
        sc = inv[c // cg] * gamma[c]
        scale[c] = sc
        shift[c] = beta[c] - (mc[c] - m0[c]) * sc


@helper
def _affine_tiles(xf, yf, m0_t, scale_t, shift_t, code, neg):
    """``yf = f((xf - m0_t) * scale_t + shift_t)`` over whole tiles of ``W = len(m0_t)``
    values, the factors repeating every tile; ``f`` the identity (``code`` 0) or ReLU /
    leaky ReLU as a select in X's dtype (``neg`` the slope left of 0).

    One tile at a time, in memory order. (Two or four adjacent tiles per pass over the
    factors and accumulators halve their loads and stores: 10-20% faster while the input
    sits in the caches, but 15-35% slower when it streams from DRAM, (128,32,32,64) float32
    on the 2-core reference machine, so the hardware prefetcher keeps its one stream.)
    """
    W = m0_t.shape[0]
    for t in range(xf.shape[0] // W):
        xs = xf[t * W:(t + 1) * W]
        ys = yf[t * W:(t + 1) * W]
        if code == 0:
            for j in range(W):
                ys[j] = (xs[j] - m0_t[j]) * scale_t[j] + shift_t[j]
        else:
            for j in range(W):
                z = (xs[j] - m0_t[j]) * scale_t[j] + shift_t[j]
                ys[j] = z if z > 0.0 else z * neg  # z * neg keeps NaN a NaN


@task_body(ordered=True)
def _group_forward_cl_task(k, X, gamma, beta, n_groups, eps, code, alpha, rows_per_chunk,
                           Y, mean, invstd):
    """Task ``k`` of :func:`group_forward_cl` (the ``prange`` body; see ``task_body``).

    An example's ``(P, C)`` values are walked as *tiles* of ``kp`` consecutive positions
    (``W = kp * C`` contiguous values, about ``_TILE``) with the per-channel factors and
    accumulators tiled ``kp`` times, so the inner loops run ``W`` long instead of ``C``
    (with C = 64 loop overhead bounded the short loops: GroupNorm(32) (32,32,32,64)
    float32 forward on 2 cores 0.50 -> 0.41 ms). Positions past the last whole tile take
    the per-position loops.

    Statistics in one pass: shifted moments around the group's first value, ``d = x -
    x0``: ``mean = x0 + sum(d) / n`` and ``M2 = sum(d^2) - sum(d)^2 / n`` are exact for any
    shift, and lose only ~``(1 + K^2)`` float32 roundings of M2 when the shift is ``K``
    standard deviations from the mean. A value drawn from the group is a few standard
    deviations away at most, as a rule; when some group's shift is more than
    ``SHIFT_LIMIT`` away (a constant border, an outlier first pixel) the example's
    moments are taken again around the mean just found, as the two-pass form would.
    (Two passes every time cost 15-20% more: GroupNorm(32) (32,32,32,64) float32 forward
    0.39 -> 0.32 ms on the 2-core reference machine.)
    """
    N, P, C = X.shape
    cg = C // n_groups
    inv_cnt = 1.0 / (P * cg)
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, N)
    kp = max(1, min(P, _TILE // C))
    W = kp * C
    n_tiles = P // kp
    tail = n_tiles * kp
    blk = np.empty(W, X.dtype)        # tiled block accumulators in X's dtype
    blk2 = np.empty(W, X.dtype)
    acc_t = np.empty(W, np.float64)   # tiled float64 accumulators
    acc2_t = np.empty(W, np.float64)
    acc = np.empty(C, np.float64)
    acc2 = np.empty(C, np.float64)
    mc = np.empty(C, np.float64)      # the group mean, per channel
    m0 = np.empty(C, X.dtype)         # the shift in X's dtype, per channel
    scale = np.empty(C, X.dtype)      # invstd * gamma, per channel
    shift = np.empty(C, X.dtype)      # beta - (mean - m0) * scale
    m0_t = np.empty(W, X.dtype)
    scale_t = np.empty(W, X.dtype)
    shift_t = np.empty(W, X.dtype)
    reject_smooth(code)
    _, neg = piecewise_slopes(code, alpha, m0)
    for n in range(start, stop):
        xf = X[n].reshape(P * C)
        yf = Y[n].reshape(P * C)
        for g in range(n_groups):  # shift: the group's first value
            for c in range(g * cg, (g + 1) * cg):
                m0[c] = xf[g * cg]
        for attempt in range(2):
            _tile(m0, m0_t)
            _channel_sums(xf, xf, 0, P, C, kp, m0, m0_t, m0, m0_t, m0, m0_t, neg, blk, blk2,
                          acc_t, acc2_t, acc, acc2)
            rescue_columns(xf.reshape(P, C), 0, P, 0, m0, acc, acc2)  # overflowed float32 squares
            far = False
            for g in range(n_groups):
                sd = 0.0
                sdd = 0.0
                for c in range(g * cg, (g + 1) * cg):
                    sd += acc[c]
                    sdd += acc2[c]
                m, m2, far_g = shifted_result(np.float64(m0[g * cg]), sd, sdd, inv_cnt)
                far = far or far_g
                mean[n, g] = m
                invstd[n, g] = 1.0 / math.sqrt(m2 * inv_cnt + eps)
                for c in range(g * cg, (g + 1) * cg):
                    mc[c] = m
            if not far:
                break
            for c in range(C):  # again, around the mean just found
                m0[c] = mc[c]
        # pass 3: normalise, affine, activation
        _group_affine(mc, invstd[n], cg, gamma, beta, m0, scale, shift)
        _tile(m0, m0_t)
        _tile(scale, scale_t)
        _tile(shift, shift_t)
        _affine_tiles(xf[:tail * C], yf[:tail * C], m0_t, scale_t, shift_t, code, neg)
        for p in range(tail, P):
            _affine_tiles(xf[p * C:(p + 1) * C], yf[p * C:(p + 1) * C], m0, scale, shift, code,
                          neg)


@kernel(ordered=True)
def group_forward_cl(X, gamma, beta, n_groups, eps, code, alpha, rows_per_chunk, Y, mean,
                     invstd):
    """Y = f((X - mean_ng) * invstd_ng * gamma_c + beta_c), channels-last.

    X, Y : (N, P, C) float32/float64, C-contiguous; gamma, beta : (C,);
    mean, invstd : (N, G) float64, written (biased variance).
    """
    N, P, C = X.shape
    n_chunks = (N + rows_per_chunk - 1) // rows_per_chunk
    for k in prange(n_chunks):
        _group_forward_cl_task(np.int64(k), X, gamma, beta, n_groups, eps, code, alpha,
                               rows_per_chunk, Y, mean, invstd)


@helper
def _dx_tiles(xf, gf, dxf, act, m0_t, sc_t, sh_t, neg, fa_t, fb_t, fr_t, fq_t):
    """``dx = (g * fa + fb) - ((x - m0) * fr) * fq`` over whole tiles of ``len(m0_t)``
    values, the per-channel factors tiled (see :func:`_group_backward_cl_task`); ``g`` the
    values of ``gf``, or with ``act`` (ReLU / leaky ReLU) ``gf * f'(z)``, ``z = (x - m0) *
    sc + sh`` formed as the forward forms it (``neg`` the slope left of 0; NaN where ``z``
    is NaN)."""
    W = m0_t.shape[0]
    for t in range(xf.shape[0] // W):
        xs = xf[t * W:(t + 1) * W]
        gs = gf[t * W:(t + 1) * W]
        ds = dxf[t * W:(t + 1) * W]
        if act:
            for j in range(W):
                d = xs[j] - m0_t[j]
                z = d * sc_t[j] + sh_t[j]
                g = gs[j] if z > 0.0 else gs[j] * (neg + (z - z))
                ds[j] = (g * fa_t[j] + fb_t[j]) - (d * fr_t[j]) * fq_t[j]
        else:
            for j in range(W):
                ds[j] = (gs[j] * fa_t[j] + fb_t[j]) - ((xs[j] - m0_t[j]) * fr_t[j]) * fq_t[j]


@task_body(ordered=True)
def _group_backward_cl_task(k, X, dY, mean, invstd, gamma, beta, n_groups, code, alpha,
                            rows_per_chunk, dX, partial_dgamma, partial_dbeta):
    """Task ``k`` of :func:`group_backward_cl` (the ``prange`` body; see ``task_body``).

    In X's dtype: sums of g and g * (x - m0) per block of tiles (m0 the mean rounded to
    X's dtype), flushed into float64; then sum(g * (x - mean)) = sum(g * (x - m0)) -
    (mean - m0) * sum(g), times invstd once per channel. Both passes walk the example in
    the forward's tiles of ``kp`` positions (inner loops ``kp * C`` long, the per-channel
    factors and accumulators tiled; per position, C = 64 loops were bound by their own
    overhead). With ReLU / leaky ReLU, both passes form ``g = dY * f'(z)`` as they go,
    ``z`` recomputed from the forward's per-channel scale and shift (one multiply-add and
    a select per value: cheaper than writing ``g`` of the whole example into a buffer and
    reading it twice, as round 9's kernel did; and a per-position float64 path before
    that made GroupNorm(32, relu) training 1.9x the identity's).
    """
    N, P, C = X.shape
    cg = C // n_groups
    inv_cnt = 1.0 / (P * cg)
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, N)
    pdg = partial_dgamma[k]
    pdb = partial_dbeta[k]
    for c in range(C):
        pdg[c] = 0.0
        pdb[c] = 0.0
    kp = max(1, min(P, _TILE // C))
    W = kp * C
    tail = (P // kp) * kp
    mc = np.empty(C, np.float64)
    rc = np.empty(C, np.float64)
    ag = np.empty(C, np.float64)
    agx = np.empty(C, np.float64)
    m0 = np.empty(C, X.dtype)
    sc = np.empty(C, X.dtype)         # the forward's scale and shift, per channel
    sh = np.empty(C, X.dtype)
    fa = np.empty(C, X.dtype)
    fb = np.empty(C, X.dtype)
    fq = np.empty(C, X.dtype)
    fr = np.empty(C, X.dtype)
    blk = np.empty(W, X.dtype)        # tiled block accumulators in X's dtype
    blk2 = np.empty(W, X.dtype)
    acc_t = np.empty(W, np.float64)   # tiled float64 accumulators
    acc2_t = np.empty(W, np.float64)
    m0_t = np.empty(W, X.dtype)
    sc_t = np.empty(W, X.dtype)
    sh_t = np.empty(W, X.dtype)
    fa_t = np.empty(W, X.dtype)
    fb_t = np.empty(W, X.dtype)
    fq_t = np.empty(W, X.dtype)
    fr_t = np.empty(W, X.dtype)
    reject_smooth(code)
    _, neg = piecewise_slopes(code, alpha, m0)
    act = code != 0
    for n in range(start, stop):
        xf = X[n].reshape(P * C)
        gy = dY[n].reshape(P * C)
        dxf = dX[n].reshape(P * C)
        for g in range(n_groups):
            for c in range(g * cg, (g + 1) * cg):
                mc[c] = mean[n, g]
                rc[c] = invstd[n, g]
        # m0, and the forward's scale and shift (for the activation's slope)
        _group_affine(mc, invstd[n], cg, gamma, beta, m0, sc, sh)
        _tile(m0, m0_t)
        if act:
            _tile(sc, sc_t)
            _tile(sh, sh_t)
            _channel_sums(xf, gy, 2, P, C, kp, m0, m0_t, sc, sc_t, sh, sh_t, neg, blk, blk2,
                          acc_t, acc2_t, ag, agx)
        else:
            _channel_sums(xf, gy, 1, P, C, kp, m0, m0_t, sc, sc_t, sh, sh_t, neg, blk, blk2,
                          acc_t, acc2_t, ag, agx)
        for c in range(C):
            agx[c] = (agx[c] - (mc[c] - m0[c]) * ag[c]) * rc[c]
        for c in range(C):
            pdg[c] += agx[c]
            pdb[c] += ag[c]
        # per-group means of h and h * xhat, spread back per channel (reuse ag/agx)
        for g in range(n_groups):
            s_h = 0.0
            s_hx = 0.0
            for c in range(g * cg, (g + 1) * cg):
                s_h += gamma[c] * ag[c]
                s_hx += gamma[c] * agx[c]
            for c in range(g * cg, (g + 1) * cg):
                ag[c] = s_h * inv_cnt
                agx[c] = s_hx * inv_cnt
        # dx = rc * (g * gamma - mh - xhat * mhx) = g * a + b - ((x - m0) * rc) * q,
        # q = rc * mhx, with x - mean = (x - m0) - (mean - m0) and the float64
        # remainder folded into b. (rc * q as one factor underflows float32 for
        # groups with a standard deviation past ~1e19.)
        for c in range(C):
            q = rc[c] * agx[c]
            fa[c] = rc[c] * gamma[c]
            fb[c] = (mc[c] - m0[c]) * rc[c] * q - rc[c] * ag[c]
            fq[c] = q
            fr[c] = rc[c]
        _tile(fa, fa_t)
        _tile(fb, fb_t)
        _tile(fq, fq_t)
        _tile(fr, fr_t)
        _dx_tiles(xf[:tail * C], gy[:tail * C], dxf[:tail * C], act, m0_t, sc_t, sh_t, neg,
                  fa_t, fb_t, fr_t, fq_t)
        for p in range(tail, P):
            _dx_tiles(xf[p * C:(p + 1) * C], gy[p * C:(p + 1) * C], dxf[p * C:(p + 1) * C], act,
                      m0, sc, sh, neg, fa, fb, fr, fq)


@kernel(ordered=True)
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
    n_chunks = partial_dgamma.shape[0]
    for k in prange(n_chunks):
        _group_backward_cl_task(np.int64(k), X, dY, mean, invstd, gamma, beta, n_groups,
                                code, alpha, rows_per_chunk, dX, partial_dgamma,
                                partial_dbeta)


@task_body
def _group_forward_cf_task(t, X, gamma, beta, n_groups, eps, code, alpha, Y, mean, invstd):
    """Task ``t`` of :func:`group_forward_cf` (the ``prange`` body; see ``task_body``)."""
    N, C, L = X.shape
    cg = C // n_groups
    inv_cnt = 1.0 / (L * cg)
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
    else:  # ReLU, leaky ReLU: a select (the smooth codes run apart, see reject_smooth)
        reject_smooth(code)
        neg = 0.0 if code == 1 else alpha
        for c in range(c0, c1):
            sc = r * gamma[c]
            bc = np.float64(beta[c])
            for j in range(L):
                z = (X[n, c, j] - m) * sc + bc
                Y[n, c, j] = z if z > 0.0 else z * neg  # z * neg keeps NaN a NaN


@kernel
def group_forward_cf(X, gamma, beta, n_groups, eps, code, alpha, Y, mean, invstd):
    """Channels-first twin of :func:`group_forward_cl`: X, Y : (N, C, L).

    One task per ``(example, group)``: its ``cg * L`` values are contiguous, read once
    from memory and twice more from cache.
    """
    N, C, L = X.shape
    for t in prange(N * n_groups):
        _group_forward_cf_task(np.int64(t), X, gamma, beta, n_groups, eps, code, alpha, Y,
                               mean, invstd)


@task_body
def _group_backward_cf_task(t, X, dY, mean, invstd, gamma, beta, n_groups, code, alpha,
                            rows_per_chunk, dX, partial_dgamma, partial_dbeta):
    """Task ``t`` of :func:`group_backward_cf` (the ``prange`` body; see ``task_body``)."""
    N, C, L = X.shape
    cg = C // n_groups
    inv_cnt = 1.0 / (L * cg)
    k = t // n_groups
    g = t - k * n_groups
    c0 = g * cg
    c1 = c0 + cg
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, N)
    for c in range(c0, c1):
        partial_dgamma[k, c] = 0.0
        partial_dbeta[k, c] = 0.0
    reject_smooth(code)
    # ReLU / leaky ReLU slopes as selects, 1 or neg + (z - z) (NaN where z is NaN)
    neg = 0.0 if code == 1 else alpha
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
                    xhat = (X[n, c, j] - m) * r
                    z = xhat * gc + bc
                    gv = dY[n, c, j] * (1.0 if z > 0.0 else neg + (z - z))
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
                    xhat = (X[n, c, j] - m) * r
                    z = xhat * gc + bc
                    gv = dY[n, c, j] * (1.0 if z > 0.0 else neg + (z - z))
                    dX[n, c, j] = r * (gv * gc - mh - xhat * mhx)


@kernel
def group_backward_cf(X, dY, mean, invstd, gamma, beta, n_groups, code, alpha, rows_per_chunk,
                      dX, partial_dgamma, partial_dbeta):
    """Channels-first twin of :func:`group_backward_cl`: X, dY, dX : (N, C, L).

    One task per ``(chunk of rows_per_chunk examples, group)``; it owns columns
    ``g*cg:(g+1)*cg`` of row ``k`` of the partial buffers.
    """
    N, C, L = X.shape
    n_chunks = partial_dgamma.shape[0]
    for t in prange(n_chunks * n_groups):
        _group_backward_cf_task(np.int64(t), X, dY, mean, invstd, gamma, beta, n_groups,
                                code, alpha, rows_per_chunk, dX, partial_dgamma,
                                partial_dbeta)


KERNELS = {
    "group_forward_cl": group_forward_cl,
    "group_backward_cl": group_backward_cl,
    "group_forward_cf": group_forward_cf,
    "group_backward_cf": group_backward_cf,
}

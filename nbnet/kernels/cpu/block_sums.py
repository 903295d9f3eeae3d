"""Block sums: input-dtype arithmetic over short blocks, accumulated in float64.

The normalization kernels compute float32 inputs in float32 (8-16 SIMD lanes, no
conversions) and keep every *running* sum in float64. Two block shapes serve them:

* along a contiguous run (a LayerNorm row, a channels-first channel): blocks of
  ``SUM_BLOCK`` values, summed in the input's dtype with "reassoc" vectorisation (each
  lane adds about 16 values), then added to a float64 total
  (:func:`block_shifted_moments`);
* across rows (per-column accumulators: BatchNorm, GroupNorm channels-last, parameter
  gradients): accumulators of the input's dtype over ``ROW_BLOCK`` passes, flushed into
  float64 (the loops live in the kernels). A pass adds one row, or the pairwise sum of
  four rows from four segments of the chunk (``(a + b) + (c + d)``, the column and
  GroupNorm sums), so a block holds 8 or 32 values.

Either way a float32 partial sum holds at most a few dozen terms, so its rounding
(relative ~1e-7 of its own magnitude) never grows with the array.

Overflow: a float32 square passes 3.4e38 from ``|x - shift| ~ 1.8e19``, and a block adds
a few dozen of them, so data with a standard deviation from ~1e18 up (variances from
~1e36, still float32 numbers) would come out with an infinite M2 (every output 0, no
error). Sums that come out non-finite are taken again in float64 from the values
(:func:`moments64`): the one-pass blocks in :func:`block_shifted_moments`, per column by
:func:`rescue_columns`. That costs one check per sum when nothing overflowed; data that
hold a NaN or an infinity take the float64 pass too, and keep their NaN.
"""
import math

import numpy as np

from ._jit import helper

#: Values per input-dtype partial sum along a contiguous run.
SUM_BLOCK = 512

#: Rows added into an input-dtype accumulator before it is flushed into float64.
ROW_BLOCK = 8

#: One-pass shifted moments (``sum(x - s)``, ``sum((x - s)**2)`` around a value ``s`` of
#: the data) are exact algebra, but M2 loses about ``1 + K**2`` input-dtype roundings when
#: the shift is ``K`` standard deviations from the mean. Kernels that shift by a value of
#: the data take the moments again around the mean they found when ``K`` exceeds this
#: (with float32 blocks, K = 8 keeps M2 within ~1e-5).
SHIFT_LIMIT = 8.0


@helper
def shifted_result(m0, s1, s2, inv_n):
    """``(mean, M2, far)`` of ``n`` values from their moments around the shift ``m0``:
    ``s1 = sum(x - m0)``, ``s2 = sum((x - m0)**2)``, ``inv_n = 1 / n``. ``far`` is true when
    the shift lies more than ``SHIFT_LIMIT`` standard deviations from the mean (take the
    moments again, around ``mean``)."""
    off = s1 * inv_n
    m2 = max(s2 - s1 * off, 0.0)
    return m0 + off, m2, off * off > SHIFT_LIMIT * SHIFT_LIMIT * (m2 * inv_n)


@helper
def block_shifted_moments(x, o, n, m0):
    """``(sum(x - m0), sum((x - m0)**2))`` as float64 over the ``n`` values ``x[o:o + n]``
    of a contiguous 1-D ``x``: blocks of ``SUM_BLOCK`` values summed in x's dtype, added
    up in float64.

    With ``m0`` any shift of x's dtype near the mean, ``mean = m0 + s1 / n`` and
    ``M2 = s2 - s1**2 / n`` are exact algebra, and lose nothing while the shift is within
    a few standard deviations of the mean (``x - m0`` is then exact, Sterbenz).

    The values are read at unsigned indices ``o + b + j``: a signed index is checked for
    wraparound, which stops the loop vectorising, and a view per block or per run (the
    channels-first kernels call this once per run of ``L`` values, 4 for a 2x2 image)
    costs a reference-count call pair that LLVM cannot drop from their loops.
    """
    s1 = 0.0
    s2 = 0.0
    for b in range(0, n, SUM_BLOCK):
        ob = o + b
        p1 = m0 - m0
        p2 = m0 - m0
        for j in range(min(SUM_BLOCK, n - b)):
            d = x[np.uint64(ob + j)] - m0
            p1 += d
            p2 += d * d
        s1 += p1
        s2 += p2
    if not (math.isfinite(s1) and math.isfinite(s2)):  # overflowed blocks (module notes)
        return moments64(x[o:o + n], m0)
    return s1, s2


@helper
def moments64(x, m0):
    """``(sum(x - m0), sum((x - m0)**2))`` of a 1-D ``x`` (strided or not), every value
    converted to float64 first: exact for any finite float32 data (a float32 difference
    squared is at most ~4.6e77). The rescue of the input-dtype sums that overflowed; a
    plain scalar loop, since it runs only on such data."""
    m = np.float64(m0)
    s1 = 0.0
    s2 = 0.0
    for j in range(x.shape[0]):
        d = np.float64(x[j]) - m
        s1 += d
        s2 += d * d
    return s1, s2


@helper
def rescue_columns(X, start, stop, j0, m0, s1, s2):
    """Per-column sums of rows ``start:stop`` of a 2-D ``X``, columns ``j0`` on, that came
    out non-finite from input-dtype accumulators: ``s1[j], s2[j] = moments64(X[start:stop,
    j0 + j], m0[j])`` for those columns only (the others, and so their bits, are left as
    they are)."""
    finite = True
    for j in range(s1.shape[0]):  # no branch: a vectorised check (23 -> 3 us per 16K sums)
        finite = finite & math.isfinite(s1[j]) & math.isfinite(s2[j])
    if finite:
        return
    for j in range(s1.shape[0]):
        if not (math.isfinite(s1[j]) and math.isfinite(s2[j])):
            s1[j], s2[j] = moments64(X[start:stop, j0 + j], m0[j])

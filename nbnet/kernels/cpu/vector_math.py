"""exp, expm1, tanh and erf (float64) written in arithmetic that LLVM vectorises.

numba compiles ``math.exp`` / ``math.expm1`` / ``math.tanh`` / ``math.erf`` to calls into
the C math library, one value at a time: a loop that calls them cannot be vectorised, and on the
2-core reference machine the sigmoid of 2M float32 values took 9.2 ms (PyTorch, with
SIMD math, 0.44 ms), tanh 17 ms (2.7 ms). These versions use only +, *, /, ``floor``,
comparisons and one bit cast, so a loop over them runs 4-8 lanes wide (sigmoid 9.2 ->
1.2 ms there). The CPU activation kernels use them through :mod:`.activations`; the CUDA
kernels keep the device's own math.

Accuracy (float64, checked in tests/test_layers_dense.py against ``math`` over the whole
range): ``exp`` within 1 ulp, ``expm1`` and ``tanh`` within 4 ulp (6e-16 relative);
``exp`` overflows to inf above 709.78 and underflows through the subnormals to 0 below
-745.13 as ``math.exp`` does (subnormal results within one subnormal step); NaN gives
NaN, -inf gives 0 (``exp``) or -1 (``expm1``, ``tanh``), and the sign of a zero is kept.

Method: ``exp(x) = 2**k * exp(r)`` with ``k = round(x / ln 2)`` and ``r = x - k ln 2``
(Cody-Waite: ``ln 2`` in two parts, so ``k * LN2_HI`` is exact), ``|r| <= ln(2)/2``, and
``exp(r)`` by its Taylor series to degree 13 (truncation below 1e-17 relative); ``2**k``
is built from its bits in two factors, so that ``k`` down to -1075 (subnormal results)
and up to 1024 stay representable. ``expm1(x)`` for ``|x| < ln(2)/2`` is the same series
without its constant term (no cancellation), elsewhere ``exp(x) - 1`` (relative error
at most ~2 ulp there, as ``|expm1(x)| > 0.29``). ``tanh(x) = expm1(2x) / (expm1(2x) + 2)``
for ``|x|`` up to 20 (beyond, tanh is +-1 in float64). ``erf(x) = x * P(x**2)`` for
``|x| < 2`` and ``sign(x) * (1 - Q(|x|) * exp(-x**2))`` for ``2 <= |x| < 6`` (1 beyond),
``P`` and ``Q`` Chebyshev series of degree 18 and 24, least-squares fits on 6000
Chebyshev nodes (``numpy.polynomial.chebyshev.chebfit``) to the C library's ``erf(x)/x``
over ``x**2`` in [0, 4] and ``erfc(x) * exp(x**2)`` over [2, 6] (relative fit error
1.3e-15 and 5e-15), evaluated by Clenshaw's recurrence; within 12 ulp
(1.3e-15 relative) of the C library's erf, half of all values exact.
"""
import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._jit import helper

_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238  # ln 2 to 32 bits: k * _LN2_HI is exact for |k| < 2**21
_LN2_LO = 1.9082149292705877e-10  # ln 2 - _LN2_HI
_HALF_LN2 = 0.34657359027997264
_EXP_MAX = 709.782712893384  # above: exp overflows
_EXP_MIN = -745.1332191019412  # below: exp rounds to 0



@intrinsic
def _bits_to_float(typingctx, bits):
    """The float whose IEEE-754 bits are ``bits``: float64 from int64, float32 from int32
    (a register move)."""
    to = {types.int64: (types.float64, ir.DoubleType()),
          types.int32: (types.float32, ir.FloatType())}.get(bits)
    if to is None:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], to[1])

    return to[0](bits), codegen


@helper
def _expm1_series(r):
    """exp(r) - 1 for |r| <= ln(2)/2: Taylor to degree 13, Horner."""
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    return (p * r) * r + r


@helper
def vexp(x):
    """exp(x) for a float64 ``x`` (see the module notes)."""
    xc = min(max(x, -746.0), 710.0)  # keeps k in range; the selects below fix the ends
    k = math.floor(xc * _LOG2E + 0.5)
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    p = _expm1_series(r) + 1.0
    ki = int(k)
    k1 = ki >> 1  # 2**k as two factors: each exponent stays within the normal range
    y = (p * _bits_to_float((k1 + 1023) << 52)) * _bits_to_float((ki - k1 + 1023) << 52)
    y = math.inf if x > _EXP_MAX else y
    y = 0.0 if x < _EXP_MIN else y
    return y if x == x else x  # NaN in, NaN out


@helper
def vexpm1(x):
    """exp(x) - 1 for a float64 ``x``, accurate near 0 (see the module notes)."""
    small = _expm1_series(min(max(x, -_HALF_LN2), _HALF_LN2))
    y = small if abs(x) <= _HALF_LN2 else vexp(x) - 1.0
    return y if x == x and x != 0.0 else x  # NaN stays NaN, expm1(-0.0) = -0.0


@helper
def vtanh(x):
    """tanh(x) for a float64 ``x`` (see the module notes)."""
    e = vexpm1(2.0 * min(abs(x), 20.0))
    t = math.copysign(e / (e + 2.0), x)  # tanh(-0.0) = -0.0
    return t if x == x else x


@helper
def _erf_small(s):
    """erf(x)/x at ``s = (x*x - 2) / 2`` (x*x in [0, 4]): the degree-18 Chebyshev series, by
    Clenshaw's recurrence written out (a loop over the coefficients would keep LLVM from
    vectorising the loop over values that calls it)."""
    s2 = 2.0 * s
    b1 = 0.0
    b2 = 0.0
    b1, b2 = 1.4788389888997542e-17 + s2 * b1 - b2, b1
    b1, b2 = 2.756651834288961e-17 + s2 * b1 - b2, b1
    b1, b2 = 5.347371435032414e-16 + s2 * b1 - b2, b1
    b1, b2 = -8.994473647979693e-15 + s2 * b1 - b2, b1
    b1, b2 = 1.4676221875536533e-13 + s2 * b1 - b2, b1
    b1, b2 = -2.236091856823739e-12 + s2 * b1 - b2, b1
    b1, b2 = 3.188114861246224e-11 + s2 * b1 - b2, b1
    b1, b2 = -4.2329756534506985e-10 + s2 * b1 - b2, b1
    b1, b2 = 5.207009123643222e-09 + s2 * b1 - b2, b1
    b1, b2 = -5.8991015317355674e-08 + s2 * b1 - b2, b1
    b1, b2 = 6.113243577552148e-07 + s2 * b1 - b2, b1
    b1, b2 = -5.749256558004811e-06 + s2 * b1 - b2, b1
    b1, b2 = 4.8620984432337357e-05 + s2 * b1 - b2, b1
    b1, b2 = -0.000365863968584754 + s2 * b1 - b2, b1
    b1, b2 = 0.002420799522433427 + s2 * b1 - b2, b1
    b1, b2 = -0.013916271264722117 + s2 * b1 - b2, b1
    b1, b2 = 0.06899483068983156 + s2 * b1 - b2, b1
    b1, b2 = -0.30107107338659483 + s2 * b1 - b2, b1
    return 0.741555282042402 + s * b1 - b2


@helper
def _erfc_scaled(s):
    """erfc(x) * exp(x*x) at ``s = (x - 4) / 2`` (x in [2, 6]): the degree-24 Chebyshev series,
    written out like :func:`_erf_small`."""
    s2 = 2.0 * s
    b1 = 0.0
    b2 = 0.0
    b1, b2 = 1.7302281357527462e-17 + s2 * b1 - b2, b1
    b1, b2 = -7.599279822543907e-18 + s2 * b1 - b2, b1
    b1, b2 = 1.4226656705502496e-16 + s2 * b1 - b2, b1
    b1, b2 = -7.591426181417155e-16 + s2 * b1 - b2, b1
    b1, b2 = 4.503935839862427e-15 + s2 * b1 - b2, b1
    b1, b2 = -2.5653112366513247e-14 + s2 * b1 - b2, b1
    b1, b2 = 1.4469350069646387e-13 + s2 * b1 - b2, b1
    b1, b2 = -8.054481589021278e-13 + s2 * b1 - b2, b1
    b1, b2 = 4.425930264558071e-12 + s2 * b1 - b2, b1
    b1, b2 = -2.3997007653132136e-11 + s2 * b1 - b2, b1
    b1, b2 = 1.283184385890709e-10 + s2 * b1 - b2, b1
    b1, b2 = -6.763532210407723e-10 + s2 * b1 - b2, b1
    b1, b2 = 3.5120800685619087e-09 + s2 * b1 - b2, b1
    b1, b2 = -1.7955339491815476e-08 + s2 * b1 - b2, b1
    b1, b2 = 9.031674383901288e-08 + s2 * b1 - b2, b1
    b1, b2 = -4.4664937548142537e-07 + s2 * b1 - b2, b1
    b1, b2 = 2.1698719431968138e-06 + s2 * b1 - b2, b1
    b1, b2 = -1.0346098326643953e-05 + s2 * b1 - b2, b1
    b1, b2 = 4.8367600321225164e-05 + s2 * b1 - b2, b1
    b1, b2 = -0.0002214489070308893 + s2 * b1 - b2, b1
    b1, b2 = 0.0009916839077238246 + s2 * b1 - b2, b1
    b1, b2 = -0.004337233595514148 + s2 * b1 - b2, b1
    b1, b2 = 0.01849487416970201 + s2 * b1 - b2, b1
    b1, b2 = -0.07674006034821482 + s2 * b1 - b2, b1
    return 0.1545489325441142 + s * b1 - b2


@helper
def verf(x):
    """erf(x) for a float64 ``x`` (see the module notes)."""
    a = abs(x)
    small = x * _erf_small((min(a * a, 4.0) - 2.0) * 0.5)
    ac = min(max(a, 2.0), 6.0)
    big = math.copysign(1.0 - _erfc_scaled((ac - 4.0) * 0.5) * vexp(-(ac * ac)), x)
    y = small if a < 2.0 else (big if a < 6.0 else math.copysign(1.0, x))
    return y if x == x else x


# ----------------------------------------------------------------------------- float32
# The same functions in float32 arithmetic, for float32 data: 16 lanes per AVX-512 vector
# instead of 8, a shorter series, and float32 division. The sigmoid of 2M float32 values
# on one core of the reference machine: 2.55 ms through the float64 versions, 0.83 ms
# through these. Every constant is wrapped in ``_F`` (np.float32) and ``np.floor`` is used
# (``math.floor`` returns an integer, which would turn the arithmetic float64). Accuracy
# against the C library's float64 results rounded to float32 (tests/test_layers_dense.py):
# exp within 2 ulp of float32, expm1 and tanh within 4, erf within 5; the same ends as the float64
# versions (exp overflows above 88.72 and reaches 0 below -103.97).

_F = np.float32
_F32_LN2_HI = 0.693359375  # ln 2 to 9 bits: k * _F32_LN2_HI is exact in float32 for |k| < 2**15
_F32_LN2_LO = -2.1219444005469057e-04  # ln 2 - _F32_LN2_HI
_F32_EXP_MAX = 88.72283935546875  # above: exp overflows float32
_F32_EXP_MIN = -103.97208404541016  # below: exp rounds to 0


@helper
def _expm1_series32(r):
    """exp(r) - 1 for |r| <= ln(2)/2, float32: Taylor to degree 7 (truncation below 6e-9
    relative), Horner."""
    p = _F(1.0 / 5040.0)
    p = p * r + _F(1.0 / 720.0)
    p = p * r + _F(1.0 / 120.0)
    p = p * r + _F(1.0 / 24.0)
    p = p * r + _F(1.0 / 6.0)
    p = p * r + _F(0.5)
    return (p * r) * r + r


@helper
def vexp32(x):
    """exp(x) for a float32 ``x`` (the method of :func:`vexp`, in float32)."""
    xc = min(max(x, _F(-104.0)), _F(89.0))
    k = np.floor(xc * _F(_LOG2E) + _F(0.5))
    r = (xc - k * _F(_F32_LN2_HI)) - k * _F(_F32_LN2_LO)
    p = _expm1_series32(r) + _F(1.0)
    ki = np.int32(k)
    k1 = ki >> 1
    y = (p * _bits_to_float(np.int32((k1 + 127) << 23))) * _bits_to_float(
        np.int32((ki - k1 + 127) << 23))
    y = _F(math.inf) if x > _F(_F32_EXP_MAX) else y
    y = _F(0.0) if x < _F(_F32_EXP_MIN) else y
    return y if x == x else x


@helper
def vexpm1_32(x):
    """exp(x) - 1 for a float32 ``x``, accurate near 0."""
    small = _expm1_series32(min(max(x, _F(-_HALF_LN2)), _F(_HALF_LN2)))
    y = small if abs(x) <= _F(_HALF_LN2) else vexp32(x) - _F(1.0)
    return y if x == x and x != _F(0.0) else x


@helper
def vtanh32(x):
    """tanh(x) for a float32 ``x`` (+-1 beyond |x| = 10, as float32 rounds it)."""
    e = vexpm1_32(_F(2.0) * min(abs(x), _F(10.0)))
    t = np.copysign(e / (e + _F(2.0)), x)
    return t if x == x else x


_F32_ERF_ONE = 3.919205904006958  # from here on erf rounds to 1 in float32


@helper
def _erf_over_x32(s):
    """erf(x)/x at ``s = (x*x - 8) / 8`` (x*x in [0, 16]), float32: one degree-16
    polynomial. erf(x)/x is an entire function of x*x, so one least-squares Chebyshev fit
    (to the C library's, on 8000 nodes) covers the whole float32 range of erf to 1.3e-8
    relative; in powers of ``s`` (coefficients below 0.36, no cancellation) it rounds to
    ~2e-7 in float32 (erf within 4.2 ulp of the exact value for every float32 x in
    [1e-30, 3.92], the most at |x| < 0.5). Half the operations of a two-piece erf (series
    for small x, erfc times exp beyond), and no exp.

    Evaluation: Horner's rule for the four lowest terms, Estrin's scheme (pairs, then
    pairs of pairs, with ``s**2``, ``s**4``, ``s**8``) for the thirteen above. All of
    Horner's rule was one chain of 16 dependent FMAs, and a GELU loop waited on it: 17.5
    us for 16384 float32 values in L1 on one core of the reference machine, 15.1 us this
    way (three more multiplies, eight FMAs deep instead of sixteen). The rounding is
    decided mostly by the last steps, which stay Horner's: over every float32 in [1e-30,
    3.92] the largest error is 4.15 ulp (all-Horner 3.85; all-Estrin reached 4.71 on a
    sample of 22M values, all-Horner 3.64 on the same).
    """
    s2 = s * s
    s4 = s2 * s2
    # c4 .. c16 (the coefficients of s**4 .. s**16) by Estrin's scheme
    q4 = _F(0.09021203964948654) + _F(-0.07468753308057785) * s
    q6 = _F(0.05985599383711815) + _F(-0.046014320105314255) * s
    q8 = _F(0.03321700170636177) + _F(-0.021662531420588493) * s
    q10 = _F(0.0139081459492445) + _F(-0.010085906833410263) * s
    q12 = _F(0.0055773635394871235) + _F(-0.0010769420769065619) * s
    q14 = _F(0.0006166106904856861) + _F(-0.0013728151097893715) * s
    t4 = (q4 + q6 * s2) + (q8 + q10 * s2) * s4
    t12 = (q12 + q14 * s2) + _F(0.0005964250885881484) * s4
    p = t4 + t12 * (s4 * s4)
    # c3 .. c0 by Horner's rule
    p = p * s + _F(-0.10771336406469345)
    p = p * s + _F(0.13167500495910645)
    p = p * s + _F(-0.176576167345047)
    return p * s + _F(0.35353100299835205)


@helper
def verf32(x):
    """erf(x) for a float32 ``x``: ``x * P(x**2)`` up to 3.92, +-1 beyond (as float32 rounds
    it), never above 1 in magnitude."""
    a = abs(x)
    y = x * _erf_over_x32((min(a * a, _F(16.0)) - _F(8.0)) * _F(0.125))
    y = min(max(y, _F(-1.0)), _F(1.0))
    y = np.copysign(_F(1.0), x) if a >= _F(_F32_ERF_ONE) else y
    return y if x == x else x

"""The scalar activation math, written once for every device.

``act_value(code, alpha, z)`` is f(z) and ``act_slope(code, alpha, z)`` is f'(z) for one
float64 value, with the codes of :mod:`nbnet.activations`. These are plain Python
functions: ``kernels/cpu/activations.py`` compiles them with ``njit(inline="always")``
and ``kernels/cuda/_common.py`` with ``cuda.jit(device=True)``, so the CPU and CUDA twins
cannot drift apart. They use only ``math`` and module-level float constants (which
both compilers freeze as literals).

Numerics: ReLU-family slopes return ``z - z`` (0, or NaN for NaN input) rather than a
literal 0 so that NaN propagates; the sigmoid takes ``exp(-|z|)``, which never
overflows; ELU uses ``expm1`` near 0. Where a branch would only pick the formula, both
sides are computed and a select picks the result (the ``exp`` argument clamped so the
unused side stays finite): with the CPU's vectorisable math
(``kernels/cpu/vector_math.py``) that lets the loops run SIMD-wide.
"""
import math

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def act_value(code, alpha, z):
    """f(z) for one float64 value."""
    if code == 0:
        return z
    if code == 1:
        return z if z > 0.0 else 0.0 * z  # 0 * z keeps NaN a NaN
    if code == 2:
        return z if z > 0.0 else alpha * z
    if code == 3:  # expm1 of min(z, 0), then a select: no branch around the math
        e = math.expm1(z if z <= 0.0 else 0.0)
        return alpha * e if z <= 0.0 else z  # NaN: z <= 0 is false, z is returned
    if code == 4:
        return 0.5 * z * (1.0 + math.erf(z * INV_SQRT_2))
    if code == 5:
        return 0.5 * z * (1.0 + math.tanh(SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)))
    if code == 6:
        return math.tanh(z)
    # code 7: sigmoid from e = exp(-|z|) <= 1, which never overflows:
    # 1 / (1 + e) for z >= 0, e / (1 + e) for z < 0
    e = math.exp(-abs(z))
    s = 1.0 / (1.0 + e)
    return s if z >= 0.0 else e * s


def act_slope(code, alpha, z):
    """f'(z) for one float64 value."""
    if code == 0:
        return 1.0
    if code == 1:
        return 1.0 if z > 0.0 else (z - z)  # NaN stays NaN
    if code == 2:
        return 1.0 if z > 0.0 else alpha + (z - z)
    if code == 3:
        e = math.exp(z if z <= 0.0 else 0.0)
        return alpha * e if z <= 0.0 else 1.0 + (z - z)  # NaN stays NaN
    if code == 4:
        return 0.5 * (1.0 + math.erf(z * INV_SQRT_2)) + z * INV_SQRT_2PI * math.exp(-0.5 * z * z)
    if code == 5:
        inner = SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
        t = math.tanh(inner)
        dinner = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z)
        # 1 - t*t is exactly 0 from |z| ~ 6.6 on (sooner in float32), and z * dinner
        # overflows from |z| ~ 7e12 in float32 (~6e102 in float64): the select keeps that
        # term 0 rather than inf * 0 = NaN, so the slope is exactly 1 or 0 out there
        # (PyTorch's float32 GELU(tanh) backward gives NaN). NaN z: t, and the slope, NaN.
        w = 1.0 - t * t
        return 0.5 * (1.0 + t) + (0.5 * z * w * dinner if w > 0.0 else 0.0)
    if code == 6:
        t = math.tanh(z)
        return 1.0 - t * t
    e = math.exp(-abs(z))
    s = 1.0 / (1.0 + e)
    s = s if z >= 0.0 else e * s
    return s * (1.0 - s)

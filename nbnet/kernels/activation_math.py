"""The scalar activation math, written once for every device.

``act_value(code, alpha, z)`` is f(z) and ``act_slope(code, alpha, z)`` is f'(z) for one
float64 value, with the codes of :mod:`nbnet.activations`. These are plain Python
functions: ``kernels/cpu/activations.py`` compiles them with ``njit(inline="always")``
and ``kernels/cuda/_common.py`` with ``cuda.jit(device=True)``, so the CPU and CUDA twins
cannot drift apart. They use only ``math`` and module-level float constants (which
both compilers freeze as literals).

Numerics: ReLU-family slopes return ``z - z`` (0, or NaN for NaN input) rather than a
literal 0 so that NaN propagates; the sigmoid is split by sign so ``exp`` never
overflows; ELU uses ``expm1`` near 0.
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
    if code == 3:
        return z if z > 0.0 else alpha * math.expm1(z)
    if code == 4:
        return 0.5 * z * (1.0 + math.erf(z * INV_SQRT_2))
    if code == 5:
        return 0.5 * z * (1.0 + math.tanh(SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)))
    if code == 6:
        return math.tanh(z)
    # code 7: sigmoid, written so that exp never overflows
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def act_slope(code, alpha, z):
    """f'(z) for one float64 value."""
    if code == 0:
        return 1.0
    if code == 1:
        return 1.0 if z > 0.0 else (z - z)  # NaN stays NaN
    if code == 2:
        return 1.0 if z > 0.0 else alpha + (z - z)
    if code == 3:
        return 1.0 if z > 0.0 else alpha * math.exp(z)
    if code == 4:
        return 0.5 * (1.0 + math.erf(z * INV_SQRT_2)) + z * INV_SQRT_2PI * math.exp(-0.5 * z * z)
    if code == 5:
        inner = SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
        t = math.tanh(inner)
        dinner = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner
    if code == 6:
        t = math.tanh(z)
        return 1.0 - t * t
    if z >= 0.0:
        s = 1.0 / (1.0 + math.exp(-z))
    else:
        e = math.exp(z)
        s = e / (1.0 + e)
    return s * (1.0 - s)

"""Activation epilogues shared by every CPU kernel.

Each function branches on the activation code once per row (or slice), outside the
inner loop, so the inner loop stays a straight vectorisable line. Codes are those of
:mod:`nbnet.activations`. All math is float64 (``z`` arrives as float64), because
the callers already hold float64 values and the conversion is free at memory speed.
"""
import math

from ._jit import helper

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@helper
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
        return 0.5 * z * (1.0 + math.erf(z * _INV_SQRT_2))
    if code == 5:
        return 0.5 * z * (1.0 + math.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)))
    if code == 6:
        return math.tanh(z)
    # code 7: sigmoid, written so that exp never overflows
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@helper
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
        return 0.5 * (1.0 + math.erf(z * _INV_SQRT_2)) + z * _INV_SQRT_2PI * math.exp(-0.5 * z * z)
    if code == 5:
        inner = _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
        t = math.tanh(inner)
        dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z)
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


@helper
def act_row(code, alpha, row):
    """Apply f in place to a float64 buffer (one branch, then a plain loop)."""
    n = row.shape[0]
    if code == 0:
        return
    if code == 1:
        for j in range(n):
            z = row[j]
            row[j] = z if z > 0.0 else 0.0 * z
        return
    for j in range(n):
        row[j] = act_value(code, alpha, row[j])


@helper
def slope_row(code, alpha, z_row, out):
    """out[j] = f'(z_row[j]) for a float64 buffer."""
    for j in range(z_row.shape[0]):
        out[j] = act_slope(code, alpha, z_row[j])

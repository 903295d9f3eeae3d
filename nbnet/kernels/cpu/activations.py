"""Activation epilogues shared by every CPU kernel.

Each function branches on the activation code once per row (or slice), outside the
inner loop, so the inner loop stays a straight vectorisable line. Codes are those of
:mod:`nbnet.activations`. All math is float64 (``z`` arrives as float64), because
the callers already hold float64 values and the conversion is free at memory speed.
"""
from .. import activation_math
from ._jit import helper

# The scalar math is shared with the CUDA kernels (one source, two compilers).
act_value = helper(activation_math.act_value)
act_slope = helper(activation_math.act_slope)


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
    if code == 2:
        for j in range(n):
            z = row[j]
            row[j] = z if z > 0.0 else alpha * z
        return
    for j in range(n):
        row[j] = act_value(code, alpha, row[j])


@helper
def slope_row(code, alpha, z_row, out):
    """out[j] = f'(z_row[j]) for a float64 buffer."""
    for j in range(z_row.shape[0]):
        out[j] = act_slope(code, alpha, z_row[j])

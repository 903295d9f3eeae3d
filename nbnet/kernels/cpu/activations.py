"""Activation epilogues shared by every CPU kernel.

Each function branches on the activation code once per row (or slice), outside the
inner loop, so the inner loop stays a straight vectorisable line. Codes are those of
:mod:`nbnet.activations`.

Two kinds. The piecewise-linear activations (identity, ReLU, leaky ReLU: codes 0-2) are
selects, fused into the normalization and dense kernels' own passes in the input's dtype
(:func:`piecewise_slopes` gives the slope left of 0; :func:`piecewise_into` for the
activation layers). The smooth ones (ELU,
GELU, tanh, sigmoid: codes 3-7) are not: they run as kernels of their own, one per
activation, vectorised over :mod:`.vector_math` (:func:`smooth_into`, float32 data in
float32), after the normalization's pass on CPU (see ``nbnet.layers.activation``). Fused
with a run-time code they were one C-library call per value (a BatchNorm1D(act_fn="gelu")
training step 17x slower than the normalization and the activation layer), and carrying
them in every normalization kernel cost ~2.5 s of the ~14.5 s that compiling the default
float32 BatchNorm1D + LayerNorm1D set took. A fused kernel given a smooth code raises.
"""
import ast
import types

import numpy as np
from numba import types as nbtypes
from numba.extending import overload

from .. import activation_math
from ._jit import CODEGEN_OPTIONS, exec_tree, helper, source_tree
from .vector_math import verf, verf32, vexp, vexp32, vexpm1, vexpm1_32, vtanh, vtanh32

# The scalar math is shared with the CUDA kernels (one source, two compilers). On CPU its
# ``math`` is a namespace whose exp, expm1, tanh and erf are the vectorisable versions of
# :mod:`.vector_math` (the C library's are one call per value).
_cpu_math = types.ModuleType("nbnet_cpu_math")
_cpu_math.exp, _cpu_math.expm1, _cpu_math.tanh, _cpu_math.erf = vexp, vexpm1, vtanh, verf


_cpu_math32 = types.ModuleType("nbnet_cpu_math32")
_cpu_math32.exp, _cpu_math32.expm1, _cpu_math32.tanh, _cpu_math32.erf = (vexp32, vexpm1_32,
                                                                           vtanh32, verf32)


def _with_cpu_math(fn):
    return types.FunctionType(fn.__code__, dict(fn.__globals__, math=_cpu_math), fn.__name__,
                              fn.__defaults__, fn.__closure__)


class _Float32Literals(ast.NodeTransformer):
    """Every float literal, every read of a module-level float constant and of ``alpha``
    becomes ``_f32_(...)`` (np.float32), so that float32 ``z`` stays float32 throughout
    (numba types a bare float literal as float64, which would promote the arithmetic)."""

    def __init__(self, names):
        self.names = names

    def _wrap(self, node):
        return ast.copy_location(
            ast.Call(func=ast.Name(id="_f32_", ctx=ast.Load()), args=[node], keywords=[]), node)

    def visit_Constant(self, node):
        return self._wrap(node) if isinstance(node.value, float) else node

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load) and node.id in self.names:
            return self._wrap(node)
        return node


def _float32_twin(fn):
    """``fn`` (a scalar function of :mod:`nbnet.kernels.activation_math`) compiled from the
    same source in float32 arithmetic, with the float32 vector math of :mod:`.vector_math`:
    one source for the formulas, a second set of constants only where the precision
    differs."""
    tree = source_tree(fn)
    floats = {k for k, v in fn.__globals__.items() if isinstance(v, float)} | {"alpha"}
    _Float32Literals(floats).visit(tree)
    return exec_tree(fn, tree, fn.__name__,
                     dict(fn.__globals__, math=_cpu_math32, _f32_=np.float32))


# The elementwise activation kernels (smooth_into, smooth_grad_into) call these with the
# code as a constant, one kernel per activation, so that their loops vectorise. (Inlining
# the vector math into every fused kernel, with a run-time code, took compiling the
# default float32 BatchNorm1D + LayerNorm1D set from 20 s to 125 s.)
act_value_simd = helper(_with_cpu_math(activation_math.act_value))
act_slope_simd = helper(_with_cpu_math(activation_math.act_slope))
act_value_simd32 = helper(_float32_twin(activation_math.act_value))
act_slope_simd32 = helper(_float32_twin(activation_math.act_slope))


@helper
def piecewise_into(code, alpha, x, y):
    """``y[i] = f(float64(x[i]))`` for the piecewise-linear activations (codes 0-2:
    identity, ReLU, leaky ReLU) as selects, one loop per code, for 1-D ``x``, ``y`` of any
    float dtypes (``y`` may be ``x``). With the code tested inside one shared loop, leaky
    ReLU over 2M float32 values took 5.4 ms instead of 0.1 ms on the reference machine."""
    n = x.shape[0]
    if code == 0:
        for i in range(n):
            y[i] = x[i]
    elif code == 1:
        for i in range(n):
            z = np.float64(x[i])
            y[i] = z if z > 0.0 else 0.0 * z  # 0 * z keeps NaN a NaN
    else:
        for i in range(n):
            z = np.float64(x[i])
            y[i] = z if z > 0.0 else alpha * z


@helper
def piecewise_grad_into(code, alpha, x, dy, dx):
    """``dx[i] = dy[i] * f'(float64(x[i]))`` for codes 0-2 (``dx`` may be ``dy``). NaN in
    ``x`` gives NaN (``z - z``)."""
    n = x.shape[0]
    if code == 0:
        for i in range(n):
            dx[i] = dy[i]
    elif code == 1:
        for i in range(n):
            z = np.float64(x[i])
            g = np.float64(dy[i])
            dx[i] = g if z > 0.0 else g * (z - z)
    else:
        for i in range(n):
            z = np.float64(x[i])
            g = np.float64(dy[i])
            dx[i] = g if z > 0.0 else g * (alpha + (z - z))


def smooth_into(code, alpha, x, y):
    """``y[i] = f(x[i])`` for one smooth activation (codes 3-7) over 1-D ``x``, ``y``;
    ``code`` must be a compile-time constant (a literal at the call), so that the branches
    of ``act_value_simd`` fold away and the loop vectorises over the math of
    :mod:`.vector_math`. float32 ``x`` is computed in float32 (16 lanes; exp, expm1, tanh
    and erf within a few float32 ulp, as PyTorch's float32 activations are), anything
    else in float64: the sigmoid of 2M float32 values 2.55 -> 0.83 ms on one core of the
    reference machine. Compiled code only: the implementation is picked from the types
    by the overload below, and called once per block."""
    raise NotImplementedError("smooth_into is called from compiled kernels only")


def smooth_grad_into(code, alpha, x, dy, dx):
    """``dx[i] = dy[i] * f'(x[i])`` for one smooth activation, ``code`` a compile-time
    constant, in float32 when ``x`` and ``dy`` are float32 (see :func:`smooth_into`)."""
    raise NotImplementedError("smooth_grad_into is called from compiled kernels only")


def _literal_code(code):
    if not isinstance(code, nbtypes.IntegerLiteral):
        raise TypeError(f"the activation code must be a compile-time constant, got {code}")
    return code.literal_value


@overload(smooth_into, prefer_literal=True, jit_options=CODEGEN_OPTIONS)
def _smooth_into_impl(code, alpha, x, y):
    c = _literal_code(code)
    if x.dtype == nbtypes.float32:
        def impl(code, alpha, x, y):
            for i in range(x.shape[0]):
                y[i] = act_value_simd32(c, alpha, x[i])
    else:
        def impl(code, alpha, x, y):
            for i in range(x.shape[0]):
                y[i] = act_value_simd(c, alpha, np.float64(x[i]))
    return impl


@overload(smooth_grad_into, prefer_literal=True, jit_options=CODEGEN_OPTIONS)
def _smooth_grad_into_impl(code, alpha, x, dy, dx):
    c = _literal_code(code)
    if x.dtype == nbtypes.float32 and dy.dtype == nbtypes.float32:
        def impl(code, alpha, x, dy, dx):
            for i in range(x.shape[0]):
                dx[i] = dy[i] * act_slope_simd32(c, alpha, x[i])
    else:
        def impl(code, alpha, x, dy, dx):
            for i in range(x.shape[0]):
                dx[i] = np.float64(dy[i]) * act_slope_simd(c, alpha, np.float64(x[i]))
    return impl


@helper
def piecewise_slopes(code, alpha, like):
    """``(one, neg)`` in the dtype of ``like``: the slopes right and left of 0 for ReLU
    (code 1: 1, 0), leaky ReLU (code 2: 1, ``alpha``) and identity (1, 1). The
    native-dtype paths of the column and dense kernels apply these activations as selects, with
    both arms in X's dtype (a float64 literal arm would turn the loop float64)."""
    buf = np.empty(2, like.dtype)
    buf[0] = 1.0
    buf[1] = 0.0 if code == 1 else (alpha if code == 2 else 1.0)
    return buf[0], buf[1]


@helper
def reject_smooth(code):
    """Raise for an activation code the fused kernels do not take (a smooth one, 3-7)."""
    if code > 2:
        raise ValueError("a smooth activation (ELU, GELU, tanh, sigmoid) is not fused into "
                         "the CPU normalization and dense kernels: run the act_forward / "
                         "act_backward kernels as a pass of their own")

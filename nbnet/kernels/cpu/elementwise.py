"""Elementwise and per-row kernels: activations, dense-layer epilogues, softmax, dropout,
losses, and the two host-side BLAS ops the dense layer routes through the registry.

Parallel layout: elementwise kernels run ``prange`` over fixed blocks of ``block``
elements of a flat, C-contiguous view (element ``i`` reads and writes index ``i`` only, so
any block size gives the same bits). Kernels that also reduce over rows (the dense
layer's bias gradient) walk *row chunks* of ``rows_per_chunk`` rows and write one row of a
``[n_chunks, C]`` float64 partial buffer per chunk, merged afterwards in chunk order by
``merge_partial_sums`` (:mod:`.column_stats`): the summation order, and every bit of the
result, depends on the shape only, never on the thread count (DESIGN.md).

The dense epilogues fuse the piecewise-linear activations only (selects); a smooth one
runs as the activation kernels' pass over ``Z`` (see :mod:`.activations`).

Softmax and the cross-entropy kernels work on rows: ``m = max(row)``,
``lse = m + log(sum(exp(row - m)))``; every ``exp`` argument is <= 0, so nothing
overflows for any finite logits (the textbook ``exp(z) / sum(exp(z))`` overflows float32
at z ~ 88.7).

Host-side ops (not compiled, not called with a leading ``size``):
``matmul(a, b, out, trans_a=False, trans_b=False)`` is NumPy's BLAS (``out = op(a) @ op(b)``,
``op`` a transpose when its flag is set; NumPy passes the transposed view to BLAS as a
transpose flag, without a copy), ``add_into(out, x)`` is ``out += x`` with
casting, and ``fill(arr1d, value)`` sets every element (used to zero device arrays). The
CUDA package provides the same three names with the same arguments.
"""
import math

import numpy as np
from numba import prange

from ._jit import helper, kernel, serial_kernel, specialised
from .activations import (piecewise_grad_into, piecewise_into, piecewise_slopes, reject_smooth,
                          smooth_grad_into, smooth_into)

# _FLAT_LOOPS: kernels over flat 1-D views loop over slices (``x = X[start:stop]``,
# index from 0). Indexing the whole array with ``i in range(start, stop)`` makes numba
# check every index for negative wraparound, which stops LLVM from vectorising the loop
# (measured 8x slower on the optimizer updates).


# ---------------------------------------------------------------- elementwise activations

# act_forward / act_backward: one compiled kernel for the piecewise-linear activations
# (identity, ReLU, leaky ReLU: selects) and one per smooth activation, its code a constant,
# compiled the first time that activation is used. Each smooth kernel is one vectorised
# loop over the math of vector_math.py (sigmoid of 2M float32 values 9.9 -> 1.5 ms on the
# reference machine); one kernel holding every activation's vectorised loop took ~60 s to
# compile.

@kernel
def _act_forward_piecewise(X, code, alpha, block, Y):
    n = X.shape[0]
    for b in prange((n + block - 1) // block):
        s = b * block
        piecewise_into(code, alpha, X[s:min(s + block, n)], Y[s:min(s + block, n)])  # _FLAT_LOOPS


def _act_forward_smooth(X, code, alpha, block, Y):
    """The smooth activations' forward, compiled once per code by ``specialised``."""
    n = X.shape[0]
    for b in prange((n + block - 1) // block):
        s = b * block
        smooth_into(code, alpha, X[s:min(s + block, n)], Y[s:min(s + block, n)])


@kernel
def _act_backward_piecewise(X, dY, code, alpha, block, dX):
    n = X.shape[0]
    for b in prange((n + block - 1) // block):
        s = b * block
        e = min(s + block, n)
        piecewise_grad_into(code, alpha, X[s:e], dY[s:e], dX[s:e])


def _act_backward_smooth(X, dY, code, alpha, block, dX):
    """The smooth activations' backward, compiled once per code by ``specialised``."""
    n = X.shape[0]
    for b in prange((n + block - 1) // block):
        s = b * block
        e = min(s + block, n)
        smooth_grad_into(code, alpha, X[s:e], dY[s:e], dX[s:e])


# the smooth activation codes (nbnet.activations) and the names of their kernels
_SMOOTH = {3: "_elu", 4: "_gelu", 5: "_gelu_tanh", 6: "_tanh", 7: "_sigmoid"}


class _ByActivation:
    """One registry op over several kernels: the piecewise-linear one takes the code (0-2),
    each smooth activation (codes 3-7) has its own (see above). Called like a Kernel."""

    def __init__(self, piecewise, smooth):
        self.piecewise = piecewise
        self.smooth = smooth  # {code: kernel without a code argument}
        self.__name__ = piecewise.__name__

    def __call__(self, size, *args):
        code = args[-4]  # (..., code, alpha, block, out)
        if code <= 2:
            return self.piecewise(size, *args)
        return self.smooth[code](size, *args[:-4], *args[-3:])

    def dispatchers(self):
        found = list(self.piecewise.dispatchers())
        for k in self.smooth.values():
            found.extend(k.dispatchers())
        return tuple(found)


act_forward = _ByActivation(_act_forward_piecewise, {
    c: specialised(_act_forward_smooth, name, code=c) for c, name in _SMOOTH.items()})
act_forward.__doc__ = """act_forward(size, X, code, alpha, block, Y): Y = f(X) over flat 1-D views
(Y may alias X)."""
act_backward = _ByActivation(_act_backward_piecewise, {
    c: specialised(_act_backward_smooth, name, code=c) for c, name in _SMOOTH.items()})
act_backward.__doc__ = """act_backward(size, X, dY, code, alpha, block, dX): dX = dY * f'(X) over
flat 1-D views (X is the activation's input)."""


@kernel
def act_backward_from_output(Y, dY, code, block, dX):
    """``dX = dY * f'(z)`` from the activation's *output* ``Y = f(z)``, for the two
    activations whose slope is a function of their value: tanh (code 6), ``1 - y**2``,
    and the sigmoid (code 7), ``y * (1 - y)``. Flat 1-D views, in the data's dtype.

    The slope kernels from ``z`` (:data:`act_backward`) evaluate ``exp`` again per value
    (compute-bound: the sigmoid's training step of (2048, 1024) float32 took 2.1 ms against
    PyTorch's 2.0, which also differentiates from the output); this is two multiplies and
    a subtraction. Same formula as those kernels' (``s * (1 - s)``, ``1 - t * t`` with
    ``s``, ``t`` the forward's float32 or float64 values), so the same values.
    """
    n = Y.shape[0]
    for b in prange((n + block - 1) // block):
        s = b * block
        e = min(s + block, n)
        _output_slope_into(code, Y[s:e], dY[s:e], dX[s:e])


@helper
def _output_slope_into(code, y, dy, dx):
    one = y.dtype.type(1.0)
    if code == 6:
        for i in range(y.shape[0]):
            dx[i] = dy[i] * (one - y[i] * y[i])
    else:
        for i in range(y.shape[0]):
            dx[i] = dy[i] * (y[i] * (one - y[i]))


# ---------------------------------------------------------------- dense-layer epilogues

@kernel
def dense_forward_epilogue(Z, b, code, alpha, rows_per_chunk, Y):
    """Z += b (in place, the pre-activation kept for backward); Y = f(Z).

    Z : (R, C), the BLAS product ``X @ W``; b : (C,); Y : (R, C) (Y may alias Z only for
    the identity, when it is the same pass).
    """
    R, C = Z.shape
    reject_smooth(code)
    n_chunks = (R + rows_per_chunk - 1) // rows_per_chunk
    for k in prange(n_chunks):
        start = k * rows_per_chunk
        stop = min(start + rows_per_chunk, R)
        for i in range(start, stop):
            if code == 0:
                for j in range(C):
                    Z[i, j] += b[j]
            elif code == 1:
                for j in range(C):
                    z = Z[i, j] + b[j]
                    Z[i, j] = z
                    Y[i, j] = z if z > 0 else 0 * z
            else:  # leaky ReLU (smooth codes were rejected above)
                for j in range(C):
                    z = Z[i, j] + b[j]
                    Z[i, j] = z
                    Y[i, j] = z if z > 0 else alpha * z


@kernel
def dense_backward_epilogue(Z, dY, code, alpha, rows_per_chunk, dZ, partial_db):
    """dZ = dY * f'(Z) and per-chunk column sums of dZ, in one pass.

    partial_db : (n_chunks, C) float64, row ``k`` written by chunk ``k`` (merge with
    ``merge_partial_sums`` for the bias gradient).
    """
    R, C = Z.shape
    reject_smooth(code)
    n_chunks = partial_db.shape[0]
    for k in prange(n_chunks):
        start = k * rows_per_chunk
        stop = min(start + rows_per_chunk, R)
        acc = partial_db[k]
        for j in range(C):
            acc[j] = 0.0
        # identity, ReLU, leaky ReLU as one select (smooth codes were rejected above);
        # z - z keeps NaN a NaN
        one, neg = piecewise_slopes(code, alpha, dY)
        for i in range(start, stop):
            for j in range(C):
                z = Z[i, j]
                g = dY[i, j] * (one if z > 0 else neg + (z - z))
                dZ[i, j] = g
                acc[j] += g


@kernel
def column_partial_sums(X, rows_per_chunk, partial):
    """partial[k, j] = sum of X[i, j] over the rows i of chunk k (float64)."""
    R, C = X.shape
    n_chunks = partial.shape[0]
    for k in prange(n_chunks):
        start = k * rows_per_chunk
        stop = min(start + rows_per_chunk, R)
        acc = partial[k]
        for j in range(C):
            acc[j] = 0.0
        for i in range(start, stop):
            for j in range(C):
                acc[j] += X[i, j]


# ---------------------------------------------------------------- softmax (rows)

@kernel
def softmax_forward(X, Y):
    """Y[i] = exp(X[i] - max) / sum(exp(X[i] - max)), per row, float64 sums."""
    R, D = X.shape
    for i in prange(R):
        m = -np.inf
        for j in range(D):
            if X[i, j] > m:
                m = X[i, j]
        if m == -np.inf or m == np.inf:
            m = 0.0 if m == -np.inf else m  # all -inf row -> NaN (0/0), like PyTorch
        s = 0.0
        for j in range(D):
            e = math.exp(np.float64(X[i, j]) - m)
            Y[i, j] = e
            s += e
        inv = 1.0 / s
        for j in range(D):
            Y[i, j] = Y[i, j] * inv


@kernel
def softmax_backward(Y, dY, dX):
    """dX = Y * (dY - sum(dY * Y)) per row (``Y`` is the softmax output)."""
    R, D = Y.shape
    for i in prange(R):
        s = 0.0
        for j in range(D):
            s += np.float64(dY[i, j]) * Y[i, j]
        for j in range(D):
            dX[i, j] = Y[i, j] * (dY[i, j] - s)


# ---------------------------------------------------------------- losses

@kernel
def softmax_xent_onehot(Z, T, scale, loss_rows, dZ):
    """Cross-entropy from logits with target distributions T (one-hot or soft).

    loss_rows[i] = lse(Z[i]) * sum(T[i]) - sum(T[i] * Z[i]) (= -sum T log softmax Z);
    dZ[i] = scale * (softmax(Z[i]) * sum(T[i]) - T[i]). Pass a zero-size dZ to skip it.
    A logit of -inf (a masked class) with target weight 0 adds nothing (softmax 0); the
    caller rejects rows with no finite logit and -inf under a positive weight.
    """
    R, D = Z.shape
    want_grad = dZ.shape[0] == R
    for i in prange(R):
        m = -np.inf
        for j in range(D):
            if Z[i, j] > m:
                m = Z[i, j]
        if m == -np.inf:
            m = 0.0
        s = 0.0
        for j in range(D):
            s += math.exp(np.float64(Z[i, j]) - m)
        lse = m + math.log(s)
        tsum = 0.0
        tz = 0.0
        for j in range(D):
            tsum += T[i, j]
            if T[i, j] != 0.0:  # 0 * -inf (a masked logit) would be NaN
                tz += np.float64(T[i, j]) * Z[i, j]
        loss_rows[i] = lse * tsum - tz
        if want_grad:
            for j in range(D):
                dZ[i, j] = scale * (math.exp(np.float64(Z[i, j]) - lse) * tsum - T[i, j])


@kernel
def softmax_xent_labels(Z, labels, scale, loss_rows, dZ):
    """Cross-entropy from logits with integer class labels (0 <= label < D, checked by the
    caller): loss_rows[i] = lse(Z[i]) - Z[i, label]; dZ[i] = scale * (softmax(Z[i]) - onehot).
    Pass a zero-size dZ to skip the gradient."""
    R, D = Z.shape
    want_grad = dZ.shape[0] == R
    for i in prange(R):
        m = -np.inf
        for j in range(D):
            if Z[i, j] > m:
                m = Z[i, j]
        if m == -np.inf:
            m = 0.0
        s = 0.0
        for j in range(D):
            s += math.exp(np.float64(Z[i, j]) - m)
        lse = m + math.log(s)
        c = labels[i]
        loss_rows[i] = lse - Z[i, c]
        if want_grad:
            for j in range(D):
                dZ[i, j] = scale * math.exp(np.float64(Z[i, j]) - lse)
            dZ[i, c] = dZ[i, c] - scale


@kernel
def squared_error(Y, T, scale, block, partial, dY):
    """partial[b] = 0.5 * sum over block b of (Y - T)**2 (float64); dY = scale * (Y - T).

    Flat 1-D views; partial has one slot per block, summed by the caller in block order
    (deterministic). Pass a zero-size dY to skip the gradient.
    """
    n = Y.shape[0]
    want_grad = dY.shape[0] == n
    n_blocks = partial.shape[0]
    for b in prange(n_blocks):
        start = b * block
        stop = min(start + block, n)
        y, t = Y[start:stop], T[start:stop]
        s = 0.0
        if want_grad:
            dy = dY[start:stop]
            for i in range(y.shape[0]):
                d = np.float64(y[i]) - t[i]
                s += d * d
                dy[i] = scale * d
        else:
            for i in range(y.shape[0]):
                d = np.float64(y[i]) - t[i]
                s += d * d
        partial[b] = 0.5 * s


# ---------------------------------------------------------------- dropout

@kernel
def dropout_forward(X, U, p, scale, block, Y, mask):
    """mask = U >= p (kept), Y = X * mask * scale, over flat 1-D views (inverted dropout)."""
    n = X.shape[0]
    n_blocks = (n + block - 1) // block
    for b in prange(n_blocks):
        start = b * block
        stop = min(start + block, n)
        x, u, y, m = X[start:stop], U[start:stop], Y[start:stop], mask[start:stop]
        for i in range(x.shape[0]):
            if u[i] >= p:
                m[i] = 1
                y[i] = x[i] * scale
            else:
                m[i] = 0
                y[i] = x[i] * 0.0  # NaN/inf become NaN, as in numpy-ml's X * mask


@kernel
def dropout_backward(dY, mask, scale, block, dX):
    """dX = dY * mask * scale over flat 1-D views."""
    n = dY.shape[0]
    n_blocks = (n + block - 1) // block
    for b in prange(n_blocks):
        start = b * block
        stop = min(start + block, n)
        dy, m, dx = dY[start:stop], mask[start:stop], dX[start:stop]
        for i in range(dy.shape[0]):
            dx[i] = dy[i] * scale if m[i] else dy[i] * 0.0


# ---------------------------------------------------------------- fill and host-side ops

@kernel
def _fill_kernel(X, value, block):
    n = X.shape[0]
    n_blocks = (n + block - 1) // block
    for b in prange(n_blocks):
        start = b * block
        stop = min(start + block, n)
        x = X[start:stop]
        for i in range(x.shape[0]):
            x[i] = value


def fill(arr1d, value):
    """Set every element of a 1-D array to ``value`` (in place)."""
    if arr1d.shape[0]:
        _fill_kernel(arr1d.shape[0], arr1d, float(value), 1 << 14)


def matmul(a, b, out, trans_a=False, trans_b=False):
    """``out = op(a) @ op(b)`` through NumPy's BLAS; ``op(m)`` is ``m.T`` when its flag is set.

    Layers pass the flags rather than transposed arrays because the CUDA twin cannot take
    a transposed numba device array for free (see its docstring). Here ``a.T`` is a view
    that NumPy hands to BLAS as a transpose flag: no copy either way.
    """
    np.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)


def add_into(out, x):
    """out += x (x is cast to out's dtype)."""
    np.add(out, x, out=out, casting="unsafe")


@serial_kernel
def running_invstd(size, running_mean, running_var, eps, mean, invstd):
    """Inference statistics from the running ones: ``mean = float64(running_mean)``,
    ``invstd = 1 / sqrt(float64(running_var) + eps)`` (``(C,)`` each; ``size`` unused).

    The same operations, in the same order, as the NumPy expression it replaces, so the
    same bits; one call instead of five NumPy calls and three temporaries (4.3 -> ~1.5 us
    of every BatchNorm inference forward at C = 1024).
    """
    for j in range(mean.shape[0]):
        mean[j] = running_mean[j]
        invstd[j] = 1.0 / math.sqrt(np.float64(running_var[j]) + eps)


KERNELS = {
    "act_forward": act_forward,
    "act_backward": act_backward,
    "act_backward_from_output": act_backward_from_output,
    "dense_forward_epilogue": dense_forward_epilogue,
    "dense_backward_epilogue": dense_backward_epilogue,
    "column_partial_sums": column_partial_sums,
    "softmax_forward": softmax_forward,
    "softmax_backward": softmax_backward,
    "softmax_xent_onehot": softmax_xent_onehot,
    "softmax_xent_labels": softmax_xent_labels,
    "squared_error": squared_error,
    "dropout_forward": dropout_forward,
    "dropout_backward": dropout_backward,
    "fill": fill,
    "matmul": matmul,
    "add_into": add_into,
    "running_invstd": running_invstd,
}

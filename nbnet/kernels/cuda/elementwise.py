"""CUDA twins of :mod:`nbnet.kernels.cpu.elementwise` (``running_invstd`` included).

Elementwise kernels run one thread per element of a flat view (the CPU ``block``
argument is accepted and ignored). Column sums (dense bias gradient) keep the CPU's
``[n_chunks, C]`` partial layout and the column-tile tree of :mod:`.column_stats`.
Softmax and the cross-entropy kernels run one thread per row (float64 sums in column
order, exactly the CPU order). Reductions never use atomics: same input, same bits.

Host-side ops with the CPU names and arguments: ``fill(arr1d, value)``,
``add_into(out, x)`` (both kernels here) and ``matmul(a, b, out, trans_a, trans_b)``, which
needs CuPy (cuBLAS); without CuPy it raises one clear error naming what to install.
"""
import math

import numpy as np

from ._common import (launch, MAX_THREADS, F64, act_slope, act_value, block_size, block_sum,
                      column_tile, cuda, lane_tree, n_blocks)


def _grid(n):
    B = block_size()
    return n_blocks(n, B), B


# ---------------------------------------------------------------- activations

@cuda.jit
def _act_forward(X, code, alpha, Y):
    i = cuda.grid(1)
    if i < X.shape[0]:
        Y[i] = act_value(code, alpha, F64(X[i]))


def act_forward(size, X, code, alpha, block, Y):
    if X.shape[0]:
        launch(_act_forward, *_grid(X.shape[0]), X, int(code), float(alpha), Y)


@cuda.jit
def _act_backward(X, dY, code, alpha, dX):
    i = cuda.grid(1)
    if i < X.shape[0]:
        z = F64(X[i])
        if code == 1:
            dX[i] = dY[i] if z > 0.0 else dY[i] * (z - z)
        else:
            dX[i] = F64(dY[i]) * act_slope(code, alpha, z)


def act_backward(size, X, dY, code, alpha, block, dX):
    if X.shape[0]:
        launch(_act_backward, *_grid(X.shape[0]), X, dY, int(code), float(alpha), dX)


@cuda.jit
def _act_backward_from_output(Y, dY, code, dX):
    i = cuda.grid(1)
    if i < Y.shape[0]:
        y = F64(Y[i])  # in float64, as _act_backward
        dX[i] = F64(dY[i]) * ((1.0 - y * y) if code == 6 else (y * (1.0 - y)))


def act_backward_from_output(size, Y, dY, code, block, dX):
    """``dX = dY * f'(z)`` from the output ``Y`` of tanh (6) or the sigmoid (7); see the
    CPU twin."""
    if Y.shape[0]:
        launch(_act_backward_from_output, *_grid(Y.shape[0]), Y, dY, int(code), dX)


# ---------------------------------------------------------------- dense epilogues

@cuda.jit
def _dense_fwd(Z, b, code, alpha, Y):
    R, C = Z.shape
    idx = cuda.grid(1)
    if idx < R * C:
        i = idx // C
        j = idx - i * C
        z = Z[i, j] + b[j]
        Z[i, j] = z
        if code != 0:
            Y[i, j] = act_value(code, alpha, F64(z))


def dense_forward_epilogue(size, Z, b, code, alpha, rows_per_chunk, Y):
    if Z.size:
        launch(_dense_fwd, *_grid(Z.size), Z, b, int(code), float(alpha), Y)


@cuda.jit
def _dense_bwd(Z, dY, code, alpha, rows_per_chunk, dZ, partial_db):
    R, C = Z.shape
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    TX = cuda.blockDim.x
    TY = cuda.blockDim.y
    k = cuda.blockIdx.x
    j = cuda.blockIdx.y * TX + tx
    lane = ty * TX + tx
    buf = cuda.shared.array(MAX_THREADS, F64)
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, R)
    s = 0.0
    if j < C:
        for i in range(start + ty, stop, TY):
            z = F64(Z[i, j])
            if code == 1:
                dZ[i, j] = dY[i, j] if z > 0.0 else dY[i, j] * (z - z)
            else:
                dZ[i, j] = F64(dY[i, j]) * act_slope(code, alpha, z)
            s += dZ[i, j]  # sum what backward propagates (rounded to dtype), as on CPU
    buf[lane] = s
    cuda.syncthreads()
    lane_tree(buf, tx, ty, TX, TY)
    if ty == 0 and j < C:
        partial_db[k, j] = buf[tx]


def dense_backward_epilogue(size, Z, dY, code, alpha, rows_per_chunk, dZ, partial_db):
    n_chunks, C = partial_db.shape
    TX, TY = column_tile()
    launch(_dense_bwd, (n_chunks, n_blocks(C, TX)), (TX, TY), Z, dY, int(code), float(alpha),
                                                      int(rows_per_chunk), dZ, partial_db)


@cuda.jit
def _col_sums(X, rows_per_chunk, partial):
    R, C = X.shape
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    TX = cuda.blockDim.x
    TY = cuda.blockDim.y
    k = cuda.blockIdx.x
    j = cuda.blockIdx.y * TX + tx
    lane = ty * TX + tx
    buf = cuda.shared.array(MAX_THREADS, F64)
    start = k * rows_per_chunk
    stop = min(start + rows_per_chunk, R)
    s = 0.0
    if j < C:
        for i in range(start + ty, stop, TY):
            s += X[i, j]
    buf[lane] = s
    cuda.syncthreads()
    lane_tree(buf, tx, ty, TX, TY)
    if ty == 0 and j < C:
        partial[k, j] = buf[tx]


def column_partial_sums(size, X, rows_per_chunk, partial):
    n_chunks, C = partial.shape
    TX, TY = column_tile()
    launch(_col_sums, (n_chunks, n_blocks(C, TX)), (TX, TY), X, int(rows_per_chunk), partial)


# ---------------------------------------------------------------- softmax and losses

@cuda.jit(device=True)
def _row_max(X, i, D):
    m = -math.inf
    for j in range(D):
        if X[i, j] > m:
            m = F64(X[i, j])
    return m


@cuda.jit
def _softmax_fwd(X, Y):
    R, D = X.shape
    i = cuda.grid(1)
    if i < R:
        m = _row_max(X, i, D)
        if m == -math.inf:
            m = 0.0
        s = 0.0
        for j in range(D):
            e = math.exp(F64(X[i, j]) - m)
            Y[i, j] = e
            s += e
        inv = 1.0 / s
        for j in range(D):
            Y[i, j] = Y[i, j] * inv


def softmax_forward(size, X, Y):
    if X.shape[0]:
        launch(_softmax_fwd, *_grid(X.shape[0]), X, Y)


@cuda.jit
def _softmax_bwd(Y, dY, dX):
    R, D = Y.shape
    i = cuda.grid(1)
    if i < R:
        s = 0.0
        for j in range(D):
            s += F64(dY[i, j]) * Y[i, j]
        for j in range(D):
            dX[i, j] = Y[i, j] * (dY[i, j] - s)


def softmax_backward(size, Y, dY, dX):
    if Y.shape[0]:
        launch(_softmax_bwd, *_grid(Y.shape[0]), Y, dY, dX)


@cuda.jit
def _xent_onehot(Z, T, scale, loss_rows, dZ):
    R, D = Z.shape
    i = cuda.grid(1)
    if i < R:
        m = _row_max(Z, i, D)
        if m == -math.inf:
            m = 0.0
        s = 0.0
        for j in range(D):
            s += math.exp(F64(Z[i, j]) - m)
        lse = m + math.log(s)
        tsum = 0.0
        tz = 0.0
        for j in range(D):
            tsum += T[i, j]
            if T[i, j] != 0.0:  # 0 * -inf (a masked logit) would be NaN
                tz += F64(T[i, j]) * Z[i, j]
        loss_rows[i] = lse * tsum - tz
        if dZ.shape[0] == R:
            for j in range(D):
                dZ[i, j] = scale * (math.exp(F64(Z[i, j]) - lse) * tsum - T[i, j])


def softmax_xent_onehot(size, Z, T, scale, loss_rows, dZ):
    if Z.shape[0]:
        launch(_xent_onehot, *_grid(Z.shape[0]), Z, T, float(scale), loss_rows, dZ)


@cuda.jit
def _xent_labels(Z, labels, scale, loss_rows, dZ):
    R, D = Z.shape
    i = cuda.grid(1)
    if i < R:
        m = _row_max(Z, i, D)
        if m == -math.inf:
            m = 0.0
        s = 0.0
        for j in range(D):
            s += math.exp(F64(Z[i, j]) - m)
        lse = m + math.log(s)
        c = labels[i]
        loss_rows[i] = lse - Z[i, c]
        if dZ.shape[0] == R:
            for j in range(D):
                dZ[i, j] = scale * math.exp(F64(Z[i, j]) - lse)
            dZ[i, c] = dZ[i, c] - scale


def softmax_xent_labels(size, Z, labels, scale, loss_rows, dZ):
    if Z.shape[0]:
        launch(_xent_labels, *_grid(Z.shape[0]), Z, labels, float(scale), loss_rows, dZ)


@cuda.jit
def _squared_error(Y, T, scale, block, partial, dY):
    n = Y.shape[0]
    want_grad = dY.shape[0] == n
    b = cuda.blockIdx.x
    t = cuda.threadIdx.x
    B = cuda.blockDim.x
    buf = cuda.shared.array(MAX_THREADS, F64)
    start = b * block
    stop = min(start + block, n)
    s = 0.0
    for i in range(start + t, stop, B):
        d = F64(Y[i]) - T[i]
        s += d * d
        if want_grad:
            dY[i] = scale * d
    s = block_sum(buf, s, t, B)
    if t == 0:
        partial[b] = 0.5 * s


def squared_error(size, Y, T, scale, block, partial, dY):
    """One CUDA block per CPU block: ``partial`` keeps the CPU layout (summed by the caller)."""
    if partial.shape[0]:
        launch(_squared_error, partial.shape[0], block_size(), Y, T, float(scale), int(block), partial, dY)


# ---------------------------------------------------------------- dropout

@cuda.jit
def _dropout_fwd(X, U, p, scale, Y, mask):
    i = cuda.grid(1)
    if i < X.shape[0]:
        if U[i] >= p:
            mask[i] = 1
            Y[i] = X[i] * scale
        else:
            mask[i] = 0
            Y[i] = X[i] * 0.0


def dropout_forward(size, X, U, p, scale, block, Y, mask):
    if X.shape[0]:
        launch(_dropout_fwd, *_grid(X.shape[0]), X, U, float(p), float(scale), Y, mask)


@cuda.jit
def _dropout_bwd(dY, mask, scale, dX):
    i = cuda.grid(1)
    if i < dY.shape[0]:
        dX[i] = dY[i] * scale if mask[i] else dY[i] * 0.0


def dropout_backward(size, dY, mask, scale, block, dX):
    if dY.shape[0]:
        launch(_dropout_bwd, *_grid(dY.shape[0]), dY, mask, float(scale), dX)


# ---------------------------------------------------------------- fill, add_into, stats

@cuda.jit
def _fill(X, value):
    i = cuda.grid(1)
    if i < X.shape[0]:
        X[i] = value


def fill(arr1d, value):
    """Set every element of a 1-D device array to ``value`` (in place)."""
    if arr1d.shape[0]:
        launch(_fill, *_grid(arr1d.shape[0]), arr1d, float(value))


@cuda.jit
def _add_into(out, x):
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = out[i] + x[i]


def add_into(out, x):
    """out += x (flat; x is cast to out's dtype)."""
    o = out.reshape(-1)
    if o.shape[0]:
        launch(_add_into, *_grid(o.shape[0]), o, x.reshape(-1))


@cuda.jit
def _running_invstd(running_mean, running_var, eps, mean, invstd):
    j = cuda.grid(1)
    if j < mean.shape[0]:
        mean[j] = running_mean[j]
        invstd[j] = 1.0 / math.sqrt(F64(running_var[j]) + eps)


def running_invstd(size, running_mean, running_var, eps, mean, invstd):
    """mean = float64(running_mean); invstd = 1/sqrt(running_var + eps) (inference)."""
    if mean.shape[0]:
        launch(_running_invstd, *_grid(mean.shape[0]), running_mean, running_var, float(eps), mean, invstd)


# ---------------------------------------------------------------- matmul (cuBLAS via CuPy)

_cupy = None


def _get_cupy():
    global _cupy
    if _cupy is None:
        try:
            import cupy
        except Exception as exc:
            raise RuntimeError(
                "dense layers on device 'cuda' need CuPy for the matrix product (cuBLAS); "
                "install it with: pip install cupy-cuda12x (or pip install 'nbnet[cupy]'). "
                f"Import failed: {type(exc).__name__}: {exc}") from None
        _cupy = cupy
    return _cupy


def matmul(a, b, out, trans_a=False, trans_b=False):
    """``out = op(a) @ op(b)`` on the GPU through CuPy/cuBLAS; ``op(m)`` is ``m.T`` when its
    flag is set. ``a``, ``b`` and ``out`` are taken zero-copy (numba, CuPy or PyTorch device
    arrays).

    The transposes are taken on CuPy's views of the operands, which cuBLAS reads as a
    transpose flag. Never pass ``x.T`` of a numba device array instead: numba-cuda's
    ``DeviceNDArray.T`` copies through a transpose kernel that it compiles anew on every
    call (~0.28 s on an H200 with numba-cuda 0.30.4): that made a dense layer's backward
    take 0.6-0.9 s per batch.

    Under the simulator (no real device memory) it computes on the host instead.
    """
    from ... import devices
    if devices.is_simulator():
        A, B = np.asarray(a), np.asarray(b)
        out[...] = np.matmul(A.T if trans_a else A, B.T if trans_b else B)
        return
    cp = _get_cupy()
    A, B = cp.asarray(a), cp.asarray(b)
    cp.matmul(A.T if trans_a else A, B.T if trans_b else B, out=cp.asarray(out))


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
    "add_into": add_into,
    "matmul": matmul,
    "running_invstd": running_invstd,
}

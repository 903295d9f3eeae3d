"""Shared pieces of the CUDA kernels: the launch geometry, block reductions, activations.

Launch geometry is decided in Python (never inside a kernel) from ``config.CUDA_BLOCK``,
read at every launch, so tests and benchmarks can change it at run time:

* column kernels use 2-D blocks of ``(TX, TY)`` threads: ``TX`` adjacent columns (one
  coalesced load per warp row) times ``TY`` row lanes; see :func:`column_tile`;
* row, group and elementwise kernels use 1-D blocks of ``CUDA_BLOCK`` threads.

Reductions are shared-memory trees with ``cuda.syncthreads()`` (no warp intrinsics, no
atomics), so every kernel also runs under ``NUMBA_ENABLE_CUDASIM=1``, and the order of
every floating-point addition is fixed by the shape and the block size: the same input
gives the same bits on every run. Shared buffers are sized for the largest block CUDA
allows (1024 threads); the block size itself is a launch parameter.
"""
import math
import os

import numpy as np

from ... import config, devices
from .. import activation_math

cuda = devices.import_cuda()

#: Shared buffers hold one float64 per thread of the largest legal block.
MAX_THREADS = 1024
F64 = np.float64

#: Column kernels of the fused BatchNorm path aim for about this many blocks (row chunks x
#: 32-column tiles): ~8 resident 256-thread blocks on each of the 132 SMs of an H100/H200,
#: so one wave keeps every SM streaming. ``NBNET_CUDA_TARGET_BLOCKS`` overrides it.
TARGET_BLOCKS = int(os.environ.get("NBNET_CUDA_TARGET_BLOCKS", "1024") or 1024)
#: At most this many row chunks: the consumer kernel of the partial buffers merges all
#: ``n_chunks`` partials of its column tile in every block (``n_chunks * 32`` values).
MAX_CHUNKS = 256
#: At least this many rows per lane in a chunk (4 rows per iteration of the unrolled loops).
MIN_ROWS_PER_LANE = 4

#: Every launch goes through :func:`launch`, which counts it (tests and benchmarks read
#: ``LAUNCHES[0]``) and reuses the ``kernel[grid, block]`` configuration object.
LAUNCHES = [0]
_configs = {}
_SIM = devices.is_simulator()


def launch(kernel, grid, block, *args):
    """``kernel[grid, block](*args)`` with the configuration cached and the launch counted."""
    LAUNCHES[0] += 1
    if _SIM:  # the simulator's kernel[grid, block] is the kernel itself: never cache it
        kernel[grid, block](*args)
        return
    key = (kernel, grid, block)
    cfg = _configs.get(key)
    if cfg is None:
        if len(_configs) > 4096:
            _configs.clear()
        cfg = _configs[key] = kernel[grid, block]
    cfg(*args)


_workspace = {}
_WORKSPACE_MAX = 64


def workspace(tag, shape, dtype=np.float64):
    """A device scratch array reused across calls (the partial buffers of the fused ops).

    Reuse is safe because every nbnet kernel runs on the default stream, in order: the
    kernel that consumes a scratch buffer finishes before the next producer overwrites it.
    Scratch contents never leave an op.
    """
    key = (tag, tuple(int(d) for d in shape), np.dtype(dtype).str)
    arr = _workspace.get(key)
    if arr is None:
        if len(_workspace) >= _WORKSPACE_MAX:
            _workspace.clear()
        arr = _workspace[key] = cuda.device_array(key[1], dtype=dtype)
    return arr


def block_size():
    """Threads per block (``config.CUDA_BLOCK``), checked: a power of two in [2, 1024]."""
    b = int(config.CUDA_BLOCK)
    if b < 2 or b > MAX_THREADS or b & (b - 1):
        raise ValueError(f"config.CUDA_BLOCK (NBNET_CUDA_BLOCK) must be a power of two in "
                         f"[2, {MAX_THREADS}], got {b}")
    return b


def column_tile(block=None):
    """``(TX, TY)``: columns per block (at most a warp) and row lanes per block."""
    b = block_size() if block is None else block
    tx = max(1, min(32, b // 4))
    return tx, b // tx


def column_plan(R, C):
    """``(rows_per_chunk, n_chunks, TX, TY)`` for the fused column ops on an ``(R, C)`` view.

    A block is a (row chunk, ``TX``-column tile); the chunk count gives about
    :data:`TARGET_BLOCKS` blocks in all (enough parallelism for few columns), at most
    :data:`MAX_CHUNKS`, with at least ``MIN_ROWS_PER_LANE`` rows per row lane. Depends on
    the shape and ``CUDA_BLOCK`` only, so the summation order (every bit) is fixed.
    """
    TX, TY = column_tile()
    n_tiles = n_blocks(C, TX)
    want = max(1, min(MAX_CHUNKS, -(-TARGET_BLOCKS // n_tiles)))
    rpc = max(-(-int(R) // want), MIN_ROWS_PER_LANE * TY, 1)
    return rpc, n_blocks(R, rpc), TX, TY


def merge_tile():
    """A taller tile for the merge kernels: more lanes walk the chunks in parallel."""
    return column_tile(min(MAX_THREADS, 4 * block_size()))


def n_blocks(n, per):
    return max(1, -(-int(n) // int(per)))


def warn_off():
    """Silence numba's low-occupancy warning (tiny test grids trigger it)."""
    try:
        from numba.core import config as nb_config
        nb_config.CUDA_LOW_OCCUPANCY_WARNINGS = 0
    except Exception:  # pragma: no cover
        pass


warn_off()

# The scalar activation math is shared with the CPU kernels (one source, two compilers):
# f(z) and f'(z) for one float64 value, codes of :mod:`nbnet.activations`.
act_value = cuda.jit(device=True)(activation_math.act_value)
act_slope = cuda.jit(device=True)(activation_math.act_slope)


@cuda.jit(device=True)
def block_sum(buf, v, t, nthreads):
    """Sum of ``v`` over the ``nthreads`` (a power of two) threads of a 1-D block.

    A fixed pairwise tree in shared memory: deterministic, no warp intrinsics. Every
    thread must call it; every thread gets the total.
    """
    buf[t] = v
    cuda.syncthreads()
    step = nthreads // 2
    while step > 0:
        if t < step:
            buf[t] += buf[t + step]
        cuda.syncthreads()
        step //= 2
    total = buf[0]
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def block_sum_pair(buf_a, buf_b, a, b, t, nthreads):
    """Two :func:`block_sum` trees in one set of barriers; returns ``(sum_a, sum_b)``."""
    buf_a[t] = a
    buf_b[t] = b
    cuda.syncthreads()
    step = nthreads // 2
    while step > 0:
        if t < step:
            buf_a[t] += buf_a[t + step]
            buf_b[t] += buf_b[t + step]
        cuda.syncthreads()
        step //= 2
    total_a = buf_a[0]
    total_b = buf_b[0]
    cuda.syncthreads()
    return total_a, total_b


@cuda.jit(device=True)
def lane_tree(buf, tx, ty, TX, TY):
    """Sum ``buf[ty * TX + tx]`` over the ``TY`` lanes of each column ``tx`` (in place:
    the column total lands in ``buf[tx]``). Fixed pairwise order."""
    lane = ty * TX + tx
    step = TY // 2
    while step > 0:
        if ty < step:
            buf[lane] += buf[lane + step * TX]
        cuda.syncthreads()
        step //= 2


@cuda.jit(device=True)
def chan_tree(cnt, mu, q, tx, ty, TX, TY):
    """Merge the ``TY`` lanes' ``(count, mean, M2)`` of each column ``tx`` (Chan's update,
    fixed pairwise order; lanes with count 0 are empty). The column's result lands in
    lane ``tx`` (``ty == 0``). The caller writes every lane and syncs first."""
    lane = ty * TX + tx
    step = TY // 2
    while step > 0:
        if ty < step:
            o = lane + step * TX
            n_b = cnt[o]
            if n_b > 0.0:
                n_a = cnt[lane]
                n = n_a + n_b
                delta = mu[o] - mu[lane]
                mu[lane] += delta * (n_b / n)
                q[lane] += q[o] + delta * delta * (n_a * n_b / n)
                cnt[lane] = n
        cuda.syncthreads()
        step //= 2


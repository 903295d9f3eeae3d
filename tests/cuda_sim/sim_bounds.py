"""Bounds-checked arrays for numba's CUDA simulator (the suite's debug mode).

Under ``NUMBA_ENABLE_CUDASIM=1`` a kernel indexes NumPy arrays, so a negative index wraps
silently (``a[-1]`` is the last element) where a real GPU reads or writes outside the
allocation (wrong values, then ``CUDA_ERROR_ILLEGAL_ADDRESS``). :func:`install` makes
every integer index into a device array, a shared array or a local array inside a kernel
raise ``IndexError`` when it is negative or past the end, and fills new shared and local
arrays with NaN, so a read of shared memory that no thread wrote shows up as NaN in the
results instead of a lucky zero. It also makes the simulator's shared-array cache
thread-safe (two threads of one block could otherwise each create "the" shared array).

Enabled by tests/cuda_sim/suite_cuda.py under the simulator unless ``NBNET_SIM_BOUNDS=0``.
"""
import sys
import threading
import traceback

import numpy as np

_lock = threading.Lock()
_installed = False


def _check(shape, idx):
    if not isinstance(idx, tuple):
        idx = (idx,)
    for d, i in enumerate(idx):
        if isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)):
            if d >= len(shape) or i < 0 or i >= shape[d]:
                raise IndexError(f"kernel index {idx} out of bounds for an array of shape "
                                 f"{shape} (a real GPU would touch memory outside it)")


class CheckedArray(np.ndarray):
    """An ndarray whose integer indices must be in range (no negative wrap-around)."""

    def __getitem__(self, idx):
        _check(self.shape, idx)
        return np.ndarray.__getitem__(self, idx)

    def __setitem__(self, idx, value):
        _check(self.shape, idx)
        np.ndarray.__setitem__(self, idx, value)


def install():
    global _installed
    if _installed:
        return
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.cuda.simulator.cudadrv import devicearray
    from numba.np import numpy_support

    get, set_ = devicearray.FakeCUDAArray.__getitem__, devicearray.FakeCUDAArray.__setitem__

    def checked_get(self, idx):
        _check(self._ary.shape, idx)
        return get(self, idx)

    def checked_set(self, idx, value):
        _check(self._ary.shape, idx)
        return set_(self, idx, value)

    devicearray.FakeCUDAArray.__getitem__ = checked_get
    devicearray.FakeCUDAArray.__setitem__ = checked_set

    def as_dtype(dtype):
        return numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else np.dtype(dtype)

    def shared_array(self, shape, dtype, alignment=None):
        if shape == 0:
            raise NotImplementedError("dynamic shared memory is not used by nbnet")
        # one array per (file, line) of the kernel, as the simulator does, under a lock
        caller = traceback.extract_stack(sys._getframe())[-2][0:2]
        with _lock:
            res = self._allocations.get(caller)
            if res is None:
                res = np.full(shape, np.nan, as_dtype(dtype)).view(CheckedArray)
                self._allocations[caller] = res
        return res

    def local_array(self, shape, dtype, alignment=None):
        return np.full(shape, np.nan, as_dtype(dtype)).view(CheckedArray)

    kernelapi.FakeCUDAShared.array = shared_array
    kernelapi.FakeCUDALocal.array = local_array
    _installed = True

"""Devices: names, availability, and moving arrays between host and device.

Two devices exist: ``"cpu"`` (always available) and ``"cuda"`` (available when
numba-cuda is installed and either a GPU is present or the simulator is enabled with
``NUMBA_ENABLE_CUDASIM=1``). Nothing here imports ``numba.cuda`` until a CUDA question is
asked, so ``import nbnet`` and all CPU work never pay for it and never fail because of it.
"""
import importlib
import os

import numpy as np

from . import config

DEVICES = ("cpu", "cuda")

_default_device = None
_cuda_status = None  # (available: bool, reason: str), computed once


def _bridge_numpy_for_numba_cuda():
    """Restore the NumPy names that numba-cuda still registers.

    numba-cuda 0.30.x (seen with 0.30.4) registers an implementation for
    ``np.row_stack`` at import time; NumPy 2.5 removed ``row_stack`` (deprecated since
    2.0 in favour of ``np.vstack``), so ``import numba.cuda`` fails with an
    AttributeError on NumPy >= 2.5. ``row_stack`` was always an alias of ``vstack``, so
    the bridge restores exactly that alias, and only when it is missing.
    """
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack


def import_cuda():
    """Import and return ``numba.cuda`` (bridged for NumPy >= 2.5)."""
    _bridge_numpy_for_numba_cuda()
    cuda = importlib.import_module("numba.cuda")
    if is_simulator():
        _bridge_simulator_shape()
    elif not _pool_installed and _pool_choice() == "cupy":
        _use_cupy_pool(cuda)
    return cuda


def _pool_choice():
    """Which allocator numba uses on a real GPU (``NBNET_CUDA_POOL``).

    ``auto`` (the default): CuPy's caching pool when CuPy imports, else numba's own
    allocator; ``cupy``: CuPy's pool (an error if CuPy is missing); ``none``/``off``/
    ``numba``: numba's allocator (cuMemAlloc/cuMemFree per array).
    """
    choice = os.environ.get("NBNET_CUDA_POOL", "auto").strip().lower() or "auto"
    if choice in ("none", "off", "0", "numba", "default"):
        return "numba"
    if choice == "cupy":
        return "cupy"
    try:
        import cupy  # noqa: F401
    except Exception:
        return "numba"
    return "cupy"


def cuda_pool():
    """The allocator in use for numba device arrays: ``"cupy"`` or ``"numba"``."""
    return "cupy" if _pool_installed else "numba"


_pool_installed = False


def _use_cupy_pool(cuda):
    """numba allocations come from CuPy's memory pool (default when CuPy imports; see
    :func:`_pool_choice`; ``NBNET_CUDA_POOL=none`` turns it off).

    numba's default allocator calls cuMemAlloc/cuMemFree for every array; layers allocate
    their outputs each step, so a caching pool (PyTorch and CuPy both use one) removes
    that cost. Must be set before the first CUDA context is created. numba's documented
    External Memory Management plugin interface.
    """
    global _pool_installed
    if _pool_installed:
        return
    import ctypes

    import cupy
    from numba.cuda import GetIpcHandleMixin, HostOnlyCUDAMemoryManager, MemoryPointer

    class _CupyPool(GetIpcHandleMixin, HostOnlyCUDAMemoryManager):
        def initialize(self):
            super().initialize()
            self._pool = cupy.get_default_memory_pool()
            self._live = {}

        def memalloc(self, size):
            mem = self._pool.malloc(size)
            ptr = int(mem.ptr)
            self._live[ptr] = mem
            live = self._live
            return MemoryPointer(cuda.current_context(), ctypes.c_void_p(ptr), size,
                                 finalizer=lambda: live.pop(ptr, None))

        def get_memory_info(self):
            return cupy.cuda.runtime.memGetInfo()  # (free, total) of the device

        @property
        def interface_version(self):
            return 1

    try:
        cuda.set_memory_manager(_CupyPool)
    except RuntimeError:  # a context already exists: keep numba's allocator
        return
    _pool_installed = True


def _bridge_simulator_shape():
    """Give the simulator's host-side device arrays a plain tuple ``shape``.

    numba's simulator returns a ``FakeShape`` that refuses negative indices on the host
    too (``X.shape[-1]`` raises IndexError), while a real ``DeviceNDArray.shape`` is a
    plain tuple. Layer code indexes shapes from the end, so under the simulator the host
    side gets the real behaviour back (kernels never index shapes from the end).
    """
    try:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    except ImportError:  # pragma: no cover - another simulator layout
        return
    if not getattr(FakeCUDAArray, "_nbnet_plain_shape", False):
        FakeCUDAArray.shape = property(lambda self: tuple(self._ary.shape))
        FakeCUDAArray._nbnet_plain_shape = True


def cuda_status():
    """``(available, reason)`` for the CUDA device, computed once per process."""
    global _cuda_status
    if _cuda_status is None:
        try:
            cuda = import_cuda()
        except Exception as exc:  # ImportError, or a broken CUDA install
            _cuda_status = (False, f"numba-cuda is not importable ({type(exc).__name__}: {exc}); "
                                   "install it with: pip install 'nbnet[cuda]'")
        else:
            try:
                ok = bool(cuda.is_available())
            except Exception as exc:
                ok, why = False, f"the CUDA driver failed to initialise ({exc})"
            else:
                why = ("no CUDA GPU or driver was found (set NUMBA_ENABLE_CUDASIM=1 to run the "
                       "CUDA kernels in numba's simulator)")
            _cuda_status = (True, "simulator" if is_simulator() else "gpu") if ok else (False, why)
    return _cuda_status


def is_simulator():
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def available_devices():
    """The device names usable in this process, e.g. ``["cpu"]`` or ``["cpu", "cuda"]``."""
    return ["cpu"] + (["cuda"] if cuda_status()[0] else [])


def unavailable_reason(device):
    """Why ``device`` cannot be used (``None`` when it can)."""
    if device == "cpu":
        return None
    if device == "cuda":
        ok, why = cuda_status()
        return None if ok else why
    return f"unknown device (nbnet knows {', '.join(DEVICES)})"


def check_device(device):
    """Return ``device`` if usable, else raise one clear RuntimeError/ValueError."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}")
    device = device.lower()
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}: expected one of {', '.join(DEVICES)}")
    why = unavailable_reason(device)
    if why is not None:
        raise RuntimeError(f"device {device!r} is not available: {why}. "
                           f"Available devices: {', '.join(available_devices())}")
    return device


def set_default_device(device):
    """Set the device that new layers use when none is given (also ``NBNET_DEVICE``)."""
    global _default_device
    _default_device = check_device(device)


def get_default_device():
    """The device new layers use: :func:`set_default_device`, else ``NBNET_DEVICE``, else cpu."""
    return _default_device if _default_device is not None else config.DEFAULT_DEVICE.lower()


def device_info():
    """A dict describing the GPU (name, compute capability, memory) or why there is none."""
    ok, why = cuda_status()
    if not ok:
        return {"available": False, "reason": why}
    cuda = import_cuda()
    if is_simulator():
        return {"available": True, "simulator": True, "name": "numba CUDA simulator"}
    dev = cuda.get_current_device()
    info = {"available": True, "simulator": False,
            "name": dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name),
            "compute_capability": ".".join(map(str, dev.compute_capability))}
    try:
        free, total = cuda.current_context().get_memory_info()
        info["memory_total_gib"] = round(total / 2**30, 2)
        info["memory_free_gib"] = round(free / 2**30, 2)
    except Exception:  # pragma: no cover - driver specific
        pass
    return info


# ---------------------------------------------------------------- array helpers

def is_device_array(x):
    """True for arrays living on a GPU (anything exposing ``__cuda_array_interface__``),
    and for the simulator's device arrays (which do not expose it)."""
    return hasattr(x, "__cuda_array_interface__") or type(x).__name__ == "FakeCUDAArray"


def empty(shape, dtype, device="cpu"):
    if device == "cpu":
        return np.empty(shape, dtype=dtype)
    return import_cuda().device_array(shape, dtype=dtype)


def zeros(shape, dtype, device="cpu"):
    if device == "cpu":
        return np.zeros(shape, dtype=dtype)
    out = import_cuda().device_array(shape, dtype=dtype)
    from .registry import get_kernel
    get_kernel("fill", device)(out.reshape(-1) if out.ndim else out, 0.0)
    return out


def to_device(x, device):
    """Move ``x`` to ``device``: NumPy for "cpu", a numba device array for "cuda"."""
    if device == "cpu":
        return to_host(x)
    cuda = import_cuda()
    if is_device_array(x):
        if hasattr(x, "copy_to_host"):
            return x  # already a numba device array: no copy, no wrapper
        return cuda.as_cuda_array(x)  # CuPy, PyTorch, ...: a zero-copy view
    return cuda.to_device(np.ascontiguousarray(x))


def to_host(x):
    """A NumPy array holding ``x`` (copied back from the GPU when needed)."""
    if isinstance(x, np.ndarray):
        return x
    if is_device_array(x):
        if hasattr(x, "copy_to_host"):
            return x.copy_to_host()
        return import_cuda().as_cuda_array(x).copy_to_host()
    return np.asarray(x)

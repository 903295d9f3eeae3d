"""CUDA kernels (``numba.cuda``): twins of :mod:`nbnet.kernels.cpu` with the same op names
and argument lists (the leading ``size`` is accepted; launch geometry comes from
``config.CUDA_BLOCK``).

Importing this package imports ``numba.cuda`` through :func:`nbnet.devices.import_cuda`
(which bridges ``np.row_stack`` for NumPy >= 2.5); the registry imports it only when a
"cuda" kernel is first requested. Every kernel also runs under ``NUMBA_ENABLE_CUDASIM=1``.
"""
import importlib

from ... import devices

devices.import_cuda()

_MODULES = ("column_stats", "row_stats", "group_stats", "optimizers", "elementwise")

KERNELS = {}
for _name in _MODULES:
    try:
        _module = importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{_name}":
            raise
        continue
    KERNELS.update(_module.KERNELS)

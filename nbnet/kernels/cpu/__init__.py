"""CPU kernels (``@njit(parallel=True, cache=True)``, each with a serial path for small inputs).

Each module groups kernels by access pattern and exports a ``KERNELS`` dict; this package
merges them into one ``KERNELS`` table that :mod:`nbnet.registry` reads. A kernel is
called as ``kernel(size, *arrays)``, where ``size`` (an element count) picks the serial
twin for small work. ``nbnet.kernels.cuda`` exposes the same names with the same argument
lists.

==================  ==========================================================
module              pattern
==================  ==========================================================
column_stats        statistics per column, reduced over row chunks (BatchNorm)
row_stats           statistics per row (LayerNorm1D/2D, RMSNorm)
group_stats         statistics per example and channel group (GroupNorm, InstanceNorm)
optimizers          in-place parameter updates over flat arrays
elementwise         activations, dense-layer epilogues, dropout, losses
==================  ==========================================================
"""
import importlib

_MODULES = ("column_stats", "row_stats", "group_stats", "optimizers", "elementwise")

KERNELS = {}
for _name in _MODULES:
    try:
        _module = importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as exc:  # a module not written yet (during development)
        if exc.name != f"{__name__}.{_name}":
            raise
        continue
    KERNELS.update(_module.KERNELS)


def all_dispatchers():
    """Every numba dispatcher behind ``KERNELS`` (one per Kernel, plus plain jitted functions)."""
    from numba.core.registry import CPUDispatcher

    found = []
    for k in KERNELS.values():
        if hasattr(k, "dispatchers"):
            found.extend(k.dispatchers())
        elif isinstance(k, CPUDispatcher):
            found.append(k)
    return found

"""The kernel registry: ``(op, device) -> kernel``.

Layers never import a device module; they ask the registry for an op on their device.
Each device's kernel package (``nbnet.kernels.cpu``, ``nbnet.kernels.cuda``) exposes a
dict ``KERNELS`` mapping op names to callables with the same argument lists on every
device; the package is imported on first use, so ``import nbnet`` compiles and loads
nothing. Extra kernels (a user's own device, a test double) can be added with
:func:`register`.
"""
import importlib

from . import devices

_DEVICE_PACKAGES = {"cpu": "nbnet.kernels.cpu", "cuda": "nbnet.kernels.cuda"}
_loaded = set()
_kernels = {}


def register(op, device):
    """Decorator: register ``fn`` as the kernel for ``op`` on ``device``."""
    def deco(fn):
        _kernels[(op, device)] = fn
        return fn
    return deco


def _load(device):
    if device in _loaded:
        return
    devices.check_device(device)
    module = importlib.import_module(_DEVICE_PACKAGES[device])
    for op, fn in module.KERNELS.items():
        _kernels.setdefault((op, device), fn)
    _loaded.add(device)


def get_kernel(op, device):
    """The kernel for ``op`` on ``device``.

    Raises
    ------
    RuntimeError
        If the device is not available (the message says why, and lists those that are).
    NotImplementedError
        If the device has no kernel for ``op``.
    """
    if (op, device) not in _kernels:
        _load(device)
    try:
        return _kernels[(op, device)]
    except KeyError:
        have = sorted(d for (o, d) in _kernels if o == op)
        raise NotImplementedError(f"no kernel for op {op!r} on device {device!r}; "
                                  f"it exists on: {', '.join(have) or 'no device'}") from None


def ops(device):
    """Names of the ops registered for ``device`` (loads the device's kernels)."""
    _load(device)
    return sorted(o for (o, d) in _kernels if d == device)

"""LayerBase: numpy-ml's layer contract, with a device.

A layer owns its state and validates its input; the arithmetic lives in kernels that
the layer fetches from :mod:`nbnet.registry` for its device. The contract (numpy-ml's):

* ``forward(X, retain_derived=True)``: with ``retain_derived`` the input (and whatever
  backward needs) is kept in ``self.X`` / ``self.derived_variables``, one entry per call,
  until the next ``update()`` or ``flush_gradients()``.
* ``backward(dLdy, retain_grads=True)``: one gradient per retained forward call (a list
  when forward was called several times); parameter gradients *accumulate* in
  ``self.gradients`` when ``retain_grads``. Returns dL/dX (a list for a list).
* ``update(cur_loss=None)``: one optimizer step on every parameter that has a gradient,
  in place, then ``flush_gradients()``.
* ``freeze()``/``unfreeze()``, ``summary()``, ``set_params(summary_dict)``,
  ``hyperparameters``, and the dicts ``parameters``, ``gradients``, ``derived_variables``.

Beyond numpy-ml: ``device`` ("cpu" or "cuda"), ``train()``/``eval()`` (a frozen layer or
one in eval mode runs inference), and ``to(device)``.
"""
import math
import sys

import numpy as np

from .. import config, devices
from .._validation import SUPPORTED_DTYPES
from ..registry import get_kernel


class LayerBase:
    """Base class of every nbnet layer (see the module docstring for the contract).

    Device rule (``device="cuda"``): parameters, running statistics, gradients and
    optimizer state live on the GPU. ``forward``/``backward`` accept any array exposing
    ``__cuda_array_interface__`` (numba device arrays, CuPy, PyTorch CUDA tensors) without
    a copy and return numba device arrays; NumPy input is transferred to the GPU and the
    result comes back as NumPy (see docs/cuda.md).
    """

    #: every key of ``parameters`` this layer type holds (learnt and running)
    _param_keys = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ("forward", "backward"):
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "_nbnet_host_io", False):
                setattr(cls, name, _host_io(fn))

    def __init__(self, optimizer=None, device=None):
        from ..optimizers import get_optimizer

        self.device = devices.check_device(device if device is not None else devices.get_default_device())
        self.X = []
        self.act_fn = None
        self.trainable = True
        self.training = True
        self.is_initialized = False
        self.parameters = {}
        self.gradients = {}
        self.derived_variables = {}
        self.optimizer = get_optimizer(optimizer)
        self.optimizer.device = self.device

    # ------------------------------------------------------------------ contract
    @property
    def hyperparameters(self):  # pragma: no cover - every layer overrides it
        raise NotImplementedError

    def forward(self, X, retain_derived=True):  # pragma: no cover
        raise NotImplementedError

    def backward(self, dLdy, retain_grads=True):  # pragma: no cover
        raise NotImplementedError

    def freeze(self):
        """Stop learning: forward runs in inference mode, backward/update refuse."""
        self.trainable = False

    def unfreeze(self):
        self.trainable = True

    def train(self):
        """Training mode (the default): batch statistics, derived variables retained."""
        self.training = True
        return self

    def eval(self):
        """Inference mode: running statistics; same as ``forward(X, retain_derived=False)``."""
        self.training = False
        return self

    def _is_training(self, retain_derived):
        return bool(retain_derived) and self.trainable and self.training

    def flush_gradients(self):
        """Forget retained inputs and derived variables; zero the gradients (in place)."""
        self.X = []
        for k in self.derived_variables:
            self.derived_variables[k] = []
        for k, v in self.gradients.items():
            _fill_zero(v)

    def update(self, cur_loss=None):
        """One optimizer step on each parameter with a gradient, then flush the gradients."""
        if not self.trainable:
            raise RuntimeError(f"{type(self).__name__} is frozen; call unfreeze() before update()")
        self.optimizer.step()
        for k, grad in self.gradients.items():
            if k in self.parameters:
                self.optimizer(self.parameters[k], grad, k, cur_loss)
        self.flush_gradients()

    def summary(self):
        """``{"layer": name, "parameters": {...}, "hyperparameters": {...}}`` (numpy-ml's)."""
        return {
            "layer": self.hyperparameters["layer"],
            "parameters": {k: devices.to_host(v) for k, v in self.parameters.items()},
            "hyperparameters": self.hyperparameters,
        }

    def set_params(self, summary_dict):
        """Set parameters and hyperparameters from a (possibly partial) summary dict.

        Parameter arrays are checked against the layer's shapes (or, for a layer not yet
        built, against each other) *before* anything is assigned: on a ValueError or
        TypeError the layer is exactly as it was.
        """
        sd = dict(summary_dict)
        for key in ("parameters", "hyperparameters"):
            if key in sd:
                entry = sd.pop(key)
                sd.update(entry)
        params = {k: v for k, v in sd.items() if k in self._param_keys}
        hypers = {k: v for k, v in sd.items() if k not in params and k != "layer"}
        checked = self._check_params(params)
        settable = self._settable_hyperparameters()
        for k in hypers:
            if k not in self.hyperparameters and k not in settable:
                raise ValueError(f"{type(self).__name__}.set_params: unknown key {k!r}")
        # --- nothing above modified the layer; apply
        for k, v in hypers.items():
            if k in settable:
                settable[k](v)
        if checked:
            if not self.is_initialized:
                self._init_from_params(checked)
            for k, v in checked.items():
                self.parameters[k] = devices.to_device(v, self.device)
        return self

    # ------------------------------------------------------------ helpers for layers
    def _settable_hyperparameters(self):
        """Map hyperparameter name -> setter, for those set_params may change."""
        from ..optimizers import get_optimizer

        def set_optimizer(v):
            opt = get_optimizer(v)
            opt.device = self.device
            self.optimizer = opt

        return {"optimizer": set_optimizer}

    def _expected_param_shapes(self, params):
        """Shapes the given params must have: the current ones once built."""
        return {k: tuple(v.shape) for k, v in self.parameters.items()}

    def _check_params(self, params):
        if not params:
            return {}
        out = {}
        expected = self._expected_param_shapes(params)
        dtype = self._param_dtype()
        for k, v in params.items():
            arr = np.ascontiguousarray(devices.to_host(v))
            if np.dtype(arr.dtype) not in SUPPORTED_DTYPES:
                raise TypeError(f"{type(self).__name__}.set_params: parameter {k!r} must be "
                                f"float32 or float64, got {arr.dtype}")
            if k in expected and tuple(arr.shape) != expected[k]:
                raise ValueError(f"{type(self).__name__}.set_params: parameter {k!r} must have "
                                 f"shape {expected[k]}, got {tuple(arr.shape)}")
            out[k] = arr.astype(dtype, copy=True) if dtype is not None else arr.copy()
        return out

    def _init_from_params(self, params):  # pragma: no cover - layers with params override
        raise ValueError(f"{type(self).__name__} cannot be built from parameters alone")

    def _param_dtype(self):
        for v in self.parameters.values():
            return np.dtype(v.dtype)
        return None

    def _check_dtype_matches(self, X):
        for v in self.parameters.values():  # the first parameter's dtype (all share it)
            if v.dtype != X.dtype:
                dtype = np.dtype(v.dtype)
                raise TypeError(f"{type(self).__name__} holds {dtype} parameters (set by its "
                                f"first input) but got {np.dtype(X.dtype)} input; pass {dtype} "
                                "data")
            return

    def _kernel(self, op):
        return get_kernel(op, self.device)

    def _empty(self, shape, dtype):
        if self.device == "cpu":  # (the common case without a second call: a few per step)
            return np.empty(shape, dtype)
        return devices.empty(shape, dtype, self.device)

    def _output(self, key, shape, dtype):
        """An uninitialised output array (``Y`` of forward, ``dX`` of backward).

        On CPU, outputs of at least ``config.OUTPUT_REUSE_BYTES`` come from a small
        per-layer pool: a buffer this layer returned earlier is handed out again once
        nothing but the pool refers to it (no caller variable, no view, no other layer's
        retained input). Fresh arrays that large are ``mmap``-ed by the C allocator and
        zero-filled by the kernel on first touch: at (65536, 256) float32 that cost
        ~4 ms for each of ``Y`` and ``dX`` in a ~20 ms training step. A reused buffer is
        never one that anything else can still see, so results are unaffected.
        """
        if self.device != "cpu" or config.OUTPUT_POOL <= 0:
            return self._empty(shape, dtype)
        dtype = np.dtype(dtype)
        if math.prod(shape) * dtype.itemsize < config.OUTPUT_REUSE_BYTES:
            return np.empty(shape, dtype)
        pools = self.__dict__.setdefault("_output_pools", {})
        pool = pools.setdefault(key, [])
        for buf in pool:
            # references: the pool's list, `buf`, and getrefcount's argument
            if sys.getrefcount(buf) == 3 and buf.shape == tuple(shape) and buf.dtype == dtype:
                return buf
        buf = np.empty(shape, dtype)
        pool.append(buf)
        del pool[:-config.OUTPUT_POOL]  # keep the newest few
        return buf

    def _zeros(self, shape, dtype):
        return devices.zeros(shape, dtype, self.device)

    def _gradient_list(self, dLdy):
        """numpy-ml's convention: one gradient per retained forward call."""
        if not self.trainable:
            raise RuntimeError(f"{type(self).__name__} is frozen; backward needs a trainable layer")
        grads = dLdy if isinstance(dLdy, (list, tuple)) else [dLdy]
        if len(self.X) == 0:
            raise RuntimeError(f"{type(self).__name__}.backward called without a retained forward "
                               "pass (call forward(X, retain_derived=True) in training mode first)")
        if len(grads) != len(self.X):
            raise ValueError(f"{type(self).__name__}.backward got {len(grads)} gradient(s) but "
                             f"forward was called {len(self.X)} time(s) since the last update; "
                             "pass one gradient per forward call, as a list")
        return grads, isinstance(dLdy, (list, tuple))

    @property
    def n_params(self):
        """Number of learnt scalars (those with gradients)."""
        return int(sum(int(np.prod(self.parameters[k].shape)) for k in self.gradients if k in self.parameters))

    def to(self, device):
        """Move parameters, gradients and optimizer state to ``device`` (in place)."""
        device = devices.check_device(device)
        if device == self.device:
            return self
        self.parameters = {k: devices.to_device(v, device) for k, v in self.parameters.items()}
        self.gradients = {k: devices.to_device(v, device) for k, v in self.gradients.items()}
        if hasattr(self.optimizer, "to"):
            self.optimizer.to(device)
        self.optimizer.device = device
        self.X = []
        for k in self.derived_variables:
            self.derived_variables[k] = []
        self.device = device
        return self

    def __repr__(self):
        hp = self.hyperparameters
        keys = [k for k in hp if k not in ("layer", "optimizer", "n_out")]
        inner = ", ".join(f"{k}={hp[k]!r}" for k in keys)
        return f"{hp['layer']}({inner})"


def _is_host_input(X):
    first = X[0] if isinstance(X, (list, tuple)) and len(X) else X
    return not devices.is_device_array(first)


def _host_io(fn):
    """Wrap forward/backward: on a GPU layer, NumPy in -> NumPy out (device in -> device out)."""
    import functools

    @functools.wraps(fn)
    def wrapper(self, X, *args, **kwargs):
        if self.device == "cpu" or not _is_host_input(X):
            return fn(self, X, *args, **kwargs)
        out = fn(self, X, *args, **kwargs)
        if isinstance(out, list):
            return [devices.to_host(o) for o in out]
        return devices.to_host(out)

    wrapper._nbnet_host_io = True
    return wrapper


def _fill_zero(arr):
    if isinstance(arr, np.ndarray):
        arr.fill(0)
    else:
        get_kernel("fill", "cuda")(arr.reshape(-1), 0.0)

"""Optimizers: SGD, AdaGrad, RMSProp and Adam, with numpy-ml's names, defaults and rules.

The optimizer owns the state (``cache``, ``cur_step``) and the validation; the update
arithmetic runs in compiled kernels (:mod:`nbnet.kernels.cpu.optimizers` on the CPU),
picked by the optimizer's ``device`` attribute (set by the layer that owns it; default
``"cpu"``). The API is numpy-ml's::

    opt = Adam(lr=0.001)
    opt.step()                                  # cur_step += 1 (layers call it per update)
    opt(param, grad, "W", cur_loss=None)        # updates param IN PLACE and returns it

Update rules (numpy-ml's, with ``lr = lr_scheduler(cur_step, cur_loss)``):

- gradient clipping, all optimizers: when ``clip_norm`` is set and
  ``||grad||_2 > clip_norm`` (the L2 norm of the whole array), ``grad *= clip_norm / ||grad||_2``;
- SGD: ``update = momentum * cache + lr * grad``; ``cache = update``; ``param -= update``;
- AdaGrad: ``cache += grad**2``; ``param -= lr * grad / (sqrt(cache) + eps)``;
- RMSProp: ``cache = decay * cache + (1 - decay) * grad**2``;
  ``param -= lr * grad / (sqrt(cache) + eps)``;
- Adam, per parameter: ``t += 1``; ``mean = decay1 * mean + (1 - decay1) * grad``;
  ``var = decay2 * var + (1 - decay2) * grad**2``; ``m_hat = mean / (1 - decay1**t)``;
  ``v_hat = var / (1 - decay2**t)``; ``param -= lr * m_hat / (sqrt(v_hat) + eps)``.
  This is also PyTorch's ``torch.optim.Adam`` (eps outside the square root, bias
  corrections on both moments), so the two agree step for step.

Numerics and dtypes
-------------------
Parameters may be float32 or float64. State arrays have the parameter's dtype; each
element's update is computed in float64 inside the kernel and rounded once when stored.
The clip-norm reduction accumulates in float64 over fixed-size chunks merged in order,
so it is bit-identical for any thread count. The gradient must have the parameter's
shape; its dtype may differ when NumPy's ``same_kind`` casting allows it (a float64
gradient for a float32 parameter is cast to float32 first; a complex one is refused).

NaN and inf are propagated, never silently dropped: a NaN anywhere in the gradient makes
its norm NaN, ``NaN > clip_norm`` is false, so no clipping happens and the NaN reaches
the parameter and the state, exactly as in numpy-ml. (An infinite norm gives scale 0, so
finite entries become 0 and infinite ones NaN, again as in numpy-ml. The norm is
``sqrt(sum(g**2))`` in float64, so float64 gradients above ~1e154 overflow it, as
``numpy.linalg.norm`` does.)

Differences from numpy-ml, all deliberate
-----------------------------------------
- ``opt(param, grad, name)`` updates ``param`` in place (numpy-ml returns ``param - update``
  and leaves ``param`` alone); the returned object is ``param`` itself.
- ``copy()`` returns a fresh optimizer with the same hyperparameters (and a fresh copy of
  the scheduler) and empty state; numpy-ml deep-copies the state too.
- :func:`get_optimizer` with an optimizer object returns ``spec.copy()``, so two layers
  given the same optimizer object never share state (numpy-ml returns the object itself,
  and layers sharing it then share momentum buffers keyed by parameter name).
- Hyperparameters are validated; unknown names or arguments raise ``ValueError``.
"""
import math

import numpy as np

from . import config, devices
from .schedulers import _real, build, get_scheduler, parse_spec

__all__ = ["OptimizerBase", "SGD", "AdaGrad", "RMSProp", "Adam", "get_optimizer"]


def _kernel(name, device):
    """The kernel ``name`` for ``device``.

    The registry is asked first. Until the CPU package's ``KERNELS`` includes the
    optimizer kernels, the CPU falls back to :data:`OPTIMIZER_KERNELS` of
    :mod:`nbnet.kernels.cpu.optimizers` (imported here, lazily, so that ``import nbnet``
    compiles nothing); other devices get the registry's own error.
    """
    from .registry import get_kernel
    try:
        return get_kernel(name, device)
    except NotImplementedError:
        if device != "cpu":
            raise
        from .kernels.cpu.optimizers import OPTIMIZER_KERNELS
        return OPTIMIZER_KERNELS[name]


def _elements_per_chunk(itemsize):
    """Chunk/block length in elements: ``config.CHUNK_BYTES`` of data, from the dtype only."""
    return max(1, config.CHUNK_BYTES // itemsize)


def _clip_norm_value(clip_norm):
    if clip_norm is None:
        return None
    return _real("clip_norm", clip_norm, min_value=0.0, allow_equal=False)


class OptimizerBase:
    """State, validation and bookkeeping shared by every optimizer.

    Attributes
    ----------
    cache : dict
        Per-parameter state keyed by ``param_name`` (numpy-ml's layout: one array for
        SGD/AdaGrad/RMSProp, ``{"t": int, "mean": array, "var": array}`` for Adam).
    cur_step : int
        The step counter given to the scheduler; :meth:`step` increments it.
    lr_scheduler : SchedulerBase
        Gives the learning rate; built from ``lr`` when none is given.
    device : str
        Where the parameters live ("cpu" by default); the owning layer sets it.
    """

    _id = None
    #: Hyperparameters besides ``lr_scheduler``, in signature order.
    _hyperparameter_names = ()
    #: Name of the state array in ``state_dict`` keys (single-array optimizers).
    _state_field = None

    def __init__(self, lr, lr_scheduler=None):
        if lr is None and lr_scheduler is None:
            raise ValueError("lr must be given when lr_scheduler is None")
        if lr is not None:  # ignored when a scheduler is given, but still validated
            _real("lr", lr, min_value=0.0)
        self.lr = lr
        self.lr_scheduler = get_scheduler(lr_scheduler, lr=lr)
        self.cache = {}
        self.cur_step = 0
        self.device = "cpu"

    # -------------------------------------------------------------- numpy-ml API

    def __call__(self, param, grad, param_name, cur_loss=None):
        return self.update(param, grad, param_name, cur_loss)

    def step(self):
        """Increment the step counter (numpy-ml layers call it once per ``update``)."""
        self.cur_step += 1

    def reset_step(self):
        """Set the step counter back to 0 (numpy-ml's name)."""
        self.cur_step = 0

    def reset(self):
        """Forget all state: the cache, the step counter and the scheduler's history."""
        self.cache = {}
        self.cur_step = 0
        self.lr_scheduler.reset()

    def to(self, device):
        """Move the state to ``device`` (in place) and use that device's kernels from now on.

        Layers call it from their own ``to(device)``; returns ``self``.
        """
        device = devices.check_device(device)

        def move(value):
            return value if isinstance(value, int) else devices.to_device(value, device)

        cache = {name: ({k: move(v) for k, v in entry.items()} if isinstance(entry, dict)
                        else move(entry))
                 for name, entry in self.cache.items()}
        self.cache, self.device = cache, device
        return self

    @property
    def hyperparameters(self):
        """numpy-ml's summary dict: ``{"id": "Adam", "lr": ..., ..., "lr_scheduler": str}``."""
        hp = {"id": self._id}
        hp.update((k, getattr(self, k)) for k in self._hyperparameter_names)
        hp["lr_scheduler"] = str(self.lr_scheduler)
        return hp

    def copy(self):
        """A fresh optimizer: same hyperparameters and device, a fresh scheduler, no state."""
        new = type(self)(**{k: getattr(self, k) for k in self._hyperparameter_names},
                         lr_scheduler=self.lr_scheduler.copy())
        new.device = self.device
        return new

    def __str__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.hyperparameters.items() if k != "id")
        return f"{self._id}({args})"

    __repr__ = __str__

    # -------------------------------------------------------------- the update

    def update(self, param, grad, param_name, cur_loss=None):
        """Apply one update to ``param`` in place and return it.

        Parameters
        ----------
        param : ndarray (float32 or float64), or a device array on ``self.device``
            Updated in place. A non-contiguous NumPy array is updated through a
            contiguous copy that is written back.
        grad : array_like
            Same shape as ``param``; cast to ``param.dtype`` when ``same_kind`` allows.
        param_name : hashable
            Key of the state in :attr:`cache`.
        cur_loss : float, optional
            Passed to the scheduler (required by :class:`KingScheduler`).

        Raises
        ------
        ValueError
            Shape mismatch (the message names both shapes), a state of another shape
            under the same name, a read-only ``param``, or a learning rate that is not
            finite or is negative. Nothing (parameter, cache) is changed.
        TypeError
            Non-float ``param`` or a gradient dtype that cannot be cast.
        """
        flat_param, write_back, flat_grad = self._flat_views(param, grad, param_name)
        state, fresh = self._get_state(param_name, param)  # allocates, stores nothing yet
        lr = self._learning_rate(cur_loss)  # last check: the scheduler may record cur_loss
        scale = self._clip_scale(flat_grad)
        self._apply(flat_param, flat_grad, state, lr, scale)
        if fresh:
            self.cache[param_name] = state
        if write_back:
            param[...] = flat_param.reshape(param.shape)
        return param

    def _flat_views(self, param, grad, param_name):
        device = self.device
        if device == "cpu":
            if not isinstance(param, np.ndarray):
                raise TypeError(f"param {param_name!r} must be a NumPy array on device 'cpu', "
                                f"got {type(param).__name__}")
            grad = np.asarray(grad)
        if param.dtype not in (np.float32, np.float64):
            raise TypeError(f"param {param_name!r} must be float32 or float64, got {param.dtype}")
        if tuple(param.shape) != tuple(grad.shape):
            raise ValueError(f"param {param_name!r} has shape {tuple(param.shape)} but its "
                             f"gradient has shape {tuple(grad.shape)}")
        if device != "cpu":
            grad = devices.to_device(grad, device)
            if grad.dtype != param.dtype:
                raise TypeError(f"on device {device!r} the gradient of {param_name!r} must have "
                                f"the parameter's dtype {param.dtype}, got {grad.dtype}")
            return param.reshape(-1), False, grad.reshape(-1)
        if not np.can_cast(grad.dtype, param.dtype, casting="same_kind"):
            raise TypeError(f"gradient of {param_name!r} has dtype {grad.dtype}, which cannot be "
                            f"cast to the parameter's dtype {param.dtype}")
        if not param.flags.writeable:
            raise ValueError(f"param {param_name!r} is read-only; it is updated in place")
        flat_grad = np.ascontiguousarray(grad, dtype=param.dtype).reshape(-1)
        if param.flags.c_contiguous:
            return param.reshape(-1), False, flat_grad
        return np.ascontiguousarray(param).reshape(-1), True, flat_grad

    def _learning_rate(self, cur_loss):
        lr = self.lr_scheduler(self.cur_step, cur_loss)
        try:
            value = float(lr)
        except (TypeError, ValueError):
            raise ValueError(f"the scheduler {self.lr_scheduler} returned a learning rate that is "
                             f"not a number: {lr!r}") from None
        if not math.isfinite(value) or value < 0.0:
            raise ValueError(f"learning rate must be finite and >= 0, got {value!r} from "
                             f"{self.lr_scheduler} at step {self.cur_step}")
        return value

    def _state_array(self, param_name, field, value, param):
        """``value`` (an existing state array) checked against ``param``, or new zeros.

        State arrays have the parameter's shape and dtype (numpy-ml's ``zeros_like``);
        a loaded array of the right size is reshaped, one of another dtype cast.
        """
        shape, dtype = tuple(param.shape), param.dtype
        if value is None:
            return devices.zeros(shape, dtype, self.device)
        if value.size != param.size:
            raise ValueError(f"optimizer state {field!r} of {param_name!r} has shape "
                             f"{tuple(value.shape)}, but the parameter has shape {shape} "
                             "(was the name reused for another parameter?)")
        if value.dtype != dtype:
            if self.device != "cpu":
                raise ValueError(f"optimizer state {field!r} of {param_name!r} is {value.dtype} "
                                 f"but the parameter is {dtype}")
            value = value.astype(dtype)  # state follows the parameter's dtype
        if self.device == "cpu" and not value.flags.c_contiguous:
            value = np.ascontiguousarray(value)  # the kernels update a flat view in place
        if tuple(value.shape) != shape:
            value = value.reshape(shape)
        return value

    def _get_state(self, param_name, param):
        """``(state, fresh)``: the state to update; ``fresh`` when it must be stored back
        into :attr:`cache` after the update (new, reshaped or cast)."""
        old = self.cache.get(param_name)
        cache = self._state_array(param_name, self._state_field, old, param)
        return cache, cache is not old

    def _clip_scale(self, flat_grad):
        """numpy-ml's clip: ``clip_norm / ||g||`` when ``||g|| > clip_norm``, else 1.0."""
        if self.clip_norm is None:
            return 1.0
        n = flat_grad.shape[0]
        chunk = _elements_per_chunk(flat_grad.dtype.itemsize)
        partial = devices.empty(((n + chunk - 1) // chunk,), np.float64, self.device)
        out = devices.empty((1,), np.float64, self.device)
        _kernel("sum_of_squares", self.device)(n, flat_grad, chunk, partial, out)
        norm = math.sqrt(float(devices.to_host(out)[0]))
        if math.isinf(norm):
            return self._clip_scale_overflowed(flat_grad)
        if norm > self.clip_norm:  # False for a NaN norm: the NaN then propagates
            return float(self.clip_norm) / norm
        return 1.0

    def _clip_scale_overflowed(self, flat_grad):
        """The clip scale when ``sum(g**2)`` overflowed float64 (|g| beyond ~1e154).

        Rescaled by the largest magnitude: ``||g|| = amax * sqrt(sum((g / amax)**2))``, and
        the scale ``clip_norm / ||g||`` formed as ``(clip_norm / amax) / sqrt(...)`` so it
        never overflows either. An infinite entry keeps numpy-ml's result (scale 0 turns
        it into NaN, which propagates). Rare, so on the host in NumPy.
        """
        g = np.asarray(devices.to_host(flat_grad), dtype=np.float64)
        amax = float(np.max(np.abs(g)))
        if not math.isfinite(amax):
            return 0.0
        root = math.sqrt(float(np.sum(np.square(g / amax))))
        if amax * root > self.clip_norm:
            return (float(self.clip_norm) / amax) / root
        return 1.0

    def _apply(self, flat_param, flat_grad, state, lr, scale):
        raise NotImplementedError

    # -------------------------------------------------------------- checkpoints

    def _state_items(self, entry):
        """``[(field, value), ...]`` of one cache entry."""
        return [(self._state_field, entry)]

    def _entry_from_fields(self, param_name, fields):
        try:
            return fields.pop(self._state_field)
        except KeyError:
            raise ValueError(f"state for {param_name!r} lacks {self._state_field!r}") from None

    def state_dict(self):
        """The mutable state as a flat dict of NumPy arrays and Python numbers.

        Keys: ``"cur_step"``, ``"cache/<param_name>/<field>"`` (fields: SGD ``update``,
        AdaGrad ``sum_sq``, RMSProp ``mean_sq``, Adam ``t``, ``mean``, ``var``) and
        ``"lr_scheduler/<key>"`` for a scheduler with state (KingScheduler). Arrays are
        host copies with the parameter's shape. Hyperparameters are not included: save
        :attr:`hyperparameters` beside it.
        """
        out = {"cur_step": int(self.cur_step)}
        for name, entry in self.cache.items():
            for field, value in self._state_items(entry):
                key = f"cache/{name}/{field}"
                out[key] = value if isinstance(value, int) else np.array(devices.to_host(value))
        for key, value in self.lr_scheduler.state_dict().items():
            out[f"lr_scheduler/{key}"] = value
        return out

    def load_state_dict(self, state):
        """Replace the state with that of :meth:`state_dict` (nothing changes on error)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if "cur_step" not in state:
            raise ValueError("state has no 'cur_step'")
        cur_step = state["cur_step"]
        if (isinstance(cur_step, (bool, np.bool_)) or not isinstance(cur_step, (int, np.integer))
                or cur_step < 0):
            raise ValueError(f"cur_step must be an integer >= 0, got {cur_step!r}")
        fields, sched_state = {}, {}
        for key, value in state.items():
            if key == "cur_step":
                continue
            if key.startswith("lr_scheduler/"):
                sched_state[key[len("lr_scheduler/"):]] = value
                continue
            if not key.startswith("cache/") or key.count("/") < 2:
                raise ValueError(f"unknown optimizer state key {key!r}")
            name, field = key[len("cache/"):].rsplit("/", 1)
            fields.setdefault(name, {})[field] = value
        cache = {}
        for name, f in fields.items():
            entry = self._entry_from_fields(name, {k: self._load_value(name, k, v)
                                                   for k, v in f.items()})
            cache[name] = entry
        # validate the scheduler's part on a copy first so that nothing changes on error
        self.lr_scheduler.copy().load_state_dict(sched_state)
        self.lr_scheduler.load_state_dict(sched_state)
        self.cache, self.cur_step = cache, int(cur_step)

    def _load_value(self, name, field, value):
        if field == "t":
            if isinstance(value, np.ndarray):
                value = value.item()
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
                    or value < 0:
                raise ValueError(f"state 't' of {name!r} must be an integer >= 0, got {value!r}")
            return int(value)
        arr = np.array(devices.to_host(value), copy=True, order="C")
        if arr.dtype not in (np.float32, np.float64):
            raise ValueError(f"state {field!r} of {name!r} must be float32/float64, "
                             f"got {arr.dtype}")
        return arr if self.device == "cpu" else devices.to_device(arr, self.device)


class SGD(OptimizerBase):
    """Stochastic gradient descent with numpy-ml's momentum rule.

    .. math::

        u_t = momentum \\cdot u_{t-1} + lr \\cdot g_t, \\qquad \\theta \\leftarrow \\theta - u_t

    (PyTorch's ``SGD(momentum)`` keeps ``b_t = momentum * b_{t-1} + g_t`` and steps by
    ``lr * b_t``; the two agree only for a constant learning rate.)

    Parameters
    ----------
    lr : float
        Learning rate, used when ``lr_scheduler`` is None. Default 0.01.
    momentum : float
        Fraction of the previous update added to this one (>= 0). Default 0.0.
    clip_norm : float or None
        Clip the gradient to this L2 norm (over the whole array). Default None.
    lr_scheduler : None, str, dict or SchedulerBase
        See :func:`nbnet.schedulers.get_scheduler`; overrides ``lr`` when given.
    """

    _id = "SGD"
    _hyperparameter_names = ("lr", "momentum", "clip_norm")
    _state_field = "update"

    def __init__(self, lr=0.01, momentum=0.0, clip_norm=None, lr_scheduler=None):
        super().__init__(lr, lr_scheduler)
        self.momentum = _real("momentum", momentum, min_value=0.0)
        self.clip_norm = _clip_norm_value(clip_norm)

    def _apply(self, flat_param, flat_grad, state, lr, scale):
        n = flat_param.shape[0]
        _kernel("sgd_update", self.device)(
            n, flat_param, flat_grad, state.reshape(-1), lr, float(self.momentum), scale,
            _elements_per_chunk(flat_param.dtype.itemsize))


class AdaGrad(OptimizerBase):
    """AdaGrad: per-element rates scaled by the root of the summed squared gradients.

    .. math::

        c \\leftarrow c + g^2, \\qquad \\theta \\leftarrow \\theta - lr \\cdot g / (\\sqrt{c} + eps)

    Parameters
    ----------
    lr : float
        Default 0.01.
    eps : float
        Added to the denominator (>= 0). Default 1e-7.
    clip_norm, lr_scheduler
        As for :class:`SGD`.
    """

    _id = "AdaGrad"
    _hyperparameter_names = ("lr", "eps", "clip_norm")
    _state_field = "sum_sq"

    def __init__(self, lr=0.01, eps=1e-7, clip_norm=None, lr_scheduler=None):
        super().__init__(lr, lr_scheduler)
        self.eps = _real("eps", eps, min_value=0.0)
        self.clip_norm = _clip_norm_value(clip_norm)

    def _apply(self, flat_param, flat_grad, state, lr, scale):
        n = flat_param.shape[0]
        _kernel("adagrad_update", self.device)(
            n, flat_param, flat_grad, state.reshape(-1), lr, float(self.eps), scale,
            _elements_per_chunk(flat_param.dtype.itemsize))


class RMSProp(OptimizerBase):
    """RMSProp: per-element rates scaled by a running mean of squared gradients.

    .. math::

        c \\leftarrow decay \\cdot c + (1 - decay) g^2, \\qquad
        \\theta \\leftarrow \\theta - lr \\cdot g / (\\sqrt{c} + eps)

    Parameters
    ----------
    lr : float
        Default 0.001.
    decay : float
        Weight of the running mean, in [0, 1]. Default 0.9.
    eps : float
        Added to the denominator (>= 0). Default 1e-7.
    clip_norm, lr_scheduler
        As for :class:`SGD`.
    """

    _id = "RMSProp"
    _hyperparameter_names = ("lr", "decay", "eps", "clip_norm")
    _state_field = "mean_sq"

    def __init__(self, lr=0.001, decay=0.9, eps=1e-7, clip_norm=None, lr_scheduler=None):
        super().__init__(lr, lr_scheduler)
        self.decay = _real("decay", decay, min_value=0.0, max_value=1.0)
        self.eps = _real("eps", eps, min_value=0.0)
        self.clip_norm = _clip_norm_value(clip_norm)

    def _apply(self, flat_param, flat_grad, state, lr, scale):
        n = flat_param.shape[0]
        _kernel("rmsprop_update", self.device)(
            n, flat_param, flat_grad, state.reshape(-1), lr, float(self.decay),
            float(self.eps), scale, _elements_per_chunk(flat_param.dtype.itemsize))


class Adam(OptimizerBase):
    """Adam (Kingma & Ba, 2015) with numpy-ml's names; identical to ``torch.optim.Adam``.

    For each parameter, at its own step ``t`` (counted per parameter, from 1):

    .. math::

        m \\leftarrow d_1 m + (1 - d_1) g, \\quad v \\leftarrow d_2 v + (1 - d_2) g^2, \\quad
        \\theta \\leftarrow \\theta - lr \\frac{m / (1 - d_1^t)}{\\sqrt{v / (1 - d_2^t)} + eps}

    Parameters
    ----------
    lr : float
        Default 0.001.
    decay1, decay2 : float
        Decay rates of the first and second moments, in [0, 1). Defaults 0.9, 0.999
        (PyTorch's ``betas``).
    eps : float
        Added to the denominator (>= 0). Default 1e-7 (PyTorch's default is 1e-8).
    clip_norm, lr_scheduler
        As for :class:`SGD`.
    """

    _id = "Adam"
    _hyperparameter_names = ("lr", "decay1", "decay2", "eps", "clip_norm")

    def __init__(self, lr=0.001, decay1=0.9, decay2=0.999, eps=1e-7, clip_norm=None,
                 lr_scheduler=None):
        super().__init__(lr, lr_scheduler)
        self.decay1 = _real("decay1", decay1, min_value=0.0, max_value=1.0, max_exclusive=True)
        self.decay2 = _real("decay2", decay2, min_value=0.0, max_value=1.0, max_exclusive=True)
        self.eps = _real("eps", eps, min_value=0.0)
        self.clip_norm = _clip_norm_value(clip_norm)

    def _get_state(self, param_name, param):
        old = self.cache.get(param_name)
        if old is None:
            return {"t": 0, "mean": self._state_array(param_name, "mean", None, param),
                    "var": self._state_array(param_name, "var", None, param)}, True
        mean = self._state_array(param_name, "mean", old["mean"], param)
        var = self._state_array(param_name, "var", old["var"], param)
        if mean is old["mean"] and var is old["var"]:
            return old, False
        return {"t": old["t"], "mean": mean, "var": var}, True

    def _apply(self, flat_param, flat_grad, state, lr, scale):
        n = flat_param.shape[0]
        t = state["t"] + 1
        d1, d2 = float(self.decay1), float(self.decay2)
        _kernel("adam_update", self.device)(
            n, flat_param, flat_grad, state["mean"].reshape(-1), state["var"].reshape(-1),
            lr, d1, d2, float(self.eps), 1.0 - d1 ** t, 1.0 - d2 ** t, scale,
            _elements_per_chunk(flat_param.dtype.itemsize))
        state["t"] = t

    def _state_items(self, entry):
        return [("t", int(entry["t"])), ("mean", entry["mean"]), ("var", entry["var"])]

    def _entry_from_fields(self, param_name, fields):
        missing = {"t", "mean", "var"} - set(fields)
        extra = set(fields) - {"t", "mean", "var"}
        if missing or extra:
            raise ValueError(f"Adam state for {param_name!r}: missing {sorted(missing)}, "
                             f"unknown {sorted(extra)}")
        if fields["mean"].size != fields["var"].size:
            raise ValueError(f"Adam state for {param_name!r}: mean and var sizes differ")
        return {"t": fields["t"], "mean": fields["mean"], "var": fields["var"]}


_OPTIMIZERS = {"sgd": SGD, "adagrad": AdaGrad, "rmsprop": RMSProp, "adam": Adam}


def _optimizer_class(name):
    try:
        return _OPTIMIZERS[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}: expected one of SGD, AdaGrad, RMSProp, "
                         "Adam") from None


def _load_numpy_ml_cache(opt, cache):
    """Load numpy-ml's ``cache`` dict (``{name: array}``, Adam ``{name: {t, mean, var}}``)."""
    flat = {"cur_step": 0}
    for name, entry in cache.items():
        if isinstance(opt, Adam):
            if not isinstance(entry, dict):
                raise ValueError(f"Adam cache entry {name!r} must be a dict with t, mean, var")
            for field, value in entry.items():
                flat[f"cache/{name}/{field}"] = value
        else:
            flat[f"cache/{name}/{opt._state_field}"] = entry
    opt.load_state_dict(flat)


def get_optimizer(spec):
    """Build an optimizer (numpy-ml's ``OptimizerInitializer``).

    Parameters
    ----------
    spec : None, OptimizerBase, dict or str
        - ``None``: ``SGD()``;
        - an optimizer object: ``spec.copy()`` -- a fresh optimizer with the same
          hyperparameters and empty state, so two layers never share state (numpy-ml
          returns the object itself);
        - a dict: numpy-ml's summary form ``{"id": "Adam", "lr": 0.01, ...}`` (the
          ``hyperparameters`` of an optimizer), or ``{"cache": {...}, "hyperparameters":
          {...}}``, whose cache (numpy-ml's layout) is loaded too;
        - a string: ``"adam"``, ``"sgd(lr=0.1, momentum=0.9)"``, ``"rmsprop(lr=0.01)"``,
          ``"adagrad"``, ``"sgd(lr_scheduler=exponential(decay=0.5))"``, or the ``str()``
          of an optimizer. Values are read with :func:`ast.literal_eval`, never ``eval``.

    Raises
    ------
    ValueError
        Unknown optimizer name or argument, unparsable string, or a bad value.
    TypeError
        ``spec`` of another type.
    """
    if spec is None:
        return SGD()
    if isinstance(spec, OptimizerBase):
        return spec.copy()
    if isinstance(spec, dict):
        cache = None
        if "hyperparameters" in spec:
            extra = set(spec) - {"hyperparameters", "cache"}
            if extra:
                raise ValueError(f"optimizer dict has unknown keys {sorted(extra)}")
            hp, cache = spec["hyperparameters"], spec.get("cache")
        else:
            hp = spec
        if not isinstance(hp, dict) or "id" not in hp:
            raise ValueError(f"optimizer dict needs an 'id' key, got {spec!r}")
        opt = build(_optimizer_class(hp["id"]), {k: v for k, v in hp.items() if k != "id"},
                    "optimizer")
        if cache:
            _load_numpy_ml_cache(opt, cache)
        return opt
    if isinstance(spec, str):
        name, kwargs = parse_spec(spec, "optimizer", nested=("lr_scheduler",))
        return build(_optimizer_class(name), kwargs, "optimizer")
    raise TypeError(f"cannot build an optimizer from {type(spec).__name__}: expected None, an "
                    "optimizer, a dict or a string")

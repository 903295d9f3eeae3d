"""Inverted dropout with a seeded generator."""
import numpy as np

from .. import devices
from .._validation import check_float_array
from .base import LayerBase

_BLOCK = 1 << 14


class Dropout(LayerBase):
    r"""Inverted dropout: in training each element is zeroed with probability ``p`` and the
    survivors are scaled by ``1 / (1 - p)``, so inference is the identity.

    .. math:: y = x \cdot m / (1 - p), \quad m_i \sim \text{Bernoulli}(1 - p)

    Parameters
    ----------
    p : float in [0, 1)
        Probability of *dropping* an element (numpy-ml's and PyTorch's meaning).
    seed : int, optional
        Seeds the layer's own ``numpy.random.Generator`` (PCG64); the same seed gives the
        same masks, and the generator state is saved in checkpoints, so resumed training
        draws the masks it would have drawn.
    device : {"cpu", "cuda"}, optional

    Notes
    -----
    The mask of each retained forward call is kept in ``derived_variables["mask"]``
    (uint8) for backward: ``dX = dY * mask / (1 - p)``. Uniforms are drawn on the host in
    the input's dtype (float32 draws are twice as fast) and compared with ``p``.
    """

    def __init__(self, p=0.5, seed=None, device=None):
        if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, float, np.integer, np.floating)) \
                or not 0.0 <= float(p) < 1.0:
            raise ValueError(f"p (the drop probability) must be a number in [0, 1), got {p!r}")
        if seed is not None and (isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer))
                                 or seed < 0):
            raise ValueError(f"seed must be None or a non-negative integer, got {seed!r}")
        super().__init__(optimizer=None, device=device)
        self.p = float(p)
        self.seed = None if seed is None else int(seed)
        self._rng = np.random.default_rng(self.seed)
        self.derived_variables = {"mask": []}
        self.is_initialized = True

    @property
    def hyperparameters(self):
        return {"layer": "Dropout", "p": self.p, "seed": self.seed, "device": self.device}

    def forward(self, X, retain_derived=True):
        X = check_float_array(X, "X", device=self.device)
        if not self._is_training(retain_derived) or self.p == 0.0:
            if self._is_training(retain_derived):
                self.X.append(X)
                self.derived_variables["mask"].append(None)
            return X
        U = self._rng.random(X.shape, dtype=X.dtype)
        if self.device != "cpu":
            U = devices.to_device(U, self.device)
        Y = self._output("Y", X.shape, X.dtype)
        mask = self._empty(X.shape, np.uint8)
        if X.size:
            self._kernel("dropout_forward")(X.size, X.reshape(-1), U.reshape(-1), self.p,
                                            1.0 / (1.0 - self.p), _BLOCK, Y.reshape(-1), mask.reshape(-1))
        self.X.append(X)
        self.derived_variables["mask"].append(mask)
        return Y

    def backward(self, dLdy, retain_grads=True):
        grads, was_list = self._gradient_list(dLdy)
        out = []
        for dy, X, mask in zip(grads, self.X, self.derived_variables["mask"]):
            dy = check_float_array(dy, "dLdy", device=self.device)
            if tuple(dy.shape) != tuple(X.shape):
                raise ValueError(f"dLdy must have the shape of the layer's output "
                                 f"{tuple(X.shape)}, got {tuple(dy.shape)}")
            dy = dy if dy.dtype == X.dtype else dy.astype(X.dtype)
            if mask is None:
                out.append(dy)
                continue
            dX = self._output("dX", X.shape, X.dtype)
            if X.size:
                self._kernel("dropout_backward")(X.size, dy.reshape(-1), mask.reshape(-1),
                                                 1.0 / (1.0 - self.p), _BLOCK, dX.reshape(-1))
            out.append(dX)
        return out if was_list else out[0]

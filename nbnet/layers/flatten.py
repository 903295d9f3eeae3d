"""Flatten: reshape to 2-D (numpy-ml's ``Flatten(keep_dim="first")``)."""
import numpy as np

from .._validation import check_float_array
from .base import LayerBase


class Flatten(LayerBase):
    """Reshape the input; backward reshapes the gradient back (no copy on the CPU).

    Parameters
    ----------
    keep_dim : {"first", "last", -1}, default "first"
        numpy-ml's options: "first" gives ``(N, -1)``, "last" gives ``(-1, X.shape[-1])``,
        ``-1`` gives ``(1, X.size)`` (numpy-ml's ``X.flatten().reshape(1, -1)``).
    """

    def __init__(self, keep_dim="first", device=None):
        if keep_dim not in ("first", "last", -1):
            raise ValueError(f"keep_dim must be 'first', 'last' or -1, got {keep_dim!r}")
        super().__init__(optimizer=None, device=device)
        self.keep_dim = keep_dim
        self.derived_variables = {"in_dims": []}
        self.is_initialized = True

    @property
    def hyperparameters(self):
        return {"layer": "Flatten", "keep_dim": self.keep_dim, "device": self.device}

    def forward(self, X, retain_derived=True):
        X = check_float_array(X, "X", device=self.device)
        if self.keep_dim == "first":
            Y = X.reshape(X.shape[0] if X.ndim else 1, -1)
        elif self.keep_dim == "last":
            Y = X.reshape(-1, X.shape[-1] if X.ndim else 1)
        else:
            Y = X.reshape(1, -1)
        if self._is_training(retain_derived):
            self.X.append(X)
            self.derived_variables["in_dims"].append(tuple(X.shape))
        return Y

    def backward(self, dLdy, retain_grads=True):
        grads, was_list = self._gradient_list(dLdy)
        out = []
        for dy, X in zip(grads, self.X):
            dy = check_float_array(dy, "dLdy", device=self.device)
            if int(np.prod(dy.shape)) != int(np.prod(X.shape)):
                raise ValueError(f"dLdy of shape {tuple(dy.shape)} cannot be reshaped to the "
                                 f"layer's input shape {tuple(X.shape)}")
            out.append(dy.reshape(X.shape))
        return out if was_list else out[0]

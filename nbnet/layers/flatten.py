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

    def _out_shape(self, shape):
        """The output shape for an input of ``shape`` (see ``keep_dim``)."""
        shape = tuple(int(d) for d in shape)
        if not shape:  # a 0-d input is one value
            return (1, 1)
        if self.keep_dim == "first":
            return (shape[0], int(np.prod(shape[1:], dtype=np.int64)))
        if self.keep_dim == "last":
            return (int(np.prod(shape[:-1], dtype=np.int64)), shape[-1])
        return (1, int(np.prod(shape, dtype=np.int64)))

    def forward(self, X, retain_derived=True):
        X = check_float_array(X, "X", device=self.device)
        Y = X.reshape(self._out_shape(X.shape))
        if self._is_training(retain_derived):
            self.X.append(X)
            self.derived_variables["in_dims"].append(tuple(X.shape))
        return Y

    def backward(self, dLdy, retain_grads=True):
        """dL/dX: ``dLdy`` (the shape forward returned) reshaped to the input's shape.

        A gradient of any other shape is a ``ValueError``, even one with as many values: a
        transposed ``(features, N)`` gradient would otherwise reshape without complaint and
        mix the examples.
        """
        grads, was_list = self._gradient_list(dLdy)
        out = []
        for dy, X in zip(grads, self.X):
            dy = check_float_array(dy, "dLdy", device=self.device)
            want = self._out_shape(X.shape)
            if tuple(dy.shape) != want:
                raise ValueError(f"{type(self).__name__}.backward: dLdy must have the shape "
                                 f"forward returned, {want}; got {tuple(dy.shape)}")
            out.append(dy.reshape(X.shape))
        return out if was_list else out[0]

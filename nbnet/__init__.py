"""nbnet: numpy-ml's neural-network layers, compiled with Numba.

Layers keep numpy-ml's API (``forward``/``backward``/``update``, optimizers by name);
their hot loops are ``@njit(parallel=True, cache=True)`` kernels picked by a registry
for the layer's device. Nothing is compiled or loaded at import: the first use of a
kernel loads it from numba's on-disk cache (or compiles it once).
"""
from . import config

config.apply_openmp_environment()  # before numba starts its OpenMP workers

from .activations import Activation, parse_activation  # noqa: E402
from .devices import available_devices, get_default_device, set_default_device
from .layers import BatchNorm1D, LayerBase, LayerNorm1D
from .layers import BatchNorm2D, GroupNorm, InstanceNorm2D, LayerNorm2D, RMSNorm
from .optimizers import SGD, AdaGrad, Adam, RMSProp, get_optimizer
from . import layers, losses
from .layers import (ELU, GELU, Dropout, Flatten, FullyConnected, Identity, LeakyReLU, ReLU,
                     Sigmoid, Softmax, Tanh)
from .losses import CrossEntropy, SquaredError
from .model import Callback, EarlyStopping, Model, Sequential
from .io import CheckpointError, load
from .layers import SyncBatchNorm1D, SyncBatchNorm2D
from . import distributed

__version__ = "0.1.0"

__all__ = [
    "Activation", "AdaGrad", "Adam", "BatchNorm1D", "LayerBase", "LayerNorm1D", "RMSProp", "SGD",
    "available_devices", "get_default_device", "get_optimizer", "parse_activation",
    "set_default_device", "__version__",
]
__all__ += ["BatchNorm2D", "GroupNorm", "InstanceNorm2D", "LayerNorm2D", "RMSNorm"]
__all__ += ["CheckpointError", "Callback", "CrossEntropy", "Dropout", "EarlyStopping", "ELU", "Flatten",
            "FullyConnected", "GELU", "Identity", "LeakyReLU", "Model", "ReLU", "Sequential", "Sigmoid",
            "Softmax", "SquaredError", "Tanh", "layers", "load", "losses"]
__all__ += ["SyncBatchNorm1D", "SyncBatchNorm2D", "distributed"]

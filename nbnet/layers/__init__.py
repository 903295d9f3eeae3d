"""Stateful layers: each owns its parameters, running statistics and caches."""
from .base import LayerBase
from .normalization import BatchNorm1D, LayerNorm1D
from .normalization import BatchNorm2D, GroupNorm, InstanceNorm2D, LayerNorm2D, RMSNorm
from .dense import FullyConnected
from .activation import ELU, GELU, Identity, LeakyReLU, ReLU, Sigmoid, Softmax, Tanh
from .dropout import Dropout
from .flatten import Flatten

__all__ = ["LayerBase", "BatchNorm1D", "LayerNorm1D"]
__all__ += ["FullyConnected", "ELU", "GELU", "Identity", "LeakyReLU", "ReLU", "Sigmoid", "Softmax",
            "Tanh", "Dropout", "Flatten"]
__all__ += ["BatchNorm2D", "GroupNorm", "InstanceNorm2D", "LayerNorm2D", "RMSNorm"]
from .sync_batchnorm import SyncBatchNorm1D, SyncBatchNorm2D

__all__ += ["SyncBatchNorm1D", "SyncBatchNorm2D"]

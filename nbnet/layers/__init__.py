"""Stateful layers: each owns its parameters, running statistics and caches."""
from .base import LayerBase
from .normalization import BatchNorm1D, LayerNorm1D

__all__ = ["LayerBase", "BatchNorm1D", "LayerNorm1D"]

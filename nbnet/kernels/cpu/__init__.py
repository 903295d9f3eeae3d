"""CPU kernels (``@njit(parallel=True, cache=True)`` with serial twins).

``KERNELS`` maps op names to :class:`~nbnet.kernels.cpu._jit.Kernel` objects; each is
called as ``kernel(size, *arrays)`` where ``size`` picks the serial twin for small work.
The CUDA package exposes the same names with the same argument lists.
"""
from .column_stats import (column_backward_dx, column_backward_reduce, column_merge_stats,
                           column_normalize, column_partial_stats, merge_partial_sums)
from .row_stats import row_backward, row_forward

KERNELS = {
    "column_partial_stats": column_partial_stats,
    "column_merge_stats": column_merge_stats,
    "column_normalize": column_normalize,
    "column_backward_reduce": column_backward_reduce,
    "column_backward_dx": column_backward_dx,
    "merge_partial_sums": merge_partial_sums,
    "row_forward": row_forward,
    "row_backward": row_backward,
}

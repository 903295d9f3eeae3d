"""Data-parallel training on MPI (mpi4py), with SyncBatchNorm.

Every process (rank) holds a full copy of the model and a shard of each batch. After
backward, :func:`allreduce_gradients` averages the gradients of all ranks in one fused
buffer, so every rank applies the same update and the copies stay identical.

Run under MPI with ``mpiexec -n 2 python -m mpi4py train.py`` (``-m mpi4py`` makes an
uncaught exception on one rank abort the whole job instead of leaving the others
waiting in a collective), or ``mpiexec -n 2 nbnet train data.csv``. Install the runtime
with ``pip install "nbnet[mpi]"`` (mpi4py and the ``mpich`` wheel: no system MPI needed).
Without mpi4py, or outside ``mpiexec``, :func:`init` gives a single-process context and
everything here is a no-op, so the same script runs alone.

Threads: each rank runs numba kernels (and NumPy's BLAS) on several threads. :func:`init`
caps every rank's numba and BLAS threads at ``max(1, cores // ranks_on_this_node)`` so that
ranks x threads never exceeds the cores; ``NBNET_NUM_THREADS`` (or ``init(threads=...)``)
overrides it.
"""
import os
import sys

import numpy as np

from . import config

_MPI_ENV_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_RANK", "HYDI_CONTROL_FD")


class _SelfComm:
    """The communicator of a lone process (no mpi4py): every collective is the identity."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allreduce(self, sendbuf, recvbuf, op=None):
        src = sendbuf if not isinstance(sendbuf, (list, tuple)) else sendbuf[0]
        dst = recvbuf if not isinstance(recvbuf, (list, tuple)) else recvbuf[0]
        if src is not _IN_PLACE:
            dst[...] = src

    def Bcast(self, buf, root=0):
        pass

    def allgather(self, obj):
        return [obj]

    def Allgather(self, sendbuf, recvbuf):
        np.asarray(recvbuf).reshape(-1)[...] = np.asarray(sendbuf).reshape(-1)

    def bcast(self, obj, root=0):
        return obj

    def Barrier(self):
        pass

    def Abort(self, code=1):  # pragma: no cover - only on failure
        os._exit(code)


_IN_PLACE = object()
_context = None


class Context:
    """The process group: ``comm``, ``rank``, ``world_size``, ``local_size``, ``threads``."""

    def __init__(self, comm, mpi, threads):
        self.comm = comm
        self.mpi = mpi
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        self.local_size = self._local_size()
        self.threads = threads

    def _local_size(self):
        if self.mpi is None:
            return 1
        try:
            local = self.comm.Split_type(self.mpi.COMM_TYPE_SHARED)
            size = local.Get_size()
            local.Free()
            return size
        except Exception:  # pragma: no cover - MPI without shared-memory split
            return self.world_size

    @property
    def in_place(self):
        return self.mpi.IN_PLACE if self.mpi is not None else _IN_PLACE

    def allreduce_sum(self, buf):
        """In-place sum of ``buf`` over all ranks (identical result on every rank)."""
        if self.world_size > 1:
            self.comm.Allreduce(self.in_place, buf, op=self.mpi.SUM)
        return buf

    def __repr__(self):
        return f"Context(rank={self.rank}, world_size={self.world_size}, threads={self.threads})"


def _under_mpiexec():
    return any(v in os.environ for v in _MPI_ENV_VARS)


def default_threads(local_size):
    """Numba threads per rank: ``NBNET_NUM_THREADS`` if set, else cores // local ranks."""
    if config.NUM_THREADS > 0:
        return config.NUM_THREADS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_size))


def _limit_blas_threads(n_threads):
    """Cap NumPy's BLAS pool too (dense layers multiply through it): two ranks each running
    a 2-thread OpenBLAS on 2 cores spin against each other. Uses threadpoolctl, installed
    with the ``mpi`` extra; without it the BLAS pool keeps its size (set
    ``OPENBLAS_NUM_THREADS`` before starting Python instead)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=n_threads, user_api="blas")


def init(comm=None, threads=None):
    """Join the MPI job (``mpi4py.MPI.COMM_WORLD`` unless ``comm`` is given).

    Works with a single process too: without mpiexec, or without mpi4py installed, the
    context has ``rank == 0`` and ``world_size == 1``. Caps numba's threads per rank
    (see the module docstring). Returns the :class:`Context` (also kept module-wide).
    """
    global _context
    mpi = None
    if comm is None:
        try:
            from mpi4py import MPI
        except ImportError:
            if _under_mpiexec():
                raise ImportError("nbnet.distributed: running under mpiexec but mpi4py is not "
                                  "installed; install it with: pip install 'nbnet[mpi]'") from None
            comm = _SelfComm()
        else:
            mpi = MPI
            comm = MPI.COMM_WORLD
    else:
        from mpi4py import MPI
        mpi = MPI
    ctx = Context(comm, mpi, 1)
    n_threads = int(threads) if threads is not None else default_threads(ctx.local_size)
    import numba
    n_threads = max(1, min(n_threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n_threads)
    _limit_blas_threads(n_threads)
    ctx.threads = n_threads
    _context = ctx
    return ctx


def context():
    """The current :class:`Context` (calls :func:`init` on first use)."""
    return _context if _context is not None else init()


def rank():
    return context().rank


def world_size():
    return context().world_size


# ---------------------------------------------------------------- model collectives

def _trainable_layers(model):
    layers = getattr(model, "layers", None)
    if layers is None:
        layers = [model]
    return [layer for layer in layers if layer.trainable]


def _gradient_arrays(model):
    """Every gradient array, in a fixed order (layer order, then key order)."""
    out = []
    for layer in _trainable_layers(model):
        for key in sorted(layer.gradients):
            if key in layer.parameters:
                out.append(layer.gradients[key])
    return out


def _parameter_arrays(model):
    layers = getattr(model, "layers", None) or [model]
    out = []
    for layer in layers:
        for key in sorted(layer.parameters):
            out.append(layer.parameters[key])
    return out


def _pack(arrays):
    dtype = np.result_type(*[a.dtype for a in arrays]) if arrays else np.float64
    buf = np.empty(sum(a.size for a in arrays), dtype=dtype)
    pos = 0
    for a in arrays:
        buf[pos:pos + a.size] = a.reshape(-1)
        pos += a.size
    return buf


def _unpack(buf, arrays):
    pos = 0
    for a in arrays:
        a.reshape(-1)[...] = buf[pos:pos + a.size]
        pos += a.size


def allreduce_gradients(model, average=True, ctx=None):
    """Sum (``average``: then divide by the world size) every gradient over all ranks.

    All gradients travel in one fused buffer per step (one ``Allreduce``), in a fixed
    order, so every rank ends with identical gradients.
    """
    ctx = ctx or context()
    if ctx.world_size == 1:
        return model
    arrays = _gradient_arrays(model)
    if not arrays:
        return model
    buf = _pack(arrays)
    ctx.allreduce_sum(buf)
    if average:
        buf /= ctx.world_size
    _unpack(buf, arrays)
    return model


def broadcast_parameters(model, root=0, ctx=None):
    """Copy every parameter and running statistic of rank ``root`` to all ranks."""
    ctx = ctx or context()
    if ctx.world_size == 1:
        return model
    arrays = _parameter_arrays(model)
    if not arrays:
        return model
    buf = _pack(arrays)
    ctx.comm.Bcast(buf, root=root)
    _unpack(buf, arrays)
    return model


class DistributedSampler:
    """Shard ``n`` examples over the ranks, reshuffled every epoch from a shared seed.

    Every rank draws the same permutation (``seed + epoch``), pads it by repeating its
    start so that its length divides by the world size (PyTorch's rule; ``drop_last``
    drops the tail instead), and takes every ``world_size``-th index from its rank. All
    ranks therefore get shards of equal length, so they run the same number of steps
    and never wait on each other in a collective.
    """

    def __init__(self, n, rank=None, world_size=None, shuffle=True, seed=0, drop_last=False):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        ctx = context() if rank is None or world_size is None else None
        self.n = int(n)
        self.rank = ctx.rank if rank is None else int(rank)
        self.world_size = ctx.world_size if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        w = self.world_size
        return self.n // w if self.drop_last else -(-self.n // w)

    def indices(self, order=None):
        """This rank's indices for the current epoch (from ``order`` if given)."""
        if order is None:
            order = (np.random.default_rng(self.seed + self.epoch).permutation(self.n)
                     if self.shuffle else np.arange(self.n))
        order = np.asarray(order)
        w = self.world_size
        if self.drop_last:
            order = order[:len(order) - len(order) % w]
        elif len(order) % w and len(order):
            pad = w - len(order) % w
            order = np.concatenate([order, np.resize(order, pad)])
        return order[self.rank::w]

    def __iter__(self):
        return iter(self.indices())


def abort_on_exception():
    """Install an excepthook that aborts the whole MPI job on an uncaught exception.

    Equivalent to running under ``python -m mpi4py``; the ``nbnet`` command does it.
    """
    ctx = context()
    if ctx.world_size == 1:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        sys.stderr.flush()
        ctx.comm.Abort(1)

    sys.excepthook = hook


def convert_sync_batchnorm(model):
    """Turn every BatchNorm1D/BatchNorm2D of ``model`` into its SyncBatchNorm twin, in place.

    Parameters, running statistics, gradients and optimizer state are kept (the Sync
    classes add behaviour, not state). Returns ``model``.
    """
    from .layers.normalization import BatchNorm1D, BatchNorm2D
    from .layers.sync_batchnorm import SyncBatchNorm1D, SyncBatchNorm2D

    layers = getattr(model, "layers", None) or [model]
    for layer in layers:
        if type(layer) is BatchNorm1D:
            layer.__class__ = SyncBatchNorm1D
        elif type(layer) is BatchNorm2D:
            layer.__class__ = SyncBatchNorm2D
    return model

"""SyncBatchNorm: BatchNorm whose statistics span every MPI rank's share of the batch.

Forward (training): each rank reduces its rows to per-feature ``(count, mean, M2)`` in
float64 (the usual chunked two-pass + Chan merge), the ranks exchange these ``2C + 1``
numbers with one ``Allgather``, and every rank combines them in rank order with Chan's
formula

    n = n_a + n_b,  delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,  M2 = M2_a + M2_b + delta**2 * n_a * n_b / n,

so every rank holds bit-identical global statistics (never a sum / sum-of-squares, which
at mean 1e6 would lose about 12 of float64's 16 digits). Ranks with zero rows contribute
``n = 0`` and are skipped; they still take part in every collective, so nobody waits.

Backward: each rank reduces ``sum(g)`` and ``sum(g * xhat)`` over its rows, one
``Allreduce`` sums them (with the row count) over the ranks, and the dx pass uses the
global sums and count. ``scaler``/``intercept`` gradients stay *local* sums: the model's
gradient all-reduce (:func:`nbnet.distributed.allreduce_gradients`) combines them once.

CPU only (MPI buffers are host arrays). Outside MPI (one process) it equals BatchNorm.
"""
import numpy as np

from .normalization import BatchNorm1D, BatchNorm2D

_F64 = np.float64


class _SyncMixin:
    """Replaces the batch-statistics and backward-sum hooks of ``_BatchNormBase``."""

    def _ctx(self):
        from .. import distributed
        return distributed.context()

    def _check_sync_device(self):
        if self.device != "cpu":
            raise RuntimeError(f"{type(self).__name__} runs on the CPU only (MPI exchanges host "
                               f"buffers); got device {self.device!r}")

    def _check_train_rows(self, R, shape):
        """Local row counts of 0 or 1 are fine: the global count is checked after the
        exchange, on every rank alike."""

    def _batch_stats(self, V, sfx, chunk, merge_rpc, n_chunks, R, C, shape):
        self._check_sync_device()
        ctx = self._ctx()
        local = np.zeros(2 * C + 1, _F64)  # [count, mean (C), M2 (C)]
        local[0] = R
        if R > 0:
            pm = np.empty((n_chunks, C), _F64)
            pm2 = np.empty((n_chunks, C), _F64)
            self._kernel("column_partial_stats" + sfx)(V.size, V, *chunk, pm, pm2)
            self._kernel("column_merge_moments")(n_chunks * C, pm, pm2, R, merge_rpc,
                                                 local[1:C + 1], local[C + 1:])
        gathered = np.empty((ctx.world_size, 2 * C + 1), _F64)
        ctx.comm.Allgather(local, gathered)
        n, mean, m2 = 0.0, np.zeros(C), np.zeros(C)
        for row in gathered:  # rank order: identical arithmetic on every rank
            n_b = row[0]
            if n_b == 0:
                continue
            mean_b, m2_b = row[1:C + 1], row[C + 1:]
            if n == 0:
                n, mean, m2 = n_b, mean_b.copy(), m2_b.copy()
                continue
            tot = n + n_b
            delta = mean_b - mean
            mean = mean + delta * (n_b / tot)
            m2 = m2 + m2_b + delta * delta * (n * n_b / tot)
            n = tot
        if n <= 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per feature when "
                             f"training, got {int(n)} across all {ctx.world_size} rank(s) "
                             f"(this rank's input has shape {tuple(shape)})")
        var = m2 / n
        invstd = 1.0 / np.sqrt(var + self.epsilon)
        p = self.parameters
        batch_var = var * (n / (n - 1)) if self.unbiased_running_var else var
        m = self.momentum
        ok = np.isfinite(mean) & np.isfinite(var)  # NaN / Inf: the running stats are kept
        p["running_mean"][...] = np.where(ok, m * p["running_mean"] + (1.0 - m) * mean,
                                          p["running_mean"])
        p["running_var"][...] = np.where(ok, m * p["running_var"] + (1.0 - m) * batch_var,
                                         p["running_var"])
        return mean, invstd

    def _sums_for_dx(self, sum_g, sum_gx, R):
        ctx = self._ctx()
        C = sum_g.shape[0]
        buf = np.empty(2 * C + 1, _F64)
        buf[:C] = sum_g
        buf[C:2 * C] = sum_gx
        buf[2 * C] = R
        ctx.allreduce_sum(buf)
        # the dx kernel divides by the local count R: hand it the global sums scaled by
        # R / N so that it computes sum / N
        scale = R / buf[2 * C] if R > 0 else 0.0
        return buf[:C] * scale, buf[C:2 * C] * scale


class SyncBatchNorm1D(_SyncMixin, BatchNorm1D):
    """:class:`~nbnet.BatchNorm1D` with statistics over the whole batch of every MPI rank.

    Same arguments, parameters and conventions as BatchNorm1D; see
    :mod:`nbnet.layers.sync_batchnorm` for the exchange. Use it under ``mpiexec`` with
    ``Model.fit(..., distributed=True)``, or convert a model with
    :func:`nbnet.distributed.convert_sync_batchnorm`.
    """


class SyncBatchNorm2D(_SyncMixin, BatchNorm2D):
    """:class:`~nbnet.BatchNorm2D` (NHWC or NCHW) with statistics over every MPI rank."""

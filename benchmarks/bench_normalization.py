"""asv: nbnet's normalization layers, training step and inference forward.

Each suite is parametrised over input shape, dtype (float32, float64) and thread count
(1, 2; set with ``numba.set_num_threads`` in ``setup``). ``setup`` runs every timed call
once, so JIT compilation (or loading from numba's cache) is never timed. A layer that
this nbnet does not have (``getattr(nbnet, name)`` is None), or a thread count above
``NUMBA_NUM_THREADS``, makes ``setup`` raise NotImplementedError: asv records a skip.

* ``time_train_step``: ``forward(X)`` + ``backward(dY)`` + ``flush_gradients()``;
* ``time_inference_forward``: ``forward(X, retain_derived=False)`` (running statistics);
* ``track_*_GBps``: bytes the step must move divided by its time -- a training step must
  read X and dY and write Y and dX (4 * X.nbytes), an inference forward reads X and
  writes Y (2 * X.nbytes);
* ``track_*_vs_copy``: that rate over the ``np.copyto`` bandwidth measured in ``setup``
  (1.0 = as fast as a plain copy of the same bytes).
"""
import numba
import numpy as np

try:
    import nbnet
except ImportError:  # asv check in an environment without the project
    nbnet = None

from . import copy_bandwidth, seconds_per_call

DTYPES = ["float32", "float64"]
THREADS = [1, 2]
SHAPES_1D = [(256, 1024), (4096, 1024), (65536, 256), (128, 64)]
SHAPES_NHWC = [(32, 32, 32, 64), (64, 16, 16, 256)]


class _NormSuite:
    """Shared machinery; subclasses set ``layer``, ``kwargs`` and ``params``."""

    layer = None
    kwargs = {}
    param_names = ["shape", "dtype", "threads"]
    params = [SHAPES_1D, DTYPES, THREADS]
    timeout = 300

    def setup(self, shape, dtype, threads):
        cls = getattr(nbnet, self.layer, None) if nbnet is not None else None
        if cls is None:
            raise NotImplementedError(f"nbnet has no {self.layer}")
        if threads > numba.config.NUMBA_NUM_THREADS:
            raise NotImplementedError(f"NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS} < {threads}")
        numba.set_num_threads(threads)
        rng = np.random.default_rng(0)
        self.X = (3.0 + 2.0 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
        self.dY = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        self.train_layer = cls(**self.kwargs)
        self.infer_layer = cls(**self.kwargs)
        self.train_step()  # compile / load from cache, build the parameters
        self.inference_forward()
        self.bandwidth = copy_bandwidth()

    def train_step(self):
        layer = self.train_layer
        layer.forward(self.X)
        layer.backward(self.dY)
        layer.flush_gradients()

    def inference_forward(self):
        self.infer_layer.forward(self.X, retain_derived=False)

    # ------------------------------------------------------------------ timings
    def time_train_step(self, shape, dtype, threads):
        self.train_step()

    def time_inference_forward(self, shape, dtype, threads):
        self.inference_forward()

    # ------------------------------------------------------------------ bandwidth
    def _train_rate(self):
        return 4 * self.X.nbytes / seconds_per_call(self.train_step)

    def _inference_rate(self):
        return 2 * self.X.nbytes / seconds_per_call(self.inference_forward)

    def track_train_GBps(self, shape, dtype, threads):
        return self._train_rate() / 1e9

    track_train_GBps.unit = "GB/s"

    def track_inference_GBps(self, shape, dtype, threads):
        return self._inference_rate() / 1e9

    track_inference_GBps.unit = "GB/s"

    def track_train_vs_copy(self, shape, dtype, threads):
        return self._train_rate() / self.bandwidth

    track_train_vs_copy.unit = "fraction of copy bandwidth"

    def track_inference_vs_copy(self, shape, dtype, threads):
        return self._inference_rate() / self.bandwidth

    track_inference_vs_copy.unit = "fraction of copy bandwidth"


def _nchw(shapes):
    return [(n, c, h, w) for (n, h, w, c) in shapes]


class BatchNorm1D(_NormSuite):
    layer = "BatchNorm1D"


class LayerNorm1D(_NormSuite):
    layer = "LayerNorm1D"


class BatchNorm2DNHWC(_NormSuite):
    layer = "BatchNorm2D"
    params = [SHAPES_NHWC, DTYPES, THREADS]


class BatchNorm2DNCHW(_NormSuite):
    layer = "BatchNorm2D"
    kwargs = {"data_format": "NCHW"}
    params = [_nchw(SHAPES_NHWC), DTYPES, THREADS]


class BatchNorm2DReLUFused(_NormSuite):
    layer = "BatchNorm2D"
    kwargs = {"act_fn": "relu"}
    params = [SHAPES_NHWC[:1], DTYPES, THREADS]


class GroupNorm32NHWC(_NormSuite):
    layer = "GroupNorm"
    kwargs = {"n_groups": 32}
    params = [SHAPES_NHWC[:1], DTYPES, THREADS]


class GroupNorm32Features(_NormSuite):
    """GroupNorm on (N, C) features: one position, the one-position row kernels (wide
    groups, and groups of 8 channels)."""
    layer = "GroupNorm"
    kwargs = {"n_groups": 32}
    params = [[(64, 4096), (1024, 256)], DTYPES, THREADS]


class RMSNorm(_NormSuite):
    layer = "RMSNorm"
    params = [[(4096, 1024)], DTYPES, THREADS]


class LayerNorm2DNHWC(_NormSuite):
    layer = "LayerNorm2D"
    params = [SHAPES_NHWC[:1], DTYPES, THREADS]


class InstanceNorm2DNHWC(_NormSuite):
    layer = "InstanceNorm2D"
    params = [SHAPES_NHWC[:1], DTYPES, THREADS]

"""asv: one in-place optimizer update over 1M and 10M float32 parameters.

``setup`` builds the optimizer and runs one update (compiles or loads the kernel), so
only the update is timed. ``track_GBps`` reports the bytes the update must move (Adam
reads param, grad, m, v and writes param, m, v: 7 arrays; SGD with momentum 5) over its
time, ``track_vs_copy`` that over the ``np.copyto`` bandwidth.
"""
import numba
import numpy as np

try:
    import nbnet
except ImportError:
    nbnet = None

from . import copy_bandwidth, seconds_per_call

# name -> (optimizer spec, arrays moved per parameter)
OPTIMIZERS = {
    "adam": ("adam(lr=0.001)", 7),
    "sgd_momentum": ("sgd(lr=0.01, momentum=0.9)", 5),
}


class OptimizerStep:
    param_names = ["optimizer", "n_params", "threads"]
    params = [list(OPTIMIZERS), [1_000_000, 10_000_000], [1, 2]]
    timeout = 300

    def setup(self, optimizer, n_params, threads):
        if nbnet is None or not hasattr(nbnet, "get_optimizer"):
            raise NotImplementedError("nbnet has no optimizers")
        if threads > numba.config.NUMBA_NUM_THREADS:
            raise NotImplementedError(f"NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS} < {threads}")
        numba.set_num_threads(threads)
        spec, self.arrays = OPTIMIZERS[optimizer]
        self.opt = nbnet.get_optimizer(spec)
        rng = np.random.default_rng(0)
        self.param = np.zeros(n_params, np.float32)
        self.grad = rng.standard_normal(n_params, dtype=np.float32)
        self.step()  # compile / load from cache, allocate the state
        self.bandwidth = copy_bandwidth()

    def step(self):
        self.opt(self.param, self.grad, "w")

    def time_step(self, optimizer, n_params, threads):
        self.step()

    def _rate(self):
        return self.arrays * self.param.nbytes / seconds_per_call(self.step)

    def track_GBps(self, optimizer, n_params, threads):
        return self._rate() / 1e9

    track_GBps.unit = "GB/s"

    def track_vs_copy(self, optimizer, n_params, threads):
        return self._rate() / self.bandwidth

    track_vs_copy.unit = "fraction of copy bandwidth"

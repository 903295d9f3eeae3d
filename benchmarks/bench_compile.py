"""asv: start-up costs, each timed in a new process (``timeraw_`` benchmarks).

* ``timeraw_import_nbnet``: ``import nbnet`` (nothing is compiled at import).
* ``FirstTrainingStep.timeraw_warm_cache``: the first BatchNorm1D training step
  (forward + backward on a (4096, 256) float32 input) in a process that has already
  imported nbnet, with numba's kernel cache warm (``setup`` runs the step once in a
  subprocess first): the cost of loading the kernels from disk.
* ``FirstTrainingStep.timeraw_cold_cache``: the same step with an empty cache (a fresh
  ``NUMBA_CACHE_DIR``, emptied before every sample): the full JIT compile cost.

These are the only nbnet benchmarks that time JIT compilation.
"""
import os
import subprocess
import sys
import tempfile

_STEP = """
Y = bn.forward(X)
bn.backward(Y)
"""

_SETUP = """
import numpy as np
import nbnet
X = np.random.default_rng(0).standard_normal((4096, 256), dtype=np.float32)
bn = nbnet.BatchNorm1D()
"""

# A fixed place, emptied before each cold sample (so nothing accumulates in /tmp).
_COLD_DIR = os.path.join(tempfile.gettempdir(), "nbnet-asv-cold-numba-cache")

_COLD_SETUP = f"""
import os, shutil
shutil.rmtree({_COLD_DIR!r}, ignore_errors=True)
os.environ["NUMBA_CACHE_DIR"] = {_COLD_DIR!r}
""" + _SETUP


def timeraw_import_nbnet():
    return "import nbnet"


timeraw_import_nbnet.repeat = (3, 10, 20.0)


class FirstTrainingStep:
    timeout = 600
    number = 1

    def setup(self):
        # Fill the default kernel cache (a no-op when it is already warm).
        subprocess.run([sys.executable, "-c", _SETUP + _STEP], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def timeraw_warm_cache(self):
        return _STEP, _SETUP

    timeraw_warm_cache.repeat = (3, 10, 30.0)

    def timeraw_cold_cache(self):
        return _STEP, _COLD_SETUP

    timeraw_cold_cache.repeat = (1, 3, 120.0)
    timeraw_cold_cache.rounds = 1

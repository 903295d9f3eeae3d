"""asv: one training epoch of an MLP 784-256-256-10 with BatchNorm+ReLU, batch 128.

``FullyConnected(256) -> BatchNorm1D(act_fn="relu") -> FullyConnected(256) ->
BatchNorm1D(act_fn="relu") -> FullyConnected(10)``, softmax cross-entropy from logits,
Adam(lr=1e-3), float32, 8192 synthetic examples (64 batches) per epoch, no shuffling.
``setup`` trains one epoch first, so every kernel is compiled (or loaded) before timing.
Skipped (NotImplementedError in ``setup``) while nbnet has no ``Sequential``/``Model``.
"""
import numba
import numpy as np

try:
    import nbnet
except ImportError:
    nbnet = None

N_EXAMPLES = 8192
BATCH = 128


class MLPEpoch:
    param_names = ["threads"]
    params = [[1, 2]]
    timeout = 600
    number = 1

    def setup(self, threads):
        Model = getattr(nbnet, "Sequential", None) or getattr(nbnet, "Model", None)
        FC = getattr(nbnet, "FullyConnected", None)
        if Model is None or FC is None:
            raise NotImplementedError("nbnet has no Sequential/Model or FullyConnected")
        if threads > numba.config.NUMBA_NUM_THREADS:
            raise NotImplementedError(f"NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS} < {threads}")
        numba.set_num_threads(threads)
        rng = np.random.default_rng(0)
        self.X = rng.standard_normal((N_EXAMPLES, 784), dtype=np.float32)
        self.y = rng.integers(0, 10, N_EXAMPLES)
        self.model = Model([FC(256, seed=1), nbnet.BatchNorm1D(act_fn="relu"), FC(256, seed=2),
                            nbnet.BatchNorm1D(act_fn="relu"), FC(10, seed=3)],
                           loss="cross_entropy", optimizer="adam(lr=1e-3)", seed=0)
        self.epoch()  # compile / load every kernel

    def epoch(self):
        self.model.fit(self.X, self.y, epochs=1, batch_size=BATCH, shuffle=False, verbose=0)

    def time_epoch(self, threads):
        self.epoch()

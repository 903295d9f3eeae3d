"""Data-parallel training with SyncBatchNorm on 2 ranks == one process on the
concatenated batches (float64, 20 steps, atol 1e-10); fit(distributed=True) keeps the
replicas identical and saves from rank 0 only."""
import os
import sys
import tempfile

import numpy as np

import nbnet
from nbnet import distributed

ctx = distributed.init()
rank = ctx.rank


def make(bn):
    return nbnet.Model([nbnet.FullyConnected(16), bn(act_fn="relu"), nbnet.FullyConnected(3)],
                       loss="cross_entropy", optimizer="sgd(lr=0.1, momentum=0.9)",
                       dtype=np.float64, seed=0, input_dim=5)


par = make(nbnet.SyncBatchNorm1D).distribute()
ref = make(nbnet.BatchNorm1D)
rng = np.random.default_rng(1)
for step in range(20):
    Xg = rng.normal(size=(16, 5))
    yg = rng.integers(0, 3, 16)
    par.train_step(Xg[rank * 8:(rank + 1) * 8], yg[rank * 8:(rank + 1) * 8])
    ref.train_step(Xg, yg)
for i, (a, b) in enumerate(zip(par.layers, ref.layers)):
    for k in b.parameters:
        np.testing.assert_allclose(a.parameters[k], b.parameters[k], atol=1e-10, rtol=0,
                                   err_msg=f"layer {i} {k}")

# fit(distributed=True): sharded epochs, identical replicas, rank-0 checkpoint
X = rng.normal(size=(203, 5))
y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 1).astype(int)
model = nbnet.Model([nbnet.FullyConnected(16), nbnet.BatchNorm1D(act_fn="relu"), nbnet.FullyConnected(3)],
                    optimizer="adam(lr=0.01)", seed=3)
distributed.convert_sync_batchnorm(model)
assert type(model.layers[1]).__name__ == "SyncBatchNorm1D"
hist = model.fit(X, y, epochs=3, batch_size=32, verbose=0, distributed=True)
assert len(hist["loss"]) == 3 and hist["loss"][-1] < hist["loss"][0]
flat = np.concatenate([v.ravel() for layer in model.layers for _, v in sorted(layer.parameters.items())])
both = ctx.comm.allgather(flat)
np.testing.assert_array_equal(both[0], both[1])
path = ctx.comm.bcast(os.path.join(tempfile.mkdtemp(), "m.npz") if rank == 0 else None, root=0)
model.save(path)
assert os.path.exists(path)
loaded = nbnet.load(path)
np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
print("training ok", flush=True)
sys.stdout.flush()

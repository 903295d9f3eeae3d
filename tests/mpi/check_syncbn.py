"""2 ranks holding 3 and 5 rows == one process on the 8 rows (float64, atol 1e-10)."""
import numpy as np

import nbnet
from nbnet import distributed

ctx = distributed.init()
rank = ctx.rank
assert ctx.world_size == 2


def split(a, sizes):
    edges = np.cumsum([0] + list(sizes))
    return a[edges[rank]:edges[rank + 1]]


def check(make_sync, make_ref, X, dY, sizes, act=None):
    sync, ref = make_sync(act_fn=act, unbiased_running_var=True), make_ref(act_fn=act, unbiased_running_var=True)
    Xr, dYr = split(X, sizes), split(dY, sizes)
    Y = sync.forward(Xr)
    dX = sync.backward(dYr)
    Yref = ref.forward(X)
    dXref = ref.backward(dY)
    np.testing.assert_allclose(Y, split(Yref, sizes), atol=1e-10, rtol=0)
    np.testing.assert_allclose(dX, split(dXref, sizes), atol=1e-10, rtol=0)
    for k in ("running_mean", "running_var"):
        np.testing.assert_allclose(sync.parameters[k], ref.parameters[k], atol=1e-10, rtol=0)
    # parameter gradients: local sums, combined once by the gradient all-reduce
    g = {k: sync.gradients[k].copy() for k in ("scaler", "intercept")}
    distributed.allreduce_gradients(sync, average=False)
    for k in g:
        np.testing.assert_allclose(sync.gradients[k], ref.gradients[k], atol=1e-10, rtol=0)
    return g


rng = np.random.default_rng(0)  # same data on both ranks; each takes its slice
X = rng.normal(2.0, 3.0, (8, 6))
dY = rng.normal(size=(8, 6))
check(nbnet.SyncBatchNorm1D, nbnet.BatchNorm1D, X, dY, (3, 5))
check(nbnet.SyncBatchNorm1D, nbnet.BatchNorm1D, X, dY, (3, 5), act="relu")
check(nbnet.SyncBatchNorm1D, nbnet.BatchNorm1D, X, dY, (1, 7))  # one row on rank 0 is fine

# a rank with 0 rows: no deadlock, same result as the other rank's data alone
g = check(nbnet.SyncBatchNorm1D, nbnet.BatchNorm1D, X, dY, (0, 8))
if rank == 0:
    assert not g["scaler"].any()

# 2-D, NHWC and NCHW
X4 = rng.normal(1.0, 2.0, (8, 3, 2, 4))
dY4 = rng.normal(size=X4.shape)
check(nbnet.SyncBatchNorm2D, nbnet.BatchNorm2D, X4, dY4, (3, 5))
Xc = rng.normal(1.0, 2.0, (8, 4, 3, 2))
dYc = rng.normal(size=Xc.shape)
check(lambda **kw: nbnet.SyncBatchNorm2D(data_format="NCHW", **kw),
      lambda **kw: nbnet.BatchNorm2D(data_format="NCHW", **kw), Xc, dYc, (3, 5))

# stability at mean 1e6: variance relative error <= 1e-8
Xbig = rng.normal(1e6, 1.0, (4000, 5))
layer = nbnet.SyncBatchNorm1D(momentum=0.0)
layer.forward(split(Xbig, (1500, 2500)))
true_var = ((Xbig - Xbig.mean(0)) ** 2).mean(0)
assert np.max(np.abs(layer.parameters["running_var"] - true_var) / true_var) <= 1e-8

# a NaN in feature 2 (in rank 1's rows): on every rank that feature keeps its running
# statistics, as BatchNorm1D does in one process, and the others update
Xn = X.copy()
Xn[6, 2] = np.nan
sync, ref = nbnet.SyncBatchNorm1D(), nbnet.BatchNorm1D()
sync.forward(split(Xn, (3, 5)))
ref.forward(Xn)
for k, initial in (("running_mean", 0.0), ("running_var", 1.0)):
    assert np.isfinite(sync.parameters[k]).all() and sync.parameters[k][2] == initial
    assert (np.delete(sync.parameters[k], 2) != initial).all()
    np.testing.assert_allclose(sync.parameters[k], ref.parameters[k], atol=1e-10, rtol=0)

# one value per feature across all ranks is still an error, on every rank alike
try:
    nbnet.SyncBatchNorm1D().forward(split(X[:1], (1, 0)))
except ValueError as exc:
    assert "more than 1 value per feature" in str(exc)
else:
    raise AssertionError("expected ValueError")
print("syncbn ok", flush=True)

import numpy as np

import nbnet
from nbnet import distributed

ctx = distributed.init()
assert ctx.world_size == 2, ctx
assert ctx.threads == 1, f"2 ranks on 2 cores must get 1 numba thread each, got {ctx.threads}"
rank = ctx.rank

# allreduce_gradients averages, broadcast_parameters copies rank 0's state
layer = nbnet.BatchNorm1D()
layer.forward(np.random.default_rng(rank).normal(size=(6, 3)))
layer.gradients["scaler"][:] = rank + 1.0
layer.gradients["intercept"][:] = 10.0 * (rank + 1)
distributed.allreduce_gradients(layer)
np.testing.assert_array_equal(layer.gradients["scaler"], np.full(3, 1.5))
np.testing.assert_array_equal(layer.gradients["intercept"], np.full(3, 15.0))
layer.parameters["scaler"][:] = rank + 7.0
distributed.broadcast_parameters(layer)
np.testing.assert_array_equal(layer.parameters["scaler"], np.full(3, 7.0))

# sampler: equal shards, disjoint cover of the data, same permutation on every rank
s = distributed.DistributedSampler(11, seed=3)
s.set_epoch(2)
mine = s.indices()
all_shards = ctx.comm.allgather(mine.tolist())
assert len(all_shards[0]) == len(all_shards[1]) == 6
assert set(all_shards[0]) | set(all_shards[1]) == set(range(11))
s.set_epoch(3)
assert not np.array_equal(s.indices(), mine)
print("collectives ok", flush=True)

import time

from nbnet import distributed

ctx = distributed.init()
if ctx.rank == 1:
    raise RuntimeError("deliberate failure on rank 1")
ctx.comm.Barrier()  # rank 0 would wait here forever without the abort
time.sleep(60)

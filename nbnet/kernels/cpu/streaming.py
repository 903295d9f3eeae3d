"""Streaming (non-temporal) stores, for outputs too large to stay in the caches.

A normal store first reads the cache line it writes (write-allocate), so an output that
goes straight to DRAM costs a read and a write. A non-temporal store writes the line
without reading it and without evicting what the caches hold. For a BatchNorm output of
64 MiB ((65536, 256) float32) on the 2-core Zen 4 reference machine the normalize pass
went from 4.9 to 3.1 ms. For an output that fits the caches it is a loss (the next
reader finds it in DRAM instead of L3) and so is any partial cache line, so the layers
stream only outputs of at least ``config.STREAM_BYTES`` whose rows are whole cache
lines.

Kernels compute a row into a small buffer (L1) and hand it to :func:`stream_copy`, then
end each task with :func:`store_fence`: non-temporal stores are weakly ordered, and the
fence makes them visible before the task reports back.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_VECTOR_BYTES = 32  # one AVX register: the widest aligned store every x86-64 CPU we run on has


@intrinsic
def stream_copy(typingctx, src, dst, offset):
    """``dst.flat[offset:offset + n] = src`` (``n = len(src)``; ``src`` 1-D, ``dst``
    C-contiguous of any number of dimensions, the same float dtype; the caller keeps the
    range inside ``dst``) with non-temporal vector stores for the ``_VECTOR_BYTES``-aligned
    middle of the range and plain stores for the elements before and after it. (An
    element offset rather than a view ``Y[i, j0:j1]``: a view per row costs its slice
    arithmetic on every row.)"""
    ok = (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.ndim == 1
          and src.layout == "C" and dst.layout == "C" and isinstance(offset, types.Integer)
          and src.dtype == dst.dtype and src.dtype in (types.float32, types.float64))
    if not ok:
        return None

    def codegen(context, builder, signature, args):
        sty, dty, _ = signature.args
        s = context.make_array(sty)(context, builder, args[0])
        d = context.make_array(dty)(context, builder, args[1])
        i64 = ir.IntType(64)
        esz = dty.dtype.bitwidth // 8
        width = _VECTOR_BYTES // esz
        vec = ir.VectorType(context.get_data_type(dty.dtype), width)
        n = builder.extract_value(s.shape, 0)
        sp = s.data
        dp = builder.gep(d.data, [builder.sext(args[2], i64) if args[2].type.width < 64
                                  else args[2]])
        # elements before the first aligned address of dst (at most width - 1)
        mis = builder.and_(builder.ptrtoint(dp, i64), ir.Constant(i64, _VECTOR_BYTES - 1))
        gap = builder.and_(builder.sub(ir.Constant(i64, _VECTOR_BYTES), mis),
                           ir.Constant(i64, _VECTOR_BYTES - 1))
        head = builder.udiv(gap, ir.Constant(i64, esz))
        head = builder.select(builder.icmp_unsigned(">", head, n), n, head)
        with cgutils.for_range(builder, head) as loop:
            builder.store(builder.load(builder.gep(sp, [loop.index])),
                          builder.gep(dp, [loop.index]))
        n_vec = builder.udiv(builder.sub(n, head), ir.Constant(i64, width))
        nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        with cgutils.for_range(builder, n_vec) as loop:
            off = builder.add(head, builder.mul(loop.index, ir.Constant(i64, width)))
            v = builder.load(builder.bitcast(builder.gep(sp, [off]), vec.as_pointer()), align=esz)
            st = builder.store(v, builder.bitcast(builder.gep(dp, [off]), vec.as_pointer()),
                               align=_VECTOR_BYTES)
            st.set_metadata("nontemporal", nontemporal)
        done = builder.add(head, builder.mul(n_vec, ir.Constant(i64, width)))
        with cgutils.for_range(builder, builder.sub(n, done)) as loop:
            off = builder.add(done, loop.index)
            builder.store(builder.load(builder.gep(sp, [off])), builder.gep(dp, [off]))
        return context.get_dummy_value()

    return types.void(src, dst, offset), codegen


@intrinsic
def store_fence(typingctx):
    """A full memory fence (``mfence`` on x86): orders the task's streaming stores before
    anything it does next."""
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen

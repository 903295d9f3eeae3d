"""Every tunable of nbnet, in one place.

Each value below can be overridden before ``import nbnet`` with the environment
variable named beside it. Values that shape compiled code (the fastmath flag set)
are read once, when the kernels are first compiled; numba's on-disk cache is keyed by
source and signature, not by these flags, so after changing ``NBNET_FASTMATH`` clear
the cache (``nbnet info`` prints where it lives).
"""
import os


def _env_int(name, default):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _env_str(name, default):
    raw = os.environ.get(name)
    return default if raw is None or raw == "" else raw


#: Default device for new layers ("cpu" or "cuda"); see :func:`nbnet.set_default_device`.
DEFAULT_DEVICE = _env_str("NBNET_DEVICE", "cpu")

#: Number of numba threads nbnet asks for (0: leave numba's default, the core count,
#: or NUMBA_NUM_THREADS). Results never depend on it (see CHUNK_BYTES).
NUM_THREADS = _env_int("NBNET_NUM_THREADS", 0)

#: Target size in bytes of one row chunk of a column reduction. A chunk is read twice
#: (sum, then squared deviations around the chunk mean), so it must stay in the
#: per-core L2 cache (1 MiB on the reference machine); 256 KiB leaves room for the
#: float64 partial rows. The chunk count depends only on the shape and dtype, never on
#: the thread count, which is what makes results bit-identical for any thread count.
CHUNK_BYTES = _env_int("NBNET_CHUNK_BYTES", 256 * 1024)

#: Bounds on the rows per chunk: at least MIN_CHUNK_ROWS so that very wide inputs still
#: amortise the per-chunk merge, at most MAX_CHUNK_ROWS so that tall narrow inputs
#: still split into enough chunks to keep every core busy.
MIN_CHUNK_ROWS = _env_int("NBNET_MIN_CHUNK_ROWS", 4)
MAX_CHUNK_ROWS = _env_int("NBNET_MAX_CHUNK_ROWS", 1024)

#: How long an idle OpenMP worker spins before it sleeps (GNU libgomp's GOMP_SPINCOUNT),
#: applied when nbnet is imported unless the user set GOMP_SPINCOUNT or OMP_WAIT_POLICY.
#: libgomp's default (300,000 spins, about a millisecond) keeps numba's workers busy after
#: every parallel kernel, stealing the cores NumPy's BLAS threads need next: an MLP
#: training epoch (784-256-256-10, batch 128, 2 cores) took 672 ms with the default,
#: 144 ms with 10,000, 249 ms with 1,000 (every parallel region then pays a wake-up), while
#: a BatchNorm1D (256, 1024) step moved from 212 to 236 us. It reaches every libgomp
#: loaded after nbnet in the process (PyTorch's too); 0 leaves the environment alone.
GOMP_SPINCOUNT = _env_int("NBNET_GOMP_SPINCOUNT", 10000)

#: Row-pattern backward (LayerNorm, RMSNorm) on CPU: when the per-chunk float64
#: parameter-gradient partials would reach this fraction of the input's bytes (few rows,
#: very wide), the parameter gradients are reduced by column blocks of
#: PARAM_GRAD_COLUMNS columns instead (no partials, no merge). LayerNorm2D (32,32,32,64)
#: float32 has partials as large as X (ratio 1.0); LayerNorm1D (4096, 1024) 1/16.
WIDE_PARTIALS_RATIO = float(os.environ.get("NBNET_WIDE_PARTIALS_RATIO", "0.5"))
PARAM_GRAD_COLUMNS = _env_int("NBNET_PARAM_GRAD_COLUMNS", 2048)

#: CPU layer outputs (Y, dX) of at least OUTPUT_REUSE_BYTES are taken from a per-layer
#: pool of up to OUTPUT_POOL buffers, reused once nothing outside the pool refers to them
#: (see LayerBase._output). glibc serves allocations of 32 MiB and more with a fresh
#: mmap that the kernel zero-fills on first touch; that cost ~4 ms per 64 MiB output
#: on the reference machine. OUTPUT_POOL=0 turns the pool off.
OUTPUT_REUSE_BYTES = _env_int("NBNET_OUTPUT_REUSE_BYTES", 8 << 20)
OUTPUT_POOL = _env_int("NBNET_OUTPUT_POOL", 2)

#: Column-kernel outputs (BatchNorm's Y and dX) of at least STREAM_BYTES are written with
#: non-temporal stores, which skip the read of each cache line a normal store makes and
#: leave the caches to the inputs (nbnet/kernels/cpu/streaming.py). Below this size the
#: output would still be in L3 for whoever reads it next, and streaming it is a loss. The
#: default is the reference machine's L3 (32 MiB): BatchNorm1D (65536, 256) float32 normalize
#: 4.9 -> 3.1 ms there. 0 streams every eligible output.
STREAM_BYTES = _env_int("NBNET_STREAM_BYTES", 32 << 20)


def streams(V):
    """Whether a column kernel writes its ``(rows, C)`` output (the shape of ``V``) with
    non-temporal stores: at least ``STREAM_BYTES``, and rows of whole 64-byte cache lines.
    Channels-first views (3-D) never stream."""
    return bool(V.ndim == 2 and V.nbytes >= STREAM_BYTES
                and (V.shape[1] * V.dtype.itemsize) % 64 == 0)

#: Below this many elements a kernel runs its loops serially instead of in parallel:
#: starting and joining a parallel region costs microseconds, and a thread descheduled
#: by another process stalls the whole region for a scheduler tick. Measured on the
#: 2-core reference machine (BatchNorm1D/LayerNorm1D training step, float32): serial
#: wins at 65,536 elements (84 vs 99 us), parallel from 131,072 (102 vs 144 us).
SERIAL_CUTOFF = _env_int("NBNET_SERIAL_CUTOFF", 1 << 17)

#: The group kernels (GroupNorm, InstanceNorm, both layouts) go parallel from this
#: many elements when they have two tasks or more (blocks of groups, chunks of
#: examples): they do more per value than a BatchNorm pass (a dozen short passes per
#: example and block besides the data), so a parallel region pays for itself sooner.
#: Serial against parallel kernel on the 2-core reference machine, float32, GroupNorm(32):
#: (1, 2, 8192) (16K values, 8 tasks) forward 13.5 vs 9.4 us, backward 35.8 vs 21.1 us;
#: (4, 2, 2048) (2 tasks) 11.7 vs 9.7 and 29.3 vs 19.1 us; with one task parallel only
#: costs (2-3 us).
GROUP_SERIAL_CUTOFF = _env_int("NBNET_GROUP_SERIAL_CUTOFF", 1 << 14)

#: LLVM fast-math flags for the kernels. "nnan"/"ninf" are deliberately absent: they
#: let LLVM assume NaN never occurs, which breaks isnan and NaN containment.
#: "reassoc" lets row sums vectorise; "contract" allows FMA. Kernels built with
#: ``@kernel(ordered=True)`` (the split mean subtraction) drop "reassoc"; see
#: nbnet/kernels/cpu/_jit.py.
FASTMATH = frozenset(
    f.strip() for f in _env_str("NBNET_FASTMATH", "reassoc,contract").split(",") if f.strip()
)

#: Print one line to stderr before the first kernel compiles in a process (compiling the
#: default kernel set takes seconds; every later process loads it from numba's cache).
COMPILE_MESSAGE = _env_str("NBNET_COMPILE_MESSAGE", "1") not in ("0", "false", "no")

#: Keep numba's CPU start-up, at nbnet's first kernel call, from importing SciPy (numba
#: probes SciPy's BLAS once for np.dot; nbnet's kernels never call it): 0.56 -> ~0.44 s
#: from a new process to its first BatchNorm1D step on the reference machine when that
#: start-up ran on every first call. With LIGHT_CACHE_LOAD it runs only when the first
#: call compiles. numba imports SciPy later, when a jitted function really uses BLAS. See
#: nbnet/kernels/cpu/_jit.py (_deferred_blas_probe). "0" gives numba's own probe.
DEFER_SCIPY = _env_str("NBNET_DEFER_SCIPY", "1") not in ("0", "false", "no")

#: Load cached CPU kernels without numba's full CPU-target start-up (the ~50 modules and
#: registries only compiling needs; numba's compiler still runs it before any compile):
#: ~0.1 s of a new process's first BatchNorm1D step, warm cache, on the 2-core reference
#: machine. See nbnet/kernels/cpu/_jit.py (_LightLoadCache). "0" gives numba's own path.
LIGHT_CACHE_LOAD = _env_str("NBNET_LIGHT_CACHE_LOAD", "1") not in ("0", "false", "no")

#: Threads per block for the CUDA kernels (a power of two).
CUDA_BLOCK = _env_int("NBNET_CUDA_BLOCK", 256)


def rows_per_chunk(n_cols, itemsize):
    """Rows per chunk for a column reduction over a ``(rows, n_cols)`` array.

    Depends only on the row width in bytes (never on the thread count), so the
    summation order, and with it every bit of the result, is fixed by the shape.
    """
    # (comparisons, not min/max/int: this runs several times per layer call, ~0.5 us that way)
    width = n_cols * itemsize
    rows = CHUNK_BYTES // width if width > 0 else MAX_CHUNK_ROWS
    return MIN_CHUNK_ROWS if rows < MIN_CHUNK_ROWS else (
        MAX_CHUNK_ROWS if rows > MAX_CHUNK_ROWS else rows)


def examples_per_chunk(n_values, itemsize):
    """Examples per task where each task reduces whole examples of ``n_values`` values:
    the group kernels (GroupNorm, InstanceNorm, forward and backward) and the row
    kernels' passes that keep no per-chunk partials (LayerNorm/RMSNorm forward, and the
    dX pass of wide inputs). As many as fit CHUNK_BYTES, down to one. Unlike
    :func:`rows_per_chunk` there is no MIN_CHUNK_ROWS floor: a group kernel's per-chunk
    merge of the parameter gradients costs one add per channel against an example's
    ``H * W`` values per channel, and the others merge nothing. With the floor, four
    (4, 4, 4, 4096) float32 examples made one task, and GroupNorm(32) ran serially:
    inference 0.24 ms against PyTorch's 0.06 ms on the 2-core reference machine.
    Shape-only, like every chunking."""
    width = n_values * itemsize
    rows = CHUNK_BYTES // width if width > 0 else MAX_CHUNK_ROWS
    return 1 if rows < 1 else (MAX_CHUNK_ROWS if rows > MAX_CHUNK_ROWS else rows)


#: What one group of an example costs the one-position group kernels (GroupNorm on
#: ``(N, C)`` features, ``group_stats._group_forward_rows``) besides its values, counted in
#: values: its sums, a square root and a division, loops of ``cg`` values set up three
#: times. Serial kernels on the 2-core reference machine, float32: 5-16 ns a group
#: forward (groups of 2 the least) and more backward, against ~0.3 ns a value in a wide
#: group. Only the chunking depends on it (tasks of ~CHUNK_BYTES of such work).
GROUP_ROW_COST = 48


def group_examples_per_chunk(n_positions, n_channels, n_groups, itemsize):
    """Examples per task of the channels-last group kernels (both passes; the layer sizes
    the backward's partial buffers with it): :func:`examples_per_chunk` of an example's
    values, plus ``GROUP_ROW_COST`` values a group with one position, where a group is a
    row of ``cg`` values and its fixed cost can exceed its data (GroupNorm(32) on (1024,
    64) features: one chunk of all 1024 examples, serial, without it). Shape-only."""
    n = n_positions * n_channels
    return examples_per_chunk(n + GROUP_ROW_COST * n_groups if n_positions == 1 else n,
                              itemsize)


#: The column kernels (BatchNorm's row layout) cut rows wider than TILE_BYTES into
#: tiles of that many bytes: a task is a chunk of rows times a block of columns, and the
#: chunk's height comes from the tile's width (``column_tiling``). With whole rows, a
#: (256, 16384) float32 input had chunks of 4 rows (CHUNK_BYTES / 64 KiB, raised to
#: MIN_CHUNK_ROWS) and float64 partial sums as large as the input itself, merged
#: serially, and (32, 16384) had 8 tasks: BatchNorm1D training steps 0.5-0.75x PyTorch's
#: speed on the 2-core reference machine. Tiles against whole rows, alternated in one
#: process there (medians): (2048, 2048) float32 training step 6.6 -> 4.6 ms, (512, 8192)
#: 14.1 -> 5.4 ms, inference 0.68 -> 0.61 and 1.09 -> 1.04 ms. Tiles of 2048 bytes were
#: no better (inference 10-50% slower: shorter runs for the prefetcher). Rows of at most
#: TILE_BYTES are not cut (one tile per chunk, the same chunks as before, the same bits).
TILE_BYTES = _env_int("NBNET_TILE_BYTES", 4096)


def groups_per_task(n_channels, n_groups, itemsize):
    """Whole groups per task of the channels-last group kernels (GroupNorm, InstanceNorm
    NHWC): as many as fit ``TILE_BYTES`` of channels, at least one. A task's per-channel
    arrays are that wide, so they stay in L1 whatever the channel count. Shape-only."""
    per_group = (n_channels // n_groups) * itemsize
    g = TILE_BYTES // per_group if per_group > 0 else n_groups
    return 1 if g < 1 else (n_groups if g > n_groups else g)


def cf_group_tiling(n_examples, example_values, n_groups, itemsize):
    """``(examples_per_chunk, groups_per_task)`` of the channels-first group kernels
    (GroupNorm, InstanceNorm NCHW): a chunk of whole examples (:func:`examples_per_chunk`)
    times as many whole groups as fill ``CHUNK_BYTES`` with the chunk. A task of one group
    of one example had ``cg * H * W`` values, 4 to 16 for InstanceNorm on small images,
    and its fixed costs (a call, the moments' set-up, a square root) exceeded its data.
    ``n_examples``: the chunk's examples when the caller has fixed them (the backward's
    partial buffers), else the batch. Shape-only."""
    rpc = examples_per_chunk(example_values, itemsize)
    rpc = n_examples if n_examples < rpc else rpc
    per_group = rpc * (example_values // n_groups) * itemsize
    g = CHUNK_BYTES // per_group if per_group > 0 else n_groups
    return rpc, 1 if g < 1 else (n_groups if g > n_groups else g)


def column_tiling(n_cols, itemsize):
    """``(rows_per_chunk, cols_per_tile)`` of the column kernels for a ``(rows, n_cols)``
    array: tiles of at most ``TILE_BYTES`` per row, chunks of ``rows_per_chunk`` of the
    tile's width. From the shape alone, so results do not depend on the thread count."""
    cols = TILE_BYTES // itemsize
    cols = n_cols if n_cols < cols else cols
    cols = 1 if cols < 1 else cols
    return rows_per_chunk(cols, itemsize), cols


def apply_openmp_environment():
    """Set GOMP_SPINCOUNT (see above) unless the user chose an OpenMP wait policy."""
    if GOMP_SPINCOUNT > 0 and "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(GOMP_SPINCOUNT)

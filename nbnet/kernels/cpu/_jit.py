"""The one decorator every CPU kernel uses: a parallel kernel and its serial twin.

``kernel(fn)`` compiles the same Python source twice, once with
``parallel=True`` (``prange`` splits the loop over threads) and once without (``prange``
is a plain ``range``). Both are cached on disk (``cache=True``). The serial twin gets its
own ``__qualname__`` so that the two never share a cache entry: numba keys its cache by
qualified name and signature, and a shared key would hand the parallel code to the
serial twin.

Kernels must not read dynamic globals (``numba.get_num_threads()``, config values):
that silently disables caching. Everything tunable is passed in as an argument.
"""
import contextlib
import importlib.util
import os
import sys
import types

from numba import njit

from ... import config

_OPTIONS = dict(cache=True, nogil=True, fastmath=set(config.FASTMATH), error_model="numpy")

# Kernels that subtract a float64 mean as ``x - m0`` (m0 rounded to the input's dtype)
# plus a float64 remainder folded into a later constant depend on the written order of
# their floating-point operations: with "reassoc" LLVM may rewrite ``(x - m0) * s + b``
# into forms that cancel (``x * s - m0 * s + b``) or fold the remainder back into ``m0``.
# They compile without it ("contract", i.e. FMA, only makes them more exact). Their loops
# vectorise anyway: the inner loop runs across columns with one accumulator per column,
# which is not a reduction.
_ORDERED_OPTIONS = dict(_OPTIONS, fastmath=set(config.FASTMATH) - {"reassoc"})


def _renamed(fn, suffix):
    clone = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix,
                               fn.__defaults__, fn.__closure__)
    clone.__qualname__ = fn.__qualname__ + suffix
    clone.__module__ = fn.__module__
    clone.__doc__ = fn.__doc__
    return clone


class Kernel:
    """A compiled kernel with a parallel body and a serial twin.

    Call it with ``size`` (the element count that decides which twin runs) first, or
    use ``.parallel`` / ``.serial`` directly.
    """

    def __init__(self, fn, ordered=False):
        options = _ORDERED_OPTIONS if ordered else _OPTIONS
        self.parallel = njit(parallel=True, **options)(fn)
        self.serial = njit(parallel=False, **options)(_renamed(fn, "_serial"))
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._unseen = {id(self.parallel), id(self.serial)}

    def __call__(self, size, *args):
        twin = self.serial if size < config.SERIAL_CUTOFF else self.parallel
        if self._unseen and id(twin) in self._unseen:
            self._unseen.discard(id(twin))
            if _not_cached(twin):
                _announce_compile()
            with _deferred_blas_probe():
                return twin(*args)
        return twin(*args)

    def dispatchers(self):
        return (self.parallel, self.serial)


_announced = False


def _not_cached(dispatcher):
    """True when numba has no on-disk cache index for ``dispatcher`` (it will compile)."""
    try:
        return not os.path.exists(dispatcher._cache._cache_file._index_path)
    except AttributeError:  # numba internals moved: stay quiet rather than guess
        return False


def _announce_compile():
    """One line, once per process, before the first kernel compiles (seconds, not ms)."""
    global _announced
    if not _announced and config.COMPILE_MESSAGE:
        _announced = True
        print("nbnet: compiling kernels for first use (once; cached on disk for later runs)",
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def _deferred_blas_probe():
    """Keep numba's CPU target start-up from importing SciPy, during nbnet's first dispatch.

    The first dispatch in a process initialises numba's CPU target, which imports
    ``numba.np.arraymath``; that module asks ``numba.np.linalg.ensure_blas()`` once, at
    import, whether BLAS is available (for ``np.dot`` on vectors), and the answer imports
    ``scipy.linalg.cython_blas`` and with it ``scipy.linalg``: 0.12 of the 0.56 s a new
    process took to its first BatchNorm1D step on the reference machine, for kernels that
    never call BLAS. While that import runs, this swaps ``ensure_blas`` for a probe that
    answers from ``importlib.util.find_spec("scipy")`` (SciPy installed or not, without
    importing it); numba's own check runs, and imports SciPy, the first time a jitted
    function really uses BLAS. The swap is undone when the dispatch returns, and does
    nothing when the target is already up (``numba.np.arraymath`` imported), when
    ``config.DEFER_SCIPY`` is off, or when numba's internals have moved.
    """
    if not config.DEFER_SCIPY or "numba.np.arraymath" in sys.modules:
        yield
        return
    try:
        from numba.np import linalg
        original = linalg.ensure_blas
    except (ImportError, AttributeError):  # numba internals moved: change nothing
        yield
        return

    def probe():
        if "scipy.linalg.cython_blas" in sys.modules:  # already paid for: ask numba
            return original()
        if importlib.util.find_spec("scipy") is None:
            raise ImportError("scipy 0.16+ is required for linear algebra")

    linalg.ensure_blas = probe
    try:
        yield
    finally:
        linalg.ensure_blas = original
        arraymath = sys.modules.get("numba.np.arraymath")
        if arraymath is not None and getattr(arraymath, "ensure_blas", None) is probe:
            arraymath.ensure_blas = original


def kernel(fn=None, *, ordered=False):
    """Decorate a kernel body: returns a :class:`Kernel` (parallel + serial twin).

    ``@kernel(ordered=True)`` compiles without "reassoc", for kernels whose accuracy
    rests on the written order of their operations (the split mean subtraction).
    """
    if fn is None:
        return lambda f: Kernel(f, ordered=ordered)
    return Kernel(fn, ordered=ordered)


def chunk_body(fn):
    """Decorate the per-chunk body of a kernel: compiled once, not inlined."""
    return njit(**_OPTIONS)(fn)


def task_body(fn=None, *, ordered=False):
    """Decorate the body of a kernel's ``prange`` loop, lifted into its own function.

    The kernel keeps only ``for t in prange(n): body(np.int64(t), ...)``. The body is
    compiled once (the ``int64`` cast gives the serial and the parallel twin the same
    signature) and cached on its own; before, each twin compiled and optimised its own
    copy of the body. With about 1.8 s of fixed cost per parallel twin (numba's parfor
    passes) this took compiling the default float32 BatchNorm1D + LayerNorm1D set from
    ~25 s to ~14 s on the 2-core reference machine, with no change at run time (one call
    per chunk).

    ``@task_body(ordered=True)`` goes with ``@kernel(ordered=True)``.
    """
    if fn is None:
        return lambda f: njit(**(_ORDERED_OPTIONS if ordered else _OPTIONS))(f)
    return njit(**_OPTIONS)(fn)


def helper(fn):
    """Decorate a small device function inlined into kernels (no parallel loop)."""
    return njit(inline="always", **_OPTIONS)(fn)

"""The one decorator every CPU kernel uses: one compiled function with a parallel and a
serial path.

``kernel(fn)`` compiles ``fn`` once, with ``parallel=True``, after rewriting its source
(:func:`_with_serial_loops`): the function gains a first argument ``serial_``, and every
``for ... in prange(...)`` loop becomes ``if serial_: <the loop over range> else: <the
prange loop>``. Small inputs take the serial loop (no parallel region to start), large
ones the prange loop, in the same machine code; the results are bit-identical (each task
writes its own outputs, chunked by the shape alone). It is cached on disk
(``cache=True``).

Before, the serial path was a second function compiled from the same source with
``parallel=False``. One function per kernel halves the dispatchers and cache entries and
numba's fixed cost per compiled function: compiling the default float32 BatchNorm1D +
LayerNorm1D set from an empty cache went from 21.1 to 20.4 s on the 2-core reference
machine. It saves no more because most of what a driver costs is LLVM optimising again,
and generating code again for, the task body it calls (numba links the callee's module into
the caller's and LLVM inlines it), which the serial loop still does: in that set the task
bodies take ~7 s to compile, the kernels that call them ~12 s (~0.9 s of it per ``prange``
loop however small its body).

Kernels must not read dynamic globals (``numba.get_num_threads()``, config values):
that silently disables caching. Everything tunable is passed in as an argument.
"""
import ast
import contextlib
import copy
import importlib.util
import inspect
import os
import sys
import textwrap

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


#: The argument :func:`_with_serial_loops` adds in front of a kernel's own arguments.
SERIAL_ARG = "serial_"


class _SerialLoops(ast.NodeTransformer):
    """``for v in prange(...): body`` -> ``if serial_: for v in range(...): body`` ``else:``
    the loop as written."""

    def visit_For(self, node):
        self.generic_visit(node)
        it = node.iter
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "prange":
            serial = copy.deepcopy(node)
            serial.iter.func = ast.Name(id="range", ctx=ast.Load())
            return ast.If(test=ast.Name(id=SERIAL_ARG, ctx=ast.Load()), body=[serial],
                          orelse=[node])
        return node


class _Constants(ast.NodeTransformer):
    """Every read of a name in ``values`` becomes that constant."""

    def __init__(self, values):
        self.values = values

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load) and node.id in self.values:
            return ast.copy_location(ast.Constant(self.values[node.id]), node)
        return node


def _with_serial_loops(fn, constants=None, suffix=""):
    """``fn`` recompiled from its source with a first argument ``serial_`` that sends every
    ``prange`` loop down a plain ``range`` copy of itself (see the module notes).

    ``constants`` (``{argument: value}``) removes those arguments and puts their values in
    the code as constants, for a specialised copy (named with ``suffix``) in which LLVM
    drops every branch the value decides. The new function keeps ``fn``'s file, line
    numbers and module: numba's error messages point at the written source, and its disk
    cache (keyed by file, qualified name and first line) stays with the file; each
    specialisation has its own qualified name, so its own cache entries.
    """
    constants = constants or {}
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    fdef = tree.body[0]
    names = [a.arg for a in fdef.args.args] if isinstance(fdef, ast.FunctionDef) else []
    if not names or SERIAL_ARG in names or not set(constants) <= set(names):
        raise TypeError(f"@kernel expects a plain function without an argument named "
                        f"{SERIAL_ARG!r} (and with the arguments {sorted(constants)}), got "
                        f"{fn.__qualname__}")
    fdef.decorator_list = []
    fdef.name = fn.__name__ + suffix
    fdef.args.args = [a for a in fdef.args.args if a.arg not in constants]
    fdef.args.args.insert(0, ast.arg(arg=SERIAL_ARG))
    _Constants(constants).visit(fdef)
    _SerialLoops().visit(fdef)
    ast.fix_missing_locations(tree)
    ast.increment_lineno(tree, fn.__code__.co_firstlineno - 1)
    namespace = {}
    exec(compile(tree, fn.__code__.co_filename, "exec"), fn.__globals__, namespace)
    new = namespace[fdef.name]
    new.__qualname__ = fn.__qualname__ + suffix
    new.__module__ = fn.__module__
    new.__doc__ = fn.__doc__
    return new


class Kernel:
    """A compiled kernel whose every ``prange`` loop also has a serial path.

    Call it with ``size`` (the element count) first: below ``config.SERIAL_CUTOFF`` the
    loops run serially. ``.parallel(*args)`` / ``.serial(*args)`` pick the path directly.
    """

    def __init__(self, fn, ordered=False, constants=None, suffix=""):
        options = _ORDERED_OPTIONS if ordered else _OPTIONS
        self.dispatcher = njit(parallel=True, **options)(_with_serial_loops(fn, constants, suffix))
        self.__name__ = fn.__name__ + suffix
        self.__doc__ = fn.__doc__
        self._seen = False

    def __call__(self, size, *args):
        serial = size < config.SERIAL_CUTOFF
        if not self._seen:
            self._seen = True
            if _not_cached(self.dispatcher):
                _announce_compile()
            with _deferred_blas_probe():
                return self.dispatcher(serial, *args)
        return self.dispatcher(serial, *args)

    def parallel(self, *args):
        return self(config.SERIAL_CUTOFF, *args)

    def serial(self, *args):
        return self(0, *args)

    def dispatchers(self):
        return (self.dispatcher,)


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
    """Decorate a kernel body: returns a :class:`Kernel` (parallel and serial loops).

    ``@kernel(ordered=True)`` compiles without "reassoc", for kernels whose accuracy
    rests on the written order of their operations (the split mean subtraction).
    """
    if fn is None:
        return lambda f: Kernel(f, ordered=ordered)
    return Kernel(fn, ordered=ordered)


def specialised(fn, suffix, **constants):
    """A :class:`Kernel` of the plain function ``fn`` with the arguments named in
    ``constants`` fixed to those values (removed from its argument list), compiled as
    ``fn.__name__ + suffix``: one kernel source, several kernels that each compile only the
    code path their values select."""
    return Kernel(fn, constants=constants, suffix=suffix)


def chunk_body(fn):
    """Decorate the per-chunk body of a kernel: compiled once, not inlined."""
    return njit(**_OPTIONS)(fn)


def task_body(fn=None, *, ordered=False):
    """Decorate the body of a kernel's ``prange`` loop, lifted into its own function.

    The kernel keeps only ``for t in prange(n): body(np.int64(t), ...)``. The body is
    typed and lowered once (the ``int64`` cast gives the serial and the parallel loop the
    same signature) and cached on its own; before, the kernel's serial and parallel
    compiles each typed, lowered and optimised their own copy of the body. That took
    compiling the default float32 BatchNorm1D + LayerNorm1D set from ~25 s to ~14 s on the
    2-core reference machine when it was introduced, with no change at run time (one call
    per chunk). (Each caller still links the body's module into its own and optimises it
    again: see the module notes.)

    ``@task_body(ordered=True)`` goes with ``@kernel(ordered=True)``.
    """
    if fn is None:
        return lambda f: njit(**(_ORDERED_OPTIONS if ordered else _OPTIONS))(f)
    return njit(**_OPTIONS)(fn)


def helper(fn):
    """Decorate a small device function inlined into kernels (no parallel loop)."""
    return njit(inline="always", **_OPTIONS)(fn)

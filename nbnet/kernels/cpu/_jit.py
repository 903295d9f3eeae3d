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
numba's fixed cost per compiled function (compiling the default float32 BatchNorm1D +
LayerNorm1D set from an empty cache: 21.1 -> 20.4 s on the 2-core reference machine).

Most of a kernel's work sits in a :func:`task_body`, the function its ``prange`` loop
calls once per chunk. A direct call makes numba link the body's LLVM module into the
caller's, where it is optimised and turned into machine code again, and a ``prange``
loop's code passes through four modules (the loop body, two gufunc wrappers, the kernel):
each body was compiled five times (LLVM took 12.5 of the 20.4 s above, most of it on
those copies). The rewrite therefore also turns each call of a task body into
:func:`call_task`, a call through a symbol bound to the body's own compiled code (compiled
once, cached on its own): the same set now compiles in ~12.5 s, and runs at the same
speed (one call per chunk either way).

Kernels must not read dynamic globals (``numba.get_num_threads()``, config values):
that silently disables caching. Everything tunable is passed in as an argument.

Array views made in a hot loop (``x = X[i]``, ``xs = xf[a:b]``) are free when numba's
reference-count pruning removes their ``NRT_incref``/``NRT_decref`` pair, and it does not
always: a row's view used on two paths (a helper call in each branch of an ``if``, or an
array chosen by a branch) kept one call pair per row in the LayerNorm forward, 6 of its
29 ns per 64-wide float32 row (row_stats._row_stats). Pick the values first, then make
one call on the view; ``inspect_asm`` shows whether any NRT call is left in a loop.
"""
import ast
import contextlib
import copy
import functools
import importlib
import importlib.util
import inspect
import os
import sys
import textwrap

import llvmlite.binding as llvm
import numba
from numba import njit, types
from numba.core import cgutils, itanium_mangler
from numba.core.caching import FunctionCache
from numba.core.registry import CPUDispatcher
from numba.extending import intrinsic

from ... import config

#: Code-generation options of every kernel and helper (also the ``jit_options`` of the
#: overloads in activations.py); ``_OPTIONS`` adds the disk cache and nogil.
CODEGEN_OPTIONS = dict(fastmath=set(config.FASTMATH), error_model="numpy")
_OPTIONS = dict(CODEGEN_OPTIONS, cache=True, nogil=True)

# Kernels that subtract a float64 mean as ``x - m0`` (m0 rounded to the input's dtype)
# plus a float64 remainder folded into a later constant depend on the written order of
# their floating-point operations: with "reassoc" LLVM may rewrite ``(x - m0) * s + b``
# into forms that cancel (``x * s - m0 * s + b``) or fold the remainder back into ``m0``.
# They compile without it ("contract", i.e. FMA, only makes them more exact). Their loops
# vectorise anyway: the inner loop runs across columns with one accumulator per column,
# which is not a reduction.
_ORDERED_OPTIONS = dict(_OPTIONS, fastmath=set(config.FASTMATH) - {"reassoc"})

# numba builds two wrappers around every function it compiles: one to call it from Python
# (unboxing every argument) and one to call it from C (first-class function types). A kernel
# needs only the first, a task body neither (only compiled code calls it). Both are
# typed, lowered and optimised like code of their own: without them the default float32
# BatchNorm1D + LayerNorm1D set compiled in 14.0-14.8 s instead of 15.5-16.2 s on the
# 2-core reference machine (alternated 4x, round 12). Run time is unchanged: compiled
# callers call a task body's own function, never a wrapper.
_NO_CFUNC = dict(no_cfunc_wrapper=True)
_NO_WRAPPERS = dict(no_cfunc_wrapper=True, no_cpython_wrapper=True)


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


#: The global name under which rewritten kernel sources reach :func:`call_task`.
CALL_TASK = "call_task_"


class _TaskCalls(ast.NodeTransformer):
    """``body(a, b, ...)`` -> ``call_task_(body, (a, b, ...))`` for every call of a
    :func:`task_body` function (a global of the kernel's module)."""

    def __init__(self, namespace):
        self.namespace = namespace

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        if isinstance(f, ast.Name) and getattr(self.namespace.get(f.id), "_nbnet_task", False):
            if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
                raise TypeError(f"task body {f.id} must be called with plain positional "
                                f"arguments")
            call = ast.Call(func=ast.Name(id=CALL_TASK, ctx=ast.Load()),
                            args=[f, ast.Tuple(elts=node.args, ctx=ast.Load())], keywords=[])
            return ast.copy_location(call, node)
        return node


def _task_symbol(task, argtypes):
    """The process-wide symbol a kernel calls ``task`` through, for these argument types.

    Built from the task's module, name and the mangled argument types only, so it is
    the same in every process (numba's own symbol names carry a per-process counter).
    """
    py = task.py_func
    return f"nbnet.task.{py.__module__}.{py.__qualname__}.{itanium_mangler.mangle_args(argtypes)}"


def _task_result(task, argtypes):
    """Compile (or load from the disk cache) ``task`` for ``argtypes``; its compile result."""
    task.compile(argtypes)
    cres = task.overloads[argtypes]
    if cres.signature.return_type != types.none:
        raise TypeError(f"task body {task.py_func.__qualname__} must return None, it "
                        f"returns {cres.signature.return_type}")
    return cres


def register_task(module, name, argtypes):
    """Make the symbol of task ``module.name`` for ``argtypes`` point at its machine code.

    Run while a kernel that calls the task compiles, and again (numba's ``reload_init``)
    before that kernel's code is loaded from the disk cache in a later process, so the
    task is compiled or loaded first and its address known when the kernel's code is
    linked.
    """
    task = getattr(importlib.import_module(module), name)
    cres = _task_result(task, argtypes)
    llvm.add_symbol(_task_symbol(task, argtypes),
                    cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name))


@intrinsic
def call_task(typingctx, task, args):
    """``call_task(body, (a, b, ...))``: call the :func:`task_body` ``body(a, b, ...)``
    through a symbol resolved when the kernel's code is loaded, instead of linking the
    body's code into the kernel's.

    Numba links a called function's LLVM module into its caller's and optimises and
    generates code for it again; a ``prange`` loop's code passes through four such
    modules (the loop body, two gufunc wrappers and the kernel itself), so every task
    body was compiled five times. Called through a symbol, it is compiled once (its own
    module, cached on its own) and each kernel module holds a call. The call follows
    numba's calling convention, and an error status (an exception raised in the body)
    propagates as from a direct call.
    """
    if not isinstance(task, types.Dispatcher) or not isinstance(args, types.BaseTuple):
        return None
    disp = task.dispatcher
    argtypes = tuple(types.unliteral(t) for t in args.types)
    _task_result(disp, argtypes)  # type errors in the body surface here
    module, name = disp.py_func.__module__, disp.py_func.__name__

    def codegen(context, builder, sig, llargs):
        register_task(module, name, argtypes)
        context.active_code_library._reload_init.add(
            functools.partial(register_task, module, name, argtypes))
        fnty = context.call_conv.get_function_type(types.none, argtypes)
        fn = cgutils.get_or_insert_function(builder.module, fnty, _task_symbol(disp, argtypes))
        values = [context.cast(builder, v, t, u) for v, t, u in
                  zip(cgutils.unpack_tuple(builder, llargs[1], len(argtypes)), args.types,
                      argtypes)]
        status, _ = context.call_conv.call_function(builder, fn, types.none, argtypes, values)
        with cgutils.if_unlikely(builder, status.is_error):
            context.call_conv.return_status_propagate(builder, status)
        return context.get_dummy_value()

    return types.none(task, args), codegen


def source_tree(fn):
    """The source of the function ``fn`` as an ``ast.Module`` (for a rewrite)."""
    return ast.parse(textwrap.dedent(inspect.getsource(fn)))


def exec_tree(fn, tree, name, globals_):
    """Compile ``tree`` (a rewritten :func:`source_tree` of ``fn``) with ``fn``'s file and
    line numbers, so tracebacks and numba's messages point at the written source; run it
    with ``globals_`` and return the function it defines as ``name``."""
    ast.fix_missing_locations(tree)
    ast.increment_lineno(tree, fn.__code__.co_firstlineno - 1)
    namespace = {}
    exec(compile(tree, fn.__code__.co_filename, "exec"), globals_, namespace)
    return namespace[name]


def _with_serial_loops(fn, constants=None, suffix=""):
    """``fn`` recompiled from its source with a first argument ``serial_`` that sends every
    ``prange`` loop down a plain ``range`` copy of itself, and with every call of a
    :func:`task_body` made through :func:`call_task` (see the module notes).

    ``constants`` (``{argument: value}``) removes those arguments and puts their values in
    the code as constants, for a specialised copy (named with ``suffix``) in which LLVM
    drops every branch the value decides. The new function keeps ``fn``'s file, line
    numbers and module: numba's error messages point at the written source, and its disk
    cache (keyed by file, qualified name and first line) stays with the file; each
    specialisation has its own qualified name, so its own cache entries.
    """
    constants = constants or {}
    tree = source_tree(fn)
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
    if not numba.config.DISABLE_JIT:  # (pure Python calls the task bodies directly)
        _TaskCalls(fn.__globals__).visit(fdef)
        fn.__globals__.setdefault(CALL_TASK, call_task)
    new = exec_tree(fn, tree, fdef.name, fn.__globals__)
    new.__qualname__ = fn.__qualname__ + suffix
    new.__module__ = fn.__module__
    new.__doc__ = fn.__doc__
    return new


class Kernel:
    """A compiled kernel whose every ``prange`` loop also has a serial path.

    Call it with ``size`` (the element count) first: below ``config.SERIAL_CUTOFF`` the
    loops run serially. ``.parallel(*args)`` / ``.serial(*args)`` pick the path directly.

    The source rewrite and the numba dispatcher are made on first use (first call, or
    ``.dispatcher``): rewriting all ~50 kernels when ``nbnet.kernels.cpu`` is imported
    took ~80 ms of every process's first step, for the handful a model calls.
    """

    def __init__(self, fn, ordered=False, constants=None, suffix=""):
        self._fn = fn
        self._options = _ORDERED_OPTIONS if ordered else _OPTIONS
        self._constants = constants
        self._suffix = suffix
        self._dispatcher = None
        self.__name__ = fn.__name__ + suffix
        self.__doc__ = fn.__doc__
        self._seen = False

    @property
    def dispatcher(self):
        """The numba dispatcher (made on first access)."""
        if self._dispatcher is None:
            self._dispatcher = _light_cache(njit(parallel=True, **self._options, **_NO_CFUNC)(
                _with_serial_loops(self._fn, self._constants, self._suffix)))
        return self._dispatcher

    def __call__(self, size, *args):
        serial = size < config.SERIAL_CUTOFF
        if self._seen:
            return self._dispatcher(serial, *args)
        return self._first_call(serial, args)

    def _first_call(self, serial, args):
        dispatcher = self.dispatcher
        self._seen = True
        compiling = _not_cached(dispatcher)
        if compiling:
            _announce_compile()
        # A cached kernel loads without numba's full start-up (_LightLoadCache), which is
        # what imports SciPy: the probe is only needed when this call may compile.
        with _deferred_blas_probe(compiling or not config.LIGHT_CACHE_LOAD):
            return dispatcher(serial, *args)

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


class _LightLoadCache(FunctionCache):
    """numba's disk cache for a function, loading without the CPU target's full start-up.

    numba's ``load_overload`` first refreshes the target context: it imports ~50 numba
    modules (the NumPy and CPython implementations, linalg, random, typed containers,
    jitclass) and installs their typing and lowering registries, work that only *compiling*
    needs. A cached kernel's machine code is rebuilt from its object file, its ``reload_init``
    hooks (the threading layer, nbnet's task symbols) and the NRT runtime, which this
    initialises. That start-up was ~100 of the ~500 ms from a new process to its first
    BatchNorm1D training step on the 2-core reference machine (warm cache). Compiling is
    unchanged: numba's compiler refreshes the context itself before every compilation, so
    a cache miss (or a later compile in the process) gets the full start-up then.

    Installed on nbnet's own dispatchers only (:func:`_light_cache`); numba's behaviour
    for other code is untouched. ``config.LIGHT_CACHE_LOAD`` off restores numba's path.
    """

    def load_overload(self, sig, target_context):
        from numba.core.runtime import rtsys

        rtsys.initialize(target_context)
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)


def _light_cache(dispatcher):
    """Give ``dispatcher`` (``cache=True``) the light cache loader, when enabled and when
    numba's cache classes are the ones this was written against; returns ``dispatcher``."""
    cache = getattr(dispatcher, "_cache", None)
    if (config.LIGHT_CACHE_LOAD and type(cache) is FunctionCache
            and hasattr(cache, "_guard_against_spurious_io_errors")
            and hasattr(cache, "_load_overload")):
        cache.__class__ = _LightLoadCache
    return dispatcher


@contextlib.contextmanager
def _deferred_blas_probe(active=True):
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
    if not (active and config.DEFER_SCIPY) or "numba.np.arraymath" in sys.modules:
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


def subroutine(fn=None, *, ordered=False):
    """Decorate a helper that kernels and task bodies *call* rather than inline: compiled
    once per argument types and compile flags, where a :func:`helper` (``inline="always"``)
    costs numba a copy of its IR per call site, typed, lowered and optimised again in each
    caller. No disk cache of its own: its code is linked into its callers'.

    For work done once per call or per task on short vectors (per-column factors, a
    block's group sums), never per element: the call stays a call unless LLVM inlines it.
    Its compile flags are its own, not its caller's: ``ordered=True`` as for
    :func:`kernel`; without it a reduction loop gets "reassoc" (vectorised) even when the
    caller is an ``ordered`` task body, whose inlined loops keep their written order.

    The row layout's per-column factors (:func:`~nbnet.kernels.cpu.column_stats.
    _column_factors`, three kernels of the default float32 set, and ``_dx_factors``):
    exclusive compile time of those kernels 1.43 -> 1.31, 1.07 -> 0.99 and 0.69 -> 0.63 s,
    for 0.21 s spent once on the two subroutines (numba's compile events, 2-core
    reference machine).
    """
    if fn is None:
        return lambda f: subroutine(f, ordered=ordered)
    options = dict(_ORDERED_OPTIONS if ordered else _OPTIONS, cache=False)
    return njit(**options, **_NO_WRAPPERS)(fn)


def task_body(fn=None, *, ordered=False):
    """Decorate the body of a kernel's ``prange`` loop, lifted into its own function.

    The kernel keeps only ``for t in prange(n): body(np.int64(t), ...)``; the rewrite of
    :class:`Kernel` turns that call into :func:`call_task`. The body is typed, lowered and
    compiled once, cached on its own, and called through a symbol by the kernel's serial
    and parallel loop alike (the ``int64`` cast gives both the same signature). It must
    return None and take plain positional arguments. Compiling the default float32
    BatchNorm1D + LayerNorm1D set went from ~25 s to ~14 s on the 2-core reference machine
    when bodies were first lifted out (one typed copy instead of one per loop), and from
    20.4 to ~12.5 s when the kernels stopped linking their code (see the module notes),
    with no change at run time (one call per chunk).

    ``@task_body(ordered=True)`` goes with ``@kernel(ordered=True)``.
    """
    if fn is None:
        return lambda f: _task(f, ordered)
    return _task(fn, False)


class _TaskDispatcher(CPUDispatcher):
    """The dispatcher of a :func:`task_body`: compiled without a Python wrapper, so a call
    from Python would jump to a null pointer; it raises instead."""

    def __call__(self, *args, **kwargs):
        raise TypeError(f"task body {self.py_func.__qualname__} runs only inside a kernel "
                        f"(it has no Python entry point); call its kernel instead")


def _task(fn, ordered):
    disp = njit(**(_ORDERED_OPTIONS if ordered else _OPTIONS), **_NO_WRAPPERS)(fn)
    if isinstance(disp, CPUDispatcher):  # (not under NUMBA_DISABLE_JIT: a plain function)
        disp.__class__ = _TaskDispatcher
    disp = _light_cache(disp)
    disp._nbnet_task = True  # kernels call it through call_task (see _TaskCalls)
    return disp


def wraps_kernel(inner, *others):
    """Decorate a plain Python function that prepares arguments (chunking, reshapes) and
    calls the :class:`Kernel` ``inner`` (or, by the shape, one of ``others``): the op
    keeps its twin's argument list, and ``fn.kernel`` / ``fn.dispatchers`` expose
    ``inner`` (and the dispatchers of ``others``) to the warm-up and the tests."""
    def deco(fn):
        fn.kernel = inner
        fn.dispatchers = lambda: tuple(d for k in (inner, *others) for d in k.dispatchers())
        return fn
    return deco


def serial_kernel(fn):
    """Decorate a kernel whose work is one pass over a short vector (``O(C)``, not
    ``O(N*C)``): one serial compiled function, called ``kernel(size, *args)`` like every
    kernel (``size`` is ignored). No parallel loop, so no parfor to compile or start."""
    return _light_cache(njit(**_OPTIONS, **_NO_CFUNC)(fn))


def helper(fn):
    """Decorate a small device function inlined into kernels (no parallel loop)."""
    return njit(inline="always", **_OPTIONS)(fn)

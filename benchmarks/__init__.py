"""asv benchmark suites for nbnet (``bench_<area>.py``) and ``compare.py``.

Shared helpers live here. None of their names starts with an asv prefix (``time_``,
``track_``, ``mem_``, ``peakmem_``, ``timeraw_``), so asv does not collect them.
"""
import time

import numpy as np

_BANDWIDTH = {}


def seconds_per_call(fn, min_time=0.1, min_calls=3):
    """Median seconds per call of ``fn`` over at least ``min_calls`` calls and ``min_time``
    seconds (for ``track_`` benchmarks, which time themselves)."""
    samples = []
    start = time.perf_counter()
    while len(samples) < min_calls or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 1000:
            break
    return float(np.median(samples))


def copy_bandwidth(nbytes=64 << 20):
    """Bytes per second that ``np.copyto`` moves (read + write) on this machine, at the
    current thread settings; measured once per process."""
    if nbytes not in _BANDWIDTH:
        src = np.ones(nbytes // 8)
        dst = np.empty_like(src)
        np.copyto(dst, src)
        best = min(seconds_per_call(lambda: np.copyto(dst, src), 0.0, 1) for _ in range(7))
        _BANDWIDTH[nbytes] = 2 * src.nbytes / best
    return _BANDWIDTH[nbytes]

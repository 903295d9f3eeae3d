import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def rel_err(actual, expected):
    """Max abs error relative to the largest magnitude of the expected array."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(np.abs(expected).max(initial=0.0), 1e-300)
    return np.abs(actual - expected).max(initial=0.0) / scale


TOL = {np.float64: 1e-10, np.float32: 1e-5}


# In CI (CI=true, or NBNET_NO_SKIP=1) a skipped test is a hole: every optional
# dependency is installed there, so a skip means something is missing. Turn it into a
# failure instead of letting CI pass by skipping.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    no_skip = os.environ.get("NBNET_NO_SKIP") == "1" or os.environ.get("CI") == "true"
    if no_skip and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (NBNET_NO_SKIP=1): {report.longrepr}"

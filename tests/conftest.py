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

"""The benchmarks must not rot: compare.py runs end to end (--quick) and asv accepts the suites.

Needs the ``bench`` extra (asv, numpy-ml, threadpoolctl) and torch; without them these
tests skip (which fails in CI, where the extra is installed).
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARE = os.path.join(ROOT, "benchmarks", "compare.py")
SECTIONS = ("normalization", "activations", "optimizers", "training", "cold_start")


def _require(module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[bench]')")


def _positive(t):
    return isinstance(t, (int, float)) and math.isfinite(t) and t > 0


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    for module in ("torch", "numpy_ml", "threadpoolctl"):
        _require(module)
    out = tmp_path_factory.mktemp("compare") / "quick.json"
    proc = subprocess.run([sys.executable, COMPARE, "--quick", "--threads", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f), proc.stdout


def test_compare_quick_has_every_section(quick_report):
    report, stdout = quick_report
    rows = report["rows"]
    assert {r["section"] for r in rows} == set(SECTIONS)
    for r in rows:
        assert _positive(r["times"]["nbnet"]), r
        if r["name"].startswith("new process, empty kernel cache"):  # compile time: no torch
            assert "torch" not in r["times"] and r["times"]["nbnet"] > 1.0, r
        else:
            assert _positive(r["times"]["torch"]), r  # torch is installed: every row has it
            assert _positive(r["torch_over_nbnet"]), r
        if r["section"] != "training":
            assert _positive(r["floor"]), r
            assert _positive(r["nbnet_over_floor"]), r
        assert r["threads"] == 1
    # numpy-ml is installed: the rows it has a layer for carry its time
    npml = [r for r in rows if r["section"] in ("optimizers", "training")
            or r["name"].startswith(("BatchNorm1D ", "LayerNorm1D "))]
    assert npml and all(_positive(r["times"].get("numpy_ml")) for r in npml)
    header = report["header"]
    for key in ("cpu", "python", "numpy", "numba", "torch", "numpy_ml", "numba_threading_layer"):
        assert header[key], key
    assert header["threads"] == 1
    # the printed table names every row
    for r in rows:
        assert r["name"] in stdout


def test_compare_quick_only_filters(tmp_path):
    _require("torch")
    out = tmp_path / "only.json"
    proc = subprocess.run([sys.executable, COMPARE, "--quick", "--threads", "1", "--only",
                           "^optimizers SGD", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["name"].startswith("SGD") for r in rows)


def test_asv_check():
    _require("asv")
    proc = subprocess.run([sys.executable, "-m", "asv", "check", "--python=same"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "No problems found" in output, output[-3000:]

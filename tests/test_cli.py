"""The nbnet command: train / predict / info, and one-line errors with exit status 2."""
import os
import subprocess
import sys

import numpy as np
import pytest

import nbnet
from nbnet.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_csv(path, n=150, seed=0, label_text=False):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5)
    names = np.array(["low", "mid", "high"])
    with open(path, "w") as f:
        f.write("a,b,c,label\n")
        for row, label in zip(X, y):
            f.write(",".join(f"{v:.6f}" for v in row) + f",{names[label] if label_text else label}\n")
    return X, y


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_and_predict_on_csv(tmp_path, capsys):
    csv = tmp_path / "data.csv"
    X, y = _write_csv(csv)
    model = tmp_path / "model.npz"
    code, out, err = _run(["train", str(csv), "--target", "label", "--hidden", "16", "--epochs", "3",
                           "--batch-size", "16", "--lr", "0.02", "--seed", "0", "--out", str(model)], capsys)
    assert code == 0, err
    assert "task classify (3 classes)" in out
    assert "validation: loss" in out and "accuracy" in out
    assert f"model saved to {model}" in out
    assert err.count("epoch ") == 3  # plain progress lines (not a TTY)
    m = nbnet.load(model)
    assert m.metadata["task"] == "classify" and m.metadata["classes"] == ["0", "1", "2"]
    np.testing.assert_allclose(m.metadata["scaler_mean"], X[np.sort(
        np.random.default_rng(0).permutation(150)[30:])].mean(0), rtol=1e-5)
    preds = tmp_path / "preds.csv"
    code, out, err = _run(["predict", str(model), str(csv), "--out", str(preds)], capsys)
    assert code == 0, err
    lines = preds.read_text().splitlines()
    assert len(lines) == 150 and set(lines) <= {"0", "1", "2"}
    assert np.mean(np.array(lines).astype(int) == y) > 0.75
    code, out, err = _run(["predict", str(model), str(csv)], capsys)
    assert code == 0 and out.splitlines() == lines


def test_text_labels_regression_and_plot(tmp_path, capsys):
    csv = tmp_path / "text.csv"
    _write_csv(csv, label_text=True)
    code, out, err = _run(["train", str(csv), "--target", "label", "--hidden", "8", "--epochs", "2",
                           "--norm", "layer", "--out", str(tmp_path / "t.npz"), "--plot",
                           str(tmp_path / "curves.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "curves.png").stat().st_size > 1000
    code, out, _ = _run(["predict", str(tmp_path / "t.npz"), str(csv)], capsys)
    assert set(out.split()) <= {"low", "mid", "high"}
    # a real-valued target is a regression (no target column given: the last one)
    reg = tmp_path / "reg.csv"
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 2))
    with open(reg, "w") as f:
        f.write("x1,x2,price\n")
        for a, b in X:
            f.write(f"{a},{b},{1000 + 50 * a - 20 * b}\n")
    code, out, err = _run(["train", str(reg), "--hidden", "16", "--norm", "none", "--epochs", "40",
                           "--lr", "0.01", "--out", str(tmp_path / "r.npz"), "--quiet"], capsys)
    assert code == 0, err and "task regress" in out and "mse" in out and err == ""
    code, out, _ = _run(["predict", str(tmp_path / "r.npz"), str(reg)], capsys)
    pred = np.array(out.split(), float)
    truth = 1000 + 50 * X[:, 0] - 20 * X[:, 1]
    assert np.abs(pred - truth).mean() < 15  # the target scale (mean 1000, std 54) is restored
    code, out, err = _run(["train", str(csv), "--target", "label", "--task", "regress", "--out",
                           str(tmp_path / "x.npz")], capsys)
    assert code == 2 and "not numeric" in err


def test_train_on_bundled_digits_via_subprocess(tmp_path):
    out = tmp_path / "digits.npz"
    proc = subprocess.run([sys.executable, "-m", "nbnet.cli", "train", "--hidden", "64", "--epochs", "5",
                           "--lr", "0.01", "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1797 rows, 64 features" in proc.stdout and "model saved to" in proc.stdout
    m = nbnet.load(out)
    assert m.metadata["classes"] == [str(i) for i in range(10)]
    proc = subprocess.run([sys.executable, "-m", "nbnet", "predict", str(out),
                           os.path.join(REPO, "nbnet", "data", "digits.npz")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    preds = np.array(proc.stdout.split(), int)
    truth = np.load(os.path.join(REPO, "nbnet", "data", "digits.npz"))["target"]
    assert len(preds) == 1797 and np.mean(preds == truth) > 0.8


def test_info(capsys):
    code, out, err = _run(["info"], capsys)
    assert code == 0
    for key in ("nbnet 0.1.0", "devices: cpu", "threads:", "threading layer:", "kernel cache:"):
        assert key in out


def _bad_cases(tmp_path):
    csv = tmp_path / "ok.csv"
    _write_csv(csv, n=40)
    text = tmp_path / "text.csv"
    text.write_text("a,b,label\n1,x,0\n2,3,1\n3,4,0\n")
    nan = tmp_path / "nan.csv"
    nan.write_text("a,b,label\n1,2,0\n2,nan,1\n3,4,0\n4,5,1\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("a,b,label\n,2,0\n2,3,1\n")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    return {
        "wrong column": (["train", str(csv), "--target", "nope"], "no column named 'nope'"),
        "non-numeric feature": (["train", str(text), "--target", "label"], "column 'b' is not numeric"),
        "missing file": (["train", str(tmp_path / "missing.csv")], "does not exist"),
        "NaN": (["train", str(nan), "--target", "label"], "column 'b' has a missing, NaN"),
        "empty cell": (["train", str(empty), "--target", "label"], "column 'a' has a missing"),
        "corrupt checkpoint": (["predict", str(corrupt), str(csv)], "corrupt.npz"),
        "missing checkpoint": (["predict", str(tmp_path / "none.npz"), str(csv)], "none.npz"),
        "bad option": (["train", "--epochs", "many"], "invalid int value"),
        "bad optimizer": (["train", str(csv), "--optimizer", "lbfgs"], "unknown optimizer"),
        "bad val split": (["train", str(csv), "--val-split", "1.5"], "--val-split"),
        "no command": ([], "choose a command"),
    }


@pytest.mark.parametrize("case", ["wrong column", "non-numeric feature", "missing file", "NaN", "empty cell",
                                  "corrupt checkpoint", "missing checkpoint", "bad option", "bad optimizer",
                                  "bad val split", "no command"])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    argv, message = _bad_cases(tmp_path)[case]
    code, out, err = _run(argv + ["--out", str(tmp_path / "m.npz")] if argv and argv[0] == "train" else argv,
                          capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("nbnet: error:") and message in err, err
    assert "Traceback" not in err


def test_bad_input_via_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nbnet.cli", "train", str(tmp_path / "missing.csv")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    missing = tmp_path / "missing.csv"
    assert proc.stderr.strip().splitlines() == [f"nbnet: error: data file {missing} does not exist"]


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    csv = tmp_path / "data.csv"
    _write_csv(csv, n=30)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, out, err = _run(["train", str(csv), "--target", "label", "--plot", str(tmp_path / "c.png"),
                           "--out", str(tmp_path / "m.npz")], capsys)
    assert code == 2 and "needs matplotlib" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.npz").exists()  # checked before training

"""Checkpoints: bit-identical round trips, resumed training, atomic saves, refusals."""
import json
import os
import zipfile

import numpy as np
import pytest

import nbnet
from nbnet.io import HEADER_KEY, CheckpointError
from nbnet.layers import (BatchNorm1D, Dropout, FullyConnected, GELU, LayerNorm1D, LeakyReLU, Softmax)
from nbnet.model import Model


def _data(n=96, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    return X, (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5)


def _model(optimizer="adam(lr=0.01)"):
    return Model([FullyConnected(16, init="he_uniform"), BatchNorm1D(act_fn="relu"), Dropout(0.25),
                  FullyConnected(12), LayerNorm1D(), LeakyReLU(0.1), GELU(), FullyConnected(3)],
                 optimizer=optimizer, seed=1)


def _assert_same_state(a, b):
    for la, lb in zip(a.layers, b.layers):
        assert type(la) is type(lb)
        assert la.hyperparameters == lb.hyperparameters
        assert set(la.parameters) == set(lb.parameters)
        for k in la.parameters:
            assert la.parameters[k].dtype == lb.parameters[k].dtype
            np.testing.assert_array_equal(la.parameters[k], lb.parameters[k])
        sa, sb = la.optimizer.state_dict(), lb.optimizer.state_dict()
        assert set(sa) == set(sb)
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k])


@pytest.mark.parametrize("optimizer", ["adam(lr=0.01)", "sgd(lr=0.05, momentum=0.9)", "rmsprop", "adagrad"])
def test_round_trip_is_bit_identical_and_resumes_identically(tmp_path, optimizer):
    X, y = _data()
    a = _model(optimizer)
    a.fit(X, y, epochs=2, batch_size=16, verbose=0)
    path = tmp_path / "model.npz"
    a.save(path)
    b = nbnet.load(path)
    _assert_same_state(a, b)
    assert b.loss.hyperparameters == a.loss.hyperparameters and b.dtype == a.dtype
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    # resumed training (dropout masks, shuffling, Adam moments, step counters) is identical
    ha = a.fit(X, y, epochs=2, batch_size=16, verbose=0)
    hb = b.fit(X, y, epochs=2, batch_size=16, verbose=0)
    assert ha == hb
    _assert_same_state(a, b)


def test_float64_model_and_metadata(tmp_path):
    X, y = _data()
    m = Model([FullyConnected(4, act_fn="tanh"), FullyConnected(3), Softmax()], dtype=np.float64, seed=0)
    m.fit(X, y, epochs=1, verbose=0)
    meta = {"scaler_mean": np.arange(5.0), "classes": ["a", "b", "c"], "note": {"k": 1.5}}
    m.save(tmp_path / "m.npz", metadata=meta)
    b = nbnet.load(tmp_path / "m.npz")
    assert b.dtype == np.float64 and b[0].parameters["W"].dtype == np.float64
    np.testing.assert_array_equal(b.metadata["scaler_mean"], meta["scaler_mean"])
    assert b.metadata["classes"] == ["a", "b", "c"] and b.metadata["note"] == {"k": 1.5}
    np.testing.assert_array_equal(m.predict_proba(X), b.predict_proba(X))


def test_header_is_json_in_a_uint8_array(tmp_path):
    X, y = _data()
    m = _model()
    m.fit(X, y, epochs=1, verbose=0)
    path = tmp_path / "m.npz"
    m.save(path)
    with np.load(path, allow_pickle=False) as f:
        raw = f[HEADER_KEY]
        assert raw.dtype == np.uint8
        header = json.loads(raw.tobytes())
        assert header["format"] == "nbnet-checkpoint" and header["version"] == 1
        assert [entry["class"] for entry in header["layers"]][:3] == ["FullyConnected", "BatchNorm1D", "Dropout"]
        assert all(f[name].dtype != object for name in f.files)


def test_failure_mid_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    X, y = _data()
    m = _model()
    path = tmp_path / "model.npz"
    m.save(path)
    before = path.read_bytes()
    m.fit(X, y, epochs=1, verbose=0)
    real = np.savez_compressed

    def explode(f, **arrays):  # write part of the file, then crash
        real(f, **dict(list(arrays.items())[:2]))
        raise OSError("disk full (injected)")

    monkeypatch.setattr(np, "savez_compressed", explode)
    with pytest.raises(OSError, match="injected"):
        m.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.npz"]
    monkeypatch.setattr(np, "savez_compressed", real)

    def no_replace(src, dst):
        raise KeyboardInterrupt  # even a BaseException cleans up

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(KeyboardInterrupt):
        m.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.npz"]
    monkeypatch.undo()
    nbnet.load(path)  # the old checkpoint is intact


def test_pickled_object_array_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    header = np.frombuffer(json.dumps({"format": "nbnet-checkpoint", "version": 1}).encode(), np.uint8)
    np.savez(path, **{HEADER_KEY: header, "a0000": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match=r"evil\.npz.*pickled"):
        nbnet.load(path)


def test_corrupt_truncated_and_foreign_files(tmp_path):
    X, y = _data()
    m = _model()
    m.fit(X, y, epochs=1, verbose=0)
    good = tmp_path / "good.npz"
    m.save(good)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.npz"):
        nbnet.load(trunc)
    # flip one byte inside a stored array (rewrite the zip with one altered member)
    tampered = tmp_path / "tampered.npz"
    with np.load(good, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["a0000"] = arrays["a0000"].copy()
    arrays["a0000"].reshape(-1)[0] += 1
    np.savez(tampered, **arrays)
    with pytest.raises(CheckpointError, match="tampered.npz.*checksum"):
        nbnet.load(tampered)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="garbage.npz is not an nbnet checkpoint: not a zip"):
        nbnet.load(garbage)
    # files np.load would take for a pickle are named for what they are, not "pickled"
    for name, content, what in (("empty.npz", b"", "an empty file"),
                                ("pickle.npz", b"\x80\x04K\x01.", "a pickle"),
                                ("random.npz", bytes(range(7, 200)), "not a zip archive")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=f"{name} is not an nbnet checkpoint: {what}"):
            nbnet.load(tmp_path / name)
    single = tmp_path / "single.npy"
    np.save(single, np.ones(3))
    with pytest.raises(CheckpointError, match="single.npy is not an nbnet checkpoint: a single"):
        nbnet.load(single)
    with pytest.raises(IsADirectoryError, match="is a directory, expected an .npz"):
        nbnet.load(tmp_path)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.ones(3))
    with pytest.raises(CheckpointError, match="foreign.npz.*not an nbnet checkpoint"):
        nbnet.load(foreign)
    future = tmp_path / "future.npz"
    header = json.loads(arrays[HEADER_KEY].tobytes())
    header["version"] = 99
    arrays[HEADER_KEY] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(future, **arrays)
    with pytest.raises(CheckpointError, match="version 99"):
        nbnet.load(future)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        nbnet.load(tmp_path / "missing.npz")
    assert issubclass(CheckpointError, ValueError)
    # a bad CRC inside the zip is caught too
    crc = tmp_path / "crc.npz"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(crc, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    raw = bytearray(crc.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    crc.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="crc.npz"):
        nbnet.load(crc)


def test_checkpoint_from_cuda_layers_stores_host_arrays(tmp_path, monkeypatch):
    """Every stored array passes through devices.to_host, so device arrays load on CPU."""
    from nbnet import devices, io
    seen = []
    real = devices.to_host

    def spy(x):
        seen.append(type(x))
        return real(x)

    monkeypatch.setattr(io.devices, "to_host", spy)
    m = _model()
    X, y = _data()
    m.fit(X, y, epochs=1, verbose=0)
    m.save(tmp_path / "m.npz")
    assert len(seen) >= sum(len(layer.parameters) for layer in m.layers)
    # a checkpoint written on a GPU machine names "cuda" in every layer; it loads on the CPU
    with np.load(tmp_path / "m.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    header = json.loads(arrays[HEADER_KEY].tobytes())
    for entry in header["layers"]:
        entry["hyperparameters"]["device"] = "cuda"
    arrays[HEADER_KEY] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(tmp_path / "gpu.npz", **arrays)
    b = nbnet.load(tmp_path / "gpu.npz", device="cpu")
    assert b.device == "cpu" and all(layer.device == "cpu" for layer in b.layers)
    np.testing.assert_array_equal(b.predict_proba(X), m.predict_proba(X))

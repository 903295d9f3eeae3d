"""nbnet.Model / Sequential: the training loop, inference, callbacks, hooks."""
import numpy as np
import pytest

import reference_train as ref
from nbnet.data import load_digits
from nbnet.layers import BatchNorm1D, Dropout, FullyConnected, Softmax
from nbnet.losses import CrossEntropy
from nbnet.model import Callback, EarlyStopping, Model, Sequential


def _digits():
    X, y = load_digits()
    X = X.astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(X))
    tr, te = perm[:1437], perm[1437:]
    mean, std = X[tr].mean(0), X[tr].std(0)
    std[std == 0] = 1
    X = (X - mean) / std
    return X[tr], y[tr], X[te], y[te]


def _mlp(seed=0, **kw):
    return Model([FullyConnected(128), BatchNorm1D(act_fn="relu"), FullyConnected(10)],
                 optimizer="adam(lr=0.001)", seed=seed, **kw)


def _blobs(n=200, d=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    y = rng.integers(0, k, n)
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_digits_mlp_with_batchnorm_reaches_95_percent_reproducibly():
    Xtr, ytr, Xte, yte = _digits()
    results = []
    for _ in range(2):
        model = _mlp(seed=0)
        history = model.fit(Xtr, ytr, epochs=15, batch_size=64, validation_data=(Xte, yte), verbose=0)
        acc = model.evaluate(Xte, yte)["accuracy"]
        assert acc >= 0.95, acc
        assert history["val_accuracy"][-1] == acc
        results.append((history, model.get_weights(), model.predict_proba(Xte)))
    (h1, w1, p1), (h2, w2, p2) = results
    assert h1 == h2
    for a, b in zip(w1, w2):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(p1, p2)


def test_train_step_matches_manual_numpy_ml_loop():
    X, y = _blobs(64)
    layers_a = [FullyConnected(8, act_fn="tanh", seed=1, optimizer="sgd(lr=0.1)"),
                FullyConnected(3, seed=2, optimizer="sgd(lr=0.1)")]
    layers_b = [FullyConnected(8, act_fn="tanh", seed=1, optimizer="sgd(lr=0.1)"),
                FullyConnected(3, seed=2, optimizer="sgd(lr=0.1)")]
    model = Model(layers_a, dtype=np.float32)
    ce = CrossEntropy(from_logits=True, reduction="mean")
    for step in range(3):
        Xb, yb = X[step * 16:(step + 1) * 16], y[step * 16:(step + 1) * 16]
        loss, out = model.train_step(Xb, yb)
        h = layers_b[0].forward(Xb)
        z = layers_b[1].forward(h)
        want_loss, g = ce.loss_and_grad(yb, z)
        layers_b[0].backward(layers_b[1].backward(g))
        for layer in layers_b:
            layer.update(want_loss)
        assert loss == want_loss
        np.testing.assert_array_equal(out, z)
        for a, b in zip(layers_a, layers_b):
            np.testing.assert_array_equal(a.parameters["W"], b.parameters["W"])
            np.testing.assert_array_equal(a.parameters["b"], b.parameters["b"])


def test_numpy_ml_forward_backward_update_api():
    X, y = _blobs(20)
    model = Model([FullyConnected(5, act_fn="relu", seed=0), FullyConnected(3, seed=1)])
    out = model.forward(X)
    assert out.shape == (20, 3)
    T = ref.one_hot(y, 3)
    _, g = CrossEntropy(from_logits=True).loss_and_grad(T, out)
    dX = model.backward(g.astype(np.float32))
    assert dX.shape == X.shape
    W = model[0].parameters["W"].copy()
    model.update()
    assert not np.array_equal(W, model[0].parameters["W"])
    assert model[0].X == [] and not model[0].gradients["W"].any()


def test_trailing_softmax_is_fused_into_the_loss():
    X, y = _blobs(120)
    a = Model([FullyConnected(16, act_fn="relu", seed=0), FullyConnected(3, seed=1)], optimizer="adam", seed=0)
    b = Model([FullyConnected(16, act_fn="relu", seed=0), FullyConnected(3, seed=1), Softmax()],
              optimizer="adam", seed=0)
    ha = a.fit(X, y, epochs=3, batch_size=32, seed=1, verbose=0)
    hb = b.fit(X, y, epochs=3, batch_size=32, seed=1, verbose=0)
    assert ha == hb
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    # numpy-ml's probability form with a Softmax layer trains the same way
    c = Model([FullyConnected(16, act_fn="relu", seed=0), FullyConnected(3, seed=1), Softmax()],
              loss=CrossEntropy(from_logits=False, reduction="mean"), optimizer="adam", seed=0)
    hc = c.fit(X, y, epochs=3, batch_size=32, seed=1, verbose=0)
    np.testing.assert_allclose(hc["loss"], ha["loss"], rtol=1e-5)
    with pytest.raises(ValueError, match="Softmax"):
        Model([FullyConnected(3)], loss=CrossEntropy(from_logits=False))


def test_regression_model():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, 4)).astype(np.float32)
    y = X @ np.array([1.0, -2.0, 0.5, 0.0], np.float32) + 0.1
    model = Sequential([FullyConnected(32, act_fn="relu", seed=0), FullyConnected(1, seed=1)],
                       loss="squared_error", optimizer="adam(lr=0.01)", seed=0)
    h = model.fit(X, y, epochs=30, batch_size=32, verbose=0)
    assert set(h) == {"loss", "mse"}
    assert h["mse"][-1] < 0.05 and h["loss"][-1] < h["loss"][0]
    pred = model.predict(X)
    assert pred.shape == (256, 1)
    assert model.evaluate(X, y)["mse"] < 0.05
    with pytest.raises(AttributeError):
        model.predict_proba(X)


def test_predict_evaluate_summary_and_modes(capsys):
    X, y = _blobs(50)
    model = Model([FullyConnected(16), BatchNorm1D(act_fn="relu"), Dropout(0.5), FullyConnected(3)],
                  input_dim=6, seed=0)
    text = model.summary()
    out = capsys.readouterr().out
    assert "FullyConnected" in out and "(None, 16)" in out and "(None, 3)" in out
    assert "Total params: 227" in text and "Trainable params: 195" in text  # 112 + 64 + 51; 32 running
    proba = model.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-5)
    assert model.predict(X).shape == (50,)
    assert set(model.evaluate(X, y)) == {"loss", "accuracy"}
    # inference is deterministic (no dropout, running statistics) and changes nothing
    w = model.get_weights()
    np.testing.assert_array_equal(model.predict_proba(X), proba)
    for a, b in zip(w, model.get_weights()):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    model.eval()
    assert all(not layer.training for layer in model)
    np.testing.assert_array_equal(model.forward(X), model.forward(X, retain_derived=False))
    model.train()
    assert all(layer.training for layer in model)
    assert model.to("cpu") is model and model.device == "cpu"
    assert len(model) == 4 and isinstance(model[0], FullyConnected)


def test_history_progress_lines_and_callbacks(capsys):
    X, y = _blobs(100)
    seen = []

    class Recorder(Callback):
        def on_epoch_end(self, model, epoch, logs):
            seen.append((epoch, sorted(logs)))

    model = Model([FullyConnected(8, act_fn="relu"), FullyConnected(3)], optimizer="adam", seed=0)
    h = model.fit(X, y, epochs=2, batch_size=16, validation_data=(X, y), verbose=1, callbacks=[Recorder()])
    err = capsys.readouterr().err
    assert err.count("epoch ") == 2 and "val_accuracy" in err  # stderr is not a TTY: plain lines
    assert set(h) == {"loss", "accuracy", "val_loss", "val_accuracy"} and len(h["loss"]) == 2
    assert seen == [(1, ["accuracy", "loss", "val_accuracy", "val_loss"]),
                    (2, ["accuracy", "loss", "val_accuracy", "val_loss"])]
    model.fit(X, y, epochs=1, verbose=0)
    assert capsys.readouterr().err == ""


def test_early_stopping_restores_best():
    X, y = _blobs(80)
    Xv, yv = _blobs(40, seed=5)
    model = Model([FullyConnected(8, act_fn="relu"), FullyConnected(3)], optimizer="sgd(lr=0.5)", seed=0)
    stopper = EarlyStopping(monitor="val_loss", patience=1, restore_best=True)
    h = model.fit(X, y, epochs=50, batch_size=8, validation_data=(Xv, yv), verbose=0, callbacks=[stopper])
    assert stopper.stopped_epoch is not None and len(h["loss"]) < 50
    assert len(h["loss"]) == stopper.stopped_epoch
    assert np.isclose(model.evaluate(Xv, yv)["loss"], min(h["val_loss"]))
    with pytest.raises(ValueError, match="val_loss"):
        model.fit(X, y, epochs=1, verbose=0, callbacks=[EarlyStopping()])


def test_distributed_hooks_are_called():
    calls = {"shard": 0, "reduce": 0, "totals": 0}

    class Hooked(Model):
        def shard_indices(self, order):
            calls["shard"] += 1
            return order[::2]

        def reduce_gradients(self):
            calls["reduce"] += 1

        def reduce_totals(self, totals):
            calls["totals"] += 1
            return totals

    X, y = _blobs(64)
    m = Hooked([FullyConnected(4), FullyConnected(3)], seed=0)
    m.fit(X, y, epochs=2, batch_size=8, verbose=0)
    assert calls == {"shard": 2, "reduce": 8, "totals": 2}  # 32 examples per epoch: 4 batches


def test_single_trailing_example_joins_last_batch():
    X, y = _blobs(33)
    model = Model([FullyConnected(4), BatchNorm1D(), FullyConnected(3)], seed=0)
    model.fit(X, y, epochs=1, batch_size=16, verbose=0)  # 16 + 17, never a batch of 1


def test_fit_input_validation():
    X, y = _blobs(20)
    model = Model([FullyConnected(3)], seed=0)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.fit(bad, y, verbose=0)
    with pytest.raises(ValueError, match="rows"):
        model.fit(X, y[:-1], verbose=0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        model.fit(X, y + 5, verbose=0)
    with pytest.raises(ValueError, match="integer class labels"):
        model.fit(X, y + 0.5, verbose=0)
    with pytest.raises(ValueError, match="batch_size"):
        model.fit(X, y, batch_size=0, verbose=0)
    with pytest.raises(TypeError):
        Model([object()])
    with pytest.raises(ValueError, match="unknown loss"):
        Model([FullyConnected(3)], loss="hinge")
    m = Model([FullyConnected(3)], input_dim=6)
    with pytest.raises(ValueError, match="6 input features"):
        m.predict(np.zeros((2, 5)))


def _state(model):
    return [{k: np.array(v, copy=True) for k, v in w.items()} for w in model.get_weights()]


def _same_state(a, b):
    return all(set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x)
               for x, y in zip(a, b))


def test_fit_checks_every_target_before_the_first_step():
    """A label the model has no output for, in the last batch only, or a bad y_val (only
    evaluated after an epoch) raise before any step: weights, running statistics and the
    optimizer's step count stay as they were (the per-batch check in the loss came after
    the earlier batches had trained)."""
    X, y = _blobs(64)
    model = Model([FullyConnected(8), BatchNorm1D(act_fn="relu"), FullyConnected(3)],
                  optimizer="adam", seed=0)
    model.fit(X, y, epochs=1, batch_size=16, verbose=0)
    before = _state(model)
    steps = [layer.optimizer.cur_step for layer in model.layers if layer.optimizer is not None]
    y_last = y.copy()
    y_last[-1] = 3  # in the last batch when not shuffled
    onehot4 = np.eye(4, dtype=np.float32)[y]
    cases = [
        (dict(x=X, y=y_last, shuffle=False), r"y: class labels must be in \[0, 3\).*up to 3"),
        (dict(x=X, y=onehot4), r"y must be one-hot rows of shape \(N, 3\).*\(64, 4\)"),
        (dict(x=X, y=y, validation_data=(X, y + 3)), r"y_val: class labels must be in \[0, 3\)"),
        (dict(x=X[:, :, None], y=y), r"X of shape \(64, 6, 1\) does not fit the model"),
    ]
    for kw, msg in cases:
        kw = dict(kw)
        with pytest.raises(ValueError, match=msg):
            model.fit(kw.pop("x"), kw.pop("y"), epochs=2, batch_size=16, verbose=0, **kw)
        assert _same_state(before, _state(model))
        assert [layer.optimizer.cur_step for layer in model.layers
                if layer.optimizer is not None] == steps
    # a regressor's targets must match its output width too
    reg = Model([FullyConnected(2)], loss="mse", seed=0)
    with pytest.raises(ValueError, match=r"targets of shape \(N, 2\).*\(64, 3\)"):
        reg.fit(X, np.zeros((64, 3), np.float32), verbose=0)
    # predict: NaN is named, not turned into class 0
    bad = X.copy()
    bad[5, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf \(at row 5\)"):
        model.predict(bad)
    with pytest.raises(ValueError, match=r"NaN or inf \(at row 5\)"):
        model.predict_proba(bad)


def test_optimizer_and_scheduler_through_model():
    model = Model([FullyConnected(4), BatchNorm1D(), FullyConnected(3)], optimizer="sgd(lr=0.05)",
                  lr_scheduler="exponential(initial_lr=0.1, stage_length=1, decay=0.5)", seed=0)
    ids = {layer.optimizer.hyperparameters["id"] for layer in model}
    assert ids == {"SGD"}
    assert len({id(layer.optimizer) for layer in model}) == 3  # never shared
    assert "xponential" in model[0].optimizer.hyperparameters["lr_scheduler"]
    X, y = _blobs(40)
    model.fit(X, y, epochs=1, batch_size=20, verbose=0)
    assert model[0].optimizer.cur_step == 2


def test_model_seed_makes_unseeded_layers_reproducible():
    X, y = _blobs(40)
    runs = []
    for _ in range(2):
        m = Model([FullyConnected(8, act_fn="relu"), Dropout(0.2), FullyConnected(3)], optimizer="adam", seed=7)
        runs.append(m.fit(X, y, epochs=2, batch_size=8, verbose=0))
    assert runs[0] == runs[1]


def test_tqdm_progress_bar_on_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    X, y = _blobs(64)
    Model([FullyConnected(4), FullyConnected(3)], seed=0).fit(X, y, epochs=2, batch_size=16, verbose=1)
    text = term.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text and "4/4" in text and "accuracy" in text


def test_set_weights_checks_everything_before_copying():
    X, y = _blobs(32, d=5)
    model = Model([FullyConnected(4), BatchNorm1D(), FullyConnected(3)], seed=0)
    model.fit(X, y, epochs=1, batch_size=16, verbose=0)
    before = _state(model)
    other = Model([FullyConnected(4), BatchNorm1D(), FullyConnected(3)], seed=1)
    other.fit(X, y, epochs=2, batch_size=16, verbose=0)
    good = other.get_weights()

    def spoil(i, key, fn):
        w = [dict(layer) for layer in good]
        w[i][key] = fn(w[i][key].copy())
        return w

    def nan_at_0(a):
        a.flat[0] = np.nan
        return a

    bad = [
        (spoil(2, "W", lambda a: a[:, :2]), ValueError, r"FullyConnected.W: shape \(4, 2\)"),
        (spoil(2, "b", nan_at_0), ValueError, r"FullyConnected.b contains NaN \(at index \[0, 0\]\)"),
        (spoil(1, "running_var", lambda a: -a), ValueError, "variance cannot be negative"),
        (spoil(0, "W", lambda a: a.astype(str)), TypeError, "numeric"),
        (good[:2], ValueError, "expected weights for 3 layers"),
    ]
    for w, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            model.set_weights(w)
        assert _same_state(before, _state(model))  # the valid layers before it were not copied
    model.set_weights(good)
    assert _same_state(_state(other), _state(model))
    np.testing.assert_array_equal(model.predict(X), other.predict(X))

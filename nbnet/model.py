"""``Model`` / ``Sequential``: a stack of layers with a loss and a training loop.

::

    model = nbnet.Sequential([
        FullyConnected(256), BatchNorm1D(act_fn="relu"),
        FullyConnected(10),
    ], loss="cross_entropy", optimizer="adam(lr=0.001)")
    history = model.fit(X, y, epochs=20, batch_size=128, validation_data=(Xv, yv), seed=0)
    model.evaluate(Xv, yv)        # {"loss": ..., "accuracy": ...}
    model.predict(Xv)             # class indices (classifier) or outputs (regressor)
    model.save("model.npz"); model = nbnet.load("model.npz")

The layer-level API is numpy-ml's: :meth:`Model.forward`, :meth:`Model.backward` and
:meth:`Model.update` run every layer's own method in order (reverse order for backward).

The loop
--------
All per-batch work lives in :meth:`Model.train_step`: forward (training mode), loss and
its gradient in one call, backward, :meth:`Model.reduce_gradients` (a no-op hook), then one
optimizer step per layer. :meth:`Model.fit` only orders the examples, slices batches and
reports. Data-parallel training (MPI) plugs in through three hooks, each a no-op here:

* :meth:`Model.shard_indices` -- the indices of this process's share of an epoch;
* :meth:`Model.reduce_gradients` -- called after backward, before the update (all-reduce
  every layer's ``gradients`` here, averaging so that ``reduction="mean"`` stays a mean);
* :meth:`Model.reduce_totals` -- sums of per-epoch counters (loss sum, correct count,
  example count) across processes, so every rank reports the same metrics.

Classification
--------------
With ``loss="cross_entropy"`` (``CrossEntropy(from_logits=True, reduction="mean")``) the
model outputs logits and the targets are integer labels ``0..K-1`` (or one-hot rows);
:meth:`predict_proba` applies a softmax. A trailing :class:`~nbnet.layers.Softmax` layer
is allowed: in training it is fused into the loss (the stable log-softmax form), and
:meth:`predict_proba` returns its output.

A trailing batch of a single example is merged into the previous batch (BatchNorm cannot
train on one example).
"""
import math
import sys
import time

import numpy as np

from . import devices
from ._validation import check_finite
from .layers.activation import Softmax
from .layers.base import LayerBase
from .losses import CrossEntropy, get_loss

_F32 = np.dtype(np.float32)


def _check_2d_features(X, name="X"):
    if devices.is_device_array(X) and not isinstance(X, np.ndarray):
        X = devices.to_host(X)
    arr = np.asarray(X)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(f"{name} must be at least 2-D (n_examples, n_features), got shape {arr.shape}")
    return arr


class Callback:
    """Base class of fit callbacks; every hook is optional.

    Hooks: ``on_train_begin(model, logs)``, ``on_epoch_begin(model, epoch, logs)``,
    ``on_epoch_end(model, epoch, logs)`` and ``on_train_end(model, logs)``. ``logs`` at
    epoch end holds that epoch's metrics (``loss``, ``accuracy``, ``val_loss``, ...). Set
    ``model.stop_training = True`` to stop after the current epoch.
    """

    def on_train_begin(self, model, logs):
        pass

    def on_epoch_begin(self, model, epoch, logs):
        pass

    def on_epoch_end(self, model, epoch, logs):
        pass

    def on_train_end(self, model, logs):
        pass


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs.

    Parameters
    ----------
    monitor : str, default "val_loss"
        A key of the epoch logs (``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``,
        ``mse``, ``val_mse``).
    patience : int, default 5
        Epochs without improvement before stopping.
    min_delta : float, default 0
        An improvement must beat the best value by more than this.
    mode : {"auto", "min", "max"}
        "auto": "max" for accuracy-like keys, else "min".
    restore_best : bool, default True
        At the end of training put back the weights (parameters and running statistics)
        of the best epoch.

    After training, ``best``, ``best_epoch`` and ``stopped_epoch`` (None if it never
    stopped) are set.
    """

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, mode="auto", restore_best=True):
        if isinstance(patience, bool) or not isinstance(patience, (int, np.integer)) or patience < 0:
            raise ValueError(f"patience must be an integer >= 0, got {patience!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        if not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
        self.monitor = str(monitor)
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.mode = mode
        self.restore_best = bool(restore_best)

    def _maximize(self):
        if self.mode != "auto":
            return self.mode == "max"
        return "acc" in self.monitor or "r2" in self.monitor

    def on_train_begin(self, model, logs):
        self.best = None
        self.best_epoch = None
        self.stopped_epoch = None
        self.wait = 0
        self._best_weights = None

    def on_epoch_end(self, model, epoch, logs):
        if self.monitor not in logs:
            raise ValueError(f"EarlyStopping monitors {self.monitor!r}, which this fit does not "
                             f"report (it reports: {', '.join(sorted(logs))}); pass validation_data "
                             "for val_* keys")
        value = float(logs[self.monitor])
        better = (self.best is None or
                  (value > self.best + self.min_delta if self._maximize()
                   else value < self.best - self.min_delta))
        if better and not math.isnan(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best:
                self._best_weights = model.get_weights()
        else:
            self.wait += 1
            if self.wait > self.patience:
                self.stopped_epoch = epoch
                model.stop_training = True

    def on_train_end(self, model, logs):
        if self.restore_best and self._best_weights is not None:
            model.set_weights(self._best_weights)


class _Progress:
    """A tqdm bar per epoch on a terminal; plain one-line-per-epoch logs otherwise."""

    def __init__(self, verbose, epochs, n_batches, stream=None):
        self.verbose = verbose
        self.epochs = epochs
        self.n_batches = n_batches
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        self._tqdm = None
        if verbose == 1:
            try:
                isatty = self.stream.isatty()
            except Exception:
                isatty = False
            if isatty:
                try:
                    from tqdm.auto import tqdm
                    self._tqdm = tqdm
                except ImportError:
                    pass

    def start_epoch(self, epoch):
        self.t0 = time.perf_counter()
        if self._tqdm is not None:
            self.bar = self._tqdm(total=self.n_batches, desc=f"epoch {epoch}/{self.epochs}",
                                  file=self.stream, leave=True, unit="batch", mininterval=0.2)

    def step(self, k, postfix):
        if self.bar is not None:
            self.bar.update(1)
            if k % 16 == 0 or k == self.n_batches:
                self.bar.set_postfix(postfix(), refresh=False)

    def end_epoch(self, epoch, logs):
        dt = time.perf_counter() - self.t0
        text = " - ".join(f"{k} {v:.4f}" for k, v in logs.items())
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=True)
            self.bar.close()
            self.bar = None
        elif self.verbose:
            print(f"epoch {epoch}/{self.epochs} - {text} - {dt:.2f}s", file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Model:
    """A sequential stack of nbnet layers trained with one loss.

    Parameters
    ----------
    layers : list of LayerBase
    loss : "cross_entropy", "squared_error", or a loss object, default "cross_entropy"
        ``"cross_entropy"`` is ``CrossEntropy(from_logits=True, reduction="mean")`` (the
        model outputs logits); ``"squared_error"`` is ``SquaredError(reduction="mean")``
        (``0.5 * sum((y_pred - y)**2) / N``).
    optimizer : str, dict or optimizer, optional
        Given, every layer gets its own copy (e.g. ``"adam(lr=1e-3)"``); otherwise each
        layer keeps the optimizer it was built with (numpy-ml's default SGD).
    lr_scheduler : str, dict or scheduler, optional
        A scheduler for that optimizer (``"exponential(initial_lr=0.01, stage_length=100)"``,
        see :func:`nbnet.schedulers.get_scheduler`), attached to ``optimizer`` (or, when
        ``optimizer`` is None, to each layer's own optimizer).
    input_dim : int, optional
        Number of input features: builds every layer now (so :meth:`summary` shows shapes
        and counts before training). Otherwise layers build on the first batch.
    dtype : float32 or float64, default float32
        Inputs are cast to it; parameters follow it.
    seed : int, optional
        Seeds the shuffling generator used when ``fit(seed=None)``, and gives layers
        without a seed (FullyConnected, Dropout) one derived from it, so the whole run
        is reproducible.
    device : {"cpu", "cuda"}, optional
        Moves every layer there (see :meth:`to`).
    """

    def __init__(self, layers, loss="cross_entropy", optimizer=None, lr_scheduler=None,
                 input_dim=None, dtype=np.float32, seed=None, device=None):
        layers = list(layers)
        if not layers:
            raise ValueError("a Model needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, LayerBase):
                raise TypeError(f"layer {i} is a {type(layer).__name__}, not an nbnet layer")
        if len({id(layer) for layer in layers}) != len(layers):
            raise ValueError("the same layer object appears twice in the model")
        self.loss = get_loss(loss)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        if isinstance(self.loss, CrossEntropy) and not self.loss.from_logits \
                and not isinstance(layers[-1], Softmax):
            raise ValueError("CrossEntropy(from_logits=False) needs a final Softmax layer (its "
                             "gradient is taken at the softmax input); use loss='cross_entropy' "
                             "(from logits) instead")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"seed must be None or a non-negative integer, got {seed!r}")
        if input_dim is not None and (isinstance(input_dim, bool) or not isinstance(input_dim, (int, np.integer))
                                      or input_dim < 1):
            raise ValueError(f"input_dim must be a positive integer, got {input_dim!r}")
        if optimizer is not None or lr_scheduler is not None:
            from .optimizers import get_optimizer
            base = get_optimizer(optimizer) if optimizer is not None else None
            for layer in layers:
                opt = base if base is not None else layer.optimizer
                if lr_scheduler is not None:
                    hp = dict(opt.hyperparameters)
                    hp["lr_scheduler"] = lr_scheduler
                    opt = get_optimizer(hp)
                opt = get_optimizer(opt)  # a copy: layers never share state
                opt.device = layer.device
                layer.optimizer = opt
        self.layers = layers
        self.seed = None if seed is None else int(seed)
        self._rng = np.random.default_rng(self.seed)
        if self.seed is not None:
            children = np.random.SeedSequence(self.seed).spawn(len(layers))
            for layer, child in zip(layers, children):
                if hasattr(layer, "_rng") and getattr(layer, "seed", 0) is None and not layer.parameters:
                    layer.seed = int(child.generate_state(1)[0])
                    layer._rng = np.random.default_rng(layer.seed)
        self.metadata = {}
        self.history = {}
        self._dist = None  # an MPI context once distribute() is called
        self.stop_training = False
        self.input_dim = None if input_dim is None else int(input_dim)
        self._output_shapes = None
        if device is not None:
            self.to(device)
        if self.input_dim is not None:
            self.build(self.input_dim)

    # ------------------------------------------------------------------ structure
    @property
    def device(self):
        return self.layers[0].device

    @property
    def is_classifier(self):
        return isinstance(self.loss, CrossEntropy)

    @property
    def _fused_softmax(self):
        return self.is_classifier and isinstance(self.layers[-1], Softmax)

    @property
    def _train_layers(self):
        return self.layers[:-1] if self._fused_softmax else self.layers

    def build(self, input_dim):
        """Create every layer's parameters for ``input_dim`` features (an inference pass
        over two zero rows; nothing else changes)."""
        self.input_dim = int(input_dim)
        self.forward(np.zeros((2, self.input_dim), self.dtype), retain_derived=False)
        return self

    def train(self):
        """Training mode for every layer."""
        for layer in self.layers:
            layer.train()
        return self

    def eval(self):
        """Inference mode for every layer (running statistics, no dropout)."""
        for layer in self.layers:
            layer.eval()
        return self

    def to(self, device):
        """Move every layer (parameters, gradients, optimizer state) to ``device``."""
        device = devices.check_device(device)
        for layer in self.layers:
            layer.to(device)
        return self

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"{type(self).__name__}([\n  {inner}\n], loss={self.loss!r})"

    # ------------------------------------------------------------------ numpy-ml API
    def _prep_X(self, X):
        arr = _check_2d_features(X)
        if self.input_dim is not None and arr.shape[1:] != (self.input_dim,) and arr.ndim == 2:
            raise ValueError(f"the model expects {self.input_dim} input features, got X of shape "
                             f"{arr.shape}")
        return np.ascontiguousarray(arr, dtype=self.dtype)

    def forward(self, X, retain_derived=True):
        """Run every layer's ``forward`` in order; returns the last output."""
        out = X
        shapes = []
        for layer in self.layers:
            out = layer.forward(out, retain_derived=retain_derived)
            shapes.append(tuple(out.shape[1:]))
        self._output_shapes = shapes
        if self.input_dim is None and getattr(X, "ndim", 0) == 2:
            self.input_dim = int(X.shape[1])
        return out

    def backward(self, dLdy, retain_grads=True):
        """Run every layer's ``backward`` in reverse order; returns dL/dX."""
        g = dLdy
        for layer in reversed(self.layers):
            g = layer.backward(g, retain_grads=retain_grads)
        return g

    def update(self, cur_loss=None):
        """One optimizer step per trainable layer (then its gradients are flushed)."""
        for layer in self.layers:
            if layer.trainable:
                layer.update(cur_loss)
            else:
                layer.flush_gradients()

    def flush_gradients(self):
        for layer in self.layers:
            layer.flush_gradients()

    # ------------------------------------------------------------------ training
    def train_step(self, Xb, yb):
        """One optimisation step on one batch; returns ``(loss, output)``.

        ``output`` is what the loss saw (logits for a classifier). This is the whole
        per-batch computation: a distributed subclass overrides :meth:`reduce_gradients`
        (or this method) only.
        """
        layers = self._train_layers
        device = layers[0].device
        out = Xb if device == "cpu" else devices.to_device(Xb, device)
        for layer in layers:
            out = layer.forward(out, True)
        if self._fused_softmax and not self.loss.from_logits:
            out = self.layers[-1].forward(out, False)
        loss, g = self._loss_and_grad(yb, out)
        if device != "cpu":  # keep the whole backward pass on the device
            g = devices.to_device(g, device)
        last = len(layers) - 1
        for i in range(last, -1, -1):
            layer = layers[i]
            if i == 0 and getattr(layer, "_can_skip_dX", False):
                layer.backward(g, True, False)  # the input needs no gradient
            else:
                g = layer.backward(g, True)
        self.reduce_gradients()
        for layer in layers:
            if layer.trainable:
                layer.update(loss)
        if self._fused_softmax:
            self.layers[-1].flush_gradients()
        return loss, out

    def _loss_and_grad(self, y, out):
        if hasattr(self.loss, "loss_and_grad"):
            return self.loss.loss_and_grad(y, out)
        return float(self.loss.loss(y, out)), self.loss.grad(y, out)

    # data-parallel training ---------------------------------------------------------
    def distribute(self, ctx=None):
        """Train data-parallel over the MPI ranks of ``ctx`` (default: :func:`nbnet.distributed.init`).

        Builds the model if needed and copies rank 0's parameters to every rank; from
        then on :meth:`train_step` averages the gradients of all ranks (one fused
        all-reduce per step), :meth:`fit` shards each epoch's examples by rank, reports
        progress on rank 0 only, and :meth:`save` writes from rank 0 only. With one
        process it changes nothing. Returns the model.
        """
        from . import distributed

        ctx = ctx if ctx is not None else distributed.context()
        if self.input_dim is not None and not all(layer.is_initialized for layer in self.layers
                                                  if hasattr(layer, "is_initialized")):
            self.build(self.input_dim)
        distributed.broadcast_parameters(self, ctx=ctx)
        self._dist = ctx
        return self

    @property
    def _dist_ctx(self):
        ctx = getattr(self, "_dist", None)
        return ctx if ctx is not None and ctx.world_size > 1 else None

    def shard_indices(self, order):
        """This process's share of the epoch's example order: equal-length shards by rank
        (all of it in a single process)."""
        ctx = self._dist_ctx
        if ctx is None:
            return order
        from .distributed import DistributedSampler
        return DistributedSampler(len(order), ctx.rank, ctx.world_size).indices(order)

    def reduce_gradients(self):
        """Called after backward, before the update: averages gradients over the ranks."""
        ctx = self._dist_ctx
        if ctx is not None:
            from .distributed import allreduce_gradients
            allreduce_gradients(self, ctx=ctx)

    def reduce_totals(self, totals):
        """Sum per-epoch counters across processes. ``totals`` is a float64 array:
        [loss * n, metric sum, n]."""
        ctx = self._dist_ctx
        if ctx is not None:
            ctx.allreduce_sum(totals)
        return totals

    # -------------------------------------------------------------------------------
    def _check_targets(self, y, n, name="y"):
        if devices.is_device_array(y) and not isinstance(y, np.ndarray):
            y = devices.to_host(y)
        y = np.asarray(y)
        if y.shape[:1] != (n,):
            raise ValueError(f"{name} has {y.shape[0] if y.ndim else 0} rows but X has {n}")
        if y.dtype == object or not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
            raise TypeError(f"{name} must be numeric (class labels 0..K-1 or one-hot rows for a "
                            f"classifier), got dtype {y.dtype}")
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            raise ValueError(f"{name} contains NaN or inf")
        if self.is_classifier:
            if y.ndim == 1:
                if y.dtype.kind == "f" and not np.all(y == np.round(y)):
                    raise ValueError(f"{name}: a classifier needs integer class labels 0..K-1, got "
                                     "non-integer values")
                y = y.astype(np.int64)
                if n and y.min() < 0:
                    raise ValueError(f"{name}: class labels must be >= 0, got {y.min()}")
            else:
                y = np.ascontiguousarray(y, dtype=self.dtype)
        else:
            y = np.ascontiguousarray(y, dtype=self.dtype)
            if y.ndim == 1:
                y = y.reshape(-1, 1)
        return y

    def _prep_finite_X(self, X, name="X"):
        """:meth:`_prep_X`, and NaN or inf in ``X`` is a ``ValueError`` naming the first row
        (it would give a NaN loss, or, in ``predict``, class 0 for that row without a word)."""
        X = self._prep_X(X)
        if X.dtype.kind == "f" and not np.isfinite(X).all():
            raise ValueError(f"{name} contains NaN or inf (at row {int(np.argwhere(~np.isfinite(X))[0][0])})")
        return X

    def _prep_data(self, X, y, name="X"):
        X = self._prep_finite_X(X, name)
        return X, self._check_targets(y, X.shape[0], "y" if name == "X" else "y_val")

    def _check_target_width(self, X, y, name="y"):
        """Targets against the model's outputs, before a step changes anything.

        The loss checks every batch as well, but in ``fit`` that comes too late: the batches
        before the first bad label would already have trained (and a bad ``y_val`` would
        only show after the first epoch). One example through the model in inference mode
        (no running statistics touched) gives the output width.
        """
        if X.shape[0] == 0:
            return
        try:
            out = self._logits_or_output(X[:1], 1)
        except ValueError as exc:  # the layer names the probe's (1, ...) slice: say whose
            x_name = "X_val" if name == "y_val" else "X"
            raise ValueError(f"{x_name} of shape {X.shape} does not fit the model: {exc}") from None
        width = out.shape[1] if out.ndim > 1 else 1
        if self.is_classifier and y.ndim == 1:
            if y.max() >= width:
                raise ValueError(f"{name}: class labels must be in [0, {width}) for a model with "
                                 f"{width} outputs, got labels up to {int(y.max())}")
        elif y.shape[1:] != out.shape[1:]:
            kind = "one-hot rows" if self.is_classifier else "targets"
            raise ValueError(f"{name} must be {kind} of shape (N, {', '.join(map(str, out.shape[1:]))}) "
                             f"to match the model's outputs, got shape {y.shape}")

    def _metric_sum(self, y, out):
        """Per-batch sum of the metric (correct predictions / squared errors)."""
        if self.is_classifier:
            pred = np.argmax(out, axis=1)
            true = y if y.ndim == 1 else np.argmax(y, axis=1)
            return float(np.count_nonzero(pred == true))
        d = out.astype(np.float64) - y
        return float(np.mean(d * d, axis=tuple(range(1, d.ndim))).sum()) if d.ndim > 1 else float((d * d).sum())

    @property
    def _metric_name(self):
        return "accuracy" if self.is_classifier else "mse"

    def _batches(self, n, batch_size):
        starts = list(range(0, n, batch_size))
        if len(starts) > 1 and n - starts[-1] == 1:
            starts.pop()  # a single trailing example joins the previous batch
        return [(s, starts[i + 1] if i + 1 < len(starts) else n) for i, s in enumerate(starts)]

    def fit(self, X, y, epochs=1, batch_size=32, validation_data=None, shuffle=True, seed=None,
            verbose=1, callbacks=None, distributed=False):
        """Train; returns the history dict (one list per metric, one value per epoch).

        Parameters
        ----------
        X : (N, ...) array; y : labels (N,) / one-hot (N, K) for a classifier, (N,) or
            (N, d) targets for a regressor.
        epochs, batch_size : int
        validation_data : (X_val, y_val), optional
            Evaluated (inference mode) after every epoch: ``val_loss``, ``val_<metric>``.
        shuffle : bool
            Reshuffle the examples every epoch.
        seed : int, optional
            Seeds this call's shuffling; None continues the model's own generator
            (seeded by ``Model(seed=...)``, saved in checkpoints).
        verbose : 0, 1 or 2
            0 silent; 1 a progress bar per epoch on a terminal (tqdm), else one line per
            epoch; 2 one line per epoch. Output goes to stderr.
        callbacks : list of Callback, e.g. :class:`EarlyStopping`
        distributed : bool
            Data-parallel over MPI ranks (run under ``mpiexec``; see :meth:`distribute`).
            Every rank passes the same ``X``, ``y`` and ``seed``; each trains on its shard
            of every epoch, gradients are averaged each step, progress shows on rank 0.

        Metrics: ``loss`` (the mean training loss over the epoch's batches, weighted by
        batch size), ``accuracy`` for a classifier or ``mse`` (mean squared error per
        example) for a regressor, each computed on the training batches as they were
        seen (training mode), plus their ``val_`` versions.
        """
        for name, v in (("epochs", epochs), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if name == "epochs" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'epochs' else 'positive'} "
                                 f"integer, got {v!r}")
        if verbose not in (0, 1, 2, True, False):
            raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
        X, y = self._prep_data(X, y)
        if self.input_dim is None and X.ndim == 2:
            self.input_dim = int(X.shape[1])
        if distributed:
            self.distribute()
            ctx = self._dist_ctx
            if ctx is not None:
                if ctx.rank != 0:
                    verbose = 0
                if seed is None:  # every rank must draw the same epoch permutations
                    seed = ctx.comm.bcast(int(self._rng.integers(2**62)), root=0)
        if validation_data is not None:
            if not (isinstance(validation_data, (tuple, list)) and len(validation_data) == 2):
                raise ValueError("validation_data must be a pair (X_val, y_val)")
            Xv, yv = self._prep_data(*validation_data, name="X_val")
        self._check_target_width(X, y)
        if validation_data is not None:
            self._check_target_width(Xv, yv, "y_val")
        callbacks = list(callbacks or [])
        rng = np.random.default_rng(seed) if seed is not None else self._rng
        n = X.shape[0]
        if n == 0:
            raise ValueError("X has no examples")
        metric = self._metric_name
        history = {"loss": [], metric: []}
        if validation_data is not None:
            history["val_loss"] = []
            history["val_" + metric] = []
        self.stop_training = False
        self.train()
        self.flush_gradients()
        for cb in callbacks:
            cb.on_train_begin(self, {})
        progress = None
        try:
            for epoch in range(1, int(epochs) + 1):
                order = rng.permutation(n) if shuffle else np.arange(n)
                order = self.shard_indices(order)
                batches = self._batches(len(order), int(batch_size))
                if progress is None:
                    progress = _Progress(int(verbose), int(epochs), len(batches))
                progress.n_batches = len(batches)
                for cb in callbacks:
                    cb.on_epoch_begin(self, epoch, {})
                progress.start_epoch(epoch)
                tot_loss = tot_metric = 0.0
                tot_n = 0
                for k, (s, e) in enumerate(batches, 1):
                    idx = order[s:e]
                    Xb = X[idx] if shuffle else X[s:e]
                    yb = y[idx] if shuffle else y[s:e]
                    loss, out = self.train_step(Xb, yb)
                    m = e - s
                    tot_loss += loss * m
                    tot_metric += self._metric_sum(yb, devices.to_host(out))
                    tot_n += m
                    progress.step(k, lambda: {"loss": f"{tot_loss / tot_n:.4f}",
                                              metric: f"{tot_metric / tot_n:.4f}"})
                totals = self.reduce_totals(np.array([tot_loss, tot_metric, tot_n], np.float64))
                logs = {"loss": totals[0] / totals[2], metric: totals[1] / totals[2]}
                if validation_data is not None:
                    val = self._evaluate_prepared(Xv, yv, max(int(batch_size), 1024))
                    logs["val_loss"] = val["loss"]
                    logs["val_" + metric] = val[metric]
                for key, value in logs.items():
                    history[key].append(float(value))
                progress.end_epoch(epoch, logs)
                for cb in callbacks:
                    cb.on_epoch_end(self, epoch, dict(logs))
                if self.stop_training:
                    break
        finally:
            if progress is not None:
                progress.close()
            self.flush_gradients()
        for cb in callbacks:
            cb.on_train_end(self, {})
        self.history = history
        return history

    # ------------------------------------------------------------------ inference
    def _infer(self, X, batch_size):
        outs = []
        n = X.shape[0]
        step = n if batch_size is None else max(1, int(batch_size))
        device = self.device
        for s in range(0, max(n, 1), step):
            out = X[s:s + step] if device == "cpu" else devices.to_device(X[s:s + step], device)
            for layer in self.layers:
                out = layer.forward(out, retain_derived=False)
            outs.append(devices.to_host(out))
        return np.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]

    def _logits_or_output(self, X, batch_size):
        """Outputs as the loss sees them (logits when a trailing Softmax is fused)."""
        if not self._fused_softmax or not self.loss.from_logits:
            return self._infer(X, batch_size)
        outs = []
        n = X.shape[0]
        step = n if batch_size is None else max(1, int(batch_size))
        device = self.device
        for s in range(0, max(n, 1), step):
            out = X[s:s + step] if device == "cpu" else devices.to_device(X[s:s + step], device)
            for layer in self.layers[:-1]:
                out = layer.forward(out, retain_derived=False)
            outs.append(devices.to_host(out))
        return np.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]

    def _evaluate_prepared(self, X, y, batch_size):
        out = self._logits_or_output(X, batch_size)
        n = X.shape[0]
        loss = self.loss.loss(y, out)
        reduction = getattr(self.loss, "reduction", "sum")
        totals = np.array([loss * (n if reduction == "mean" else 1.0), self._metric_sum(y, out), n],
                          np.float64)
        totals = self.reduce_totals(totals)
        return {"loss": float(totals[0] / totals[2]), self._metric_name: float(totals[1] / totals[2])}

    def evaluate(self, X, y, batch_size=1024):
        """``{"loss": ..., "accuracy"|"mse": ...}`` in inference mode (loss per example)."""
        X, y = self._prep_data(X, y)
        return self._evaluate_prepared(X, y, batch_size)

    def predict(self, X, batch_size=1024):
        """Class indices (classifier) or outputs (regressor), in inference mode."""
        out = self._infer(self._prep_finite_X(X), batch_size)
        if self.is_classifier:
            return np.argmax(out, axis=1)
        return out

    def predict_proba(self, X, batch_size=1024):
        """Class probabilities (softmax of the logits, or a trailing Softmax's output)."""
        if not self.is_classifier:
            raise AttributeError("predict_proba needs a classifier (loss='cross_entropy')")
        out = self._infer(self._prep_finite_X(X), batch_size)
        if isinstance(self.layers[-1], Softmax):
            return out
        z = out.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z.astype(out.dtype)

    # ------------------------------------------------------------------ weights
    def get_weights(self):
        """Host copies of every layer's ``parameters`` (running statistics included)."""
        return [{k: np.array(devices.to_host(v), copy=True) for k, v in layer.parameters.items()}
                for layer in self.layers]

    def set_weights(self, weights):
        """Copy values from :meth:`get_weights` into the parameters (in place).

        Everything is checked before anything is copied (layer count, parameter names,
        shapes, numeric and finite values, ``running_var >= 0``): a failed call changes
        nothing.
        """
        if len(weights) != len(self.layers):
            raise ValueError(f"expected weights for {len(self.layers)} layers, got {len(weights)}")
        for layer, w in zip(self.layers, weights):
            if set(w) != set(layer.parameters):
                raise ValueError(f"{type(layer).__name__}: expected parameters "
                                 f"{sorted(layer.parameters)}, got {sorted(w)}")
            for k, v in w.items():
                where = f"{type(layer).__name__}.{k}"
                if tuple(np.shape(v)) != tuple(layer.parameters[k].shape):
                    raise ValueError(f"{where}: shape {np.shape(v)} != "
                                     f"{tuple(layer.parameters[k].shape)}")
                a = devices.to_host(v)
                if a.dtype.kind not in "fiu":
                    raise TypeError(f"{where}: expected a numeric array, got dtype {a.dtype}")
                check_finite(where, a)
                if k == "running_var" and a.size and a.min() < 0:
                    raise ValueError(f"{where}: a variance cannot be negative, got {a.min()}")
        for layer, w in zip(self.layers, weights):
            for k, v in w.items():
                p = layer.parameters[k]
                if isinstance(p, np.ndarray):
                    np.copyto(p, v, casting="unsafe")
                else:
                    layer.parameters[k] = devices.to_device(np.asarray(v, dtype=p.dtype), layer.device)

    @property
    def n_params(self):
        """Learnt scalars (parameters with gradients)."""
        return sum(layer.n_params for layer in self.layers)

    def summary(self, print_fn=print):
        """Print (and return) a table of layers, output shapes and parameter counts."""
        if self._output_shapes is None and self.input_dim is not None:
            self.forward(np.zeros((1, self.input_dim), self.dtype), retain_derived=False)
        shapes = self._output_shapes
        rows = []
        total = trainable = 0
        for i, layer in enumerate(self.layers):
            learnt = layer.n_params
            other = sum(int(np.prod(v.shape)) for k, v in layer.parameters.items() if k not in layer.gradients)
            total += learnt + other
            trainable += learnt if layer.trainable else 0
            shape = "(None, " + ", ".join(map(str, shapes[i])) + ")" if shapes else "?"
            shape = shape.replace(", )", ")")
            name = type(layer).__name__
            act = getattr(layer, "act_fn", None)
            if act is not None and getattr(act, "code", 0) != 0 and not hasattr(layer, "activation"):
                name += f" [{act}]"
            rows.append((f"{i}", name, shape, f"{learnt + other:,}"))
        head = ("#", "Layer", "Output shape", "Params")
        widths = [max(len(r[c]) for r in rows + [head]) for c in range(4)]
        fmt = lambda r: "  ".join(s.ljust(w) if c < 3 else s.rjust(w)  # noqa: E731
                                  for c, (s, w) in enumerate(zip(r, widths)))
        line = "-" * len(fmt(head))
        lines = [f"Model: {len(self.layers)} layers, loss {self.loss!r}, dtype {self.dtype}, "
                 f"device {self.device}", line, fmt(head), line]
        lines += [fmt(r) for r in rows]
        lines += [line, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
                  f"Non-trainable params: {total - trainable:,}"]
        if shapes is None:
            lines.append("(not built yet: pass input_dim= or run a batch to see shapes and counts)")
        text = "\n".join(lines)
        if print_fn is not None:
            print_fn(text)
        return text

    # ------------------------------------------------------------------ checkpoints
    def save(self, path, metadata=None):
        """Write a checkpoint (see :func:`nbnet.io.save`); returns the path.

        In data-parallel training (:meth:`distribute`) only rank 0 writes (atomically);
        the other ranks wait for it, so the file is complete when ``save`` returns anywhere.
        """
        from .io import save
        ctx = self._dist_ctx
        if ctx is None:
            return save(self, path, metadata=metadata)
        try:
            if ctx.rank == 0:
                save(self, path, metadata=metadata)
        finally:
            ctx.comm.Barrier()
        return path


class Sequential(Model):
    """``Sequential([layer, ...], loss=..., ...)``: the same as :class:`Model`."""


__all__ = ["Model", "Sequential", "Callback", "EarlyStopping"]

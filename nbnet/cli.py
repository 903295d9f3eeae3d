"""The ``nbnet`` command: train, predict, info.

::

    nbnet train [data.csv|data.npz] [--target label] [--task classify|regress]
                [--hidden 256,128] [--norm batch|layer|none] [--epochs 20] [--batch-size 128]
                [--lr 1e-3] [--optimizer adam] [--lr-scheduler SPEC] [--seed 0]
                [--val-split 0.2] [--out model.npz] [--plot curves.png]
    nbnet predict model.npz data.csv [--out preds.csv]
    nbnet info

Without a data file ``train`` uses the bundled handwritten digits (8x8, 1797 samples).
Data: a CSV file with a header row (every feature column numeric; the target may be
text for classification), or an ``.npz`` with a 2-D ``X`` (or ``data``) array and a 1-D
``y`` (or ``target``) array, or one 1-D array per column. The task is inferred from the
target (text, or integer-valued with at most 20 distinct values: classify; otherwise
regress) unless ``--task`` says. Features are standardised with the training split's
mean and standard deviation, which are stored in the checkpoint so ``predict`` applies
them (regression targets are standardised too, and predictions mapped back).

Every user error (missing file, unknown column, non-numeric feature, NaN, corrupt
checkpoint, bad option) prints one line ``nbnet: error: ...`` on stderr and exits with
status 2.
"""
import argparse
import csv
import math
import os
import sys

import numpy as np

MAX_CLASSES = 20


class UsageError(Exception):
    """A user error: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


# ------------------------------------------------------------------ data

def _read_csv(path):
    """(names, list of columns as lists of str)."""
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"data file {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"data file {path} is a directory") from None
    with f:
        try:
            rows = list(csv.reader(f))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise UsageError(f"{path}: cannot parse CSV ({exc})") from None
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise UsageError(f"{path} is empty")
    names = [c.strip() for c in rows[0]]
    if len(set(names)) != len(names):
        raise UsageError(f"{path}: duplicate column names in the header")
    body = rows[1:]
    if not body:
        raise UsageError(f"{path} has a header but no data rows")
    for i, r in enumerate(body, start=2):
        if len(r) != len(names):
            raise UsageError(f"{path}: line {i} has {len(r)} fields, the header has {len(names)}")
    return names, [[r[j].strip() for r in body] for j in range(len(names))]


def _read_npz(path):
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"data file {path} does not exist") from None
    except Exception as exc:
        raise UsageError(f"{path}: cannot read .npz ({exc})") from None
    with npz:
        try:
            arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:
            raise UsageError(f"{path}: cannot read .npz ({exc})") from None
    Xkey = next((k for k in ("X", "data") if k in arrays and arrays[k].ndim == 2), None)
    if Xkey is not None:
        X = arrays.pop(Xkey)
        names = [f"x{j}" for j in range(X.shape[1])]
        cols = [X[:, j] for j in range(X.shape[1])]
        for k, v in arrays.items():
            if v.ndim == 1 and v.shape[0] == X.shape[0]:
                names.append(k)
                cols.append(v)
        return names, cols
    names, cols = [], []
    n = None
    for k, v in arrays.items():
        if v.ndim != 1:
            raise UsageError(f"{path}: array {k!r} is {v.ndim}-D; expected a 2-D 'X' plus 1-D "
                             "targets, or one 1-D array per column")
        if n is not None and v.shape[0] != n:
            raise UsageError(f"{path}: column {k!r} has {v.shape[0]} rows, others have {n}")
        n = v.shape[0]
        names.append(k)
        cols.append(v)
    if not names:
        raise UsageError(f"{path} holds no arrays")
    return names, cols


def _read_table(path):
    if path.lower().endswith(".npz"):
        return _read_npz(path)
    return _read_csv(path)


def _numeric(name, col, path):
    """A float64 column, or a UsageError naming the column and the first bad value."""
    if isinstance(col, np.ndarray) and col.dtype.kind in "biuf":
        out = col.astype(np.float64)
    else:
        out = np.empty(len(col), np.float64)
        for i, v in enumerate(col):
            try:
                out[i] = float(v) if v != "" else math.nan
            except (TypeError, ValueError):
                raise UsageError(f"{path}: column {name!r} is not numeric (row {i + 1}: {v!r})") from None
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.argmax(bad))
        raise UsageError(f"{path}: column {name!r} has a missing, NaN or infinite value at row {i + 1}")
    return out


def _features(names, cols, feature_names, path):
    index = {n: j for j, n in enumerate(names)}
    missing = [n for n in feature_names if n not in index]
    if missing:
        raise UsageError(f"{path}: missing feature column(s) {', '.join(map(repr, missing[:5]))}"
                         + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    if not feature_names:
        raise UsageError(f"{path}: no feature columns")
    return np.column_stack([_numeric(n, cols[index[n]], path) for n in feature_names])


def _load_digits_table():
    """The bundled digits as a table: features x0..x63 (as for any .npz with a 2-D
    ``data``), target ``target``."""
    from . import data
    return _read_npz(os.path.join(os.path.dirname(os.path.abspath(data.__file__)), "digits.npz"))


def _is_integer_like(values):
    return bool(np.all(values == np.round(values)))


# ------------------------------------------------------------------ train

def _parse_hidden(text):
    if text.strip() in ("", "none", "0"):
        return []
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--hidden must be comma-separated positive integers, got {text!r}") from None
    if any(s < 1 for s in sizes):
        raise UsageError(f"--hidden sizes must be positive, got {text!r}")
    return sizes


def _build_model(n_in, n_out, hidden, norm, task, optimizer, lr_scheduler, seed):
    from .layers import BatchNorm1D, FullyConnected, LayerNorm1D
    from .model import Model
    layers = []
    for h in hidden:
        if norm == "none":
            layers.append(FullyConnected(h, act_fn="relu", init="he_uniform"))
        else:
            layers.append(FullyConnected(h, init="he_uniform"))
            layers.append(BatchNorm1D(act_fn="relu") if norm == "batch" else LayerNorm1D(act_fn="relu"))
    layers.append(FullyConnected(n_out))
    loss = "cross_entropy" if task == "classify" else "squared_error"
    return Model(layers, loss=loss, optimizer=optimizer, lr_scheduler=lr_scheduler, input_dim=n_in,
                 seed=seed)


def _format_label(v):
    if isinstance(v, str):
        return v
    v = float(v)
    return str(int(v)) if v == int(v) else repr(v)


def _mpi_context():
    """The MPI context when running under mpiexec with several ranks, else None."""
    from . import distributed
    if not distributed._under_mpiexec():
        return None
    ctx = distributed.init()
    if ctx.world_size < 2:
        return None
    distributed.abort_on_exception()
    return ctx


def _abort_if_distributed(code):
    """A handled error on one rank must end every rank (they would wait forever)."""
    from . import distributed
    ctx = distributed._context
    if ctx is not None and ctx.world_size > 1:
        sys.stderr.flush()
        ctx.comm.Abort(code)


def cmd_train(args):
    from .optimizers import get_optimizer

    if not 0.0 <= args.val_split < 1.0:
        raise UsageError(f"--val-split must be in [0, 1), got {args.val_split}")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    hidden = _parse_hidden(args.hidden)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    try:
        optimizer = get_optimizer(f"{args.optimizer}(lr={args.lr!r})")
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--optimizer: {exc}") from None
    if args.lr_scheduler:
        from .schedulers import get_scheduler
        try:
            get_scheduler(args.lr_scheduler)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--lr-scheduler: {exc}") from None
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--out: folder {out_dir} does not exist")

    if args.data is None:
        path = "digits (bundled)"
        names, cols = _load_digits_table()
        target = args.target or "target"
    else:
        path = args.data
        names, cols = _read_table(path)
        target = args.target or names[-1]
    if target not in names:
        raise UsageError(f"{path}: no column named {target!r} (columns: "
                         f"{', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")
    feature_names = [n for n in names if n != target]
    X = _features(names, cols, feature_names, path)
    raw_y = cols[names.index(target)]
    try:
        y_num = _numeric(target, raw_y, path)
    except UsageError:
        y_num = None
        if any((v == "" if isinstance(v, str) else False) for v in raw_y):
            raise UsageError(f"{path}: target column {target!r} has missing values") from None
    task = args.task
    if task is None:
        task = ("classify" if y_num is None or
                (_is_integer_like(y_num) and len(np.unique(y_num)) <= MAX_CLASSES) else "regress")
    if task == "regress" and y_num is None:
        _numeric(target, raw_y, path)  # raises the precise error
    n = X.shape[0]
    if n < 2:
        raise UsageError(f"{path}: need at least 2 rows to train, got {n}")

    rng = np.random.default_rng(args.seed)
    order = rng.permutation(n)
    n_val = int(round(n * args.val_split))
    if args.val_split > 0 and (n_val < 1 or n - n_val < 2):
        raise UsageError(f"{path}: {n} rows are too few for --val-split {args.val_split}")
    val_idx, train_idx = order[:n_val], order[n_val:]

    mean = X[train_idx].mean(axis=0)
    std = X[train_idx].std(axis=0)
    std[std == 0] = 1.0
    Xs = (X - mean) / std

    metadata = {"task": task, "target": target, "feature_names": feature_names,
                "scaler_mean": mean, "scaler_std": std}
    if task == "classify":
        if y_num is not None:
            classes, y = np.unique(y_num, return_inverse=True)
            metadata["classes"] = [_format_label(c) for c in classes]
        else:
            classes, y = np.unique(np.asarray(raw_y, dtype=str), return_inverse=True)
            metadata["classes"] = [str(c) for c in classes]
        if len(classes) < 2:
            raise UsageError(f"{path}: target column {target!r} has a single class")
        n_out = len(classes)
    else:
        y_mean, y_std = float(y_num[train_idx].mean()), float(y_num[train_idx].std()) or 1.0
        metadata["target_mean"], metadata["target_std"] = y_mean, y_std
        y = (y_num - y_mean) / y_std
        n_out = 1

    model = _build_model(X.shape[1], n_out, hidden, args.norm, task, optimizer, args.lr_scheduler,
                         args.seed)
    # Under mpiexec with several ranks: data-parallel training with SyncBatchNorm; every
    # rank reads the same file and split, rank 0 prints and saves.
    ctx = _mpi_context()
    say = print if ctx is None or ctx.rank == 0 else (lambda *a, **k: None)
    if ctx is not None:
        from .distributed import convert_sync_batchnorm
        convert_sync_batchnorm(model)
    say(f"data: {path}: {n} rows, {X.shape[1]} features, target {target!r}, task {task}"
          + (f" ({n_out} classes)" if task == "classify" else ""))
    say(f"training on {len(train_idx)} rows, validating on {len(val_idx)}; "
          f"{model.n_params:,} parameters; {args.optimizer}(lr={args.lr})")
    validation = (Xs[val_idx], y[val_idx]) if n_val else None
    history = model.fit(Xs[train_idx], y[train_idx], epochs=args.epochs, batch_size=args.batch_size,
                        validation_data=validation, seed=args.seed, verbose=0 if args.quiet else 1,
                        distributed=ctx is not None)

    metric = "accuracy" if task == "classify" else "mse"
    final = {k: v[-1] for k, v in history.items()}
    train_eval = model.evaluate(Xs[train_idx], y[train_idx])
    line = f"train: loss {train_eval['loss']:.4f} {metric} {train_eval[metric]:.4f}"
    if validation is not None:
        line += f" | validation: loss {final['val_loss']:.4f} {metric} {final['val_' + metric]:.4f}"
    if task == "regress":
        line += " (on standardised targets)"
    say(line)
    model.save(args.out, metadata=metadata)
    say(f"model saved to {args.out}")
    if args.plot and (ctx is None or ctx.rank == 0):
        _plot(history, args.plot)
        say(f"curves saved to {args.plot}")
    return 0


def _plot(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [k for k in history if not k.startswith("val_")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5))
    axes = np.atleast_1d(axes)
    for ax, key in zip(axes, metrics):
        epochs = np.arange(1, len(history[key]) + 1)
        ax.plot(epochs, history[key], label="train")
        if "val_" + key in history:
            ax.plot(epochs, history["val_" + key], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--plot: cannot save {path} ({exc})") from None
    finally:
        plt.close(fig)


# ------------------------------------------------------------------ predict

def cmd_predict(args):
    from .io import load
    model = load(args.model)
    meta = model.metadata
    needed = ("task", "feature_names", "scaler_mean", "scaler_std")
    if any(k not in meta for k in needed):
        raise UsageError(f"{args.model} was not written by 'nbnet train' (no feature scaler in it)")
    names, cols = _read_table(args.data)
    X = _features(names, cols, list(meta["feature_names"]), args.data)
    Xs = (X - np.asarray(meta["scaler_mean"])) / np.asarray(meta["scaler_std"])
    if meta["task"] == "classify":
        classes = list(meta["classes"])
        lines = [classes[i] for i in model.predict(Xs)]
    else:
        out = model.predict(Xs).reshape(-1).astype(np.float64)
        out = out * meta["target_std"] + meta["target_mean"]
        lines = [repr(float(v)) for v in out]
    text = "\n".join(lines) + ("\n" if lines else "")
    if args.out:
        tmp = args.out + ".tmp"
        try:
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, args.out)
        except OSError as exc:
            raise UsageError(f"--out: cannot write {args.out} ({exc.strerror or exc})") from None
        print(f"{len(lines)} predictions written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


# ------------------------------------------------------------------ info

def _kernel_cache_dir():
    env = os.environ.get("NUMBA_CACHE_DIR")
    if env:
        return env
    from .kernels import cpu
    return os.path.join(os.path.dirname(os.path.abspath(cpu.__file__)), "__pycache__")


def cmd_info(args):
    import numba

    from . import __version__, config, devices
    from .registry import get_kernel
    print(f"nbnet {__version__} (numba {numba.__version__}, numpy {np.__version__}, "
          f"python {sys.version.split()[0]})")
    print(f"devices: {', '.join(devices.available_devices())} (default {devices.get_default_device()})")
    info = devices.device_info()
    if info.get("available"):
        print("cuda: " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "available"))
    else:
        print(f"cuda: not available ({info.get('reason')})")
    print(f"threads: {numba.get_num_threads()} numba threads "
          f"(NBNET_NUM_THREADS={config.NUM_THREADS or 'unset'}, cores {os.cpu_count()})")
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run yet: run one (a tiny cached kernel)
        buf = np.zeros(config.SERIAL_CUTOFF, np.float64)
        get_kernel("fill", "cpu")(buf, 0.0)
        try:
            layer = numba.threading_layer()
        except ValueError:
            layer = "not initialised"
    print(f"threading layer: {layer}")
    print(f"kernel cache: {_kernel_cache_dir()}")
    print(f"serial cut-off: {config.SERIAL_CUTOFF} elements; fastmath: "
          f"{','.join(sorted(config.FASTMATH)) or 'off'}")
    return 0


# ------------------------------------------------------------------ main

def _parser():
    p = _Parser(prog="nbnet", description="Train and use nbnet models from the command line.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    t = sub.add_parser("train", help="train a classifier or regressor on a CSV/NPZ file "
                                     "(default: the bundled digits)")
    t.add_argument("data", nargs="?", help="data.csv or data.npz (default: bundled digits)")
    t.add_argument("--target", help="target column (default: the last column; 'target' for digits)")
    t.add_argument("--task", choices=("classify", "regress"), help="override the inferred task")
    t.add_argument("--hidden", default="256,128", help="hidden layer sizes, e.g. 256,128 (0 or none: no hidden layer, a linear model)")
    t.add_argument("--norm", choices=("batch", "layer", "none"), default="batch")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--optimizer", default="adam", help="sgd, adagrad, rmsprop or adam")
    t.add_argument("--lr-scheduler", default=None,
                   help="e.g. 'exponential(initial_lr=0.01, stage_length=100, decay=0.5)'")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-split", type=float, default=0.2)
    t.add_argument("--out", default="model.npz")
    t.add_argument("--plot", default=None, help="save loss/metric curves to this image file")
    t.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    pr = sub.add_parser("predict", help="predict with a model saved by 'nbnet train'")
    pr.add_argument("model")
    pr.add_argument("data")
    pr.add_argument("--out", default=None, help="write predictions here (default: stdout)")
    sub.add_parser("info", help="version, devices, threads, kernel cache")
    return p


def main(argv=None):
    """Run the ``nbnet`` command; returns the exit status (0 ok, 2 user error)."""
    from .io import CheckpointError
    try:
        args = _parser().parse_args(argv)
        if args.command is None:
            raise UsageError("choose a command: train, predict or info (nbnet -h for help)")
        return {"train": cmd_train, "predict": cmd_predict, "info": cmd_info}[args.command](args)
    except UsageError as exc:
        msg = str(exc)
    except CheckpointError as exc:
        msg = str(exc)
    except FileNotFoundError as exc:
        msg = str(exc) if exc.filename is None else f"{exc.filename}: {exc.strerror or 'not found'}"
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        msg = str(exc) or type(exc).__name__
    except KeyboardInterrupt:
        print("nbnet: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    print("nbnet: error: " + " ".join(msg.split()), file=sys.stderr)
    _abort_if_distributed(2)
    return 2


if __name__ == "__main__":
    sys.exit(main())

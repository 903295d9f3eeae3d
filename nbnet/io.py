"""Checkpoints: a whole :class:`nbnet.Model` in one ``.npz`` file.

Layout (format version 1)
-------------------------
An uncompressed-header, compressed-data NumPy ``.npz`` (a zip of ``.npy`` files):

* ``__nbnet_header__``: a uint8 array holding UTF-8 JSON::

      {"format": "nbnet-checkpoint", "version": 1, "nbnet_version": "0.1.0",
       "model": {"class", "loss", "dtype", "input_dim", "seed", "rng_state", "metadata"},
       "layers": [{"class", "hyperparameters", "trainable", "training",
                   "parameters": {name: ref}, "optimizer_state": {...}, "rng_state"}],
       "arrays": {"a0000": {"shape", "dtype", "sha256"}, ...}}

  where a ``ref`` is ``{"__array__": "a0000"}``, naming one of the arrays below. The
  architecture is the layers' ``hyperparameters`` (numpy-ml's summary dicts), so a
  checkpoint is rebuilt by constructing each layer from them.
* ``a0000``, ``a0001``, ...: parameters, running statistics, optimizer state arrays
  (``Optimizer.state_dict()``), and any arrays of the user's ``metadata``. All are host
  (NumPy) arrays, whatever the model's device, so a checkpoint written on "cuda" loads
  on a machine without a GPU.

Safety
------
* Written atomically: to a temporary file in the destination folder, flushed and
  fsync'ed, then ``os.replace``'d over the destination. A crash or an exception mid-save
  leaves the previous checkpoint intact and removes the temporary file.
* Read with ``np.load(allow_pickle=False)``: a file holding a pickled object array is
  refused (loading pickles executes code).
* Every array's SHA-256 is in the header and is checked on load; a truncated, tampered or
  foreign file raises :class:`CheckpointError` (a ``ValueError``) naming the file.
"""
import hashlib
import inspect
import json
import os
import tempfile
import zipfile

import numpy as np

from . import devices

FORMAT = "nbnet-checkpoint"
VERSION = 1
HEADER_KEY = "__nbnet_header__"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, tampered, foreign or unsafe."""


# ------------------------------------------------------------------ encoding helpers

class _Writer:
    def __init__(self):
        self.arrays = {}
        self.info = {}

    def add(self, arr):
        arr = np.ascontiguousarray(devices.to_host(arr))
        if arr.dtype == object:
            raise TypeError("cannot store an object array in a checkpoint")
        name = f"a{len(self.arrays):04d}"
        self.arrays[name] = arr
        self.info[name] = {"shape": list(arr.shape), "dtype": arr.dtype.str,
                           "sha256": hashlib.sha256(arr.tobytes()).hexdigest()}
        return {"__array__": name}

    def encode(self, obj):
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                if not isinstance(k, str):
                    raise TypeError(f"checkpoint dict keys must be strings, got {k!r}")
                out[k] = self.encode(v)
            return out
        if isinstance(obj, (list, tuple)):
            return [self.encode(v) for v in obj]
        if isinstance(obj, np.ndarray) or devices.is_device_array(obj):
            return self.add(obj)
        if isinstance(obj, np.generic):
            return obj.item()
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (use arrays, numbers, "
                        "strings, lists and dicts)")


def _decode(obj, arrays):
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return arrays[obj["__array__"]]
        return {k: _decode(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    return obj


def _rng_state(layer_or_model):
    rng = getattr(layer_or_model, "_rng", None)
    return None if rng is None else rng.bit_generator.state


# ------------------------------------------------------------------ save

def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(model, path, metadata=None):
    """Write ``model`` to ``path`` atomically (see the module docstring); returns ``path``.

    ``metadata`` (a dict of JSON values and NumPy arrays) is merged into
    ``model.metadata`` and stored with it (the CLI keeps the feature scaler there).
    """
    path = os.fspath(path)
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        model.metadata.update(metadata)
    w = _Writer()
    layers = []
    for layer in model.layers:
        hp = dict(layer.hyperparameters)
        entry = {"class": type(layer).__name__,
                 "hyperparameters": w.encode(hp),
                 "trainable": bool(layer.trainable),
                 "training": bool(layer.training),
                 "parameters": {k: w.add(v) for k, v in layer.parameters.items()},
                 "optimizer_state": w.encode(layer.optimizer.state_dict()),
                 "rng_state": _rng_state(layer)}
        layers.append(entry)
    loss_hp = getattr(model.loss, "hyperparameters", {"id": type(model.loss).__name__})
    header = {
        "format": FORMAT,
        "version": VERSION,
        "nbnet_version": _version(),
        "model": {"class": type(model).__name__, "loss": loss_hp, "dtype": model.dtype.name,
                  "input_dim": model.input_dim, "seed": model.seed, "rng_state": _rng_state(model),
                  "metadata": w.encode(model.metadata)},
        "layers": layers,
        "arrays": w.info,
    }
    header_bytes = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save checkpoint {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **{HEADER_KEY: header_bytes}, **w.arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); best effort elsewhere
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _version():
    from . import __version__
    return __version__


# ------------------------------------------------------------------ load

def _read(path):
    """(header dict, {name: array}) from a checkpoint, every check done."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path} is a directory, expected an .npz file "
                                "written by nbnet.save")
    with open(path, "rb") as f:
        magic = f.read(4)
    # np.load takes anything that is not a zip or .npy for a pickle; say what it really is
    if magic[:2] != b"PK":
        what = ("an empty file" if not magic else
                "a single .npy array" if magic.startswith(b"\x93NUM") else
                "a pickle" if magic[:1] == b"\x80" else
                f"not a zip archive (it starts with {magic!r})")
        raise CheckpointError(f"{path} is not an nbnet checkpoint: {what}; expected the .npz "
                              "archive that nbnet.save writes")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            if HEADER_KEY not in names:
                raise CheckpointError(f"{path} is not an nbnet checkpoint (no {HEADER_KEY} entry)")
            arrays = {name: npz[name] for name in names}
    except CheckpointError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickle" in str(exc).lower():
            raise CheckpointError(f"{path} contains a pickled object array; refusing to load it "
                                  "(unpickling can run arbitrary code)") from None
        raise CheckpointError(f"{path} is not a valid checkpoint ({exc})") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, zipfile.LargeZipFile) as exc:
        if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise CheckpointError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # zlib.error and friends from a damaged stream
        raise CheckpointError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    raw = arrays.pop(HEADER_KEY)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{path}: header has dtype {raw.dtype}, expected a 1-D uint8 array")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an nbnet checkpoint (format {header.get('format')!r})"
                              if isinstance(header, dict) else f"{path}: malformed header")
    version = header.get("version")
    if not isinstance(version, int) or version > VERSION or version < 1:
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; this nbnet reads "
                              f"versions 1..{VERSION} (upgrade nbnet to read newer files)")
    info = header.get("arrays")
    if not isinstance(info, dict) or set(info) != set(arrays):
        raise CheckpointError(f"{path}: the arrays in the file do not match its header "
                              "(file truncated or tampered with)")
    for name, meta in info.items():
        arr = arrays[name]
        if (list(arr.shape) != meta.get("shape") or arr.dtype.str != meta.get("dtype")
                or hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() != meta.get("sha256")):
            raise CheckpointError(f"{path}: array {name} fails its checksum (file tampered with or "
                                  "corrupt)")
    return header, arrays


def _layer_classes():
    from . import layers as L
    out = {}
    for name in dir(L):
        obj = getattr(L, name)
        if isinstance(obj, type) and issubclass(obj, L.LayerBase) and obj is not L.LayerBase:
            out[obj.__name__] = obj
    return out


def _build_layer(cls, hp, device):
    sig = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in hp.items() if k in sig and k != "device"}
    if "device" in sig:
        kwargs["device"] = device
    return cls(**kwargs)


def load(path, device=None, loss=None):
    """Rebuild the model saved at ``path``.

    Parameters
    ----------
    path : str or path-like
    device : {"cpu", "cuda"}, optional
        Where to put the model; defaults to :func:`nbnet.get_default_device` (so a model
        saved on "cuda" loads on the CPU of a machine without a GPU).
    loss : loss object, optional
        Needed only for a model trained with a custom loss object (the file records its
        class name only).

    Raises
    ------
    FileNotFoundError
        No such file.
    CheckpointError
        Truncated, tampered, foreign or pickled content (the message names the file).
    """
    from .losses import get_loss
    from .model import Model, Sequential

    path = os.fspath(path)
    header, arrays = _read(path)
    if device is None:
        device = devices.get_default_device()
    device = devices.check_device(device)
    try:
        m = header["model"]
        classes = _layer_classes()
        layers = []
        for i, entry in enumerate(header["layers"]):
            cls = classes.get(entry["class"])
            if cls is None:
                raise CheckpointError(f"{path}: layer {i} has unknown class {entry['class']!r}")
            hp = _decode(entry["hyperparameters"], arrays)
            layer = _build_layer(cls, hp, device)
            params = {k: arrays[ref["__array__"]] for k, ref in entry["parameters"].items()}
            if params:
                layer.set_params({"parameters": params})
            layer.optimizer.load_state_dict(_decode(entry["optimizer_state"], arrays))
            if entry.get("rng_state") is not None and hasattr(layer, "_rng"):
                layer._rng.bit_generator.state = entry["rng_state"]
            layer.trainable = bool(entry.get("trainable", True))
            layer.training = bool(entry.get("training", True))
            layers.append(layer)
        if loss is None:
            try:
                loss = get_loss(m["loss"])
            except (ValueError, TypeError):
                raise CheckpointError(f"{path}: the model was trained with a custom loss "
                                      f"{m['loss'].get('id')!r}; pass it as load(..., loss=obj)") from None
        model_cls = Sequential if m.get("class") == "Sequential" else Model
        model = model_cls(layers, loss=loss, dtype=m["dtype"])
        model.input_dim = m.get("input_dim")
        model.seed = m.get("seed")
        if m.get("rng_state") is not None:
            model._rng.bit_generator.state = m["rng_state"]
        model.metadata = _decode(m.get("metadata") or {}, arrays)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: inconsistent checkpoint content ({type(exc).__name__}: "
                              f"{exc})") from None
    return model


__all__ = ["save", "load", "CheckpointError", "FORMAT", "VERSION"]

"""Input checks shared by every public entry point.

Every check raises before anything is modified, with one message that says what was
expected and what was received.
"""
import numpy as np

from . import devices

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _dtype_error(name, dtype):
    return TypeError(f"{name} must be float32 or float64, got dtype {dtype}; "
                     f"cast it first (e.g. {name}.astype(np.float32))")


def check_finite(name, arr, hint=""):
    """``ValueError`` naming NaN or inf and the index of the first one in a float array
    (``hint`` appended to the message); other dtypes pass."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        what = "NaN" if np.isnan(arr).any() else "inf"
        raise ValueError(f"{name} contains {what} (at index "
                         f"{np.argwhere(~np.isfinite(arr))[0].tolist()}){hint}")


def check_float_array(X, name="X", ndim=None, device="cpu"):
    """Return ``X`` as a C-contiguous float32/float64 array for ``device``.

    NumPy input for a "cuda" layer is transferred; device arrays for a "cpu" layer are
    copied to the host. Non-contiguous or Fortran-ordered input is copied to C order
    (results equal those of the contiguous copy).

    Raises
    ------
    TypeError
        For any dtype other than float32/float64 (integers, bools, float16, complex, object).
    ValueError
        For the wrong number of dimensions (when ``ndim`` is given, an int or a tuple).
    """
    if device == "cpu":
        if devices.is_device_array(X) and not isinstance(X, np.ndarray):
            X = devices.to_host(X)
        elif not isinstance(X, np.ndarray):
            try:
                X = np.asarray(X)
            except Exception as exc:
                raise TypeError(f"{name} must be an array, got {type(X).__name__} ({exc})") from None
    else:
        if not devices.is_device_array(X):
            X = np.asarray(X)
    dtype = np.dtype(X.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise _dtype_error(name, dtype)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if X.ndim not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got a {X.ndim}-D array of shape {tuple(X.shape)}")
    if device == "cpu":
        if not X.flags.c_contiguous:
            X = np.ascontiguousarray(X)
        return X
    return devices.to_device(X, device)


def check_same_shape(a, b, name_a, name_b):
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, "
                         f"got {tuple(b.shape)}")

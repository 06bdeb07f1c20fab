"""Input checks shared by the public functions of the codec.

Public functions validate and convert; the private ones they call assume
clean float32 input (scikit-learn's ``kmeans_plusplus`` / ``_kmeans_plusplus``).
"""

import numpy as np

from ..errors import DimensionMismatchError, InvalidInputError


def as_matrix(x, *, name="vectors", dim=None, allow_1d=False):
    """Return ``x`` as a C-contiguous float32 matrix of shape (n, dim).

    Raises
    ------
    InvalidInputError
        ``x`` is not numeric, is ragged, empty, not 2-D, or holds NaN/inf.
    DimensionMismatchError
        ``dim`` is given and the columns differ from it.
    """
    if isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except ValueError as exc:  # ragged nested lists
            raise InvalidInputError(f"{name} are ragged or not numeric: {exc}") from None
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise InvalidInputError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 1 and allow_1d:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D array (n, dim), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidInputError(f"{name} are empty: shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise DimensionMismatchError(f"{name} have dim={arr.shape[1]}, expected dim={dim}")
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise InvalidInputError(f"{name} contain NaN or inf (first at row {bad})")
    return arr


def check_k(k):
    """Return ``k`` as an int, refusing non-integers and values <= 0."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidInputError(f"k must be a positive integer, got {k!r}")
    if not 0 < k <= MAX_K:
        raise InvalidInputError(f"k must be a positive integer up to {MAX_K:,}, got k={k}")
    return int(k)


MAX_K = 1 << 20
"""Largest k a search returns (results are allocated as (nq, k))."""


METRICS = ("l2", "ip", "cosine")


def check_metric(metric):
    if metric not in METRICS:
        raise InvalidInputError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return metric

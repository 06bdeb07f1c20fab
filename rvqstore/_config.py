"""A store's configuration, and the conversions it governs.

The ``_CONFIG`` table of settings kept in the file, opening a file against the settings
asked for (created when missing, refused on a conflict), and turning arguments into the
arrays the store works on (vectors, ids, keys) and stored originals back into vectors.
Public methods of :class:`~rvqstore.store.Store` call these to validate; nothing here
does distance math.
"""

import os

import numpy as np

from . import algo
from .algo.validate import as_matrix, check_metric
from .errors import (BadFileError, ConfigMismatchError, InvalidInputError, OriginalsMissingError,
                     RvqstoreError, UnknownIdError)
from .storage import ORIGINAL_FORMATS, Database, unpack_originals

_CONFIG = {  # name: (type, default)
    "dim": (int, None),
    "metric": (str, "l2"),
    "stages": (int, 16),
    "codebook_size": (int, 256),
    "keep_originals": (bool, True),
    "originals": (str, "float32"),
    "block_size": (int, 16384),
    "train_beam": (int, 1),
    "add_beam": (int, 1),
    "train_sample": (int, 65536),
    "seed": (int, 0),
}


def _parse(kind, text):
    return (text == "1") if kind is bool else kind(text)


def meta_int(meta, name):
    """The integer meta value ``name``, 0 when absent."""
    return int(meta.get(name, 0))


# -- opening --------------------------------------------------------------------------------

def open_database(path, given, *, readonly, create, mmap_originals):
    """Open (or create) the file at ``path``; returns ``(db, config)``.

    ``given`` maps every ``_CONFIG`` name to the value asked for, or None. On an existing
    file the configuration is read from the file, and a given value that conflicts with it
    is an error naming both values.
    """
    dim = given["dim"]
    fresh = {k: (given[k] if given[k] is not None else d) for k, (t, d) in _CONFIG.items()}
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        if not create and not readonly:
            raise BadFileError(f"{os.fspath(path)} does not exist")
        validate_config(fresh)  # before a file is made: a refused open leaves none
    db = Database(path, readonly=readonly, mmap_originals=mmap_originals)
    try:
        stored = db.meta()
        if not stored and not readonly:
            # create under the write lock: another process may be creating it right now
            validate_config(fresh)
            with db.write():
                stored = db.meta()
                if not stored:
                    db.set_meta(format=1, active_version=0, next_id=0,
                                **{k: (int(v) if isinstance(v, bool) else v)
                                   for k, v in fresh.items() if v is not None})
                    stored = db.meta()
        if stored:
            config = {k: _parse(t, stored[k]) if k in stored else d
                      for k, (t, d) in _CONFIG.items()}
            if "dim" in stored:
                config["dim"] = int(stored["dim"])
            for name, value in given.items():
                if value is not None and config[name] is not None and value != config[name]:
                    raise ConfigMismatchError(
                        f"{name}={value!r} was asked for, but {db.path} has {name}={config[name]!r}")
            if config["dim"] is None and dim is not None and not readonly:
                with db.write():
                    now = db.meta().get("dim")
                    if now is not None and int(now) != dim:
                        raise ConfigMismatchError(
                            f"dim={dim} was asked for, but {db.path} has dim={now}")
                    db.set_meta(dim=dim)
                config["dim"] = dim
        else:
            raise RvqstoreError(f"{db.path} is not initialised and was opened read-only")
        return db, config
    except BaseException:
        db.close()
        raise


def validate_config(c):
    check_metric(c["metric"])
    if c["dim"] is not None and (not isinstance(c["dim"], int) or c["dim"] < 1):
        raise InvalidInputError(f"dim must be a positive integer, got {c['dim']!r}")
    if not 1 <= c["stages"] <= 64:
        raise InvalidInputError(f"stages must be in [1, 64], got {c['stages']}")
    if not 2 <= c["codebook_size"] <= 256:
        raise InvalidInputError(f"codebook_size must be in [2, 256], got {c['codebook_size']}")
    if c["originals"] not in ORIGINAL_FORMATS:
        raise InvalidInputError(
            f"originals must be one of {', '.join(ORIGINAL_FORMATS)}, got {c['originals']!r}")
    for name in ("block_size", "train_beam", "add_beam", "train_sample"):
        if c[name] < 1:
            raise InvalidInputError(f"{name} must be >= 1, got {c[name]}")


# -- input checks ---------------------------------------------------------------------------

def as_vectors(x, *, dim, metric, name="vectors", allow_1d=False):
    """``x`` as float32 (n, dim), checked against ``dim`` when known (cosine: normalised)."""
    arr = as_matrix(x, name=name, dim=dim, allow_1d=allow_1d)
    if metric == "cosine":
        arr = algo.normalize(arr)
    return arr


def id_array(ids, name="ids"):
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InvalidInputError(f"{name} must be a 1-D sequence of integers, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def key_list(keys, n, allow_none=False):
    keys = list(keys)
    if len(keys) != n:
        raise InvalidInputError(f"got {len(keys)} keys for {n} vectors")
    bad = [k for k in keys if not isinstance(k, str) and not (allow_none and k is None)]
    if bad:
        raise InvalidInputError(f"keys must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
    return keys


def resolve(db, ids, keys):
    """Ids for ``ids`` or ``keys``, refusing unknown ones."""
    if keys is not None:
        keys = key_list(keys, len(list(keys)))
        found = db.ids_for_keys(keys)
        missing = [k for k in keys if k not in found]
        if missing:
            raise UnknownIdError(f"unknown keys: {missing[:5]}")
        return np.asarray([found[k] for k in keys], np.int64)
    ids = id_array(ids)
    present = set(db.existing_ids(ids.tolist()))
    missing = [i for i in ids.tolist() if i not in present]
    if missing:
        raise UnknownIdError(f"unknown ids: {missing[:5]}")
    return ids


# -- stored originals -----------------------------------------------------------------------

def unpack(blobs, config):
    """Stored original blobs as float32 (n, dim); refused when the store keeps none."""
    if any(b is None for b in blobs):
        raise OriginalsMissingError("this store does not keep original vectors")
    return unpack_originals(blobs, config["originals"], config["dim"])

"""A store's configuration, and the conversions it governs.

The settings kept in the file (:class:`Config`), opening a file against the settings
asked for (created when missing, refused on a conflict), and turning arguments into the
arrays the store works on (vectors, ids, keys) and stored originals back into vectors.
Public methods of :class:`~rvqstore.store.Store` call these to validate; nothing here
does distance math.
"""

import os
from dataclasses import dataclass, fields, replace
from typing import Optional

import numpy as np

from . import algo
from .algo.validate import as_matrix, check_metric
from .errors import (BadFileError, ConfigMismatchError, InvalidInputError, OriginalsMissingError,
                     RvqstoreError, UnknownIdError)
from .storage import ORIGINAL_FORMATS, Database, unpack_originals

@dataclass(frozen=True)
class Config:
    """A store's settings, as kept in the file's meta table.

    ``dim`` is None until the first add of a store created without one.
    """

    dim: Optional[int] = None
    metric: str = "l2"
    stages: int = 16
    codebook_size: int = 256
    keep_originals: bool = True
    originals: str = "float32"
    block_size: int = 16384
    train_beam: int = 1
    add_beam: int = 1
    train_sample: int = 65536
    seed: int = 0

    @classmethod
    def from_meta(cls, meta):
        """The settings stored in ``meta`` (name -> text), defaults where absent."""
        values = {}
        for f in fields(cls):
            if f.name in meta:
                values[f.name] = _parse(_TYPES[f.name], meta[f.name])
        return cls(**values)

    def to_meta(self):
        """name -> value to store (bools as 0/1, unset dim left out)."""
        return {f.name: (int(v) if isinstance(v, bool) else v)
                for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def validate(self):
        """Refuse settings out of range, naming the value."""
        check_metric(self.metric)
        if self.dim is not None and (not isinstance(self.dim, int) or self.dim < 1):
            raise InvalidInputError(f"dim must be a positive integer, got {self.dim!r}")
        if not 1 <= self.stages <= 64:
            raise InvalidInputError(f"stages must be in [1, 64], got {self.stages}")
        if not 2 <= self.codebook_size <= 256:
            raise InvalidInputError(f"codebook_size must be in [2, 256], got {self.codebook_size}")
        if self.originals not in ORIGINAL_FORMATS:
            raise InvalidInputError(f"originals must be one of {', '.join(ORIGINAL_FORMATS)}, "
                                    f"got {self.originals!r}")
        for name in ("block_size", "train_beam", "add_beam", "train_sample"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self


_TYPES = {"dim": int, "metric": str, "stages": int, "codebook_size": int, "keep_originals": bool,
          "originals": str, "block_size": int, "train_beam": int, "add_beam": int,
          "train_sample": int, "seed": int}


def _parse(kind, text):
    return (text == "1") if kind is bool else kind(text)


def meta_int(meta, name):
    """The integer meta value ``name``, 0 when absent."""
    return int(meta.get(name, 0))


# -- opening --------------------------------------------------------------------------------

def open_database(path, given, *, readonly, create, mmap_originals):
    """Open (or create) the file at ``path``; returns ``(db, config)``.

    ``given`` maps every :class:`Config` field to the value asked for, or None. On an
    existing file the configuration is read from the file, and a given value that
    conflicts with it is an error naming both values.
    """
    dim = given["dim"]
    fresh = Config(**{k: v for k, v in given.items() if v is not None})
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        if not create and not readonly:
            raise BadFileError(f"{os.fspath(path)} does not exist")
        fresh.validate()  # before a file is made: a refused open leaves none
    db = Database(path, readonly=readonly, mmap_originals=mmap_originals)
    try:
        stored = db.meta()
        if not stored and not readonly:
            # create under the write lock: another process may be creating it right now
            fresh.validate()
            with db.write():
                stored = db.meta()
                if not stored:
                    db.set_meta(format=1, active_version=0, next_id=0, **fresh.to_meta())
                    stored = db.meta()
        if not stored:
            raise RvqstoreError(f"{db.path} is not initialised and was opened read-only")
        config = Config.from_meta(stored)
        for name, value in given.items():
            have = getattr(config, name)
            if value is not None and have is not None and value != have:
                raise ConfigMismatchError(
                    f"{name}={value!r} was asked for, but {db.path} has {name}={have!r}")
        if config.dim is None and dim is not None and not readonly:
            with db.write():
                now = db.meta().get("dim")
                if now is not None and int(now) != dim:
                    raise ConfigMismatchError(
                        f"dim={dim} was asked for, but {db.path} has dim={now}")
                db.set_meta(dim=dim)
            config = replace(config, dim=dim)
        return db, config
    except BaseException:
        db.close()
        raise


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
    return unpack_originals(blobs, config.originals, config.dim)

"""A store's configuration, and the conversions it governs.

The settings kept in the file (:class:`Config`), opening a file against the settings
asked for (created when missing, refused on a conflict), and turning arguments into the
arrays the store works on (vectors, ids, keys) and stored originals back into vectors.
Public methods of :class:`~rvqstore.store.Store` call these to validate; nothing here
does distance math.
"""

import contextlib
import json
import os
import re
from dataclasses import dataclass, fields, replace
from typing import Optional

import numpy as np

from . import algo
from .algo.validate import METRICS, as_matrix
from .errors import (BadFileError, ConfigMismatchError, DuplicateError, InvalidInputError,
                     OriginalsMissingError,
                     RvqstoreError, UnknownIdError)
from .filters import is_plain_metadata, validate_metadata
from .storage import ORIGINAL_FORMATS, Database, unpack_originals

MAX_DIM = 65536
"""Largest vector dimension a store accepts (and believes of a file)."""

MAX_META_INT = (1 << 63) - 1

# field: (type, smallest, largest or choices); a file's values are checked against these
# before anything is sized by them
_RULES = {
    "dim": (int, 1, MAX_DIM),
    "metric": (str, METRICS),
    "stages": (int, 1, 64),
    "codebook_size": (int, 2, 256),
    "keep_originals": (bool,),
    "originals": (str, ORIGINAL_FORMATS),
    "block_size": (int, 1, 1 << 20),
    "train_beam": (int, 1, 256),
    "add_beam": (int, 1, 256),
    "train_sample": (int, 1, 1 << 31),
    "seed": (int, 0, MAX_META_INT),
}


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
    def from_meta(cls, meta, path):
        """The settings stored in ``meta`` (name -> text), defaults where absent; a value
        of the wrong type or out of range is a ``BadFileError`` naming it."""
        if meta.get("format") != "1":
            raise BadFileError(f"{path} has store format {meta.get('format')!r}, expected '1': "
                               "the file is corrupted")
        values = {}
        for f in fields(cls):
            if f.name in meta:
                values[f.name] = _parse_stored(f.name, meta[f.name], path)
        return cls(**values)

    def to_meta(self):
        """name -> value to store (bools as 0/1, unset dim left out)."""
        return {f.name: (int(v) if isinstance(v, bool) else v)
                for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def validate(self):
        """Refuse settings of the wrong type or out of range, naming the value."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "dim":
                continue
            problem = _problem(f.name, value)
            if problem:
                raise InvalidInputError(problem)
        return self


def _problem(name, value):
    """What is wrong with ``value`` for setting ``name``, or None."""
    kind, *bounds = _RULES[name]
    if kind is bool:
        return None if isinstance(value, bool) else f"{name} must be True or False, got {value!r}"
    if kind is str:
        if value not in bounds[0]:
            return f"{name} must be one of {', '.join(bounds[0])}, got {value!r}"
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return f"{name} must be an integer, got {value!r}"
    if not bounds[0] <= value <= bounds[1]:
        return f"{name} must be in [{bounds[0]}, {bounds[1]}], got {value}"
    return None


def _parse_stored(name, text, path):
    kind = _RULES[name][0]
    value = text
    if kind is bool:
        value = {"1": True, "0": False}.get(text, text)
    elif kind is int:
        value = int(text) if isinstance(text, str) and re.fullmatch(r"-?[0-9]{1,19}", text) \
            else text
    problem = _problem(name, value)
    if problem:
        raise BadFileError(f"{path} has a bad setting: {problem}")
    return value


def meta_int(meta, name, path="the store"):
    """The integer meta value ``name`` in [0, 2**63 - 1], 0 when absent; anything else is a
    ``BadFileError``."""
    text = meta.get(name, "0")
    if not (isinstance(text, str) and re.fullmatch(r"[0-9]{1,19}", text)) or \
            int(text) > MAX_META_INT:
        raise BadFileError(f"{path} has a bad {name}: {text!r}")
    return int(text)


# -- opening --------------------------------------------------------------------------------

def open_database(path, given, *, readonly, create, mmap_originals, durable=True,
                  timeout=10.0, max_bytes=None):
    """Open (or create) the file at ``path``; returns ``(db, config)``.

    ``given`` maps every :class:`Config` field to the value asked for, or None. On an
    existing file the configuration is read from the file, and a given value that
    conflicts with it is an error naming both values.
    """
    dim = given["dim"]
    fresh = Config(**{k: v for k, v in given.items() if v is not None})
    fresh.validate()
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        if not create and not readonly:
            raise BadFileError(f"{os.fspath(path)} does not exist")
    db = Database(path, readonly=readonly, mmap_originals=mmap_originals, durable=durable,
                  timeout=timeout, max_bytes=max_bytes)
    try:
        stored = db.meta()
        if not stored and not readonly:
            # create under the write lock: another process may be creating it right now
            with db.write():
                stored = db.meta()
                if not stored:
                    db.set_meta(format=1, active_version=0, next_id=0, **fresh.to_meta())
                    stored = db.meta()
        if not stored:
            raise RvqstoreError(f"{db.path} is not initialised and was opened read-only")
        config = Config.from_meta(stored, db.path)
        for name in ("active_version", "next_id", "blocks_epoch"):
            meta_int(stored, name, db.path)
        db.upgrade()  # an older schema, once its settings have passed
        for name, value in given.items():
            have = getattr(config, name)
            if value is not None and have is not None and value != have:
                raise ConfigMismatchError(
                    f"{name}={value!r} was asked for, but {db.path} has {name}={have!r}")
        if config.dim is None and dim is not None and not readonly:
            with db.write():
                now = Config.from_meta(db.meta(), db.path).dim
                if now is not None and now != dim:
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
    if arr.size and arr.dtype == np.uint64 and int(arr.max()) > MAX_META_INT:
        raise InvalidInputError(f"{name} must fit in int64, got {int(arr.max())}")
    return arr.astype(np.int64)


def new_id_array(ids, n):
    """Ids for ``n`` new rows: distinct, in [0, 2**63 - 2] (-1 pads search results)."""
    ids = id_array(ids)
    if len(ids) != n:
        raise InvalidInputError(f"got {len(ids)} ids for {n} vectors")
    if ids.size and (ids.min() < 0 or ids.max() > MAX_META_INT - 1):
        bad = int(ids[(ids < 0) | (ids > MAX_META_INT - 1)][0])
        raise InvalidInputError(f"ids must be in [0, 2**63 - 2] (-1 marks a missing result), "
                                f"got {bad}")
    if len(np.unique(ids)) != n:
        raise DuplicateError("ids contain duplicates")
    return ids


def key_list(keys, n, allow_none=False):
    keys = list(keys)
    if len(keys) != n:
        raise InvalidInputError(f"got {len(keys)} keys for {n} vectors")
    bad = [k for k in keys if not isinstance(k, str) and not (allow_none and k is None)]
    if bad:
        raise InvalidInputError(f"keys must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
    for k in keys:
        if k is not None and not k.isascii():
            try:
                k.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidInputError(f"key {k!r} is not valid Unicode text ({exc.reason}): "
                                        "keys are stored as UTF-8") from None
    return keys


def metadata_texts(metadata, n):
    """``metadata`` (a sequence of n dict-or-None) as JSON texts (None kept), validated."""
    items = list(metadata)
    if len(items) != n:
        raise InvalidInputError(f"got {len(items)} metadata items for {n} vectors")
    return [None if m is None else json.dumps(validate_metadata(m), ensure_ascii=False,
                                              separators=(",", ":"), allow_nan=False)
            for m in items]


def document_list(documents, n):
    """``documents`` (a sequence of n str-or-None), checked."""
    items = list(documents)
    if len(items) != n:
        raise InvalidInputError(f"got {len(items)} documents for {n} vectors")
    for d in items:
        if d is not None and not isinstance(d, str):
            raise InvalidInputError(f"documents must be strings or None, got {type(d).__name__}")
        if d is not None and not d.isascii():
            try:
                d.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidInputError(f"a document is not valid Unicode text ({exc.reason})") \
                    from None
    return items


def parse_metadata(text, path, i):
    """A stored metadata text as a dict that passes :func:`validate_metadata` (the file is
    input); anything else is a ``BadFileError``."""
    try:
        meta = json.loads(text)
        return meta if is_plain_metadata(meta) else validate_metadata(meta)
    except (TypeError, ValueError, RecursionError):  # InvalidInputError is a ValueError
        raise BadFileError(f"{path}: the metadata of id {i} is not a valid metadata object: "
                           "the file is corrupted") from None


def stored_metadata(db, ids):
    """{id: dict} of the ``ids`` that have metadata, checked."""
    return {i: parse_metadata(t, db.path, i) for i, t in db.metadata_for_ids(ids).items()}


def stored_documents(db, ids):
    """{id: str} of the ``ids`` that have a document, checked."""
    found = db.documents_for_ids(ids)
    bad = [i for i, d in found.items() if not isinstance(d, str)]
    if bad:
        raise BadFileError(f"{db.path}: the document of id {bad[0]} is not text: "
                           "the file is corrupted")
    return found


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

@contextlib.contextmanager
def naming(path):
    """Prefix the ``BadFileError`` of a BLOB read from ``path`` with the file's name."""
    try:
        yield
    except BadFileError as exc:
        raise BadFileError(f"{path}: {exc}") from None


def unpack(db, blobs, config, ids=None):
    """Stored original blobs (of ``ids``, named in errors) as float32 (n, dim), their CRCs
    checked; refused when the store keeps none."""
    if any(b is None for b in blobs):
        raise OriginalsMissingError("this store does not keep original vectors")
    with naming(db.path):
        return unpack_originals(blobs, config.originals, config.dim, ids=ids, checked=db.checked)

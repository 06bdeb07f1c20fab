"""Vectors from files: ``.npy``, ``.fvecs``, JSON lines, CSV, or standard input.

Every reader returns ``Loaded(vectors, ids, keys)``: float32 (n, dim), int64 (n,) or None,
list of n str or None. A file that cannot be read or is malformed raises
:class:`InputFileError` (an :class:`~rvqstore.errors.InvalidInputError`) whose message
names the file and the line (or row, for binary files).

JSON lines hold one object per line, ``{"id": 7, "key": "doc-7", "vector": [0.1, ...]}``
with ``id`` and ``key`` optional, or a bare array ``[0.1, ...]``. CSV holds numbers only,
or a header whose ``id`` and ``key`` columns are taken as such and whose other columns are
the vector's components. Ids and keys are given on every row or on none: ``Store.add``
takes them for the whole batch.
"""

import csv
import io
import json
import os
import sys
from typing import NamedTuple, Optional

import numpy as np

from .errors import InvalidInputError

FORMATS = ("npy", "fvecs", "jsonl", "csv")
_EXTENSIONS = {".npy": "npy", ".fvecs": "fvecs", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".json": "jsonl", ".csv": "csv"}


class InputFileError(InvalidInputError):
    """An input file is missing, unreadable or malformed; the message names file and line."""


class Loaded(NamedTuple):
    """vectors : float32 (n, dim); ids : int64 (n,) or None; keys : list of n str or None."""

    vectors: np.ndarray
    ids: Optional[np.ndarray] = None
    keys: Optional[list] = None


def format_for(path):
    """The format implied by ``path``'s extension, or None."""
    return _EXTENSIONS.get(os.path.splitext(os.fspath(path))[1].lower())


def read_vectors(path, *, format=None):
    """Read vectors (and ids and keys where the format has them) from ``path``.

    Parameters
    ----------
    path : str or os.PathLike, or "-" for standard input
    format : one of FORMATS or None. None takes it from the extension; on standard
        input, JSON lines or CSV is detected from the first character.

    Returns
    -------
    Loaded(vectors float32 (n, dim), ids int64 (n,) or None, keys list or None)
    """
    path = os.fspath(path)
    name = "<stdin>" if path == "-" else path
    if format is not None and format not in FORMATS:
        raise InvalidInputError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format is None and path != "-":
        format = format_for(path)
        if format is None:
            raise InputFileError(f"{name}: cannot tell the format from the extension; "
                                 f"give one of {', '.join(FORMATS)}")
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as exc:
        raise InputFileError(f"cannot read {name}: {exc.strerror or exc}") from None
    if format in ("npy", "fvecs"):
        return (_npy if format == "npy" else _fvecs)(data, name)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputFileError(
            f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if format is None:
        first = text.lstrip()[:1]
        if not first:
            raise InputFileError(f"{name} is empty")
        format = "jsonl" if first in "{[" else "csv"
    return (_jsonl if format == "jsonl" else _csv)(text, name)


def parse_vector(text, *, name="vector"):
    """A JSON array of numbers, ``'[0.1, -2, 3e-1]'``, as a float32 array of shape (dim,)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(
            f"{name} is not valid JSON: {exc.msg} at column {exc.colno}") from None
    vec = _numbers(value)
    if vec is None or vec.ndim != 1 or not len(vec):
        raise InvalidInputError(f"{name} must be a non-empty JSON array of numbers")
    if not np.isfinite(vec).all():
        raise InvalidInputError(f"{name} holds NaN or infinity")
    return vec


def _numbers(value):
    """``value`` as float32 if it is a flat list of numbers (no bools, no strings), else None."""
    if not isinstance(value, list):
        return None
    try:
        arr = np.array(value)
    except (ValueError, TypeError):  # ragged
        return None
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iuf"):
        return None
    if any(isinstance(v, bool) for v in value):  # numpy takes true for 1 beside numbers
        return None
    return arr.astype(np.float32)


# -- binary formats -------------------------------------------------------------------------

def _npy(data, name):
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, EOFError, OSError by the kind of damage
        raise InputFileError(f"{name} is not a valid .npy file ({exc})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iuf":
        raise InputFileError(
            f"{name}: expected a numeric array, got dtype {getattr(arr, 'dtype', '?')}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or 0 in arr.shape:
        raise InputFileError(f"{name}: expected an array of shape (n, dim), got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    _check_finite(arr, name, lambda i: f"row {i}")
    return Loaded(arr)


def _fvecs(data, name):
    if len(data) < 4:
        raise InputFileError(f"{name} is empty or truncated ({len(data)} bytes)")
    dim = int(np.frombuffer(data[:4], "<i4")[0])
    if dim < 1:
        raise InputFileError(f"{name} row 0: dimension header is {dim}")
    row = 4 * (dim + 1)
    if len(data) % row:
        raise InputFileError(f"{name} is truncated or not .fvecs: {len(data)} bytes is not a "
                             f"multiple of the row size {row} (dim={dim})")
    words = np.frombuffer(data, "<i4").reshape(-1, dim + 1)
    bad = np.flatnonzero(words[:, 0] != dim)
    if len(bad):
        raise InputFileError(f"{name} row {bad[0]}: dimension header is {words[bad[0], 0]}, "
                             f"row 0 has {dim}")
    arr = np.ascontiguousarray(words[:, 1:].view("<f4"), dtype=np.float32)
    _check_finite(arr, name, lambda i: f"row {i}")
    return Loaded(arr)


# -- text formats ---------------------------------------------------------------------------

class _Rows:
    """Collects parsed rows, checking one dimension and ids/keys on all rows or none."""

    def __init__(self, name):
        self.name = name
        self.vectors, self.ids, self.keys, self.lines = [], [], [], []

    def fail(self, line, message):
        raise InputFileError(f"{self.name} line {line}: {message}")

    def add(self, line, vec, id_, key):
        if self.lines:
            first = self.lines[0]
            if len(vec) != len(self.vectors[0]):
                self.fail(line, f"vector has {len(vec)} components, line {first} has "
                                f"{len(self.vectors[0])}")
            for what, value, seen in (("an id", id_, self.ids[0]), ("a key", key, self.keys[0])):
                if (value is None) != (seen is None):
                    has, lacks = (line, first) if value is not None else (first, line)
                    self.fail(line, f"line {has} has {what} and line {lacks} has none: "
                                    "give ids and keys on every line or on none")
        self.vectors.append(vec)
        self.ids.append(id_)
        self.keys.append(key)
        self.lines.append(line)

    def result(self):
        if not self.lines:
            raise InputFileError(f"{self.name} holds no vectors")
        arr = np.ascontiguousarray(np.stack(self.vectors), dtype=np.float32)
        _check_finite(arr, self.name, lambda i: f"line {self.lines[i]}")
        ids = np.asarray(self.ids, np.int64) if self.ids[0] is not None else None
        keys = self.keys if self.keys[0] is not None else None
        return Loaded(arr, ids, keys)


def _check_finite(arr, name, where):
    ok = np.isfinite(arr).all(axis=1)
    if not ok.all():
        raise InputFileError(f"{name} {where(int(np.flatnonzero(~ok)[0]))}: "
                             "vector holds NaN or infinity")


def _jsonl(text, name):
    rows = _Rows(name)
    for line, raw in enumerate(text.splitlines(), 1):
        raw = raw.strip()
        if not raw:
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            rows.fail(line, f"not valid JSON ({exc.msg} at column {exc.colno})")
        id_ = key = None
        if isinstance(obj, dict):
            if "vector" not in obj:
                rows.fail(line, 'the object has no "vector" field')
            vec = obj["vector"]
            id_, key = obj.get("id"), obj.get("key")
            if id_ is not None and (isinstance(id_, bool) or not isinstance(id_, int)):
                rows.fail(line, f'"id" must be an integer, got {json.dumps(id_)}')
            if key is not None and not isinstance(key, str):
                rows.fail(line, f'"key" must be a string, got {json.dumps(key)}')
        elif isinstance(obj, list):
            vec = obj
        else:
            rows.fail(line, 'expected an object {"vector": [...]} or an array of numbers')
        arr = _numbers(vec)
        if arr is None or not len(arr):
            rows.fail(line, '"vector" must be a non-empty array of numbers')
        rows.add(line, arr, id_, key)
    return rows.result()


def _csv(text, name):
    rows = _Rows(name)
    reader = csv.reader(io.StringIO(text))
    id_col = key_col = None
    vec_cols = None
    width = None
    for cells in reader:
        line = reader.line_num
        if not cells or all(not c.strip() for c in cells):
            continue
        cells = [c.strip() for c in cells]
        if width is None:
            width = len(cells)
            if not all(_is_number(c) for c in cells):  # a header
                lower = [c.lower() for c in cells]
                id_col = lower.index("id") if "id" in lower else None
                key_col = lower.index("key") if "key" in lower else None
                vec_cols = [i for i in range(width) if i not in (id_col, key_col)]
                if not vec_cols:
                    rows.fail(line, "the header has no vector columns")
                continue
            vec_cols = list(range(width))
        if len(cells) != width:
            rows.fail(line, f"{len(cells)} columns, expected {width}")
        try:
            vec = np.array([cells[i] for i in vec_cols], dtype=np.float32)
        except ValueError:
            bad = next(i for i in vec_cols if not _is_number(cells[i]))
            rows.fail(line, f"column {bad + 1} is not a number: {cells[bad]!r}")
        id_ = key = None
        if id_col is not None and cells[id_col]:
            try:
                id_ = int(cells[id_col])
            except ValueError:
                rows.fail(line, f"id is not an integer: {cells[id_col]!r}")
        if key_col is not None and cells[key_col]:
            key = cells[key_col]
        rows.add(line, vec, id_, key)
    return rows.result()


def _is_number(cell):
    try:
        float(cell)
    except ValueError:
        return False
    return True

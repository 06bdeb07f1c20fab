"""Vectors from files: ``.npy``, ``.fvecs``, JSON lines, CSV, or standard input.

Every reader returns ``Loaded(vectors, ids, keys, metadata, documents)``: float32 (n, dim),
int64 (n,) or None, list of n str or None, list of n dict-or-None or None, list of n
str-or-None or None. A file that cannot be read or is malformed raises
:class:`InputFileError` (an :class:`~rvqstore.errors.InvalidInputError`) whose message
names the file and the line (or row, for binary files).

JSON lines hold one object per line, ``{"id": 7, "key": "doc-7", "vector": [0.1, ...],
"metadata": {"year": 2024}, "document": "text"}`` with all but ``vector`` optional, or a
bare array ``[0.1, ...]``. CSV holds numbers only, or a header whose ``id``, ``key``,
``metadata`` and ``document`` columns are taken as such and whose other columns are the
vector's components; a ``metadata`` cell holds a JSON object, and an empty ``metadata`` or
``document`` cell means none. Ids and keys are given on every row or on none:
``Store.add`` takes them for the whole batch; metadata and documents may be on some rows
only. Metadata follows :func:`rvqstore.filters.validate_metadata`'s rules, checked here so
that a refusal names the line. Ids are integers in ``[0, MAX_ID]`` (-1 pads search
results); keys are strings that UTF-8 can encode. A CSV key is taken exactly as written,
spaces included, so that what ``rvqstore export --format csv`` writes reads back the same.
"""

import contextlib
import csv
import io
import json
import os
import re
import sys
import threading
from typing import NamedTuple, Optional

import numpy as np

from .errors import InvalidInputError
from .filters import validate_metadata

FORMATS = ("npy", "fvecs", "jsonl", "csv", "parquet")
MAX_ID = 2**63 - 2
"""The largest id a file may give: ids are SQLite integers (int64), and the store numbers
the rows that come without ids from the largest id plus one."""
CSV_FIELD_LIMIT = 1 << 26
"""The longest CSV field read, in characters (64 Mi); Python's csv module stops at 128 Ki,
which a long key written by ``rvqstore export --format csv`` exceeds."""
_EXTENSIONS = {".npy": "npy", ".fvecs": "fvecs", ".parquet": "parquet", ".jsonl": "jsonl",
               ".ndjson": "jsonl",
               ".json": "jsonl", ".csv": "csv"}


class InputFileError(InvalidInputError):
    """An input file is missing, unreadable or malformed; the message names file and line."""


class Loaded(NamedTuple):
    """vectors : float32 (n, dim); ids : int64 (n,) or None; keys : list of n str or None;
    metadata : list of n dict-or-None, or None when no row has any; documents : list of n
    str-or-None, or None when no row has any."""

    vectors: np.ndarray
    ids: Optional[np.ndarray] = None
    keys: Optional[list] = None
    metadata: Optional[list] = None
    documents: Optional[list] = None


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
    Loaded(vectors float32 (n, dim), ids int64 (n,) or None, keys list or None,
    metadata list or None, documents list or None)
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
    if format == "parquet":
        if path == "-":
            raise InvalidInputError("Parquet is read from a file, not standard input")
        return _parquet(path)
    data = _read_stdin() if path == "-" else _read_file(path)
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


def _parquet(path):
    """A whole Parquet file (rvqstore.arrow reads it batch by batch; this joins them)."""
    from .arrow import read_batches

    parts = list(read_batches(path))
    if not parts or not sum(len(p.vectors) for p in parts):
        raise InputFileError(f"{path} holds no rows")

    def joined(field):
        got = [getattr(p, field) for p in parts]
        if all(g is None for g in got):
            return None
        if field == "ids":
            if any(g is None for g in got):
                raise InputFileError(f"{path}: some row groups have ids and others not")
            return np.concatenate(got)
        return [v for p, g in zip(parts, got) for v in (g if g is not None else
                                                       [None] * len(p.vectors))]

    return Loaded(np.concatenate([p.vectors for p in parts]), joined("ids"), joined("keys"),
                  joined("metadata"), joined("documents"))


def _read_file(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_stdin():
    stdin = sys.stdin  # None when the process started with descriptor 0 closed
    if stdin is None or stdin.closed:
        raise InputFileError("cannot read <stdin>: standard input is closed")
    try:
        data = getattr(stdin, "buffer", stdin).read()
    except OSError as exc:
        raise InputFileError(f"cannot read <stdin>: {exc.strerror or exc}") from None
    except ValueError:  # closed meanwhile
        raise InputFileError("cannot read <stdin>: standard input is closed") from None
    if isinstance(data, str):  # a text stream put in sys.stdin's place; decoded again later
        data = data.encode("utf-8", "surrogatepass")
    return data


def parse_vector(text, *, name="vector"):
    """A JSON array of numbers, ``'[0.1, -2, 3e-1]'``, as a float32 array of shape (dim,)."""
    try:
        value = _json(text)
    except ValueError as exc:
        raise InvalidInputError(f"{name} is not valid JSON: {exc}") from None
    vec = _numbers(value)
    if vec is None or vec.ndim != 1 or not len(vec):
        raise InvalidInputError(f"{name} must be a non-empty JSON array of numbers")
    if not np.isfinite(vec).all():
        raise InvalidInputError(f"{name} holds NaN or infinity")
    return vec


def parse_object(text, *, name="the value"):
    """A JSON object given as text, ``'{"year": {"$gte": 2024}}'``, as a dict."""
    try:
        value = _json(text)
    except ValueError as exc:
        raise InvalidInputError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{name} must be a JSON object, got {_cut(json.dumps(value))}")
    return value


def _json(text):
    """``json.loads``, with every way it refuses text as a ValueError that reads well."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} at column {exc.colno}") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise ValueError(str(exc).split(";")[0]) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None


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
        self.metadata, self.documents = [], []

    def fail(self, line, message):
        raise InputFileError(f"{self.name} line {line}: {message}")

    def add(self, line, vec, id_, key, meta=None, doc=None):
        for what, text in (("key", key), ("document", doc)):
            if text is not None:
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    self.fail(line, f"{what} {_cut(repr(text))} holds {text[exc.start]!r} at "
                                    f"character {exc.start}, a lone surrogate that UTF-8 "
                                    "cannot encode")
        if meta is not None:
            try:
                meta = validate_metadata(meta)
            except InvalidInputError as exc:
                self.fail(line, str(exc))
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
        self.metadata.append(meta)
        self.documents.append(doc)
        self.lines.append(line)

    def result(self):
        if not self.lines:
            raise InputFileError(f"{self.name} holds no vectors")
        arr = np.ascontiguousarray(np.stack(self.vectors), dtype=np.float32)
        _check_finite(arr, self.name, lambda i: f"line {self.lines[i]}")
        ids = np.asarray(self.ids, np.int64) if self.ids[0] is not None else None
        keys = self.keys if self.keys[0] is not None else None
        metadata = self.metadata if any(m is not None for m in self.metadata) else None
        documents = self.documents if any(d is not None for d in self.documents) else None
        return Loaded(arr, ids, keys, metadata, documents)


def _check_finite(arr, name, where):
    ok = np.isfinite(arr).all(axis=1)
    if not ok.all():
        raise InputFileError(f"{name} {where(int(np.flatnonzero(~ok)[0]))}: "
                             "vector holds NaN or infinity")


def _cut(text, width=60):
    """``text`` cut to ``width`` characters: a message names a value, not all of it."""
    return text if len(text) <= width else text[:width - 3] + "..."


_INTEGER = re.compile(r"[+-]?[0-9]+")


def _id(value):
    """``value`` if it is an id, an int in [0, MAX_ID] (-1 pads search results), else None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_ID else None


def _csv_id(cell):
    if not _INTEGER.fullmatch(cell):  # int() would also take "1_000" and other digits
        return None
    try:
        return _id(int(cell))
    except ValueError:  # more digits than Python converts
        return None


def _id_message(shown):
    return f"id must be an integer in [0, {MAX_ID}], got {shown}"


def _jsonl(text, name):
    rows = _Rows(name)
    for line, raw in enumerate(text.splitlines(), 1):
        raw = raw.strip()
        if not raw:
            continue
        try:
            obj = _json(raw)
        except ValueError as exc:
            rows.fail(line, f"not valid JSON ({exc})")
        id_ = key = meta = doc = None
        if isinstance(obj, dict):
            if "vector" not in obj:
                rows.fail(line, 'the object has no "vector" field')
            vec = obj["vector"]
            id_, key = obj.get("id"), obj.get("key")
            meta, doc = obj.get("metadata"), obj.get("document")
            if id_ is not None and _id(id_) is None:
                rows.fail(line, _id_message(_cut(json.dumps(id_))))
            if key is not None and not isinstance(key, str):
                rows.fail(line, f'"key" must be a string, got {_cut(json.dumps(key))}')
            if meta is not None and not isinstance(meta, dict):
                rows.fail(line, f'"metadata" must be an object, got {_cut(json.dumps(meta))}')
            if doc is not None and not isinstance(doc, str):
                rows.fail(line, f'"document" must be a string, got {_cut(json.dumps(doc))}')
        elif isinstance(obj, list):
            vec = obj
        else:
            rows.fail(line, 'expected an object {"vector": [...]} or an array of numbers')
        arr = _numbers(vec)
        if arr is None or not len(arr):
            rows.fail(line, '"vector" must be a non-empty array of numbers')
        rows.add(line, arr, id_, key, meta, doc)
    return rows.result()


_csv_limit = threading.Lock()


@contextlib.contextmanager
def _csv_field_limit(limit):
    """The csv module's field limit is one for the whole process: raise it while a file is
    read, then put it back."""
    with _csv_limit:
        before = csv.field_size_limit(limit)
        try:
            yield
        finally:
            csv.field_size_limit(before)


def _csv(text, name):
    rows = _Rows(name)
    with _csv_field_limit(CSV_FIELD_LIMIT):
        _csv_rows(rows, _records(csv.reader(io.StringIO(text)), rows))
    return rows.result()


def _records(reader, rows):
    """``(line, cells)`` for each CSV record; the csv module's errors name the line."""
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            message = str(exc)
            if "field limit" in message:
                message = f"a field is longer than {CSV_FIELD_LIMIT:,} characters"
            rows.fail(reader.line_num, message)
        yield reader.line_num, cells


def _csv_rows(rows, records):
    id_col = key_col = meta_col = doc_col = None
    vec_cols = None
    width = None
    for line, written in records:
        if not written or all(not c.strip() for c in written):
            continue
        cells = [c.strip() for c in written]
        if width is None:
            width = len(cells)
            if not all(_is_number(c) for c in cells):  # a header
                lower = [c.lower() for c in cells]
                id_col, key_col, meta_col, doc_col = (
                    lower.index(c) if c in lower else None
                    for c in ("id", "key", "metadata", "document"))
                vec_cols = [i for i in range(width)
                            if i not in (id_col, key_col, meta_col, doc_col)]
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
            rows.fail(line, f"column {bad + 1} is not a number: {_cut(repr(cells[bad]))}")
        id_ = key = None
        if id_col is not None and cells[id_col]:
            id_ = _csv_id(cells[id_col])
            if id_ is None:
                rows.fail(line, _id_message(_cut(repr(cells[id_col]))))
        if key_col is not None and written[key_col]:
            key = written[key_col]  # as written: spaces are part of a key
        meta = doc = None
        if meta_col is not None and cells[meta_col]:
            try:
                meta = _json(cells[meta_col])
            except ValueError as exc:
                rows.fail(line, f"metadata is not valid JSON ({exc})")
            if not isinstance(meta, dict):
                rows.fail(line, f"metadata must be a JSON object, got "
                                f"{_cut(repr(cells[meta_col]))}")
        if doc_col is not None and written[doc_col]:
            doc = written[doc_col]  # as written, like a key
        rows.add(line, vec, id_, key, meta, doc)


def _is_number(cell):
    try:
        float(cell)
    except ValueError:
        return False
    return True

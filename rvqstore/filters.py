"""Metadata filters: a Mongo/Chroma-style ``where`` language evaluated over columns in memory.

Every row's metadata is held as typed numpy columns (:class:`Columns`), built once and
extended as rows are added, so that a filter (:class:`Filter`) becomes a boolean mask over
all rows in a few numpy operations instead of a JSON lookup per row. The module is pure
Python and numpy: field names and values are dict keys and array contents, never SQL text.

Metadata
--------
A metadata object is a dict (or None: no metadata). Keys are non-empty strings of at most
256 characters, without NUL, not starting with ``$`` (which the filter language keeps for
its operators), that UTF-8 can encode. A key is one flat name: ``"a.b"`` is the field
called ``a.b``, not a path. Values are str, int (within int64), float (finite), bool, None,
or a list of those scalars. :func:`validate_metadata` refuses anything else with a message
naming the key and the value, and returns a normalised copy (numpy scalars become Python
numbers, tuples become lists).

Filter language
---------------
- ``{}`` matches every row, including rows without metadata.
- ``{"field": value}`` is shorthand for ``{"field": {"$eq": value}}``.
- ``{"field": {"$op": operand, ...}}``: several operators on one field are AND-ed.
- Several fields in one dict are AND-ed.
- ``{"$and": [f, ...]}``, ``{"$or": [f, ...]}``, ``{"$not": f}`` combine filters at any
  depth (``$and: []`` matches everything, ``$or: []`` nothing); ``{"field": {"$not":
  {"$op": ...}}}`` negates operators on one field. Nesting is limited to 64 levels.

Operators and their operands:

===============  ===================================  ========================================
operator         operand                              a row passes when the field's value ...
===============  ===================================  ========================================
``$eq``          a scalar (str, number, bool, None)   equals the operand
``$ne``          a scalar                             does not equal it (``not $eq``)
``$gt``          a number or a string                 is greater (same type family only)
``$gte``         a number or a string                 is greater or equal
``$lt``          a number or a string                 is less
``$lte``         a number or a string                 is less or equal
``$in``          a list of scalars                    equals one of them
``$nin``         a list of scalars                    equals none of them (``not $in``)
``$exists``      true or false                        is present (any value, None included)
``$contains``    a scalar                             is a list holding an element equal to
                                                      the operand, or a scalar equal to it
``$substring``   a string                             is a string holding the operand
``$isubstring``  a string                             is a string holding it, ignoring case
                                                      (both sides ``str.lower()``-ed)
``$size``        an int >= 0                          is a list of exactly that many elements
===============  ===================================  ========================================

Rules, applied identically by :meth:`Filter.mask` and :meth:`Filter.matches`:

- **Missing fields.** On a row that lacks the field (or has no metadata at all) ``$eq``,
  ``$gt``, ``$gte``, ``$lt``, ``$lte``, ``$in``, ``$contains``, ``$substring``,
  ``$isubstring`` and ``$size`` are false; ``$ne`` and
  ``$nin`` are true (MongoDB's rule: they are the negations of ``$eq`` and ``$in``);
  ``$exists: false`` is true; ``$not`` negates whatever its filter gives. A field whose
  value is None is present: ``{"f": None}`` matches it, not a row lacking ``f``.
- **Types.** int and float are one family, compared by exact value (``1 == 1.0``, and
  ints beyond 2**53 are not rounded). Strings compare with strings, by Unicode code
  point. A bool equals only a bool (``True`` is not ``1``); None equals only None.
  Comparing across families is false, so ``$ne`` across families is true.
- **Ordering** (``$gt $gte $lt $lte``) needs a number or a string operand; a bool, None
  or list operand is an error. Rows whose value is of another family fail.
- **Lists.** A list value is compared as a whole by every operator but ``$contains``: it
  equals no scalar, so ``$eq``/``$in``/ordering are false on it and ``$ne``/``$nin``
  true. ``$contains`` is the membership test, with the equality rules above for the
  elements; on a scalar value it is plain equality, so a field that holds ``"a"`` on
  one row and ``["a", "b"]`` on another matches ``{"$contains": "a"}`` on both. To
  match a list holding any of several values, ``$or`` several ``$contains``.
- **Operands** follow the value rules: finite floats, ints within int64, strings UTF-8
  can encode. An unknown operator or an ill-typed operand is an
  :class:`~rvqstore.errors.InvalidInputError` naming the operator and the field.

Memory: per field, one int8 kind byte per row, plus 8 bytes per row (float64) if any row
holds a number, 1 (int8) if any holds a bool, 4 (int32 code) if any holds a string, and
for list values 8 bytes per row of offsets and 4 per element; each distinct string costs
its Python size once. :attr:`Columns.nbytes` reports the total.
"""

from __future__ import annotations

import math
import operator
import sys
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from .errors import InvalidInputError

__all__ = ["Columns", "Filter", "validate_metadata", "MAX_KEY_LENGTH", "MAX_DEPTH"]

MAX_KEY_LENGTH = 256
MAX_DEPTH = 64
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_MISSING, _NULL, _BOOL, _NUM, _STR, _LIST = range(6)
_ORDER_OPS = ("$gt", "$gte", "$lt", "$lte")
_TEXT_OPS = ("$substring", "$isubstring")
_FIELD_OPS = (("$eq", "$ne", "$in", "$nin", "$exists", "$contains", "$size") + _TEXT_OPS
              + _ORDER_OPS)
_PY_CMP = {"$eq": operator.eq, "$gt": operator.gt, "$gte": operator.ge,
           "$lt": operator.lt, "$lte": operator.le}


# ----------------------------------------------------------------------------- values

def _show(x, limit=60):
    """repr of a key or value for a message, shortened: keys may be 256 characters."""
    r = repr(x)
    if len(r) <= limit:
        return r
    extra = f" ({len(x)} characters)" if isinstance(x, str) else ""
    return r[:limit] + "..." + extra


def _type_name(x):
    if x is None:
        return "None"
    if isinstance(x, float) and not math.isfinite(x):
        return f"non-finite float {x!r}"
    if isinstance(x, int) and not isinstance(x, bool) and not _INT_MIN <= x <= _INT_MAX:
        return "int outside int64"
    return type(x).__name__


def _scalar(x):
    """x as a Python scalar (None, bool, int, float, str), or raise ValueError with the reason."""
    t = type(x)
    if t is str:
        try:
            x.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"string {_show(x)} is not valid Unicode (UTF-8 cannot encode it)")
        return x
    if x is None or t is bool:
        return x
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        x = int(x)
        if not _INT_MIN <= x <= _INT_MAX:
            raise ValueError(f"int {x} is outside int64")
        return x
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"{x!r} is not a finite number")
        return x
    if isinstance(x, str):
        return _scalar(str(x))
    raise ValueError(f"a {type(x).__name__} is not a str, int, float, bool or None")


def _family(x):
    """The comparison family of a Python value: values of different families never compare."""
    if x is None:
        return _NULL
    t = type(x)
    if t is bool:
        return _BOOL
    if t is int or t is float:
        return _NUM
    if t is str:
        return _STR
    return _LIST


def _key(x):
    """Dict key that equals exactly when the filter rules call two scalars equal."""
    return (_family(x), x)


def validate_metadata(meta: Any) -> Optional[dict]:
    """Check one item's metadata and return a normalised copy (or None).

    Raises :class:`InvalidInputError` naming the key and value at fault; the rules are in
    the module docstring.
    """
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise InvalidInputError(f"metadata must be a dict or None, got {type(meta).__name__}")
    out = {}
    for k, v in meta.items():
        if not isinstance(k, str):
            raise InvalidInputError(
                f"metadata keys must be strings, got {type(k).__name__} {_show(k)}")
        if not k:
            raise InvalidInputError("metadata key is empty")
        if len(k) > MAX_KEY_LENGTH:
            raise InvalidInputError(
                f"metadata key {_show(k)} is longer than {MAX_KEY_LENGTH} characters")
        if "\x00" in k:
            raise InvalidInputError(f"metadata key {_show(k)} contains NUL")
        if k.startswith("$"):
            raise InvalidInputError(
                f"metadata key {_show(k)} starts with '$', which filters keep for operators")
        try:
            _scalar(k)
            if isinstance(v, (list, tuple)):
                out[k] = [_list_element(e) for e in v]
            else:
                out[k] = _scalar(v)
        except ValueError as e:
            raise InvalidInputError(f"metadata key {_show(k)}: {e}") from None
    return out


def _plain_scalar(x):
    """True when ``x`` (a value JSON decoding gave) is a scalar validate_metadata keeps as it
    is: the common case, checked without building anything."""
    t = type(x)
    if t is str:
        return x.isascii() or _scalar_ok(x)
    if t is int:
        return _INT_MIN <= x <= _INT_MAX
    if t is float:
        return math.isfinite(x)
    return x is None or t is bool


def _scalar_ok(x):
    try:
        _scalar(x)
    except ValueError:
        return False
    return True


def is_plain_metadata(meta: Any) -> bool:
    """True when ``meta`` (decoded JSON) is a dict that :func:`validate_metadata` would return
    unchanged: lets stored metadata, read back by the thousand, skip the full check (and
    its copy). False says nothing: run :func:`validate_metadata` for the verdict."""
    if type(meta) is not dict:
        return False
    for k, v in meta.items():
        if not (type(k) is str and k and len(k) <= MAX_KEY_LENGTH and k.isascii()
                and "\x00" not in k and k[0] != "$"):
            return False
        if type(v) is list:
            if not all(_plain_scalar(e) for e in v):
                return False
        elif not _plain_scalar(v):
            return False
    return True


def _list_element(e):
    if isinstance(e, (list, tuple, dict)):
        raise ValueError(f"a list may hold only scalars, not a {type(e).__name__}")
    return _scalar(e)


# ----------------------------------------------------------------------------- columns

@dataclass(eq=False)
class _Field:
    """One field's values over rows 0..n-1; arrays a field never uses are None."""

    kind: np.ndarray                     # int8 (n,): _MISSING, _NULL, _BOOL, _NUM, _STR, _LIST
    num: Optional[np.ndarray] = None     # float64 (n,): the number, NaN where not a number
    bools: Optional[np.ndarray] = None   # int8 (n,): 0/1, -1 where not a bool
    codes: Optional[np.ndarray] = None   # int32 (n,): index into vocab, -1 where not a string
    vocab: tuple = ()                    # distinct strings, by code
    vocab_index: dict = field(default_factory=dict)
    big_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    big_vals: tuple = ()                 # exact ints of big_rows (float64 rounds them)
    list_off: Optional[np.ndarray] = None   # int64 (n+1,): row i's elements are [off[i], off[i+1])
    list_elems: Optional[np.ndarray] = None  # int32: index into list_vocab
    list_vocab: tuple = ()               # distinct element keys (_key), by code
    list_index: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict)  # lazily built: string ranks, postings

    def string_rank(self):
        """(sorted vocabulary, rank of each code): code-point order for $gt & co."""
        if "rank" not in self._cache:
            order = sorted(range(len(self.vocab)), key=self.vocab.__getitem__)
            rank = np.empty(len(order), np.int64)
            rank[order] = np.arange(len(order))
            self._cache["rank"] = ([self.vocab[i] for i in order], rank)
        return self._cache["rank"]

    def postings(self):
        """(rows sorted by element code, start of each code in it): $contains in O(matches)."""
        if "post" not in self._cache:
            n = len(self.kind)
            rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(self.list_off))
            order = np.argsort(self.list_elems, kind="stable")
            start = np.zeros(len(self.list_vocab) + 1, np.int64)
            np.cumsum(np.bincount(self.list_elems, minlength=len(self.list_vocab)), out=start[1:])
            self._cache["post"] = (rows[order], start)
        return self._cache["post"]

    def nbytes(self):
        arrays = (self.kind, self.num, self.bools, self.codes, self.big_rows, self.list_off,
                  self.list_elems)
        total = sum(a.nbytes for a in arrays if a is not None)
        total += sum(sys.getsizeof(s) + 100 for s in self.vocab)  # +dict entry, tuple slot
        total += sum(sys.getsizeof(k[1]) + 150 for k in self.list_vocab)
        total += sum(sys.getsizeof(v) for v in self.big_vals)
        for cached in self._cache.values():
            total += sum(getattr(a, "nbytes", sys.getsizeof(a)) for a in cached)
        return total


def _chunk_field(n, rows_by_kind, elems, lengths):
    """A _Field over n rows from what one pass over the metadata collected."""
    kind = np.zeros(n, np.int8)
    for k, (rows, _) in rows_by_kind.items():
        kind[rows] = k
    f = _Field(kind=kind)
    if _NUM in rows_by_kind:
        rows, vals = rows_by_kind[_NUM]
        f.num = np.full(n, np.nan)
        f.num[rows] = vals
        big = [(r, v) for r, v in zip(rows, vals) if type(v) is int and int(float(v)) != v]
        if big:
            f.big_rows = np.array([r for r, _ in big], np.int64)
            f.big_vals = tuple(v for _, v in big)
    if _BOOL in rows_by_kind:
        rows, vals = rows_by_kind[_BOOL]
        f.bools = np.full(n, -1, np.int8)
        f.bools[rows] = vals
    if _STR in rows_by_kind:
        rows, vals = rows_by_kind[_STR]
        f.vocab = tuple(sorted(set(vals)))
        f.vocab_index = {s: i for i, s in enumerate(f.vocab)}
        f.codes = np.full(n, -1, np.int32)
        f.codes[rows] = [f.vocab_index[s] for s in vals]
    if _LIST in rows_by_kind:
        keys = [_key(e) for e in elems]
        f.list_index = {}
        for key in keys:
            f.list_index.setdefault(key, len(f.list_index))
        f.list_vocab = tuple(f.list_index)
        f.list_elems = np.array([f.list_index[key] for key in keys], np.int32)
        counts = np.zeros(n, np.int64)
        counts[rows_by_kind[_LIST][0]] = lengths
        f.list_off = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=f.list_off[1:])
    return f


def _merged_vocab(old_vocab, old_index, new_vocab):
    """(vocab, index, remap) with new words appended; remap[-1] == -1 keeps the sentinel."""
    index = dict(old_index)
    remap = np.empty(len(new_vocab) + 1, np.int32)
    remap[-1] = -1
    for i, w in enumerate(new_vocab):
        remap[i] = index.setdefault(w, len(index))
    return tuple(index), index, remap


def _cat(a, b, na, nb, fill, dtype):
    if a is None and b is None:
        return None
    a = np.full(na, fill, dtype) if a is None else a
    b = np.full(nb, fill, dtype) if b is None else b
    return np.concatenate([a, b])


def _concat_fields(a: Optional[_Field], b: Optional[_Field], na, nb) -> _Field:
    a = a or _Field(kind=np.zeros(na, np.int8))
    b = b or _Field(kind=np.zeros(nb, np.int8))
    f = _Field(kind=np.concatenate([a.kind, b.kind]))
    f.num = _cat(a.num, b.num, na, nb, np.nan, np.float64)
    f.bools = _cat(a.bools, b.bools, na, nb, -1, np.int8)
    f.big_rows = np.concatenate([a.big_rows, b.big_rows + na])
    f.big_vals = a.big_vals + b.big_vals
    if b.codes is None:
        f.vocab, f.vocab_index = a.vocab, a.vocab_index
        f.codes = _cat(a.codes, None, na, nb, -1, np.int32)
    else:
        f.vocab, f.vocab_index, remap = _merged_vocab(a.vocab, a.vocab_index, b.vocab)
        f.codes = _cat(a.codes, remap[b.codes], na, nb, -1, np.int32)
    if a.list_off is None and b.list_off is None:
        return f
    a_off = np.zeros(na + 1, np.int64) if a.list_off is None else a.list_off
    b_off = np.zeros(nb + 1, np.int64) if b.list_off is None else b.list_off
    f.list_off = np.concatenate([a_off, b_off[1:] + a_off[-1]])
    a_el = np.zeros(0, np.int32) if a.list_elems is None else a.list_elems
    b_el = np.zeros(0, np.int32) if b.list_elems is None else b.list_elems
    f.list_vocab, f.list_index, remap = _merged_vocab(a.list_vocab, a.list_index, b.list_vocab)
    f.list_elems = np.concatenate([a_el, remap[b_el]])
    return f


def _take_field(f: _Field, rows: np.ndarray) -> Optional[_Field]:
    kind = f.kind[rows]
    if not kind.any():
        return None
    g = _Field(kind=kind, vocab=f.vocab, vocab_index=f.vocab_index,
               list_vocab=f.list_vocab, list_index=f.list_index)
    g.num = None if f.num is None else f.num[rows]
    g.bools = None if f.bools is None else f.bools[rows]
    g.codes = None if f.codes is None else f.codes[rows]
    if f.big_rows.size:
        at = np.searchsorted(f.big_rows, rows)
        at = np.minimum(at, f.big_rows.size - 1)
        new = np.nonzero(f.big_rows[at] == rows)[0]
        g.big_rows = new.astype(np.int64)
        g.big_vals = tuple(f.big_vals[i] for i in at[new])
    if f.list_off is not None:
        starts, counts = f.list_off[rows], np.diff(f.list_off)[rows]
        g.list_off = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(counts, out=g.list_off[1:])
        # element j of new row i sits at starts[i] + j
        within = np.arange(g.list_off[-1]) - np.repeat(g.list_off[:-1], counts)
        g.list_elems = f.list_elems[np.repeat(starts, counts) + within]
    return g


class Columns:
    """Every row's metadata held in memory as typed columns, aligned with rows 0..n-1.

    Immutable: :meth:`extended` and :meth:`taken` return new objects (sharing the
    string vocabularies, never the arrays), so a reader holding one keeps a consistent view.
    """

    __slots__ = ("_n", "_fields")

    def __init__(self, n: int = 0, fields: Optional[dict] = None):
        self._n = n
        self._fields = fields or {}
        for f in self._fields.values():
            for a in (f.kind, f.num, f.bools, f.codes, f.big_rows, f.list_off, f.list_elems):
                if a is not None:
                    a.flags.writeable = False

    @classmethod
    def from_dicts(cls, metas: Sequence[Optional[dict]]) -> "Columns":
        """Columns for ``metas`` (one dict or None per row); a value the rules refuse raises
        :class:`InvalidInputError` naming its row and key (a store file is input too)."""
        return cls().extended(metas)

    def __len__(self) -> int:
        return self._n

    def __repr__(self):
        return f"Columns(rows={self._n}, fields={len(self._fields)}, nbytes={self.nbytes})"

    @property
    def fields(self) -> tuple:
        """The field names some row holds (for inspection)."""
        return tuple(self._fields)

    @property
    def nbytes(self) -> int:
        """Approximate memory held: arrays, vocabularies and lazily built indexes."""
        return sum(f.nbytes() + sys.getsizeof(name) for name, f in self._fields.items())

    def extended(self, metas: Sequence[Optional[dict]]) -> "Columns":
        """A new Columns with ``metas`` appended as rows n, n+1, ...; self is unchanged.

        Costs O(n) per call (the arrays are copied): append in batches, not one row at a time.
        """
        nb = len(metas)
        chunk = _collect(metas)
        names = list(self._fields) + [k for k in chunk if k not in self._fields]
        fields = {}
        for name in names:
            a, b = self._fields.get(name), chunk.get(name)
            if b is None:
                fields[name] = _concat_fields(a, None, self._n, nb) if nb else a
            else:
                fields[name] = _concat_fields(a, _chunk_field(nb, *b), self._n, nb)
        return Columns(self._n + nb, fields)

    def taken(self, rows: np.ndarray) -> "Columns":
        """A new Columns whose row i is row ``rows[i]`` of self.

        rows : integer array of shape (m,), values in [0, n); repeats allowed.
        """
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise InvalidInputError(
                f"rows must be a 1-d integer array, got {rows.dtype} shape {rows.shape}")
        rows = rows.astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self._n):
            raise InvalidInputError(
                f"rows must lie in [0, {self._n}), got [{rows.min()}, {rows.max()}]")
        fields = {}
        for name, f in self._fields.items():
            g = _take_field(f, rows)
            if g is not None:
                fields[name] = g
        return Columns(len(rows), fields)

    def _field(self, name) -> Optional[_Field]:
        return self._fields.get(name)


def _collect(metas):
    """One pass over metas: per field, (rows and values by kind, list elements, list lengths)."""
    acc = {}
    for i, m in enumerate(metas):
        if m is None:
            continue
        if not isinstance(m, dict):
            raise InvalidInputError(
                f"metadata of row {i} is a {type(m).__name__}, not a dict or None")
        for k, v in m.items():
            by_kind, elems, lengths = acc.get(k) or _new_field(acc, k, i)
            t = type(v)  # the common types first: this loop is the cost of opening a store
            if t is str:
                kind = _STR  # strings are checked once per distinct value, below
            elif t is int and _INT_MIN <= v <= _INT_MAX:
                kind = _NUM
            elif t is float:
                kind = _NUM  # finiteness is checked on the array, below
            elif t is bool:
                kind, v = _BOOL, int(v)
            elif v is None:
                kind = _NULL
            else:
                try:
                    if isinstance(v, (list, tuple)):
                        vals = [_list_element(e) for e in v]
                        elems.extend(vals)
                        lengths.append(len(vals))
                        kind, v = _LIST, None
                    else:
                        v = _scalar(v)
                        kind = _family(v)
                        v = int(v) if kind == _BOOL else v
                except ValueError as e:
                    raise InvalidInputError(f"metadata of row {i}, key {_show(k)}: {e}") from None
            rows, values = by_kind.get(kind) or by_kind.setdefault(kind, ([], []))
            rows.append(i)
            values.append(v)
    for k, (by_kind, _, _) in acc.items():
        rows, values = by_kind.get(_STR, ((), ()))
        for w in set(values):
            _checked(k, rows, values, w, _scalar)
        rows, values = by_kind.get(_NUM, ((), ()))
        if values and not np.isfinite(np.array(values, np.float64)).all():
            _checked(k, rows, values, next(x for x in values if not math.isfinite(x)), _scalar)
    return acc


def _new_field(acc, k, i):
    if type(k) is not str:
        raise InvalidInputError(f"metadata of row {i}: key {_show(k)} is not a string")
    return acc.setdefault(k, ({}, [], []))


def _checked(key, rows, values, x, check):
    try:
        check(x)
    except ValueError as e:
        row = rows[values.index(x)]
        raise InvalidInputError(f"metadata of row {row}, key {_show(key)}: {e}") from None


# ----------------------------------------------------------------------------- predicates

def _num_cmp(f: _Field, op, x, n):
    """Rows whose number compares ``op`` with the number x, exactly (no rounding of x)."""
    if f.num is None:
        return np.zeros(n, bool)
    xf = float(x)
    r = int(xf)
    if type(x) is int and r != x:
        # x is not a float64: num rows are exact, so num == xf means the value is r, not x
        if op == "$eq":
            m = np.zeros(n, bool)
        elif op in ("$lt", "$lte"):
            m = f.num <= xf if r < x else f.num < xf
        else:
            m = f.num >= xf if r > x else f.num > xf
    else:
        m = _PY_CMP[op](f.num, xf)
    for row, v in zip(f.big_rows, f.big_vals):  # ints that float64 rounds: compare exactly
        m[row] = _PY_CMP[op](v, x)
    return m


def _eq_mask(f: _Field, x, n):
    fam = _family(x)
    if fam == _NULL:
        return f.kind == _NULL
    if fam == _BOOL:
        return np.zeros(n, bool) if f.bools is None else f.bools == int(x)
    if fam == _STR:
        code = f.vocab_index.get(x)
        return np.zeros(n, bool) if code is None or f.codes is None else f.codes == code
    return _num_cmp(f, "$eq", x, n)


def _in_mask(f: _Field, xs, n):
    m = np.zeros(n, bool)
    strs = [f.vocab_index[x] for x in xs if type(x) is str and x in f.vocab_index]
    if strs and f.codes is not None:
        if len(strs) <= 8:
            for c in strs:
                m |= f.codes == c
        else:
            table = np.zeros(len(f.vocab) + 1, bool)  # last slot: code -1, not a string
            table[strs] = True
            m |= np.take(table, f.codes)
    nums = [x for x in xs if _family(x) == _NUM]
    if nums and f.num is not None:
        exact = [float(x) for x in nums if type(x) is float or int(float(x)) == x]
        if exact:
            m |= np.isin(f.num, exact)
        for row, v in zip(f.big_rows, f.big_vals):
            m[row] = any(v == x for x in nums)
    for x in set(x for x in xs if _family(x) in (_BOOL, _NULL)):
        m |= _eq_mask(f, x, n)
    return m


def _str_order(f: _Field, op, s, n):
    if f.codes is None:
        return np.zeros(n, bool)
    words, rank = f.string_rank()
    lo, hi = bisect_left(words, s), bisect_right(words, s)
    ok = {"$lt": rank < lo, "$lte": rank < hi, "$gt": rank >= hi, "$gte": rank >= lo}[op]
    table = np.append(ok, False)  # code -1 (not a string) reads the last slot
    return np.take(table, f.codes)


def _contains_mask(f: _Field, x, n):
    m = _eq_mask(f, x, n)
    code = f.list_index.get(_key(x))
    if code is not None:
        rows, start = f.postings()
        m[rows[start[code]:start[code + 1]]] = True
    return m


def _substring_mask(f: _Field, op, x, n):
    """Rows holding a string that contains x (per distinct string once, then by code)."""
    if f.codes is None:
        return np.zeros(n, bool)
    if op == "$isubstring":
        x = x.lower()
        table = np.fromiter((x in w.lower() for w in f.vocab), bool, len(f.vocab))
    else:
        table = np.fromiter((x in w for w in f.vocab), bool, len(f.vocab))
    return np.take(np.append(table, False), f.codes)  # code -1 (not a string): last slot


def _size_mask(f: _Field, x, n):
    if f.list_off is None:
        return np.zeros(n, bool)
    return (f.kind == _LIST) & (np.diff(f.list_off) == x)


# ----------------------------------------------------------------------------- filter tree

class _Node:
    def mask(self, cols: Columns) -> np.ndarray:
        raise NotImplementedError

    def matches(self, meta) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class _And(_Node):
    children: tuple

    def mask(self, cols):
        if not self.children:
            return np.ones(len(cols), bool)
        m = self.children[0].mask(cols)
        for c in self.children[1:]:
            m &= c.mask(cols)
        return m

    def matches(self, meta):
        return all(c.matches(meta) for c in self.children)


@dataclass(frozen=True)
class _Or(_Node):
    children: tuple

    def mask(self, cols):
        m = np.zeros(len(cols), bool)
        for c in self.children:
            m |= c.mask(cols)
        return m

    def matches(self, meta):
        return any(c.matches(meta) for c in self.children)


@dataclass(frozen=True)
class _Not(_Node):
    child: _Node

    def mask(self, cols):
        return np.logical_not(self.child.mask(cols))

    def matches(self, meta):
        return not self.child.matches(meta)


@dataclass(frozen=True)
class _Pred(_Node):
    field: str
    op: str
    operand: Any

    def mask(self, cols):
        n, op, x = len(cols), self.op, self.operand
        f = cols._field(self.field)
        if f is None:  # no row has the field: the missing-field rule for all rows
            return np.full(n, op in ("$ne", "$nin") or (op == "$exists" and not x))
        if op == "$eq":
            return _eq_mask(f, x, n)
        if op == "$ne":
            return np.logical_not(_eq_mask(f, x, n))
        if op == "$in":
            return _in_mask(f, x, n)
        if op == "$nin":
            return np.logical_not(_in_mask(f, x, n))
        if op == "$exists":
            return f.kind != _MISSING if x else f.kind == _MISSING
        if op == "$contains":
            return _contains_mask(f, x, n)
        if op in _TEXT_OPS:
            return _substring_mask(f, op, x, n)
        if op == "$size":
            return _size_mask(f, x, n)
        if type(x) is str:
            return _str_order(f, op, x, n)
        return _num_cmp(f, op, x, n)

    def matches(self, meta):
        """The rules in plain Python, one row at a time: the reference for mask()."""
        op, x = self.op, self.operand
        present = meta is not None and self.field in meta
        v = meta[self.field] if present else None
        if op == "$exists":
            return present == x
        if op == "$ne":
            return not (present and _py_eq(v, x))
        if op == "$nin":
            return not (present and any(_py_eq(v, y) for y in x))
        if not present:
            return False
        if op == "$eq":
            return _py_eq(v, x)
        if op == "$in":
            return any(_py_eq(v, y) for y in x)
        if op == "$contains":
            return any(_py_eq(e, x) for e in v) if isinstance(v, list) else _py_eq(v, x)
        if op == "$substring":
            return type(v) is str and x in v
        if op == "$isubstring":
            return type(v) is str and x.lower() in v.lower()
        if op == "$size":
            return isinstance(v, list) and len(v) == x
        return _family(v) == _family(x) and _PY_CMP[op](v, x)


def _py_eq(a, b):
    fa = _family(a)
    return fa == _family(b) and fa != _LIST and a == b


class Filter:
    """A parsed ``where`` filter; the language and its rules are in the module docstring."""

    __slots__ = ("_root", "where")

    def __init__(self, root: _Node, where: dict):
        self._root = root
        self.where = where

    def __repr__(self):
        return f"Filter({self.where!r})"

    @classmethod
    def parse(cls, where: dict) -> "Filter":
        """Validate ``where`` and build the filter; InvalidInputError names what is wrong."""
        return cls(_parse(where, 0), where)

    def mask(self, cols: Columns) -> np.ndarray:
        """bool ndarray of shape (len(cols),): the rows that pass."""
        return self._root.mask(cols)

    def matches(self, meta: Optional[dict]) -> bool:
        """Whether one item's metadata passes: the plain-Python reference for :meth:`mask`."""
        return self._root.matches(meta)


def _parse(where, depth) -> _Node:
    if not isinstance(where, dict):
        raise InvalidInputError(f"a filter must be a dict, got {type(where).__name__}")
    if depth > MAX_DEPTH:
        raise InvalidInputError(f"filter nests deeper than {MAX_DEPTH} levels")
    nodes = []
    for k, v in where.items():
        if not isinstance(k, str):
            raise InvalidInputError(
                f"filter keys must be strings, got {type(k).__name__} {_show(k)}")
        if k in ("$and", "$or"):
            if not isinstance(v, (list, tuple)):
                raise InvalidInputError(f"{k} needs a list of filters, got {_type_name(v)}")
            children = tuple(_parse(c, depth + 1) for c in v)
            nodes.append(_And(children) if k == "$and" else _Or(children))
        elif k == "$not":
            if not isinstance(v, dict):
                raise InvalidInputError(f"$not needs a filter (a dict), got {_type_name(v)}")
            nodes.append(_Not(_parse(v, depth + 1)))
        elif k.startswith("$"):
            raise InvalidInputError(
                f"unknown operator {_show(k)} (logical operators: $and, $or, $not)")
        elif isinstance(v, dict):
            nodes.append(_parse_ops(k, v, depth + 1))
        else:
            nodes.append(_pred(k, "$eq", v))
    return nodes[0] if len(nodes) == 1 else _And(tuple(nodes))  # {} -> _And(()): all rows


def _parse_ops(name, ops, depth) -> _Node:
    if depth > MAX_DEPTH:
        raise InvalidInputError(f"filter nests deeper than {MAX_DEPTH} levels")
    if not ops:
        raise InvalidInputError(f"field {_show(name)} has an empty operator dict")
    nodes = []
    for op, x in ops.items():
        if op == "$not":
            if not isinstance(x, dict):
                raise InvalidInputError(f"$not on field {_show(name)} needs a dict of "
                                        f"operators, got {_type_name(x)}")
            nodes.append(_Not(_parse_ops(name, x, depth + 1)))
        elif op in _FIELD_OPS:
            nodes.append(_pred(name, op, x))
        else:
            raise InvalidInputError(f"unknown operator {_show(op)} on field {_show(name)} "
                                    f"(operators: {', '.join(_FIELD_OPS)}, $not)")
    return nodes[0] if len(nodes) == 1 else _And(tuple(nodes))


def _pred(name, op, x) -> _Pred:
    where = f"{op} on field {_show(name)}"
    if op == "$exists":
        if type(x) is not bool:
            raise InvalidInputError(f"{where} needs true or false, got {_type_name(x)}")
        return _Pred(name, op, x)
    if op in _TEXT_OPS:
        if not isinstance(x, str):
            raise InvalidInputError(f"{where} needs a string, got {_type_name(x)}")
        return _Pred(name, op, _operand(where, "a string", x))
    if op == "$size":
        if type(x) is bool or not isinstance(x, (int, np.integer)) or x < 0:
            raise InvalidInputError(f"{where} needs an int >= 0, got {_show(x)}")
        return _Pred(name, op, int(x))
    if op in ("$in", "$nin"):
        if not isinstance(x, (list, tuple)):
            raise InvalidInputError(f"{where} needs a list of scalars, got {_type_name(x)}")
        return _Pred(name, op, tuple(_operand(where, "scalars in its list", e) for e in x))
    if op in _ORDER_OPS:
        if isinstance(x, bool) or not isinstance(x, (int, float, str, np.integer, np.floating)):
            raise InvalidInputError(f"{where} needs a number or a string, got {_type_name(x)}")
    what = ("a number or a string" if op in _ORDER_OPS
            else "a scalar (str, int, float, bool or None)")
    hint = "; use $contains for list members" if op in ("$eq", "$ne") else ""
    return _Pred(name, op, _operand(where, what, x, hint))


def _operand(where, what, x, hint=""):
    if isinstance(x, (list, tuple, dict)):
        raise InvalidInputError(f"{where} needs {what}, got {_type_name(x)}{hint}")
    try:
        return _scalar(x)
    except ValueError as e:
        raise InvalidInputError(f"{where} needs {what}: {e}") from None

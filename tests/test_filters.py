"""The metadata filter language: Filter.mask over Columns against the reference Filter.matches."""

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rvqstore.errors import InvalidInputError
from rvqstore.filters import MAX_DEPTH, Columns, Filter, validate_metadata

HOSTILE = ["'; DROP TABLE items;--", 'a"b', "x' OR '1'='1", "é" * 256, "名前", " ", "a.b",
           "\\", "%_", "json_extract(metadata, '$.a')"]
FIELDS = ["a", "b", "c", HOSTILE[0]]
POOL = [0, 1, -1, 2, 1.0, 0.5, -0.0, 2.5, -7.25, 2**53, 2**53 + 1, 2**53 + 2, float(2**53),
        2**53 + 3, 2**53 + 4, float(2**53 + 4), 2**63 - 1, -(2**63), float(2**63), 9.2e18, 1e300,
        True, False, None,
        "", "a", "b", "ab", "B", "é", "\x00", "a\x00", 'x"y', "z" * 300, "日本"] + HOSTILE
ORDER_OPS = ["$gt", "$gte", "$lt", "$lte"]
PROPERTY = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEXT_OPS = ["$substring", "$isubstring"]
ALL_OPS = ["$eq", "$ne", "$in", "$nin", "$exists", "$contains", "$size"] + TEXT_OPS + ORDER_OPS

any_scalar = st.one_of(
    st.sampled_from(POOL),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
)


def _orderable(x):
    return not isinstance(x, bool) and x is not None


def _strategies(pool, fresh):
    """scalars, values and operands drawn mostly from ``pool``, so that equal values (the
    edges of $gte versus $gt, of True versus 1) turn up in most examples."""
    scalars = st.one_of(st.sampled_from(pool), any_scalar) if fresh else st.sampled_from(pool)
    values = st.one_of(scalars, st.lists(scalars, max_size=4))
    orderable = st.one_of(scalars.filter(_orderable), st.sampled_from([0, "a", 2**53 + 1]))
    pieces = st.one_of(scalars.filter(lambda x: isinstance(x, str)).map(lambda w: w[:2]),
                       st.sampled_from(["", "A", "b", "É", "\x00"]))
    operand = {"$in": st.lists(scalars, max_size=12), "$nin": st.lists(scalars, max_size=12),
               "$exists": st.booleans(), "$size": st.integers(0, 4),
               **{op: orderable for op in ORDER_OPS}, **{op: pieces for op in TEXT_OPS}}
    return scalars, values, lambda op: operand.get(op, scalars)


TWINS = [  # values the rules tell apart although Python or float64 nearly confuse them
    (1, True, 1.0, "1"), (0, False, -0.0, None, ""), ("a", "a\x00", "A", "b", "ab"),
    (2**53, 2**53 + 1, float(2**53), 2**53 + 2), (2**53 + 3, 2**53 + 4, float(2**53 + 4)),
    (2**63 - 1, float(2**63), -(2**63), float(-(2**63))), (HOSTILE[0], HOSTILE[1], "z" * 300),
]
pools = st.tuples(st.lists(st.sampled_from(TWINS), min_size=1, max_size=2),
                  st.lists(st.one_of(st.sampled_from(POOL), any_scalar), max_size=4)).map(
    lambda t: [None] + [x for twins in t[0] for x in twins] + t[1])


def _metas(values):
    return st.lists(st.one_of(st.none(), st.dictionaries(st.sampled_from(FIELDS), values,
                                                         max_size=4)), min_size=1, max_size=40)


@st.composite
def cases(draw):
    """Random metadata and a random filter of every operator and nesting."""
    scalars, values, operand = _strategies(draw(pools), draw(st.booleans()))
    metas = draw(_metas(values))
    ops_dict = st.recursive(
        st.sampled_from(ALL_OPS).flatmap(lambda op: operand(op).map(lambda x: {op: x})),
        lambda inner: st.one_of(st.tuples(inner, inner).map(lambda t: {**t[0], **t[1]}),
                                inner.map(lambda d: {"$not": d})),
        max_leaves=3)
    field_names = st.sampled_from(FIELDS + ["missing"])
    leaf = st.one_of(st.tuples(field_names, scalars).map(lambda t: {t[0]: t[1]}),
                     st.tuples(field_names, ops_dict).map(lambda t: {t[0]: t[1]}))
    where = draw(st.recursive(
        st.one_of(st.just({}), leaf),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3).map(lambda xs: {"$and": xs}),
            st.lists(inner, max_size=3).map(lambda xs: {"$or": xs}),
            inner.map(lambda x: {"$not": x}),
            st.tuples(leaf, leaf).map(lambda t: {**t[0], **t[1]})),
        max_leaves=6))
    return [validate_metadata(m) for m in metas], where


@st.composite
def one_operator_cases(draw, op):
    scalars, values, operand = _strategies(draw(pools), draw(st.booleans()))
    metas = draw(_metas(values))
    where = {draw(st.sampled_from(FIELDS)): {op: draw(operand(op))}}
    return [validate_metadata(m) for m in metas], where


def reference(f, metas):
    return np.array([f.matches(m) for m in metas], dtype=bool)


def check(where, metas, cols=None):
    f = Filter.parse(where)
    cols = Columns.from_dicts(metas) if cols is None else cols
    got = f.mask(cols)
    assert got.dtype == bool and got.shape == (len(metas),)
    want = reference(f, metas)
    bad = np.nonzero(got != want)[0]
    assert not bad.size, (where, [(metas[i], got[i], want[i]) for i in bad[:3]])
    return got


# ----------------------------------------------------------------------------- mask == matches

@settings(max_examples=600, **PROPERTY)
@given(case=cases())
def test_mask_equals_reference(case):
    metas, where = case
    check(where, metas)


@pytest.mark.parametrize("op", ALL_OPS)
@settings(max_examples=200, **PROPERTY)
@given(data=st.data())
def test_each_operator_matches_reference(op, data):
    metas, where = data.draw(one_operator_cases(op))
    check(where, metas)


@settings(max_examples=200, **PROPERTY)
@given(case=cases(), data=st.data())
def test_mask_equals_reference_after_extended_and_taken(case, data):
    metas, where = case
    cut = data.draw(st.integers(0, len(metas)))
    cols = Columns.from_dicts(metas[:cut]).extended(metas[cut:])
    check(where, metas, cols)
    rows = np.array(data.draw(st.lists(st.integers(0, max(len(metas) - 1, 0)),
                                       max_size=40 if metas else 0)), dtype=np.int64)
    check(where, [metas[i] for i in rows], cols.taken(rows))


def _seeded_metas(n, seed):
    rng = np.random.default_rng(seed)
    words = [f"w{i:03d}" for i in range(40)] + HOSTILE
    metas = []
    for _ in range(n):
        if rng.random() < 0.05:
            metas.append(None)
            continue
        m = {}
        if rng.random() < 0.9:
            big = 2**53 + int(rng.integers(-3, 6))  # near where float64 stops holding ints
            m["price"] = [int(rng.integers(-50, 50)), float(rng.normal() * 20), big, float(big),
                          [2**63 - 1, float(2**63)][rng.integers(2)], "12", True,
                          None][rng.integers(8)]
        if rng.random() < 0.8:
            m["label"] = [words[rng.integers(len(words))], 3, False][int(rng.random() * 1.2)]
        if rng.random() < 0.7:
            tags = rng.choice(words[:12], size=rng.integers(0, 4), replace=False).tolist()
            m["tags"] = tags if rng.random() < 0.8 else (tags[0] if tags else None)
        metas.append(m)
    return metas, words


def test_mask_equals_reference_on_every_operator_seeded():
    """Larger columns reach the paths small examples miss ($in over many strings, postings)."""
    metas, words = _seeded_metas(3000, seed=3)
    cols = Columns.from_dicts(metas[:1000]).extended(metas[1000:2500]).extended(metas[2500:])
    rng = np.random.default_rng(4)
    operands = [0, 7, -12.5, 2**53, 2**53 + 1, 2**53 - 1, 2**53 + 3, 2**63 - 1, float(2**63), 1e20,
                True, False, None, "12", "w010",
                "w0", "w039x", HOSTILE[0], ""]
    seen = 0
    for fld in ["price", "label", "tags", "nothing"]:
        for x in operands:
            for op in ["$eq", "$ne", "$contains"] + (ORDER_OPS if _orderable(x) else []):
                seen += check({fld: {op: x}}, metas, cols).sum()
        for _ in range(20):
            xs = [operands[i] for i in rng.choice(len(operands), size=rng.integers(0, 6))]
            xs += rng.choice(words, size=rng.integers(0, 14)).tolist()
            check({fld: {"$in": xs}}, metas, cols)
            check({fld: {"$nin": xs}}, metas, cols)
        for e in (True, False):
            check({fld: {"$exists": e}}, metas, cols)
    assert seen > 1000  # the operands do select rows: the comparisons are exercised
    check({"$or": [{"tags": {"$contains": "w003"}}, {"price": {"$gte": 10, "$lt": 30}}],
           "label": {"$ne": "w007"}}, metas, cols)
    check({"$not": {"$and": [{"tags": {"$contains": "w001"}}, {"label": {"$in": words[:20]}}]}},
          metas, cols)


# ----------------------------------------------------------------------------- documented rules

TOY = [
    {"n": 1, "s": "b", "t": ["x", "y"], "f": True, "z": None},  # 0
    {"n": 1.0, "s": "B", "t": "x", "f": 1},                      # 1
    {"n": 2.5, "s": "ba", "t": [], "f": False},                  # 2
    {"n": "1", "s": 2, "t": [1, True, None]},                    # 3
    None,                                                        # 4
    {"n": 2**53 + 1, "t": ["x"]},                                # 5
    {"n": [1], "z": None},                                       # 6
]


@pytest.mark.parametrize("where, rows", [
    ({}, [0, 1, 2, 3, 4, 5, 6]),
    ({"n": 1}, [0, 1]),                                  # int and float are one family
    ({"n": {"$eq": 1.0}}, [0, 1]),
    ({"n": {"$ne": 1}}, [2, 3, 4, 5, 6]),                # missing, other types, lists: $ne true
    ({"n": {"$gt": 1}}, [2, 5]),
    ({"n": {"$gte": 2**53 + 1}}, [5]),                   # exact: float64 would round 2**53 + 1
    ({"n": {"$gt": 2**53}}, [5]),
    ({"n": {"$lt": "2"}}, [3]),                          # strings only with strings
    ({"n": {"$in": [1, "1"]}}, [0, 1, 3]),
    ({"n": {"$nin": [1, "1"]}}, [2, 4, 5, 6]),
    ({"f": True}, [0]),                                  # True is not 1
    ({"f": 1}, [1]),
    ({"f": {"$ne": True}}, [1, 2, 3, 4, 5, 6]),
    ({"z": None}, [0, 6]),                               # None is a value; missing is not None
    ({"z": {"$exists": True}}, [0, 6]),
    ({"z": {"$exists": False}}, [1, 2, 3, 4, 5]),
    ({"s": {"$gt": "b"}}, [2]),                          # code-point order: "B" < "b" < "ba"
    ({"s": {"$lte": "b"}}, [0, 1]),
    ({"t": "x"}, [1]),                                   # lists compare as a whole
    ({"t": {"$contains": "x"}}, [0, 1, 5]),              # membership; a scalar by equality
    ({"t": {"$contains": 1}}, [3]),
    ({"t": {"$contains": True}}, [3]),
    ({"t": {"$contains": None}}, [3]),
    ({"t": {"$in": ["x"]}}, [1]),
    ({"t": {"$size": 0}}, [2]),                          # a list's length; scalars never
    ({"t": {"$size": 1}}, [5]),
    ({"s": {"$substring": "a"}}, [2]),                   # strings only: 2 is not "2"
    ({"s": {"$substring": "b"}}, [0, 2]),
    ({"s": {"$isubstring": "b"}}, [0, 1, 2]),
    ({"s": {"$substring": ""}}, [0, 1, 2]),
    ({"t": {"$substring": "x"}}, [1]),                   # not list members: $contains is
    ({"nope": {"$substring": ""}}, []),
    ({"nope": {"$ne": 1}}, [0, 1, 2, 3, 4, 5, 6]),
    ({"nope": {"$lt": 1}}, []),
    ({"$and": []}, [0, 1, 2, 3, 4, 5, 6]),
    ({"$or": []}, []),
    ({"$not": {"n": {"$gt": 1}}}, [0, 1, 3, 4, 6]),      # $not negates: missing rows pass
    ({"n": {"$not": {"$gt": 1}}}, [0, 1, 3, 4, 6]),
    ({"n": {"$gte": 1, "$lt": 2.5}}, [0, 1]),            # operators on one field are AND-ed
    ({"n": 1, "f": 1}, [1]),                             # fields are AND-ed
    ({"$or": [{"f": True}, {"s": {"$in": ["ba", 2]}}]}, [0, 2, 3]),
])
def test_documented_rules_on_a_hand_computed_toy(where, rows):
    got = check(where, TOY)
    assert np.nonzero(got)[0].tolist() == rows


def test_matches_handles_no_metadata_and_mask_is_fresh():
    f = Filter.parse({"a": {"$ne": 1}})
    assert f.matches(None) and f.matches({}) and not f.matches({"a": 1})
    cols = Columns.from_dicts([{"a": 1}, None])
    m = f.mask(cols)
    m[:] = True  # the caller may write to the mask: it must not alias the columns
    assert f.mask(cols).tolist() == [False, True]
    assert Filter.parse({}).mask(Columns.from_dicts([])).shape == (0,)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("where, words", [
    ({"a": {"$regex": "x"}}, ["unknown operator '$regex'", "'a'"]),
    ({"$where": "1"}, ["unknown operator '$where'"]),
    ({"a": {"$gt": [1]}}, ["$gt", "'a'", "needs a number or a string, got list"]),
    ({"a": {"$lte": True}}, ["$lte", "got bool"]),
    ({"a": {"$lt": None}}, ["$lt", "got None"]),
    ({"a": {"$gte": {"$eq": 1}}}, ["$gte", "got dict"]),
    ({"a": {"$gt": float("nan")}}, ["$gt", "not a finite number"]),
    ({"a": {"$lt": float("inf")}}, ["$lt", "not a finite number"]),
    ({"a": {"$eq": 2**64}}, ["$eq", "outside int64"]),
    ({"a": [1, 2]}, ["$eq", "got list", "$contains"]),
    ({"a": {"$ne": [1]}}, ["$ne", "got list"]),
    ({"a": {"$eq": object()}}, ["$eq", "object"]),
    ({"a": {"$eq": "\ud800"}}, ["$eq", "UTF-8"]),
    ({"a": {"$in": 3}}, ["$in", "needs a list of scalars, got int"]),
    ({"a": {"$nin": "abc"}}, ["$nin", "got str"]),
    ({"a": {"$in": [1, [2]]}}, ["$in", "got list"]),
    ({"a": {"$exists": 1}}, ["$exists", "true or false, got int"]),
    ({"a": {"$contains": [1]}}, ["$contains", "got list"]),
    ({"a": {"$substring": 1}}, ["$substring", "'a'", "needs a string, got int"]),
    ({"a": {"$isubstring": None}}, ["$isubstring", "needs a string, got None"]),
    ({"a": {"$size": -1}}, ["$size", "int >= 0, got -1"]),
    ({"a": {"$size": True}}, ["$size", "got True"]),
    ({"a": {"$size": 1.5}}, ["$size", "got 1.5"]),
    ({"a": {}}, ["'a'", "empty operator dict"]),
    ({"a": {"$not": 3}}, ["$not", "'a'", "got int"]),
    ({"$and": {"a": 1}}, ["$and", "needs a list of filters, got dict"]),
    ({"$or": [3]}, ["filter must be a dict, got int"]),
    ({"$not": [{"a": 1}]}, ["$not", "got list"]),
    ({3: 1}, ["filter keys must be strings, got int"]),
    ([("a", 1)], ["filter must be a dict, got list"]),
    ({"x" * 300: {"$bad": 1}}, ["unknown operator '$bad'", "300 characters"]),
])
def test_errors_name_the_operator_and_operand(where, words):
    with pytest.raises(InvalidInputError) as e:
        Filter.parse(where)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_nesting_is_bounded():
    deep = {"a": 1}
    for _ in range(MAX_DEPTH):
        deep = {"$not": deep}
    Filter.parse(deep)
    with pytest.raises(InvalidInputError, match="deeper than"):
        Filter.parse({"$not": {"$not": deep}})
    deep_ops = {"$eq": 1}
    for _ in range(MAX_DEPTH + 2):
        deep_ops = {"$not": deep_ops}
    with pytest.raises(InvalidInputError, match="deeper than"):
        Filter.parse({"a": deep_ops})


# ----------------------------------------------------------------------------- metadata validation

@pytest.mark.parametrize("meta, words", [
    ({"a": float("nan")}, ["'a'", "nan", "not a finite number"]),
    ({"a": float("inf")}, ["'a'", "inf"]),
    ({"a": [1.0, float("-inf")]}, ["'a'", "-inf"]),
    ({"a": {"b": 1}}, ["'a'", "dict"]),
    ({"a": [[1]]}, ["'a'", "only scalars", "list"]),
    ({"a": [{"b": 1}]}, ["'a'", "only scalars", "dict"]),
    ({1: "x"}, ["keys must be strings", "int"]),
    ({None: "x"}, ["keys must be strings"]),
    ({"a": 2**63}, ["'a'", "9223372036854775808", "int64"]),
    ({"a": -(2**63) - 1}, ["int64"]),
    ({"": 1}, ["empty"]),
    ({"k" * 257: 1}, ["longer than 256", "257 characters"]),
    ({"a\x00b": 1}, ["NUL"]),
    ({"$a": 1}, ["'$a'", "operators"]),
    ({"a": "\udc80"}, ["'a'", "UTF-8"]),
    ({"\ud800": 1}, ["UTF-8"]),
    ({"a": b"bytes"}, ["'a'", "bytes"]),
    ({"a": {1, 2}}, ["'a'", "set"]),
    ([("a", 1)], ["must be a dict", "list"]),
    ("a=1", ["must be a dict", "str"]),
])
def test_validate_metadata_refuses_with_a_clear_message(meta, words):
    with pytest.raises(InvalidInputError) as e:
        validate_metadata(meta)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_validate_metadata_normalises():
    assert validate_metadata(None) is None
    got = validate_metadata({"i": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True),
                             "t": ("x", np.int32(1)), "k" * 256: 2**63 - 1, "n": None})
    assert got == {"i": 3, "f": 0.5, "b": True, "t": ["x", 1], "k" * 256: 2**63 - 1, "n": None}
    assert [type(got[k]) for k in ("i", "f", "b")] == [int, float, bool]
    assert type(got["t"][1]) is int


json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(),
              st.binary(max_size=2)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=8,
)


@settings(max_examples=400, **PROPERTY)
@given(meta=st.dictionaries(st.one_of(st.text(max_size=300), st.integers()), json_like, max_size=4))
def test_validate_metadata_accepts_only_what_json_and_columns_keep(meta):
    try:
        got = validate_metadata(meta)
    except InvalidInputError as e:
        assert str(e)
        return
    text = json.dumps(got, allow_nan=False, ensure_ascii=False).encode("utf-8")
    assert json.loads(text) == got
    assert all(isinstance(k, str) and 0 < len(k) <= 256 and not k.startswith("$") for k in got)
    Columns.from_dicts([got])  # whatever validates, the columns take


# ----------------------------------------------------------------------------- hostile data

def test_hostile_field_names_and_values_are_plain_data():
    metas = [{name: name, "v": name} for name in HOSTILE] + [{"v": [*HOSTILE, "\x00"]}, None]
    metas = [validate_metadata(m) for m in metas]
    cols = Columns.from_dicts(metas)
    for i, name in enumerate(HOSTILE):
        assert np.nonzero(check({name: name}, metas, cols))[0].tolist() == [i]
        assert check({name: {"$exists": True}}, metas, cols).sum() == 1
        assert check({"v": {"$contains": name}}, metas, cols).sum() == 2
        check({"v": {"$gte": name}}, metas, cols)
    assert check({"v": {"$contains": "\x00"}}, metas, cols).sum() == 1
    # names the metadata rules refuse are still just dict keys in a filter: they match nothing
    for name in ["", "a\x00b", "x" * 10_000]:
        assert not check({name: 1}, metas, cols).any()
        assert check({name: {"$exists": False}}, metas, cols).all()


def test_module_has_no_sql():
    tree = ast.parse(Path(__file__).parents[1].joinpath("rvqstore", "filters.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported & {"sqlite3", "sqlite_utils", "storage", "store"} == set(), imported
    assert not any("storage" in m or m.endswith("store") for m in imported), imported


# ----------------------------------------------------------------------------- extended / taken

def test_extended_keeps_alignment_and_leaves_the_old_columns_alone():
    metas, _ = _seeded_metas(600, seed=9)
    first = Columns.from_dicts(metas[:200])
    f = Filter.parse({"$or": [{"label": {"$gt": "w020"}}, {"tags": {"$contains": "w002"}},
                              {"price": {"$lt": 0}}]})
    before = f.mask(first).copy()
    grown = first.extended(metas[200:400]).extended([]).extended(metas[400:])
    assert len(first) == 200 and len(grown) == 600
    assert (f.mask(first) == before).all()
    check(f.where, metas, grown)
    # a field that first appears in a later batch, and new strings in an old field
    later = grown.extended([{"fresh": 1, "label": "aaa"}, {"label": "zzz", "tags": ["new"]}])
    check({"fresh": {"$exists": True}}, metas + [{"fresh": 1, "label": "aaa"},
                                                 {"label": "zzz", "tags": ["new"]}], later)
    check({"label": {"$lt": "b"}}, metas + [{"fresh": 1, "label": "aaa"},
                                             {"label": "zzz", "tags": ["new"]}], later)
    assert later.nbytes > grown.nbytes > first.nbytes > 0


def test_taken_reorders_truncates_and_repeats():
    metas, _ = _seeded_metas(500, seed=11)
    cols = Columns.from_dicts(metas)
    rng = np.random.default_rng(12)
    for rows in [rng.permutation(500), np.arange(100), rng.integers(0, 500, 800),
                 np.zeros(0, np.int64), np.array([499, 0, 499], np.int32)]:
        sub = cols.taken(rows)
        assert len(sub) == len(rows)
        for where in [{"tags": {"$contains": "w005"}}, {"price": {"$gte": 2**53 + 1}},
                      {"label": {"$lte": "w010"}}, {"price": {"$ne": 3}}]:
            check(where, [metas[i] for i in rows], sub)
    for bad in [np.array([500]), np.array([-1]), np.array([0.5]), np.zeros((2, 2), np.int64)]:
        with pytest.raises(InvalidInputError):
            cols.taken(bad)


def test_from_dicts_names_the_bad_row():
    with pytest.raises(InvalidInputError, match=r"row 1, key 'a'.*finite"):
        Columns.from_dicts([{"a": 1}, {"a": math.nan}])
    with pytest.raises(InvalidInputError, match="row 0 is a list"):
        Columns.from_dicts([[1]])
    with pytest.raises(InvalidInputError, match=r"row 2.*int64"):
        Columns.from_dicts([None, {}, {"a": [2**64]}])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
    st.text(max_size=5), st.lists(st.one_of(st.integers(), st.text(max_size=3), st.lists(st.none())),
                                  max_size=3)), max_size=4))
def test_plain_metadata_shortcut_agrees_with_the_full_check(meta):
    # is_plain_metadata may only say yes where validate_metadata accepts the dict unchanged
    from rvqstore.filters import is_plain_metadata
    try:
        checked = validate_metadata(meta)
    except InvalidInputError:
        checked = None
    if is_plain_metadata(meta):
        assert checked == meta
    assert is_plain_metadata({"a": 1, "b": ["x", 2.5, None], "c": True})
    assert not is_plain_metadata({"$a": 1}) and not is_plain_metadata({"a": float("nan")})
    assert not is_plain_metadata({"a": [[1]]}) and not is_plain_metadata({"a": 2**63})

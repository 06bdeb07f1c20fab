"""Bad input and faults: each gets a specific error, and nothing stored changes.

Also wrong answers: a rerank over every candidate is brute force, and reranked distances
are the exact ones. (Killed writers: test_crash.py; readers in other processes:
test_concurrency.py.)"""

import os
import sqlite3
import stat

import numpy as np
import pytest

from rvqstore import (BadFileError, DimensionMismatchError, DuplicateError, EmptyStoreError,
                      InvalidInputError, ReadOnlyError, RvqstoreError, Store, UnknownIdError)

from conftest import clustered


def snapshot(store):
    ids = store.ids()
    return len(store), ids.tolist(), store.get(ids).tobytes(), store.info()["codebook_version"]


def _with(vecs, value, row, col):
    """The first four vectors with one component set to ``value``."""
    x = vecs[:4].copy()
    x[row, col] = value
    return x


# (name, call on the trained store and its vectors, error, text the message must contain)
BAD_INPUTS = [
    ("add-wrong-dim", lambda s, v: s.add(v[:4, :15]), DimensionMismatchError, "dim=15"),
    ("add-nan", lambda s, v: s.add(_with(v, np.nan, 2, 3)), InvalidInputError, "NaN"),
    ("add-inf", lambda s, v: s.add(_with(v, np.inf, 0, 0)), InvalidInputError, "inf"),
    ("add-strings", lambda s, v: s.add(np.array([["x"] * 16])), InvalidInputError, "numeric"),
    ("add-ragged", lambda s, v: s.add([[1.0] * 16, [1.0] * 15]), InvalidInputError, "ragged"),
    ("add-empty", lambda s, v: s.add(np.empty((0, 16), np.float32)), InvalidInputError,
     "empty"),
    ("add-duplicate-ids", lambda s, v: s.add(v[:2], ids=[5000, 5000]), DuplicateError,
     "duplicates"),
    ("add-stored-id", lambda s, v: s.add(v[:2], ids=[3, 5001]), DuplicateError,
     "already in the store"),
    ("add-duplicate-keys", lambda s, v: s.add(v[:2], keys=["a", "a"]), DuplicateError,
     "duplicates"),
    ("add-stored-key", lambda s, v: s.add(v[:2], keys=["item-1", "new"]), DuplicateError,
     "item-1"),
    ("add-too-few-keys", lambda s, v: s.add(v[:2], keys=["a"]), InvalidInputError,
     "1 keys for 2"),
    ("delete-unknown-id", lambda s, v: s.delete([1, 2, 99999]), UnknownIdError, "99999"),
    ("delete-unknown-key", lambda s, v: s.delete(keys=["nope"]), UnknownIdError, "nope"),
    ("get-unknown-id", lambda s, v: s.get([99999]), UnknownIdError, "99999"),
    ("search-k-0", lambda s, v: s.search(v[0], k=0), InvalidInputError, "k must be"),
    ("search-k-negative", lambda s, v: s.search(v[0], k=-3), InvalidInputError, "k must be"),
    ("search-wrong-dim", lambda s, v: s.search(v[0, :10], k=3), DimensionMismatchError,
     "dim=10"),
    ("search-rerank-0", lambda s, v: s.search(v[0], k=3, rerank=0), InvalidInputError,
     "rerank"),
]


@pytest.mark.parametrize("call, err, text",
                         [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS])
def test_bad_input_is_refused_and_changes_nothing(trained, vecs, call, err, text):
    before = snapshot(trained)
    with pytest.raises(err, match=text):
        call(trained, vecs)
    assert snapshot(trained) == before
    assert trained.check() == []


def test_errors_share_one_root_and_builtins():
    assert issubclass(DimensionMismatchError, ValueError)
    assert issubclass(UnknownIdError, KeyError)
    for e in (DimensionMismatchError, DuplicateError, EmptyStoreError, BadFileError,
              ReadOnlyError, UnknownIdError):
        assert issubclass(e, RvqstoreError)


def test_search_on_empty_store(store_path):
    with Store.open(store_path, dim=8) as s:
        with pytest.raises(EmptyStoreError, match="no vectors"):
            s.search(np.ones(8, np.float32), k=3)


def test_not_a_store(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(5000))
    with pytest.raises(BadFileError, match="not an rvqstore file"):
        Store.open(junk)
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE people (name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(BadFileError, match="not an rvqstore store"):
        Store.open(other)
    assert [r[0] for r in sqlite3.connect(other).execute(
        "SELECT name FROM sqlite_master")] == ["people"]


def test_truncated_and_corrupted_files(tmp_path, vecs):
    path = tmp_path / "t.db"
    with Store.open(path, dim=16, stages=4, codebook_size=32) as s:
        s.add(vecs)
        s.train()
        s.compact()  # checkpoint the WAL into the file
    data = path.read_bytes()
    cut = tmp_path / "cut.db"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadFileError, match="truncated"):
        Store.open(cut)
    bad = tmp_path / "bad.db"
    bad.write_bytes(data[:100] + os.urandom(len(data) - 100))
    with pytest.raises(BadFileError):
        with Store.open(bad) as s:
            s.search(vecs[0], k=3)


def test_corrupted_code_block_is_reported(trained, store_path, vecs):
    con = sqlite3.connect(store_path)
    con.execute("UPDATE rvq_blocks SET codes = substr(codes, 1, 10)")
    con.commit()
    con.close()
    with pytest.raises(BadFileError, match="corrupted"):
        trained.search(vecs[0], k=3)
    assert any("block" in p for p in trained.check())


def test_read_only_file(store_path, vecs):
    with Store.open(store_path, dim=16) as s:
        s.add(vecs[:10])
        s.compact()
    os.chmod(store_path, stat.S_IRUSR | stat.S_IRGRP)
    try:
        with pytest.raises(ReadOnlyError, match="readonly=True"):
            Store.open(store_path)
        with Store.open(store_path, readonly=True) as s:
            assert len(s) == 10
            assert s.search(vecs[0], k=1).ids[0] == 0
            with pytest.raises(ReadOnlyError):
                s.add(vecs[:1])
    finally:
        os.chmod(store_path, stat.S_IRUSR | stat.S_IWUSR)


def test_refused_open_leaves_no_file(tmp_path):
    path = tmp_path / "new.db"
    with pytest.raises(InvalidInputError, match="stages"):
        Store.open(path, dim=4, stages=0)
    assert not path.exists()


def test_open_without_create_and_in_a_missing_folder(tmp_path):
    with pytest.raises(BadFileError, match="does not exist"):
        Store.open(tmp_path / "absent.db", create=False)
    assert not (tmp_path / "absent.db").exists()
    with pytest.raises(BadFileError, match="cannot open"):
        Store.open(tmp_path / "no" / "such" / "folder.db", dim=4)


# -- rerank is exact ------------------------------------------------------------------------

def exact_distances(metric, q, x):
    """Reference distances (nq, n) in float64: squared L2, -<q, x>, 1 - cos."""
    q, x = q.astype(np.float64), x.astype(np.float64)
    if metric == "l2":
        return ((q[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    if metric == "ip":
        return -(q @ x.T)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return 1.0 - qn @ xn.T


@pytest.fixture(params=["l2", "ip", "cosine"])
def metric_store(request, tmp_path):
    """A trained store of 300 vectors with every 7th deleted, and its live vectors.

    Coarse codes (1 stage of 2 codewords) order the candidates poorly, so that only an
    exact rerank of all of them finds the true neighbours."""
    metric = request.param
    x = clustered(300, 16, centers=8, seed=21)
    with Store.open(tmp_path / "r.db", dim=16, metric=metric, stages=1,
                    codebook_size=2) as s:
        s.add(x)
        s.train()
        s.delete(np.arange(0, 300, 7))
        live = np.setdiff1d(np.arange(300), np.arange(0, 300, 7))
        yield s, metric, live, x[live]


def test_rerank_over_every_vector_equals_brute_force(metric_store):
    s, metric, live, x = metric_store
    q = clustered(25, 16, centers=8, seed=22)
    k = 8
    rerank = -(-300 // k)  # k * rerank >= every vector ever added: all are candidates
    ref = exact_distances(metric, q, x)
    order = np.argsort(ref, axis=1, kind="stable")[:, :k + 1]
    ref_d = np.take_along_axis(ref, order, axis=1)
    # no near-ties in this toy, so the order of the ids is defined
    assert np.diff(ref_d, axis=1).min() > 2e-5
    res = s.search(q, k=k, rerank=rerank)
    np.testing.assert_array_equal(res.ids, live[order[:, :k]])
    np.testing.assert_allclose(res.distances, ref_d[:, :k], rtol=1e-5, atol=1e-4)


def test_rerank_distances_are_the_exact_distances_of_the_ids(metric_store):
    s, metric, live, x = metric_store
    q = clustered(25, 16, centers=8, seed=23)
    k = 5
    res = s.search(q, k=k, rerank=10)  # 50 candidates of 257: not all
    assert np.isin(res.ids, live).all()
    assert all(len(set(row)) == k for row in res.ids.tolist())
    assert (np.diff(res.distances, axis=1) >= 0).all()
    ref = exact_distances(metric, q, x)
    pos = np.searchsorted(live, res.ids)
    np.testing.assert_allclose(res.distances, np.take_along_axis(ref, pos, axis=1),
                               rtol=1e-5, atol=1e-4)

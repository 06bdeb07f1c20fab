"""Metadata and documents in the Store: stored with the vectors, filtered searches that stay
exact at every selectivity, count/delete/update/upsert by filter or key."""

import numpy as np
import pytest

from rvqstore import InvalidInputError, Store, UnknownIdError

from conftest import clustered

N, DIM = 3000, 16


def exact_filtered(x, ids, q, k, passing):
    """Brute force: the k nearest (squared L2) among ``passing`` rows, as ids."""
    cand = np.flatnonzero(passing)
    d = ((x[cand][None, :, :] - q[:, None, :]) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return ids[cand][order]


@pytest.fixture
def items(tmp_path):
    """A trained store whose items carry metadata: (store, vectors, metadata list)."""
    x = clustered(N, DIM, centers=15, seed=21)
    rng = np.random.default_rng(5)
    metas = []
    for i in range(N):
        m = {"n": int(rng.integers(1000)), "topic": f"t{i % 15}", "even": i % 2 == 0,
             "tags": [f"g{i % 7}", f"h{i % 11}"]}
        if i % 10 == 0:
            del m["topic"]  # some items lack a field
        metas.append(m if i % 97 else None)
    s = Store.open(tmp_path / "m.db", dim=DIM, stages=4, codebook_size=32)
    s.add(x, metadata=metas, documents=[f"doc {i}" for i in range(N)])
    s.train()
    yield s, x, metas
    s.close()


def passing_rows(metas, rule):
    """Items without metadata lack every field (and pass $exists: false)."""
    return np.asarray([rule(m or {}) for m in metas])


def lt(field, v):
    return lambda m: isinstance(m.get(field), int) and m[field] < v


FILTERS = {
    "50%": ({"n": {"$lt": 500}}, lt("n", 500)),
    "10%": ({"n": {"$lt": 100}}, lt("n", 100)),
    "1%": ({"n": {"$lt": 10}}, lt("n", 10)),
    "a handful": ({"n": {"$in": [3, 4]}}, lambda m: m.get("n") in (3, 4)),
    "topic and tag": ({"$and": [{"topic": "t3"}, {"tags": {"$contains": "g2"}}]},
                      lambda m: m.get("topic") == "t3" and "g2" in m.get("tags", [])),
    "or with missing": ({"$or": [{"topic": {"$exists": False}}, {"even": True}]},
                        lambda m: "topic" not in m or m.get("even") is True),
}


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_filtered_search_is_the_nearest_among_passing_items(items, name):
    s, x, metas = items
    where, rule = FILTERS[name]
    passing = passing_rows(metas, rule)
    q = clustered(40, DIM, centers=15, seed=22)
    k = 10
    want = exact_filtered(x, np.arange(N), q, k, passing)
    res = s.search(q, k=k, where=where)
    got_n = (res.ids >= 0).sum(axis=1)
    assert (got_n == min(k, passing.sum())).all()  # never short
    assert np.isin(res.ids[res.ids >= 0], np.flatnonzero(passing)).all()
    recall = np.mean([len(set(a) & set(b)) / min(k, len(b)) for a, b in zip(res.ids, want)])
    assert recall >= 0.95, recall
    assert s.count(where) == passing.sum()
    assert s.ids(where).tolist() == np.flatnonzero(passing).tolist()  # ids 0..N-1, ascending


def test_anti_correlated_filter_is_not_confined_to_the_query_neighbourhood(items):
    s, x, metas = items
    q = x[:20] + 0.01  # queries sit in their own items' clusters
    far = [{"topic": f"t{(i + 7) % 15}"} for i in range(20)]
    for qi, where in zip(q, far):
        passing = passing_rows(metas, lambda m, t=where["topic"]: m.get("topic") == t)
        res = s.search(qi, k=10, where=where)
        want = exact_filtered(x, np.arange(N), qi[None], 10, passing)[0]
        assert len(set(res.ids) & set(want)) >= 9


def test_the_plan_follows_the_number_of_matches(items):
    s, x, _ = items
    before = s.info()["search_plans"]
    s.search(x[0], k=10, where={"n": {"$lt": 3}})      # ~9 items: exact
    s.search(x[0], k=10, where={"n": {"$lt": 900}})    # ~2,700 items: scan
    after = s.info()["search_plans"]
    assert after["exact"] == before["exact"] + 1 and after["scan"] == before["scan"] + 1


def test_metadata_and_documents_round_trip(items):
    s, x, metas = items
    assert s.metadata([1, 10, 97]) == [metas[1], metas[10], None]
    assert s.documents([5]) == ["doc 5"]
    res = s.search(x[4], k=3, with_metadata=True, with_documents=True, with_keys=True)
    assert res.ids[0] == 4 and res.metadata[0] == metas[4] and res.documents[0] == "doc 4"


def test_update_changes_what_filters_select(items, tmp_path):
    s, x, _ = items
    assert s.count({"flag": True}) == 0
    s.search(x[0], k=1, where={"flag": True})  # columns built before the update
    s.update([7, 8], metadata=[{"flag": True}, {"flag": True}])
    assert s.count({"flag": True}) == 2
    assert set(s.search(x[0], k=5, where={"flag": True}).ids[:2]) == {7, 8}
    with Store.open(s.path, readonly=True) as r:  # another connection sees the commit
        assert r.count({"flag": True}) == 2
        s.update([8], metadata=[None])
        assert r.count({"flag": True}) == 1
    s.update([9], documents=["new text"])
    assert s.documents([9]) == ["new text"] and s.metadata([9])[0]["n"] >= 0
    with pytest.raises(UnknownIdError):
        s.update([10**9], metadata=[{}])


def test_delete_where_is_one_transaction(items):
    s, x, metas = items
    n = len(s)
    gone = s.delete(where={"n": {"$gte": 990}})
    assert gone == passing_rows(metas, lambda m: m.get("n", 0) >= 990).sum() > 0
    assert len(s) == n - gone and s.count({"n": {"$gte": 990}}) == 0
    assert s.check() == []


def test_upsert_replaces_by_key_and_adds_the_rest(tmp_path):
    x = clustered(600, DIM, seed=23)
    with Store.open(tmp_path / "u.db", dim=DIM, stages=4, codebook_size=16) as s:
        ids = s.add(x, keys=[f"k{i}" for i in range(600)], metadata=[{"v": 1}] * 600)
        s.train()
        new = x[:2] + 40.0
        got = s.upsert(np.vstack([new, x[:1] - 40.0]), keys=["k0", "k1", "fresh"],
                       metadata=[{"v": 2}, {"v": 2}, {"v": 3}], documents=["a", "b", "c"])
        assert got[:2].tolist() == ids[:2].tolist() and got[2] == 600
        assert len(s) == 601 and s.check() == []
        np.testing.assert_allclose(s.get(keys=["k0"])[0], new[0])
        assert s.search(new[1], k=1).ids[0] == ids[1]
        assert s.metadata(keys=["k0", "fresh"]) == [{"v": 2}, {"v": 3}]
        assert s.count({"v": 1}) == 598


def test_filters_before_training_and_with_exclude(tmp_path):
    x = clustered(200, DIM, seed=24)
    with Store.open(tmp_path / "e.db", dim=DIM) as s:
        s.add(x, metadata=[{"i": i} for i in range(200)])
        res = s.search(x[0], k=5, where={"i": {"$lt": 50}}, exclude=[0])
        passing = np.arange(200) < 50
        passing[0] = False
        np.testing.assert_array_equal(res.ids, exact_filtered(x, np.arange(200), x[:1], 5,
                                                              passing)[0])


HOSTILE = ["x'); DROP TABLE rvq_vectors; --", 'a"b', "ü" * 200, "key with spaces", "a.b"]


def test_hostile_field_names_and_values_are_plain_data(tmp_path):
    x = clustered(50, DIM, seed=25)
    with Store.open(tmp_path / "h.db", dim=DIM) as s:
        s.add(x[:len(HOSTILE)], metadata=[{h: h} for h in HOSTILE])
        for i, h in enumerate(HOSTILE):
            assert s.count({h: h}) == 1
            assert s.search(x[0], k=1, where={h: {"$eq": h}}).ids[0] == i
        assert len(s) == len(HOSTILE) and s.check() == []


@pytest.mark.parametrize("where,named", [({"n": {"$regex": "a"}}, "$regex"),
                                         ({"n": {"$gt": [1]}}, "$gt"),
                                         ({"$or": {"n": 1}}, "$or")])
def test_bad_filters_are_refused_by_name(items, where, named):
    s, x, _ = items
    with pytest.raises(InvalidInputError, match=named.replace("$", r"\$")):
        s.search(x[0], k=3, where=where)
    with pytest.raises(InvalidInputError):
        s.count(where)
    with pytest.raises(InvalidInputError):
        s.ids(where)


def test_bad_metadata_is_refused_and_nothing_is_added(items):
    s, x, _ = items
    n = len(s)
    for bad in ([{"a": float("nan")}], [{"a": {"nested": 1}}], [{1: "x"}], ["not a dict"],
                [{"$where": 1}]):
        with pytest.raises(InvalidInputError):
            s.add(x[:1], metadata=bad)
    with pytest.raises(InvalidInputError, match="2 metadata items for 1"):
        s.add(x[:1], metadata=[{}, {}])
    assert len(s) == n


@pytest.fixture
def docs_store(tmp_path):
    x = clustered(400, DIM, seed=31)
    texts = [f"item {i} about {'cats' if i % 4 == 0 else 'dogs'} and {'rain' if i % 5 == 0 else 'sun'}"
             for i in range(400)]
    texts[17] = "the unique zebra story"
    s = Store.open(tmp_path / "t.db", dim=DIM, stages=4, codebook_size=16)
    s.add(x, keys=[f"k{i}" for i in range(400)], documents=texts,
          metadata=[{"i": i} for i in range(400)])
    s.train()
    yield s, x, texts
    s.close()


def test_text_search_finds_the_words_in_bm25_order(docs_store):
    s, x, texts = docs_store
    res = s.text_search("zebra", k=5, with_documents=True)
    assert res.ids[0] == 17 and (res.ids[1:] == -1).all() and res.documents[0] == texts[17]
    res = s.text_search("cats rain", k=400)
    hits = res.ids[res.ids >= 0]
    assert set(hits) == {i for i in range(400) if i % 4 == 0 or i % 5 == 0}
    both = {i for i in range(400) if i % 4 == 0 and i % 5 == 0}
    assert set(hits[:len(both)]) == both  # matching both words ranks first
    assert (np.diff(res.distances[:len(hits)]) >= 0).all()
    sub = s.text_search("cats", k=10, where={"i": {"$lt": 40}})
    assert set(sub.ids[sub.ids >= 0]) == {0, 4, 8, 12, 16, 20, 24, 28, 32, 36}


def test_text_index_follows_updates_deletes_and_upserts(docs_store):
    s, x, _ = docs_store
    s.update([3], documents=["now about a zebra"])
    assert set(s.text_search("zebra", k=5).ids[:2]) == {3, 17}
    s.delete([17])
    assert s.text_search("zebra", k=5).ids[:2].tolist() == [3, -1]
    s.upsert(x[:1], keys=["k3"], documents=["no stripes here"])
    assert s.text_search("zebra", k=5).ids[0] == -1
    s.update([3], documents=[None])
    assert s.text_search("stripes", k=5).ids[0] == -1
    with Store.open(s.path, readonly=True) as r:
        assert r.text_search("cats", k=1).ids[0] >= 0
    assert s.check() == []


@pytest.mark.parametrize("text", ['zebra" OR 1=1 --', "NOT zebra (", "col:zebra", "zebra'",
                                  "zebra*", "NEAR(zebra)"])
def test_text_is_words_not_query_syntax(docs_store, text):
    s, _, _ = docs_store
    res = s.text_search(text, k=400)  # FTS5 syntax in the text is taken as plain words
    assert 17 in res.ids
    assert s.text_search("NOT AND OR", k=400).ids[0] >= 0  # "and" is a word of the texts
    with pytest.raises(InvalidInputError, match="no words"):
        s.text_search('* " ( :', k=3)


def test_hybrid_search_fuses_the_vector_and_keyword_rankings(docs_store):
    s, x, _ = docs_store
    q = x[200] + 0.01
    plain = s.search(q, k=10)
    fused = s.search(q, k=10, text="zebra")
    assert 17 in fused.ids and 200 in fused.ids[:2]   # the keyword hit and the vector hit
    assert len(set(fused.ids) & set(plain.ids)) >= 8
    d17 = ((s.get([17])[0] - q) ** 2).sum()
    np.testing.assert_allclose(fused.distances[list(fused.ids).index(17)], d17, rtol=1e-4)
    filtered = s.search(q, k=5, text="zebra", where={"i": {"$ne": 17}})
    assert 17 not in filtered.ids
    with pytest.raises(InvalidInputError, match="one query vector"):
        s.search(x[:2], k=3, text="zebra")
    with pytest.raises(InvalidInputError, match="no words"):
        s.text_search("  !! ", k=3)


def test_readers_extend_their_columns_with_others_appends_and_rebuild_on_updates(
        tmp_path, monkeypatch):
    from rvqstore import filters

    x = clustered(1200, DIM, centers=5, seed=31)
    metas = [{"n": i} for i in range(1200)]
    path = tmp_path / "e.db"
    with Store.open(path, dim=DIM, stages=2, codebook_size=16, block_size=256) as w:
        w.add(x[:1000], metadata=metas[:1000])
        w.train()
        r = Store.open(path)
        assert r.count({"n": {"$gte": 900}}) == 100  # builds the reader's columns
        builds = []
        real = filters.Columns.from_dicts.__func__
        monkeypatch.setattr(filters.Columns, "from_dicts",
                            classmethod(lambda cls, m: builds.append(len(m)) or real(cls, m)))
        w.add(x[1000:], metadata=metas[1000:])
        # the reader extends its columns by the rows it re-reads, not from scratch
        assert r.count({"n": {"$gte": 900}}) == 300 and builds == []
        assert set(r.search(x[1100], k=3, where={"n": {"$gte": 1100}}).ids) <= \
            set(range(1100, 1200))
        w.update([5], metadata=[{"n": 5000}])
        # a changed row cannot be patched in: the next filtered search rebuilds
        assert r.count({"n": {"$gte": 900}}) == 301 and builds == [1200]
        w.add(x[:10], metadata=[{"n": 7000}] * 10)
        assert r.count({"n": {"$gte": 7000}}) == 10 and builds == [1200]
        r.close()


def test_iter_carries_metadata_and_documents_and_lets_the_caller_write(items):
    s, x, metas = items
    got_ids, got_meta, got_docs = [], [], []
    for ids, keys, vecs, m, d in s.iter(batch_size=700, with_metadata=True,
                                         with_documents=True):
        np.testing.assert_array_equal(vecs, x[ids])
        got_ids += ids.tolist()
        got_meta += m
        got_docs += d
        s.delete(ids[:1])  # no transaction is held between batches
    assert got_ids == list(range(N))
    assert got_meta == metas and got_docs == [f"doc {i}" for i in range(N)]
    assert len(s) == N - len(range(0, N, 700))
    ids, keys, vecs, docs = next(s.iter(batch_size=5, with_documents=True))
    assert docs == [f"doc {i}" for i in ids]

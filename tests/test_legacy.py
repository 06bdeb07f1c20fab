"""Stores written by earlier releases open, upgrade and answer as they did.

``tests/fixtures/legacy-vN-*.db`` were written at schema N by ``make_legacy.py N``
(v1: rvqstore 0.1.0; v2: checksums, before metadata; v3: metadata, documents and their
keyword index), which also recorded their answers. From v3 on those include the items'
metadata and documents, filtered searches and counts, keyword and hybrid searches.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

from rvqstore import Store

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
VERSIONS = ("v1", "v2", "v3")
EXPECTED = {v: json.loads((FIXTURES / f"legacy-{v}-expected.json").read_text())
            for v in VERSIONS}


def same_search(res, want):
    np.testing.assert_array_equal(res.ids, want["ids"])
    np.testing.assert_allclose(res.distances, want["distances"], rtol=1e-5, atol=1e-5)


def answers_as_recorded(s, want, queries):
    """The store's answers are those recorded when it was written (v3 on: beyond search)."""
    assert len(s) == want["count"]
    assert s.info()["trained"] == want["info"]["trained"]
    same_search(s.search(queries, k=5), want)
    if "all_ids" not in want:
        return
    ids = s.ids()
    assert ids.tolist() == want["all_ids"]
    assert s.metadata(ids) == want["metadata"]
    assert s.documents(ids) == want["documents"]
    for case in want["filtered"]:
        assert s.count(case["where"]) == case["count"], case["where"]
        same_search(s.search(queries, k=5, where=case["where"]), case)
    for case in want["text"]:
        res = s.text_search(case["text"], k=8, where=case["where"])
        assert res.ids.tolist() == case["ids"], case
        np.testing.assert_allclose(res.distances, case["scores"], rtol=1e-6)
    hybrid = want["hybrid"]
    res = s.search(queries[0], k=5, text=hybrid["text"])
    same_search(res, hybrid)
    # the hybrid answer is the reciprocal rank fusion of the recorded rankings' top 5
    vector = [i for i in want["ids"][0] if i >= 0]
    keyword = next(c["ids"] for c in want["text"]
                   if c["text"] == hybrid["text"] and c["where"] is None)[:5]
    score = {}
    for ranking in (vector, [i for i in keyword if i >= 0]):
        for rank, i in enumerate(ranking):
            score[i] = score.get(i, 0.0) + 1.0 / (61 + rank)
    assert [i for i in res.ids.tolist() if i >= 0] == sorted(score, key=lambda i: (-score[i], i))[:5]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["trained", "untrained"])
def test_legacy_store_opens_upgrades_and_searches(tmp_path, version, name):
    path = tmp_path / f"{name}.db"
    shutil.copy(FIXTURES / f"legacy-{version}-{name}.db", path)
    want = EXPECTED[version][name]
    queries = np.asarray(EXPECTED[version]["queries"], np.float32)
    with Store.open(path) as s:
        assert s.check() == []
        answers_as_recorded(s, want, queries)
        assert s.keys([0])[0] == "doc-0"
        new = s.add(queries[:2] + 10.0, keys=["new-0", "new-1"],
                    metadata=[{"topic": "added"}, None], documents=["added after", None])
        assert s.search(queries[0] + 10.0, k=1).ids[0] == new[0]
        assert s.count({"topic": "added"}) == 1
        assert s.text_search("added", k=3).ids.tolist() == [new[0], -1, -1]
    with Store.open(path, readonly=True) as r:  # the upgraded file reopens as it is
        assert len(r) == want["count"] + 2
        assert r.metadata(new) == [{"topic": "added"}, None]


def test_legacy_v1_store_reads_read_only_without_upgrading(tmp_path):
    path = tmp_path / "ro.db"
    shutil.copy(FIXTURES / "legacy-v1-trained.db", path)
    before = path.read_bytes()
    queries = np.asarray(EXPECTED["v1"]["queries"], np.float32)
    with Store.open(path, readonly=True) as r:  # no CRCs to check in schema 1
        np.testing.assert_array_equal(r.search(queries, k=5).ids, EXPECTED["v1"]["trained"]["ids"])
        assert r.get([0]).shape == (1, 16)
    assert path.read_bytes() == before


@pytest.mark.parametrize("name", ["trained", "untrained"])
def test_legacy_v3_store_answers_read_only_without_changing(tmp_path, name):
    """Read-only, the file answers everything as recorded and is left as it was."""
    path = tmp_path / "ro.db"
    shutil.copy(FIXTURES / f"legacy-v3-{name}.db", path)
    before = path.read_bytes()
    queries = np.asarray(EXPECTED["v3"]["queries"], np.float32)
    with Store.open(path, readonly=True) as r:
        answers_as_recorded(r, EXPECTED["v3"][name], queries)
    assert path.read_bytes() == before

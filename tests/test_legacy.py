"""Stores written by earlier releases open, upgrade and answer as they did.

``tests/fixtures/legacy-vN-*.db`` were written at schema N by ``make_legacy.py N``
(v1: rvqstore 0.1.0; v2: checksums, before metadata), which also recorded their answers.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

from rvqstore import Store

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
EXPECTED = {v: json.loads((FIXTURES / f"legacy-{v}-expected.json").read_text())
            for v in ("v1", "v2")}


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("name", ["trained", "untrained"])
def test_legacy_store_opens_upgrades_and_searches(tmp_path, version, name):
    path = tmp_path / f"{name}.db"
    shutil.copy(FIXTURES / f"legacy-{version}-{name}.db", path)
    want = EXPECTED[version][name]
    queries = np.asarray(EXPECTED[version]["queries"], np.float32)
    with Store.open(path) as s:
        assert len(s) == want["count"]
        assert s.info()["trained"] == want["info"]["trained"]
        assert s.check() == []
        res = s.search(queries, k=5)
        np.testing.assert_array_equal(res.ids, want["ids"])
        np.testing.assert_allclose(res.distances, want["distances"], rtol=1e-5, atol=1e-5)
        assert s.keys([0])[0] == "doc-0"
        new = s.add(queries[:2] + 10.0, keys=["new-0", "new-1"])
        assert s.search(queries[0] + 10.0, k=1).ids[0] == new[0]
    with Store.open(path, readonly=True) as r:  # the upgraded file reopens as it is
        assert len(r) == want["count"] + 2


def test_legacy_v1_store_reads_read_only_without_upgrading(tmp_path):
    path = tmp_path / "ro.db"
    shutil.copy(FIXTURES / "legacy-v1-trained.db", path)
    before = path.read_bytes()
    queries = np.asarray(EXPECTED["v1"]["queries"], np.float32)
    with Store.open(path, readonly=True) as r:  # no CRCs to check in schema 1
        np.testing.assert_array_equal(r.search(queries, k=5).ids, EXPECTED["v1"]["trained"]["ids"])
        assert r.get([0]).shape == (1, 16)
    assert path.read_bytes() == before

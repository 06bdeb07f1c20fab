"""Arrow tables and Parquet files in and out (the ``arrow`` extra).

Outside CI a machine without pyarrow skips these; CI (.ci/run sets RVQSTORE_CI=1) installs
the extra and fails here if it cannot import it.
"""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from rvqstore import Store
from rvqstore.cli import main
from rvqstore.errors import InvalidInputError

from conftest import clustered

if os.environ.get("RVQSTORE_CI"):
    import pyarrow as pa  # CI installs the extra: a missing pyarrow fails here
else:
    pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402


@pytest.fixture
def store(tmp_path):
    x = clustered(300, 8, centers=5, seed=3)
    path = tmp_path / "a.db"
    with Store.open(path, dim=8, stages=4, codebook_size=16) as s:
        s.add(x[:200], keys=[f"k{i}" for i in range(200)],
              metadata=[{"n": i, "tag": ["a", "b"][i % 2], "ok": i % 3 == 0} if i % 4 else None
                        for i in range(200)],
              documents=[f"doc {i}" if i % 5 else None for i in range(200)])
        s.add(x[200:])  # no keys, metadata or documents
    return path, x


def test_to_arrow_holds_every_item(store):
    path, x = store
    with Store.open(path, readonly=True) as s:
        table = s.to_arrow(batch_size=64)
        assert table.schema.field("vector").type == pa.list_(pa.float32(), 8)
        assert table.num_rows == 300
        rows = table.to_pylist()
        np.testing.assert_array_equal(np.array([r["vector"] for r in rows], np.float32), x)
        assert [r["id"] for r in rows] == list(range(300))
        assert rows[5]["key"] == "k5" and rows[250]["key"] is None
        assert json.loads(rows[5]["metadata"]) == {"n": 5, "tag": "b", "ok": False}
        assert rows[4]["metadata"] is None and rows[6]["document"] == "doc 6"
        assert rows[10]["document"] is None


def test_parquet_round_trip_through_the_cli(store, tmp_path):
    path, x = store
    out = tmp_path / "all.parquet"
    result = CliRunner().invoke(main, ["export", str(path), "-o", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert pq.ParquetFile(out).metadata.num_rows == 300
    from rvqstore.inputs import read_vectors
    whole = read_vectors(out)  # what `search QUERYFILE` reads
    np.testing.assert_array_equal(whole.vectors, x)
    assert whole.keys[:2] == ["k0", "k1"] and whole.keys[250] is None
    q = tmp_path / "q.parquet"
    pq.write_table(pa.table({"vector": pa.array(list(x[:3]), pa.list_(pa.float32(), 8))}), q)
    result = CliRunner().invoke(main, ["search", str(path), str(q), "-k", "1", "--json"],
                                catch_exceptions=False)
    assert [r["id"] for r in json.loads(result.output)] == [0, 1, 2]
    copy = tmp_path / "copy.db"
    result = CliRunner().invoke(main, ["add", str(copy), str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Added 300 vectors" in result.output
    with Store.open(path, readonly=True) as a, Store.open(copy, readonly=True) as b:
        for (ia, ka, va, ma, da), (ib, kb, vb, mb, db) in zip(
                a.iter(with_metadata=True, with_documents=True),
                b.iter(with_metadata=True, with_documents=True)):
            np.testing.assert_array_equal(ia, ib)
            np.testing.assert_array_equal(va, vb)
            assert (ka, ma, da) == (kb, mb, db)


def test_parquet_is_read_batch_by_batch_with_struct_metadata(tmp_path):
    from rvqstore.arrow import read_batches

    x = np.random.default_rng(1).standard_normal((1000, 4)).astype(np.float32)
    table = pa.table({"embedding": pa.array(list(x), pa.list_(pa.float32())),
                      "key": [f"k{i}" for i in range(1000)],
                      "metadata": [{"year": 2000 + i % 7} for i in range(1000)]})
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=300)
    batches = list(read_batches(path, batch_size=250))
    assert len(batches) >= 4 and max(len(b.vectors) for b in batches) <= 250
    np.testing.assert_array_equal(np.concatenate([b.vectors for b in batches]), x)
    assert batches[0].metadata[3] == {"year": 2003} and batches[0].keys[0] == "k0"
    with Store.open(tmp_path / "s.db") as s:
        for b in read_batches(table):
            s.add(b.vectors, keys=b.keys, metadata=b.metadata)
        assert s.count({"year": 2003}) == len(range(3, 1000, 7))


@pytest.mark.parametrize("table, message", [
    ({"v": [[1.0, 2.0]]}, "no vector column"),
    ({"vector": ["a"]}, "must be lists of numbers"),
    ({"vector": [[1.0, 2.0], [1.0]]}, "row 1 has 1 numbers"),
    ({"vector": [[1.0, 2.0], None]}, "row 1 has no vector"),
    ({"vector": [[1.0, 2.0]], "metadata": ["{not json"]}, "row 0 metadata is not JSON"),
    ({"vector": [[1.0, 2.0]], "id": [1.5]}, "column 'id' must be integers"),
    ({"vector": [[1.0, 2.0]], "key": [3]}, "column 'key' must be text"),
])
def test_bad_parquet_is_refused_by_name(tmp_path, table, message):
    src = tmp_path / "bad.parquet"
    pq.write_table(pa.table(table), src)
    db = tmp_path / "new.db"
    result = CliRunner().invoke(main, ["add", str(db), str(src)])
    assert result.exit_code != 0 and message in result.output
    assert not db.exists()  # nothing is made for a file whose columns are wrong
    with pytest.raises(InvalidInputError, match=message.split()[0]):
        from rvqstore.inputs import read_vectors
        read_vectors(src)


def test_not_a_parquet_file(tmp_path):
    src = tmp_path / "x.parquet"
    src.write_bytes(b"not parquet")
    result = CliRunner().invoke(main, ["add", str(tmp_path / "n.db"), str(src)])
    assert result.exit_code != 0 and "is not a Parquet file" in result.output


def test_store_add_arrow_streams_batches_and_upserts(tmp_path):
    x = np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32)
    table = pa.table({"vector": pa.array(list(x), pa.list_(pa.float32(), 3)),
                      "key": ["a", "b", "c", "d", "e"],
                      "document": ["one", "two", "three", "four", "five"]})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    seen = []
    with Store.open(tmp_path / "s.db") as s:
        assert s.add_arrow(path, progress=lambda *a: seen.append(a)) == 5
        assert seen[-1] == ("add", 5, 5)
        changed = pa.table({"vector": pa.array(list(x[:2] + 1), pa.list_(pa.float32(), 3)),
                            "key": ["a", "zz"]})
        assert s.add_arrow(changed, upsert=True) == 2
        assert len(s) == 6
        np.testing.assert_array_equal(s.get(keys=["a"])[0], x[0] + 1)
        with pytest.raises(InvalidInputError, match="no keys"):
            s.add_arrow(pa.table({"vector": [[1.0, 2.0, 3.0]]}), upsert=True)

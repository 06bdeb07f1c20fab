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


# ----------------------------------------------------------------------------- quantized form

@pytest.fixture
def trained(tmp_path):
    """A trained store whose blocks hold deleted rows and whose items vary: (path, x)."""
    x = clustered(900, 16, centers=12, seed=8)
    path = tmp_path / "t.db"
    with Store.open(path, dim=16, stages=4, codebook_size=16, block_size=256) as s:
        s.add(x[:700], keys=[f"k{i}" for i in range(700)],
              metadata=[{"n": i, "tag": ["a", "b", "c"][i % 3]} if i % 4 else None
                        for i in range(700)],
              documents=[f"note {i} about {['cats', 'ships'][i % 2]}" for i in range(700)])
        s.train()
        s.add(x[700:])  # encoded after training: the added-error figures are not zero
        s.delete(list(range(0, 900, 7)))
    return path, x


def _same_answers(a, b, q):
    for kw in ({}, {"rerank": 1}, {"k": 25, "where": {"tag": "b"}}):
        ra, rb = a.search(q, **{"k": 10, **kw}), b.search(q, **{"k": 10, **kw})
        np.testing.assert_array_equal(ra.ids, rb.ids)
        np.testing.assert_array_equal(ra.distances, rb.distances)
    ta, tb = a.text_search("ships", k=15), b.text_search("ships", k=15)
    np.testing.assert_array_equal(ta.ids, tb.ids)


def test_quantized_round_trip_gives_identical_search_results(trained, tmp_path):
    path, x = trained
    calls = []
    with Store.open(path, readonly=True) as src:
        n = src.export_quantized(tmp_path / "q", progress=lambda *a: calls.append(a))
        assert n == len(src) == 900 - len(range(0, 900, 7))
        assert calls[-1] == ("export", n, n)
        with Store.import_quantized(tmp_path / "q", tmp_path / "back.db",
                                    progress=lambda *a: calls.append(a)) as dst:
            assert calls[-1] == ("import", n, n)
            assert dst.check() == [] and len(dst) == n
            np.testing.assert_array_equal(dst.ids(), src.ids())
            ids = src.ids()
            assert dst.keys(ids) == src.keys(ids)
            assert dst.metadata(ids) == src.metadata(ids)
            assert dst.documents(ids) == src.documents(ids)
            np.testing.assert_array_equal(dst.get(ids), src.get(ids))
            np.testing.assert_array_equal(dst.quantizer().codebooks, src.quantizer().codebooks)
            a, b = src.info(), dst.info()
            for f in ("train_mse", "train_count", "added_since_training", "added_sq_error",
                      "metric", "stages", "codebook_size", "block_size", "originals"):
                assert a[f] == b[f], f
            _same_answers(src, dst, clustered(30, 16, centers=12, seed=9))
            # the codes themselves, row for row (block order kept)
            got = {int(i): c for ids_, cd, _ in dst.iter_codes() for i, c in zip(ids_, cd)}
            for ids_, cd, _ in src.iter_codes():
                for i, c in zip(ids_, cd):
                    np.testing.assert_array_equal(got[int(i)], c)
            dst.add(x[:3])  # an ordinary store afterwards: adds get new ids and codes
            assert len(dst) == n + 3 and dst.check() == []



def test_codes_alone_import_and_another_tool_reads_the_documented_schema(trained, tmp_path):
    path, _ = trained
    with Store.open(path, readonly=True) as src:
        src.export_quantized(tmp_path / "q", with_vectors=False)
        rq = src.quantizer()
        codes_of = {int(i): (c, nm) for ids_, cd, nms in src.iter_codes()
                    for i, c, nm in zip(ids_, cd, nms)}
        # pyarrow and numpy only, as the docstring describes: no rvqstore
        books = pq.read_table(tmp_path / "q" / "codebooks.parquet")
        header = json.loads(books.schema.metadata[b"rvqstore"])
        S, K, dim = header["stages"], header["codebook_size"], header["dim"]
        cb = np.array(books.column("vector").to_pylist(), np.float32).reshape(S, K, dim)
        codes = pq.read_table(tmp_path / "q" / "codes.parquet")
        assert "vector" not in codes.schema.names and header["with_vectors"] is False
        c = np.array(codes.column("codes").to_pylist(), np.uint8)
        xh = cb[np.arange(S), c].sum(axis=1)
        np.testing.assert_allclose(xh, rq.decode(c), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose((xh.astype(np.float64) ** 2).sum(axis=1),
                                   codes.column("sq_norm").to_numpy(), rtol=1e-4)
        for i, row in zip(codes.column("id").to_pylist(), c):
            np.testing.assert_array_equal(codes_of[i][0], row)
        src.export_quantized(tmp_path / "full")
        q = clustered(20, 16, centers=12, seed=4)
        a = src.search(q, k=10, rerank=1)
        for directory, options in (("q", {}), ("full", {"keep_originals": False})):
            with Store.import_quantized(tmp_path / directory, tmp_path / f"{directory}.db",
                                        **options) as dst:
                assert dst.config.keep_originals is False
                b = dst.search(q, k=10)
                np.testing.assert_array_equal(a.ids, b.ids)
                np.testing.assert_array_equal(a.distances, b.distances)


def _rewrite(directory, name, change):
    """Rewrite one file of an export through ``change(table) -> table``."""
    path = directory / name
    pq.write_table(change(pq.read_table(path)), path)


def _with_header(table, **fields):
    header = json.loads(table.schema.metadata[b"rvqstore"])
    header.update(fields)
    return table.replace_schema_metadata({b"rvqstore": json.dumps(header).encode()})


def _set_code(table, value):
    codes = np.array(table.column("codes").to_pylist(), np.uint8)
    codes[5, 1] = value
    arr = pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1), pa.uint8()),
                                            codes.shape[1])
    return table.set_column(table.schema.get_field_index("codes"), table.schema.field("codes"),
                            arr)


def _set_norm(table):
    nm = table.column("sq_norm").to_numpy().copy()
    nm[3] *= 1.5
    return table.set_column(table.schema.get_field_index("sq_norm"),
                            table.schema.field("sq_norm"), pa.array(nm, pa.float32()))


@pytest.mark.parametrize("name, change, words", [
    ("codes.parquet", lambda t: _with_header(t, format_version=2), ["version 2", "upgrade"]),
    ("codebooks.parquet", lambda t: t.replace_schema_metadata({}), ["no rvqstore quantized"]),
    ("codes.parquet", lambda t: _with_header(t, count=5), ["different exports"]),
    ("codes.parquet", lambda t: _set_code(t, 200), ["a code is 200", "codebook_size=16"]),
    ("codes.parquet", _set_norm, ["sq_norms disagree"]),
    ("codes.parquet", lambda t: t.drop_columns(["sq_norm"]), ["documented schema"]),
    ("codebooks.parquet", lambda t: t.slice(0, 10), ["4 x 16 codewords"]),
])
def test_a_bad_export_is_refused_by_name_and_leaves_no_store(trained, tmp_path, name, change,
                                                             words):
    path, _ = trained
    with Store.open(path, readonly=True) as src:
        src.export_quantized(tmp_path / "q")
    _rewrite(tmp_path / "q", name, change)
    target = tmp_path / "new.db"
    with pytest.raises(InvalidInputError) as e:
        Store.import_quantized(tmp_path / "q", target)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not target.exists()


def test_quantized_export_and_import_refusals(store, trained, tmp_path):
    from rvqstore.errors import DuplicateError, NotTrainedError

    untrained, _ = store
    with Store.open(untrained) as s, pytest.raises(NotTrainedError):
        s.export_quantized(tmp_path / "none")
    path, x = trained
    with Store.open(path) as src:
        src.export_quantized(tmp_path / "q")
        with pytest.raises(InvalidInputError, match="exists"):
            Store.import_quantized(tmp_path / "q", path)
        rq = src.quantizer()
        ids, codes, norms = next(src.iter_codes())
        with pytest.raises(InvalidInputError, match="empty, untrained"):
            src.import_codes(rq, [{"ids": [10**6], "codes": codes[:1], "vectors": x[:1]}])
    with Store.open(tmp_path / "e.db", dim=16, stages=4, codebook_size=16) as e:
        twice = {"ids": ids[:2], "codes": codes[:2], "vectors": x[:2]}
        with pytest.raises(DuplicateError, match="ids given twice"):
            e.import_codes(rq, [twice, twice])
        with pytest.raises(Exception, match="keeps originals"):
            e.import_codes(rq, [{"ids": ids[:2], "codes": codes[:2]}])
        assert len(e) == 0 and not e.info()["trained"]  # all or nothing
        e.import_codes(rq, [twice])
        assert len(e) == 2 and e.check() == []


def test_quantized_export_and_import_through_the_cli(trained, tmp_path):
    path, x = trained
    run = CliRunner().invoke
    out = run(main, ["export", str(path), "--quantized", str(tmp_path / "q"), "--no-vectors"],
              catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "as codes to" in out.output and (tmp_path / "q" / "codes.parquet").exists()
    new = tmp_path / "new.db"
    out = run(main, ["import", str(tmp_path / "q"), str(new)], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert out.output.startswith(f"Imported 771 vectors into {new}") and "originals none" in \
        out.output
    search = ["search", "--vector", json.dumps(x[5].tolist()), "-k", "5", "--json"]
    a = run(main, [search[0], str(path), "--rerank", "1", *search[1:]], catch_exceptions=False)
    b = run(main, [search[0], str(new), *search[1:]], catch_exceptions=False)
    assert a.exit_code == 0 and a.output == b.output
    again = run(main, ["import", str(tmp_path / "q"), str(new)])
    assert again.exit_code == 2 and "exists" in again.output
    both = run(main, ["export", str(path), "--quantized", str(tmp_path / "q2"), "-o", "x.jsonl"])
    assert both.exit_code == 2 and "give no -o" in both.output
    lone = run(main, ["export", str(path), "--no-vectors"])
    assert lone.exit_code == 2 and "--quantized" in lone.output
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = run(main, ["import", str(empty), str(tmp_path / "other.db")])
    assert bad.exit_code == 1 and "no codebooks.parquet" in bad.output
    assert not (tmp_path / "other.db").exists()


def test_a_recorded_calibration_travels_with_the_codes(trained, tmp_path):
    """A partitioned store's calibrated default nprobe goes along, so the imported store
    probes as deep (without it a codes-only copy calibrated itself differently and its
    answers at a million vectors were not the same)."""
    path, _ = trained
    with Store.open(path, partitions=16) as src:  # K partitions: a cell per first-stage code
        chosen = src.calibrate()
        rec = src.recorded_calibration()
        assert rec == {"stages_per_cell": 1, "nprobe": chosen["nprobe"],
                       "coverage": pytest.approx(chosen["coverage"], abs=1e-6),
                       "rerank_error_z": pytest.approx(chosen["error_z"], abs=1e-3)}
        src.export_quantized(tmp_path / "q", with_vectors=False)
        q = clustered(30, 16, centers=12, seed=5)
        want = src.search(q, k=10, rerank=1)
    Store.import_quantized(tmp_path / "q", tmp_path / "c.db").close()
    with Store.open(tmp_path / "c.db", partitions=16) as dst:
        assert dst.recorded_calibration() == rec
        got = dst.search(q, k=10)
        assert dst.info()["partitions"]["nprobe"] == rec["nprobe"]
        np.testing.assert_array_equal(got.distances, want.distances)
        # ids equal but where two rows tie (16-byte codes repeat): then in either order
        for a, b, d in zip(got.ids, want.ids, want.distances):
            for dist in np.unique(d):
                assert set(a[d == dist]) == set(b[d == dist])
        assert (got.ids == want.ids).mean() > 0.95
    with Store.open(tmp_path / "plain.db", dim=16, stages=4, codebook_size=16) as e:
        rq_store = Store.open(path, readonly=True)
        ids, codes, _ = next(rq_store.iter_codes())
        with pytest.raises(InvalidInputError, match="calibration out of range"):
            e.import_codes(rq_store.quantizer(), [{"ids": ids, "codes": codes,
                                                   "vectors": rq_store.get(ids)}],
                           calibration={**rec, "nprobe": 0})
        rq_store.close()
        assert len(e) == 0


def test_an_import_numbers_on_from_the_exporting_stores_next_id(trained, tmp_path):
    path, x = trained
    with Store.open(path) as src:
        src.delete([898, 899])  # the highest ids given: not to be given again
        assert src.info()["next_id"] == 900
        src.export_quantized(tmp_path / "q")
    with Store.import_quantized(tmp_path / "q", tmp_path / "b.db") as dst:
        assert dst.ids()[-1] == 897 and dst.info()["next_id"] == 900
        assert dst.add(x[:2]).tolist() == [900, 901]

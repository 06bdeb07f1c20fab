"""The Store: the API, the file, configuration, keys, maintenance."""

import hashlib
import os
import pathlib
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from rvqstore import (ConfigMismatchError, EmptyStoreError, OriginalsMissingError, Store,
                      StoreClosedError)
from rvqstore.algo import exact_search

from conftest import clustered


def recall_at(found, truth, k=10):
    return np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)])


def test_lifecycle(store_path, vecs):
    q = clustered(20, 16, centers=12, seed=8)
    with Store.open(store_path, dim=16, stages=4, codebook_size=32) as store:
        ids = store.add(vecs)
        assert ids.dtype == np.int64 and list(ids[:3]) == [0, 1, 2]
        # before training, search is exact
        res = store.search(q, k=10)
        truth = exact_search(vecs, q, k=10)
        np.testing.assert_array_equal(res.ids, truth.ids)
        info = store.train()
        assert info["trained"] and info["codebook_version"] == 1 and info["train_mse"] > 0
        res = store.search(q, k=10)
        assert res.ids.shape == (20, 10) and res.distances.dtype == np.float32
        assert recall_at(res.ids, truth.ids) >= 0.95  # rerank x10 by default
        coarse = store.search(q, k=10, rerank=1)
        assert recall_at(coarse.ids, truth.ids) < recall_at(res.ids, truth.ids) + 1e-9
        assert store.delete(ids[:5]) == 5
        assert len(store) == len(vecs) - 5
        assert not np.isin(ids[:5], store.search(vecs[:5], k=10).ids).any()
        store.retrain()
        assert store.info()["codebook_version"] == 2
        np.testing.assert_array_equal(store.get(ids[5:8]), vecs[5:8])


def test_added_after_training_are_searchable_at_once(trained):
    new = clustered(30, 16, centers=3, seed=99) + 5.0
    ids = trained.add(new)
    coarse = trained.search(new, k=1, rerank=1)
    assert np.isin(coarse.ids[:, 0], ids).all()  # far from the old data: codes find the new ones
    res = trained.search(new, k=1, rerank=30)
    np.testing.assert_array_equal(res.ids[:, 0], ids)
    info = trained.info()
    assert info["added_since_training"] == 30 and info["added_mse"] > 0


def test_single_query_and_padding(store_path, vecs):
    with Store.open(store_path, dim=16) as store:
        store.add(vecs[:3])
        res = store.search(vecs[0], k=5)
        assert res.ids.shape == (5,) and res.ids[0] == 0
        assert list(res.ids[3:]) == [-1, -1] and np.isinf(res.distances[3:]).all()


def test_padding_after_deletes_on_trained_store(trained, vecs):
    trained.delete(np.arange(3, 800))
    res = trained.search(vecs[0], k=5)
    assert sorted(res.ids[:3].tolist()) == [0, 1, 2]
    assert list(res.ids[3:]) == [-1, -1] and np.isinf(res.distances[3:]).all()


def test_keys(trained, vecs):
    res = trained.search(vecs[10], k=3, with_keys=True)
    assert res.keys[0] == "item-10"
    np.testing.assert_array_equal(trained.get(keys=["item-4", "item-2"]), vecs[[4, 2]])
    assert list(trained.ids_for_keys(["item-9"])) == [9]
    assert trained.keys([9, 10]) == ["item-9", "item-10"]
    assert trained.delete(keys=["item-9"]) == 1
    assert len(trained) == 799


def test_reopen_reads_configuration(store_path, vecs):
    with Store.open(store_path, dim=16, metric="ip", stages=3, codebook_size=16) as s:
        s.add(vecs)
    with Store.open(store_path) as s:
        assert (s.dim, s.metric, s.config.stages, len(s)) == (16, "ip", 3, 800)
    with pytest.raises(ConfigMismatchError, match="stages=8.*stages=3"):
        Store.open(store_path, stages=8)
    with pytest.raises(ConfigMismatchError, match="dim=32.*dim=16"):
        Store.open(store_path, dim=32)


def test_dim_taken_from_first_add(store_path, vecs):
    with Store.open(store_path) as s:
        s.add(vecs[:10])
        assert s.dim == 16
    with Store.open(store_path) as s:
        assert s.dim == 16


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_other_metrics_find_exact_neighbours(tmp_path, vecs, metric):
    q = clustered(15, 16, centers=12, seed=8)
    base, qq = vecs, q
    if metric == "cosine":
        base = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        qq = q / np.linalg.norm(q, axis=1, keepdims=True)
    truth = exact_search(base, qq, k=10, metric="ip")
    with Store.open(tmp_path / "m.db", dim=16, metric=metric, stages=4, codebook_size=32) as s:
        s.add(vecs)
        s.train()
        res = s.search(q, k=10)
        assert recall_at(res.ids, truth.ids) >= 0.9
        exact_d = -(qq[0] @ base[res.ids[0]].T)
        if metric == "cosine":
            exact_d = 1 + exact_d
        np.testing.assert_allclose(res.distances[0], exact_d, rtol=1e-4, atol=1e-5)


def test_without_originals(tmp_path, vecs):
    with Store.open(tmp_path / "n.db", dim=16, stages=4, codebook_size=32,
                    keep_originals=False) as s:
        s.add(vecs)
        s.train()
        assert s.info()["bytes"]["originals"] == 0
        res = s.search(vecs[:5], k=3)  # codes only
        assert (res.ids[:, 0] == np.arange(5)).mean() >= 0.6
        with pytest.raises(OriginalsMissingError, match="keep_originals=False"):
            s.retrain()
        with pytest.raises(OriginalsMissingError):
            s.search(vecs[0], k=3, rerank=4)
        with pytest.raises(OriginalsMissingError):
            s.get([1])


@pytest.mark.parametrize("fmt,tol", [("float16", 1e-2), ("zstd", 0.0)])
def test_originals_formats(tmp_path, vecs, fmt, tol):
    with Store.open(tmp_path / "f.db", dim=16, originals=fmt) as s:
        s.add(vecs)
        np.testing.assert_allclose(s.get([3, 4]), vecs[[3, 4]], atol=tol * 4, rtol=tol)


def test_readd_deleted_id(trained, vecs):
    trained.delete([7])
    trained.add(vecs[8:9] + 100.0, ids=[7])
    res = trained.search(vecs[8] + 100.0, k=1, rerank=1)
    assert res.ids[0] == 7
    assert trained.check() == []
    np.testing.assert_allclose(trained.get([7])[0], vecs[8] + 100.0)


def test_compact_shrinks_the_file(tmp_path):
    x = clustered(6000, 64, seed=3)
    path = tmp_path / "c.db"
    with Store.open(path, dim=64, stages=8, codebook_size=32, block_size=1024) as s:
        s.add(x)
        s.train()
        s.compact()
        before = os.path.getsize(path)
        s.delete(np.arange(0, 5000))
        s.compact()
        after = os.path.getsize(path)
        assert after < 0.4 * before
        assert s.info()["deleted_pending_compact"] == 0
        assert s.check() == []
        assert len(s) == 1000
        assert s.search(x[5500], k=1).ids[0] == 5500


def test_blocks_not_rows(tmp_path):
    """Opening reads a handful of blobs: codes are stored per block, not per vector."""
    x = clustered(5000, 16, seed=4)
    path = tmp_path / "b.db"
    with Store.open(path, dim=16, stages=4, codebook_size=32, block_size=2048) as s:
        s.add(x)
        s.train()
        s.add(x[:100] + 1.0)
    con = sqlite3.connect(path)
    counts = [r[0] for r in con.execute("SELECT count FROM rvq_blocks ORDER BY block")]
    assert counts == [2048, 2048, 1004]
    con.close()


def test_second_connection_sees_commits(trained, store_path, vecs):
    with Store.open(store_path, readonly=True) as reader:
        before = reader.search(vecs[0], k=1, rerank=1).ids[0]
        assert before == 0
        new = trained.add(vecs[:1] * 1.0001)
        trained.delete([0])
        res = reader.search(vecs[0], k=1, rerank=1)
        assert res.ids[0] == new[0]
        assert len(reader) == len(trained)


def test_reader_keeps_old_version_during_retrain(trained, store_path, vecs):
    seen = []
    with Store.open(store_path, readonly=True) as reader:
        reader.search(vecs[0], k=1)

        def progress(phase, done, total):
            if phase == "encode" and done < total:
                reader.search(vecs[0], k=1)
                seen.append(reader.info()["codebook_version"])

        trained.retrain(progress=progress)
        assert seen and set(seen) == {1}
        reader.search(vecs[0], k=1)
        assert reader.info()["codebook_version"] == 2


def test_progress_callback_reports_phases(trained):
    phases = set()
    trained.retrain(progress=lambda p, d, t: phases.add(p))
    assert {"train", "encode"} <= phases


def test_close_is_idempotent_and_use_after_close_fails(store_path, vecs):
    s = Store.open(store_path, dim=16)
    s.add(vecs[:5])
    s.close()
    s.close()
    with pytest.raises(StoreClosedError):
        s.search(vecs[0], k=1)
    with pytest.raises(StoreClosedError):
        s.add(vecs[:1])


def test_migrations_recorded_and_newer_schema_refused(store_path, vecs):
    with Store.open(store_path, dim=16) as s:
        s.add(vecs[:5])
    con = sqlite3.connect(store_path)
    assert [r[0] for r in con.execute("SELECT version FROM rvq_migrations")] == [1, 2, 3]
    con.execute("INSERT INTO rvq_migrations VALUES (99, '0099_future', 'x')")
    con.commit()
    con.close()
    digest = hashlib.sha256(store_path.read_bytes()).hexdigest()
    from rvqstore import SchemaTooNewError
    with pytest.raises(SchemaTooNewError, match="schema version 99"):
        Store.open(store_path)
    with pytest.raises(SchemaTooNewError):
        Store.open(store_path, readonly=True)
    assert hashlib.sha256(store_path.read_bytes()).hexdigest() == digest


def test_wheel_ships_migrations(tmp_path):
    """Build the wheel, install it into a fresh venv, open a store from outside the repo."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(wheels), root], check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    whl = next(wheels.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                    str(whl)], check=True, capture_output=True)
    # then the fresh venv borrows the test environment's dependencies (numpy, numba, ...) through
    # a .pth file, so only rvqstore itself comes from the wheel
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    pathlib.Path(site, "test_deps.pth").write_text("\n".join(deps) + "\n")
    code = ("import rvqstore, numpy as np; from rvqstore import Store\n"
            f"assert rvqstore.__file__.startswith({str(venv)!r}), rvqstore.__file__\n"
            "s = Store.open('w.db', dim=4); s.add(np.eye(4)); print(len(s)); s.close()")
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4"


def test_skip_existing_keys_returns_stored_ids(trained, vecs):
    new = clustered(3, 16, seed=50)
    ids = trained.add(np.vstack([vecs[:2], new]), keys=["item-0", "item-1", "a", "b", "c"],
                      skip_existing_keys=True)
    assert list(ids[:2]) == [0, 1] and len(set(ids[2:])) == 3 and len(trained) == 803
    again = trained.add(new, keys=["a", "b", "c"], skip_existing_keys=True)
    np.testing.assert_array_equal(again, ids[2:])
    assert len(trained) == 803
    assert trained.check() == []


def test_iter_yields_everything_in_id_order(trained, vecs):
    seen_ids, seen_keys, seen_vecs = [], [], []
    for ids, keys, x in trained.iter(batch_size=300):
        seen_ids += ids.tolist()
        seen_keys += keys
        seen_vecs.append(x)
    assert seen_ids == list(range(800))
    assert seen_keys[5] == "item-5"
    np.testing.assert_array_equal(np.vstack(seen_vecs), vecs)


def test_own_writes_update_memory_without_full_reload(trained, vecs):
    trained.search(vecs[0], k=1)
    index = trained.code_index()
    new = trained.add(vecs[:3] + 50.0)
    assert trained.code_index() is index and len(index.ids) == 803  # appended in place
    res = trained.search(vecs[:3] + 50.0, k=1)
    np.testing.assert_array_equal(res.ids, new[:, None])
    with Store.open(trained.path) as other:  # a commit by another connection forces a reload
        other.add(vecs[:1] + 99.0)
    assert trained.search(vecs[0] + 99.0, k=1).ids[0] == 803
    assert trained.code_index() is not index


def test_reader_refresh_reads_only_the_tail(tmp_path, monkeypatch):
    from rvqstore.storage import codes as codeblocks

    x = clustered(3000, 16, seed=6)
    path = tmp_path / "r.db"
    with Store.open(path, dim=16, stages=4, codebook_size=32, block_size=500) as w:
        w.add(x[:2000])
        w.train()
        with Store.open(path, readonly=True) as r:
            r.search(x[0], k=1)
            calls = []
            real = codeblocks.read_codes
            monkeypatch.setattr(codeblocks, "read_codes",
                                lambda db, v, s, first=0: calls.append(first) or real(db, v, s, first))
            w.add(x[2000:2600])          # appends: blocks 4 and 5
            assert r.search(x[2500], k=1).ids[0] == 2500
            assert calls == [3]           # from the last block it had, not from 0
            w.delete([2500])
            w.compact()                   # rewrites everything: full reload
            res = r.search(x[2500], k=2)
            assert 2500 not in res.ids and calls[-1] == 0
            assert len(r) == 2599


def test_bias_mask_after_own_delete(trained, vecs):
    trained.search(vecs[0], k=1)
    index = trained.code_index()
    trained.delete([0, 1])
    assert trained.code_index() is index and np.isinf(index.bias[:2]).all()  # masked in place
    assert not np.isin([0, 1], trained.search(vecs[:2], k=5).ids).any()


def test_vectors_added_during_retrain_are_encoded_at_the_switch(store_path, vecs):
    extra = clustered(700, 16, centers=12, seed=77)
    trained = Store.open(store_path, dim=16, stages=4, codebook_size=32, block_size=300)
    trained.add(vecs)
    trained.train()
    with Store.open(store_path) as other:
        def progress(phase, done, total):
            if phase == "encode" and done == 0:
                other.add(extra)  # another connection commits mid-retrain
        trained.retrain(progress=progress)
    assert trained.check() == []
    assert len(trained) == 1500
    con = sqlite3.connect(store_path)
    counts = [r[0] for r in con.execute("SELECT count FROM rvq_blocks ORDER BY block")]
    con.close()
    assert counts[:-1] == [300] * (len(counts) - 1)  # all but the last block full
    res = trained.search(extra[:20], k=1)
    assert (res.ids[:, 0] >= 800).all()
    trained.close()


def test_a_search_reads_as_of_one_commit_when_another_connection_deletes(trained, store_path,
                                                                        vecs, monkeypatch):
    # A search's ranking, its rerank reads and its results come from one read transaction:
    # a delete committed by another connection between the scan and the rerank is not seen
    # half-way (the candidate keeps its exact distance); the next search no longer finds it.
    import rvqstore.algo

    real = rvqstore.algo.rerank

    def delete_between_scan_and_fetch(q, candidates, fetch, **kw):
        assert 0 in candidates  # the scan saw it
        with Store.open(store_path) as other:
            other.delete([0])
        return real(q, candidates, fetch, **kw)

    monkeypatch.setattr(rvqstore.algo, "rerank", delete_between_scan_and_fetch)
    res = trained.search(vecs[0], k=3)
    assert res.ids[0] == 0 and res.distances[0] < 1e-4 and (res.ids >= 0).all()
    monkeypatch.setattr(rvqstore.algo, "rerank", real)
    after = trained.search(vecs[0], k=3)
    assert 0 not in after.ids and (after.ids >= 0).all()
    assert list(after.ids[:2]) == list(res.ids[1:3])


def test_ids_for_keys_can_skip_missing(trained):
    np.testing.assert_array_equal(trained.ids_for_keys(["item-3", "nope"], missing="skip"), [3, -1])


def test_user_meta(trained, store_path):
    assert trained.user_meta() == {}
    assert trained.set_user_meta("model", "a") == "a"
    assert trained.set_user_meta("model", "b", only_if_absent=True) == "a"
    with Store.open(store_path, readonly=True) as r:
        assert r.user_meta() == {"model": "a"}


def test_two_processes_create_the_same_store(tmp_path):
    path = tmp_path / "race.db"
    code = ("import sys, numpy as np; from rvqstore import Store\n"
            "s = Store.open(sys.argv[1], dim=8, stages=2, codebook_size=4)\n"
            "s.add(np.ones((5, 8), np.float32)); s.close()")
    for attempt in range(3):
        path = tmp_path / f"race{attempt}.db"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        errs = [p.communicate()[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), errs
        with Store.open(path) as s:
            assert len(s) == 10 and s.check() == []


def test_some_rows_without_keys(store_path, vecs):
    with Store.open(store_path, dim=16) as s:
        ids = s.add(vecs[:3], keys=["a", None, "c"])
        assert s.keys(ids) == ["a", None, "c"]
        s.add(vecs[3:5], keys=[None, None])
        assert len(s) == 5


def test_mmap_originals_gives_the_same_results(trained, store_path, vecs):
    with Store.open(store_path, readonly=True, mmap_originals=True) as mapped:
        a = mapped.search(vecs[:5], k=5)
    b = trained.search(vecs[:5], k=5)
    np.testing.assert_array_equal(a.ids, b.ids)


def test_search_can_exclude_ids(trained, vecs):
    plain = trained.search(vecs[:2], k=5)
    res = trained.search(vecs[:2], k=5, exclude=[0, 1])
    assert not np.isin([0, 1], res.ids).any() and res.ids.shape == (2, 5)
    np.testing.assert_array_equal(res.ids[0][:4], [i for i in plain.ids[0] if i not in (0, 1)][:4])
    one = trained.search(vecs[3], k=3, exclude=3, with_keys=True)
    assert 3 not in one.ids and len(one.keys) == 3


def test_a_writer_opening_during_a_retrain_keeps_the_build(tmp_path):
    path = tmp_path / "r.db"
    x = clustered(3000, 16, seed=8)
    with Store.open(path, dim=16, stages=4, codebook_size=16, block_size=500) as a:
        a.add(x)
        a.train()

        def open_another(phase, done, total):
            if phase == "encode" and done == 1000:
                with Store.open(path) as b:  # a writer's open drops stale builds
                    assert b.search(x[1], k=1).ids[0] == 1

        a.retrain(progress=open_another)
        assert a.info()["codebook_version"] == 2 and a.check() == []
        assert a.search(x[5], k=1).ids[0] == 5


def test_a_dimension_set_by_another_connection(tmp_path):
    path = tmp_path / "d.db"
    with Store.open(path) as a, Store.open(path) as b:
        with pytest.raises(EmptyStoreError):
            a.search(np.ones(8, np.float32), k=1)  # loaded before any dimension
        b.add(np.eye(8, dtype=np.float32))
        assert a.search(np.eye(8, dtype=np.float32)[3], k=1).ids[0] == 3
        np.testing.assert_array_equal(a.get([2])[0], np.eye(8)[2])
        a.add(np.ones((1, 8), np.float32))
        assert len(a) == 9 and len(b) == 9


def test_an_add_after_searching_an_empty_store_without_dimension(tmp_path):
    with Store.open(tmp_path / "e.db") as s:
        with pytest.raises(EmptyStoreError):
            s.search(np.ones(4, np.float32), k=1)
        s.add(np.eye(4, dtype=np.float32))
        assert s.search(np.eye(4, dtype=np.float32)[2], k=1).ids[0] == 2

"""Bad input and faults: each gets a specific error, and nothing stored changes."""

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from rvqstore import (BadFileError, DimensionMismatchError, DuplicateError, EmptyStoreError,
                      InvalidInputError, ReadOnlyError, RvqstoreError, Store, UnknownIdError)

from conftest import clustered


def snapshot(store):
    ids = store.ids()
    return len(store), ids.tolist(), store.get(ids).tobytes(), store.info()["codebook_version"]


def bad_inputs(vecs):
    nan = vecs[:4].copy()
    nan[2, 3] = np.nan
    inf = vecs[:4].copy()
    inf[0, 0] = np.inf
    return [
        (lambda s: s.add(vecs[:4, :15]), DimensionMismatchError, "dim=15"),
        (lambda s: s.add(nan), InvalidInputError, "NaN"),
        (lambda s: s.add(inf), InvalidInputError, "inf"),
        (lambda s: s.add(np.array([["x"] * 16])), InvalidInputError, "numeric"),
        (lambda s: s.add([[1.0] * 16, [1.0] * 15]), InvalidInputError, "ragged"),
        (lambda s: s.add(np.empty((0, 16), np.float32)), InvalidInputError, "empty"),
        (lambda s: s.add(vecs[:2], ids=[5000, 5000]), DuplicateError, "duplicates"),
        (lambda s: s.add(vecs[:2], ids=[3, 5001]), DuplicateError, "already in the store"),
        (lambda s: s.add(vecs[:2], keys=["a", "a"]), DuplicateError, "duplicates"),
        (lambda s: s.add(vecs[:2], keys=["item-1", "new"]), DuplicateError, "item-1"),
        (lambda s: s.add(vecs[:2], keys=["a"]), InvalidInputError, "1 keys for 2"),
        (lambda s: s.delete([1, 2, 99999]), UnknownIdError, "99999"),
        (lambda s: s.delete(keys=["nope"]), UnknownIdError, "nope"),
        (lambda s: s.get([99999]), UnknownIdError, "99999"),
        (lambda s: s.search(vecs[0], k=0), InvalidInputError, "k must be"),
        (lambda s: s.search(vecs[0], k=-3), InvalidInputError, "k must be"),
        (lambda s: s.search(vecs[0, :10], k=3), DimensionMismatchError, "dim=10"),
        (lambda s: s.search(vecs[0], k=3, rerank=0), InvalidInputError, "rerank"),
    ]


@pytest.mark.parametrize("case", range(18))
def test_bad_input_is_refused_and_changes_nothing(trained, vecs, case):
    call, err, text = bad_inputs(vecs)[case]
    before = snapshot(trained)
    with pytest.raises(err, match=text):
        call(trained)
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


CHILD = textwrap.dedent("""
    import sys, numpy as np
    from rvqstore import Store
    path, mode = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng()
    s = Store.open(path)
    print("ready", len(s), flush=True)
    nxt = 100000
    while True:
        if mode == "add":
            s.add(rng.standard_normal((50, 16)).astype(np.float32), ids=np.arange(nxt, nxt + 50))
            nxt += 50
        elif mode == "delete":
            ids = s.ids().tolist()[:20]
            if not ids:
                break
            s.delete(ids)
        elif mode == "retrain":
            s.retrain()
        elif mode == "compact":
            s.delete(s.ids().tolist()[:10])
            s.compact()
        print("done", len(s), flush=True)
""")


@pytest.mark.parametrize("mode,step", [("add", 50), ("delete", 20), ("retrain", 0),
                                       ("compact", 10)])
def test_sigkill_leaves_a_consistent_store(tmp_path, mode, step):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = np.random.default_rng(hash(mode) % 1000)
    path = tmp_path / "k.db"
    base = clustered(3000, 16, seed=5)
    with Store.open(path, dim=16, stages=4, codebook_size=32, block_size=512) as s:
        s.add(base)
        s.train()
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(path), mode],
                                stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline().split()
        assert first[0] == "ready", first
        start = int(first[1])
        time.sleep(float(rng.uniform(0.05, 0.6)))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        # a kill can land halfway through a report: only whole lines count
        whole = out.split("\n")[:-1]
        counts = [start] + [int(line.split()[1]) for line in whole if line.startswith("done ")]
        con = sqlite3.connect(path)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
        with Store.open(path) as s:
            assert s.check() == [], (mode, attempt)
            n = len(s)
            # exactly the committed batches: the last reported one, or one more whose
            # commit landed before the kill but whose report did not
            if mode == "add":
                assert n in (counts[-1], counts[-1] + step)
            elif mode in ("delete", "compact"):
                assert n in (counts[-1], counts[-1] - step)
            else:
                assert n == start
            if n:
                assert s.search(base[0], k=3).ids.shape == (3,)


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

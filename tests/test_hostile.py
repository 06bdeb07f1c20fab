"""A store file is input: crafted, corrupted, full or locked files get a named error.

Each case crafts the file with plain sqlite3 (as an attacker or a failing disk would), then
checks that the store refuses it with an ``RvqstoreError`` subclass naming the problem,
runs nothing the file holds, and leaves the file as it was.
"""

import hashlib
import pathlib
import shutil
import sqlite3
import subprocess
import sys
import zlib

import numpy as np
import pytest
import zstandard

from rvqstore import (BadFileError, DiskFullError, InvalidInputError, LockedError,
                      RvqstoreError, Store)

from conftest import clustered


@pytest.fixture
def made(tmp_path):
    """A small trained store, closed: (path, vectors)."""
    path = tmp_path / "h.db"
    x = clustered(600, 16, centers=10, seed=3)
    with Store.open(path, dim=16, stages=4, codebook_size=16, block_size=256) as s:
        s.add(x, keys=[f"k{i}" for i in range(len(x))])
        s.train()
        s.delete([5])
    return path, x


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit(path, *statements):
    con = sqlite3.connect(path)
    for sql, *params in statements:
        con.execute(sql, *params)
    con.commit()
    con.close()


def count_rows(path):
    con = sqlite3.connect(path)
    n = con.execute("SELECT COUNT(*) FROM rvq_vectors").fetchone()[0]
    con.close()
    return n


# -- foreign SQL in the schema --------------------------------------------------------------

FOREIGN = {
    "trigger deleting every vector": (
        "CREATE TRIGGER wipe AFTER DELETE ON rvq_codebooks BEGIN DELETE FROM rvq_vectors; END",
        "trigger 'wipe'"),
    "trigger copying added vectors": (
        "CREATE TABLE loot (v BLOB)", "table 'loot'"),
    "trigger ignoring deletes": (
        "CREATE TRIGGER keep BEFORE DELETE ON rvq_vectors BEGIN SELECT RAISE(IGNORE); END",
        "trigger 'keep'"),
    "extra view": (
        "CREATE VIEW spin AS WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) "
        "SELECT i FROM r", "view 'spin'"),
    "extra index": ("CREATE INDEX peek ON rvq_vectors(vector)", "index 'peek'"),
}


@pytest.mark.parametrize("case", sorted(FOREIGN))
@pytest.mark.parametrize("readonly", [False, True])
def test_foreign_schema_objects_are_refused_unrun(made, case, readonly):
    path, _ = made
    sql, named = FOREIGN[case]
    statements = [(sql,)]
    if case == "trigger copying added vectors":
        statements.append(("CREATE TRIGGER copy AFTER INSERT ON rvq_vectors "
                           "BEGIN INSERT INTO loot VALUES (new.vector); END",))
    # a stale 'building' row: what a plain open deletes, firing the trigger
    statements.append(("INSERT INTO rvq_codebooks (version, state, stages, codebook_size, dim, "
                       "data, created_at, train_count, train_mse) "
                       "VALUES (77, 'building', 4, 16, 16, x'00', 'x', 0, 0)",))
    edit(path, *statements)
    before, n = digest(path), count_rows(path)
    with pytest.raises(BadFileError, match=named):
        Store.open(path, readonly=readonly)
    assert digest(path) == before and count_rows(path) == n


def test_a_view_in_place_of_a_store_table_is_refused(made):
    path, _ = made
    edit(path, ("ALTER TABLE rvq_deleted RENAME TO old_deleted",),
         ("CREATE VIEW rvq_deleted AS SELECT id FROM old_deleted WHERE id != 5",))
    before = digest(path)
    with pytest.raises(BadFileError, match="view 'rvq_deleted'"):
        Store.open(path, readonly=True)
    assert digest(path) == before


def test_an_altered_table_is_refused(made):
    path, _ = made
    edit(path, ("ALTER TABLE rvq_vectors ADD COLUMN extra TEXT",))
    with pytest.raises(BadFileError, match="altered table 'rvq_vectors'"):
        Store.open(path)


# -- settings and rows that do not fit the store --------------------------------------------

BAD_META = [("dim", "abc"), ("dim", str(1 << 23)), ("stages", "x"), ("stages", "0"),
            ("codebook_size", "1000"), ("block_size", "-1"), ("originals", "pickle"),
            ("metric", "hamming"), ("keep_originals", "yes"), ("active_version", "-3"),
            ("next_id", "1e9"), ("format", "2")]


@pytest.mark.parametrize("name,value", BAD_META, ids=[f"{n}={v}" for n, v in BAD_META])
def test_bad_settings_in_the_file_are_refused_on_open(made, name, value):
    path, _ = made
    edit(path, ("UPDATE rvq_meta SET value = ? WHERE key = ?", (value, name)))
    before = digest(path)
    for readonly in (False, True):
        with pytest.raises(BadFileError, match=name if name != "format" else "format"):
            Store.open(path, readonly=readonly)
    assert digest(path) == before


def test_active_version_without_codebooks(made):
    path, x = made
    edit(path, ("UPDATE rvq_meta SET value = '99' WHERE key = 'active_version'",))
    with Store.open(path, readonly=True) as s:
        with pytest.raises(BadFileError, match="codebook version 99"):
            s.search(x[0], k=3)
        with pytest.raises(BadFileError, match="version 99"):
            s.info()


@pytest.mark.parametrize("column,value", [("dim", 1 << 23), ("dim", 1024), ("stages", 8),
                                          ("codebook_size", 255)])
def test_codebook_rows_that_disagree_with_the_settings(made, column, value):
    path, x = made
    edit(path, (f"UPDATE rvq_codebooks SET {column} = ?", (value,)))
    with Store.open(path, readonly=True) as s:
        with pytest.raises(BadFileError, match="codebook version 1 has shape"):
            s.search(x[0], k=3)
        assert any("shape" in p for p in s.check())


def test_codes_beyond_the_codebook_with_a_recomputed_checksum(made):
    path, x = made
    con = sqlite3.connect(path)
    ids, codes, norms = con.execute("SELECT ids, codes, norms FROM rvq_blocks WHERE block = 0").fetchone()
    codes = bytes([255]) * 4 + codes[4:]  # codebook_size is 16
    crc = zlib.crc32(norms, zlib.crc32(codes, zlib.crc32(ids)))
    con.execute("UPDATE rvq_blocks SET codes = ?, checksum = ? WHERE block = 0", (codes, crc))
    con.commit()
    con.close()
    with Store.open(path, readonly=True) as s:
        with pytest.raises(BadFileError, match="codes >= codebook_size=16"):
            s.search(x[0], k=3)


def test_id_space_exhausted(made):
    path, x = made
    edit(path, ("UPDATE rvq_meta SET value = ? WHERE key = 'next_id'", (str((1 << 63) - 1),)))
    with Store.open(path) as s:
        with pytest.raises(InvalidInputError, match="no ids left"):
            s.add(x[:2])
        assert s.add(x[:1], ids=[10_000])[0] == 10_000


@pytest.mark.parametrize("claim", [1 << 40, 1 << 27])
def test_zstd_frames_claiming_huge_sizes(tmp_path, claim):
    path = tmp_path / "z.db"
    x = clustered(50, 16, seed=4)
    with Store.open(path, dim=16, originals="zstd") as s:
        s.add(x)
    # a frame whose header claims `claim` bytes, with a valid CRC around it
    # (magic, single-segment descriptor with an 8-byte size, the size, one raw 64-byte block)
    fake = (b"\x28\xb5\x2f\xfd" + b"\xe0" + claim.to_bytes(8, "little")
            + (1 | 64 << 3).to_bytes(3, "little") + b"\0" * 64)
    assert zstandard.frame_content_size(fake) == claim
    blob = fake + zlib.crc32(fake).to_bytes(4, "little")
    edit(path, ("UPDATE rvq_vectors SET vector = ? WHERE id IN (1, 2, 3, 4)", (blob,)))
    with Store.open(path, readonly=True) as s:
        with pytest.raises(BadFileError, match="claims"):
            s.search(x[0], k=3)
        with pytest.raises(BadFileError, match="id 1"):
            s.get([1])


# -- silent corruption: flipped bytes inside BLOBs ------------------------------------------

def flip(path, table, column, where, offsets):
    con = sqlite3.connect(path)
    blob = bytearray(con.execute(f"SELECT {column} FROM {table} WHERE {where}").fetchone()[0])
    for o in offsets:
        blob[o] ^= 0x5A
    con.execute(f"UPDATE {table} SET {column} = ? WHERE {where}", (bytes(blob),))
    con.commit()
    con.close()


CORRUPTIONS = {
    "code bytes": ("rvq_blocks", "codes", "block = 0", [12, 13, 14, 15], "code block 0"),
    "a norm byte": ("rvq_blocks", "norms", "block = 1", [2], "code block 1"),
    "an id byte": ("rvq_blocks", "ids", "block = 1", [8], "code block 1"),
    "codebook bytes": ("rvq_codebooks", "data", "version = 1", [100, 2000], "codebook"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_flipped_bytes_in_codes_are_detected(made, case):
    path, x = made
    table, column, where, offsets, named = CORRUPTIONS[case]
    flip(path, table, column, where, offsets)
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"  # SQLite sees nothing
    con.close()
    with Store.open(path, readonly=True) as s:
        with pytest.raises(BadFileError, match=named):
            s.search(x[3], k=3)
        problems = s.check()
        assert any(named in p and "checksum" in p for p in problems), problems


def test_flipped_bytes_in_an_original_are_detected(made):
    path, x = made
    flip(path, "rvq_vectors", "vector", "id = 3", [0, 1, 2])
    with Store.open(path, readonly=True) as s:
        with pytest.raises(BadFileError, match="id 3 fails its checksum"):
            s.get([3])
        with pytest.raises(BadFileError, match="id 3"):
            s.search(x[3], k=3)  # 3 is a rerank candidate of its own vector
        assert s.search(x[300], k=3, rerank=1).ids[0] == 300  # codes alone are intact
        assert any("id 3" in p for p in s.check())


def test_overwritten_pages_are_a_bad_file_error(made):
    path, x = made
    data = bytearray(path.read_bytes())
    page = 8192
    for start in range(2 * page, len(data) - page, 3 * page):
        data[start + 40:start + page] = b"\xff" * (page - 40)
    path.write_bytes(bytes(data))
    try:
        with Store.open(path, readonly=True) as s:
            s.search(x[0], k=3)
            s.get(s.ids())
            problems = s.check()
    except RvqstoreError as exc:  # a bare sqlite3.DatabaseError fails the test
        assert isinstance(exc, BadFileError), repr(exc)
        assert str(path) in str(exc)
    else:
        assert problems, "overwritten pages went unnoticed"


# -- a full disk, a held lock ---------------------------------------------------------------

def test_disk_full_is_named_and_rolled_back(made):
    path, x = made
    with Store.open(path) as s:
        before = (len(s), s.ids().tolist())
    # room for two more pages, as on a nearly full disk
    with Store.open(path, max_bytes=path.stat().st_size + 2 * 8192) as s:
        with pytest.raises(DiskFullError, match=str(path)):
            s.add(np.tile(x, (20, 1)))
        assert (len(s), s.ids().tolist()) == before
        s.add(x[:1])  # a write that fits still goes in
    with Store.open(path) as s:
        assert len(s) == before[0] + 1 and s.check() == []


def test_a_held_lock_is_a_locked_error_naming_the_file(made):
    path, x = made
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
         "c.execute('BEGIN IMMEDIATE'); print('held', flush=True); sys.stdin.read()",
         str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with Store.open(path, timeout=0.3) as s:
            with pytest.raises(LockedError, match=r"locked.*0\.3 s") as info:
                s.delete([7])
            assert str(path) in str(info.value)
            assert 7 in s.ids()  # reads go on under another's write lock
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    with Store.open(path) as s:
        assert s.delete([7]) == 1


# -- found in review: each failed before its fix ------------------------------------------

LEGACY = pathlib.Path(__file__).parent / "fixtures" / "legacy-v1-trained.db"


def schema_of(path):
    con = sqlite3.connect(path)
    v = con.execute("SELECT MAX(version) FROM rvq_migrations").fetchone()[0]
    con.close()
    return v


@pytest.mark.parametrize("bad", ["text original", "bad dim"])
def test_a_legacy_file_is_checked_before_it_is_upgraded(tmp_path, bad):
    path = tmp_path / "old.db"
    shutil.copy(LEGACY, path)
    if bad == "text original":
        edit(path, ("UPDATE rvq_vectors SET vector = 'not a blob' WHERE id = 4",))
        named = "id 4"
    else:
        edit(path, ("UPDATE rvq_meta SET value = 'abc' WHERE key = 'dim'",))
        named = "dim"
    before = digest(path)
    with pytest.raises(BadFileError, match=named):
        Store.open(path)
    assert schema_of(path) == 1 and digest(path) == before


def test_a_full_disk_during_the_upgrade_is_a_disk_full_error(tmp_path):
    path = tmp_path / "old.db"
    shutil.copy(LEGACY, path)
    with pytest.raises(DiskFullError):
        Store.open(path, max_bytes=path.stat().st_size)
    assert schema_of(path) == 1
    with Store.open(path) as s:
        assert s.check() == []


def test_a_legacy_reader_follows_the_upgrade_of_its_file(tmp_path):
    path = tmp_path / "old.db"
    shutil.copy(LEGACY, path)
    with Store.open(path, readonly=True) as r:
        first = r.search(r.get([0])[0], k=3).ids
        with Store.open(path) as w:  # upgrades to checksums, then adds
            w.add(np.ones((1, 16), np.float32) * 9)
        np.testing.assert_array_equal(r.search(r.get([0])[0], k=3).ids, first)
        assert len(r) == 298


def test_missing_code_blocks_are_not_answered_from(made):
    path, x = made
    edit(path, ("DELETE FROM rvq_blocks WHERE block >= 1",))
    with Store.open(path, readonly=True) as s:
        with pytest.raises(BadFileError, match="code blocks hold 256 vectors"):
            s.search(x[0], k=3)


def test_zstd_frames_beyond_the_ratio_the_store_writes(tmp_path):
    path = tmp_path / "z.db"
    with Store.open(path, dim=4096, originals="zstd") as s:
        s.add(np.zeros((1, 4096), np.float32), ids=[1])  # compresses ~1000x: stored raw
        s.add(np.random.default_rng(0).standard_normal((1, 4096)), ids=[2])
        np.testing.assert_array_equal(s.get([1]), 0)
    con = sqlite3.connect(path)
    assert len(con.execute("SELECT vector FROM rvq_vectors WHERE id = 1").fetchone()[0]) \
        == 4 * 4096 + 4
    con.close()
    frame = zstandard.ZstdCompressor().compress(bytes(4 * 4096))
    edit(path, ("UPDATE rvq_vectors SET vector = ? WHERE id = 2",
                (frame + zlib.crc32(frame).to_bytes(4, "little"),)))
    with Store.open(path, readonly=True) as s:
        with pytest.raises(BadFileError, match="beyond the 16x"):
            s.get([2])


def test_huge_k_or_rerank(made):
    path, x = made
    with Store.open(path, readonly=True) as s:
        with pytest.raises(InvalidInputError, match="k must be"):
            s.search(x[0], k=10**9)
        with pytest.raises(InvalidInputError, match="rerank must be"):
            s.search(x[0], k=10, rerank=10**9)
        res = s.search(x[:2], k=700, rerank=1000)  # more than the store holds: padded
        assert res.ids.shape == (2, 700) and (res.ids[:, 599:] == -1).all()
        assert res.ids[0, 0] == 0


def test_a_folder_is_a_bad_file(tmp_path):
    with pytest.raises(BadFileError, match="folder"):
        Store.open(tmp_path)


@pytest.mark.parametrize("craft", ["bad setting", "trigger", "flipped codes", "held lock"])
def test_the_cli_reports_a_bad_file_in_one_line(made, craft):
    from click.testing import CliRunner

    from rvqstore.cli import main

    path, _ = made
    holder = None
    if craft == "bad setting":
        edit(path, ("UPDATE rvq_meta SET value = 'abc' WHERE key = 'dim'",))
    elif craft == "trigger":
        edit(path, ("CREATE TRIGGER t AFTER INSERT ON rvq_vectors BEGIN SELECT 1; END",))
    elif craft == "flipped codes":
        flip(path, "rvq_blocks", "codes", "block = 0", [3])
    else:
        holder = sqlite3.connect(path, isolation_level=None, timeout=0)
        holder.execute("BEGIN IMMEDIATE")
    try:
        commands = {"search": ["search", str(path), "--id", "3", "-k", "2"],
                    "delete": ["delete", str(path), "--id", "9"],
                    "info": ["info", str(path)]}
        # reads go on under a write lock; a delete reads no codes
        wanted = {"held lock": ["delete"], "flipped codes": ["search"]}.get(craft, commands)
        if craft == "trigger":
            wanted = ["search", "delete", "info"]
        for args in (commands[c] for c in wanted):
            env = {"RVQSTORE_TIMEOUT": "0.2"}
            result = CliRunner().invoke(main, args, env=env)
            lines = result.output.strip().splitlines()
            assert result.exit_code == 1 and len(lines) == 1, result.output
            assert lines[0].startswith("Error: ") and str(path) in lines[0]
            assert result.exception is None or isinstance(result.exception, SystemExit)
    finally:
        if holder is not None:
            holder.close()


@pytest.mark.parametrize("column,value,named", [
    ("metadata", '{"a": {"nested": 1}}', "metadata of id 2"),
    ("metadata", '[1, 2]', "metadata of id 2"),
    ("document", b"\x00\x01", "document of id 2")])
def test_stored_metadata_and_documents_are_checked(tmp_path, column, value, named):
    path = tmp_path / "m.db"
    x = clustered(20, 16, seed=9)
    with Store.open(path, dim=16) as s:
        s.add(x, metadata=[{"a": i} for i in range(20)], documents=["d"] * 20)
    edit(path, (f"UPDATE rvq_vectors SET {column} = ? WHERE id = 2", (value,)))
    with Store.open(path, readonly=True) as s:
        read = s.metadata if column == "metadata" else s.documents
        with pytest.raises(BadFileError, match=named):
            read([2])
        with pytest.raises(BadFileError, match=named):
            s.search(x[2], k=3, with_metadata=True, with_documents=True)
        if column == "metadata":
            with pytest.raises(BadFileError, match=named):
                s.count({"a": 2})

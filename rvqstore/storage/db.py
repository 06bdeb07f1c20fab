"""The SQLite side of a store: connection, pragmas, transactions and the queries.

Knows bytes and rows, never distances. One ``Database`` per open store.
"""

import contextlib
import os

try:
    import fcntl
except ImportError:  # not POSIX: builds are never taken for stale (Database.build_locks)
    fcntl = None
import sqlite3
import stat
import time

import sqlite_utils

from ..errors import (BadFileError, DiskFullError, LockedError, ReadOnlyError, RvqstoreError,
                      StorageError)
from . import migrations, schema
from .blobs import checksum

APPLICATION_ID = 0x52565153  # "RVQS" in the SQLite header marks the file as a store
MMAP_BYTES = 1 << 30
PAGE_BYTES = 8192
BUSY_SECONDS = 10.0


def classify(exc, path, timeout=BUSY_SECONDS):
    """The rvqstore error for an SQLite error on the file at ``path``."""
    msg = str(exc)
    if isinstance(exc, RvqstoreError):
        return exc
    if "not a database" in msg or "malformed" in msg or "disk image" in msg:
        return BadFileError(f"{path} is not an rvqstore file or is corrupted ({msg})")
    if "readonly" in msg or "read-only" in msg:
        return ReadOnlyError(f"{path} cannot be written ({msg})")
    if "unable to open" in msg:
        return BadFileError(f"cannot open {path} ({msg}): does its folder exist?")
    if "locked" in msg or "busy" in msg:
        return LockedError(
            f"{path} is locked: another connection (this process or another) held its write "
            f"lock for more than {timeout:g} s; SQLite does not say which ({msg})")
    if "full" in msg:
        return DiskFullError(f"{path}: the disk is full or the file reached its size limit; "
                             f"the write was rolled back ({msg})")
    return StorageError(f"{path}: {msg}")


@contextlib.contextmanager
def translate_errors(path, timeout=BUSY_SECONDS):
    """Raise SQLite's errors on the file at ``path`` as rvqstore errors naming it
    (``timeout``: how long a lock was waited for)."""
    try:
        yield
    except sqlite3.Error as exc:
        raise classify(exc, path, timeout) from exc


def _harden(conn):
    """Pragmas every connection to a store file runs first: schema code may not call
    functions with side effects, and cell sizes are checked while reading pages."""
    conn.execute("PRAGMA trusted_schema = OFF")
    conn.execute("PRAGMA cell_size_check = ON")


def _check_header(path):
    """Refuse files that are not SQLite or are shorter than their header says (truncated)."""
    size = os.path.getsize(path)
    if size == 0:
        return  # an empty file becomes a new store
    with open(path, "rb") as f:
        head = f.read(100)
    if len(head) < 100 or not head.startswith(b"SQLite format 3\x00"):
        raise BadFileError(f"{path} is not an rvqstore file (not an SQLite database)")
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(head[28:32], "big")
    if pages and size < page * pages:
        raise BadFileError(f"{path} is truncated: {size} bytes, its header says {page * pages}")


def _retry_locked(fn, seconds=BUSY_SECONDS):
    """Run ``fn``, retrying while another process holds the lock: switching the journal
    mode does not wait on SQLite's busy handler, as other statements do."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Database:
    """An open store file.

    Parameters
    ----------
    path : str or os.PathLike
    readonly : bool, open without write access (many readers may do so at once)
    """

    def __init__(self, path, *, readonly=False, mmap_originals=False, durable=True,
                 timeout=BUSY_SECONDS, max_bytes=None):
        self.path = os.fspath(path)
        self.timeout = timeout
        self.readonly = readonly
        self.mmap_originals = mmap_originals
        self._orig = None
        self.schema_version = 0
        exists = os.path.exists(self.path)
        if not readonly and exists and not os.stat(self.path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            raise ReadOnlyError(f"{self.path} is a read-only file: open it with readonly=True")
        if readonly and not exists:
            raise BadFileError(f"{self.path} does not exist")
        if exists and os.path.isdir(self.path):
            raise BadFileError(f"{self.path} is a folder, not a store file")
        if exists:
            _check_header(self.path)
        try:
            if readonly:
                conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                       check_same_thread=False)
            else:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.conn = conn
            _harden(conn)
            self.db = sqlite_utils.Database(conn)
            if not exists or os.path.getsize(self.path) == 0:
                # 8 KiB pages hold five 384-d float32 originals with little slack; SQLite's
                # default 4 KiB holds two, wasting a quarter of the file
                conn.execute(f"PRAGMA page_size = {PAGE_BYTES}")
            conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
            self._check_identity()
            if max_bytes is not None:
                # a quota: a write that would grow the file past it fails as a full disk does
                page = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count = {max(int(max_bytes) // page, 1)}")
            if not readonly:
                _retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL"), timeout)
                # FULL: a commit returned to the caller survives power loss (the WAL is
                # synced at every commit); NORMAL survives a killed process only
                conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                if self.schema_version == 0:  # a new file: its schema first
                    self.upgrade()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self.conn.close()
            if isinstance(exc, sqlite3.Error):
                raise classify(exc, self.path, timeout) from exc
            raise

    def upgrade(self, progress=None):
        """Apply the migrations this file lacks (a read-write open does, once the caller
        has checked what the file holds)."""
        if self.readonly or self.schema_version >= migrations.LATEST:
            return
        with translate_errors(self.path, self.timeout):
            migrations.apply_pending(self.conn, self.path, progress=progress)
            self.schema_version = migrations.LATEST
            if self.conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                self.conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    @property
    def checked(self):
        """Whether the file's BLOBs carry CRCs (schema 2 on; a read-only open of an older
        file reads it as it is)."""
        return self.schema_version >= 2

    def _check_identity(self):
        # one snapshot: another process may be creating the schema right now
        self.conn.execute("BEGIN")
        try:
            app = self.conn.execute("PRAGMA application_id").fetchone()[0]
            if app not in (0, APPLICATION_ID):
                raise BadFileError(f"{self.path} is an SQLite file but not an rvqstore store")
            version = schema.verify(self.conn, self.path)
        finally:
            with contextlib.suppress(sqlite3.Error):  # never in place of the error raised
                self.conn.execute("ROLLBACK")
        if self.readonly and version == 0:
            raise BadFileError(f"{self.path} is not an rvqstore store (no schema)")
        self.schema_version = version

    def close(self):
        if self._orig is not None:
            self._orig.close()
        self.conn.close()

    # -- codebook builds --------------------------------------------------------------------

    def _build_lock_file(self):
        return open(self.path + "-build", "a+b")

    @contextlib.contextmanager
    def build_lock(self):
        """Held while this connection builds a codebook version: a lock on ``PATH-build``
        that the OS releases when the process dies, so that a writer opening the store
        drops only builds that nobody runs any more."""
        if fcntl is None:
            yield
            return
        with self._build_lock_file() as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockedError(f"{self.path} is being retrained by another connection; "
                                  "try again when it has finished") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @property
    def build_locks(self):
        """Whether builds are locked (POSIX); elsewhere no build is ever taken for stale."""
        return fcntl is not None

    # -- transactions -----------------------------------------------------------------------

    @contextlib.contextmanager
    def write(self):
        """One all-or-nothing write transaction (BEGIN IMMEDIATE: one writer at a time)."""
        if self.readonly:
            raise ReadOnlyError(f"{self.path} was opened read-only")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise classify(exc, self.path, self.timeout) from exc
        try:
            yield self
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise classify(exc, self.path, self.timeout) from exc
            raise
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise classify(exc, self.path, self.timeout) from exc

    @contextlib.contextmanager
    def read(self):
        """A consistent snapshot for several reads (one deferred transaction)."""
        if self.conn.in_transaction:
            yield self
            return
        with translate_errors(self.path, self.timeout):
            self.conn.execute("BEGIN")
            if 0 < self.schema_version < migrations.LATEST:
                # an older file read as it is: a writer may have upgraded it since
                self.schema_version = schema.verify(self.conn, self.path)
        try:
            yield self
        except BaseException:
            # ending the snapshot must not replace the error that ended it
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise
        with translate_errors(self.path, self.timeout):
            self.conn.execute("COMMIT")

    def data_version(self):
        """Changes whenever another connection commits (PRAGMA data_version)."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    def query(self, sql, params=()):
        try:
            return self.conn.execute(sql, params)
        except sqlite3.DatabaseError as exc:
            raise classify(exc, self.path, self.timeout) from exc

    # -- meta -------------------------------------------------------------------------------

    def meta(self):
        return dict(self.query("SELECT key, value FROM rvq_meta").fetchall())

    def set_meta(self, **values):
        self.conn.executemany("INSERT OR REPLACE INTO rvq_meta VALUES (?, ?)",
                              [(k, str(v)) for k, v in values.items()])

    # -- vectors ----------------------------------------------------------------------------

    def count(self):
        return self.query("SELECT COUNT(*) FROM rvq_vectors").fetchone()[0]

    def insert_vectors(self, ids, keys, blobs, metadata=None, documents=None):
        """Rows of ``ids`` with their keys, original BLOBs and, optionally, metadata (JSON
        text or None) and documents (text or None)."""
        n = len(ids)
        metadata = metadata if metadata is not None else [None] * n
        documents = documents if documents is not None else [None] * n
        self.conn.executemany(
            "INSERT INTO rvq_vectors (id, key, vector, metadata, document) "
            "VALUES (?, ?, ?, ?, ?)", zip(ids, keys, blobs, metadata, documents))
        self._index_documents([(i, d) for i, d in zip(ids, documents) if d is not None])

    def _index_documents(self, rows):
        """Add (id, text) rows to the keyword index (inside the caller's transaction)."""
        if rows:
            self.conn.executemany("INSERT INTO rvq_documents_fts (rowid, document) "
                                  "VALUES (?, ?)", rows)

    def _unindex_documents(self, ids):
        """Take the documents of ``ids`` out of the keyword index (before they change)."""
        old = self._in_chunks("SELECT id, document FROM rvq_vectors WHERE id IN ({}) "
                              "AND document IS NOT NULL", ids)
        if old:
            self.conn.executemany(
                "INSERT INTO rvq_documents_fts (rvq_documents_fts, rowid, document) "
                "VALUES ('delete', ?, ?)", old)

    def text_matches(self, query, limit=None):
        """(id, bm25 score) of the documents matching the FTS5 ``query``, best first (a
        lower score is a better match)."""
        sql = ("SELECT rowid, bm25(rvq_documents_fts) AS score FROM rvq_documents_fts "
               "WHERE rvq_documents_fts MATCH ? ORDER BY score")
        params = (query,)
        if limit is not None:
            sql += " LIMIT ?"
            params = (query, int(limit))
        return self.query(sql, params).fetchall()

    def metadata_for_ids(self, ids):
        """{id: JSON text} of the ids present that have metadata."""
        return dict(self._in_chunks(
            "SELECT id, metadata FROM rvq_vectors WHERE id IN ({}) AND metadata IS NOT NULL", ids))

    def documents_for_ids(self, ids):
        """{id: text} of the ids present that have a document."""
        return dict(self._in_chunks(
            "SELECT id, document FROM rvq_vectors WHERE id IN ({}) AND document IS NOT NULL", ids))

    def all_metadata(self):
        """(id, JSON text) of every row with metadata."""
        return self.query("SELECT id, metadata FROM rvq_vectors WHERE metadata IS NOT NULL"
                          ).fetchall()

    def set_metadata(self, ids, texts):
        self.conn.executemany("UPDATE rvq_vectors SET metadata = ? WHERE id = ?",
                              zip(texts, ids))

    def set_documents(self, ids, texts):
        self._unindex_documents(ids)
        self.conn.executemany("UPDATE rvq_vectors SET document = ? WHERE id = ?",
                              zip(texts, ids))
        self._index_documents([(i, d) for i, d in zip(ids, texts) if d is not None])

    def _in_chunks(self, sql, values, chunk=900):
        values = list(values)
        out = []
        for i in range(0, len(values), chunk):
            part = values[i:i + chunk]
            out += self.query(sql.format(",".join("?" * len(part))), part).fetchall()
        return out

    def existing_ids(self, ids):
        return [r[0] for r in self._in_chunks("SELECT id FROM rvq_vectors WHERE id IN ({})", ids)]

    def existing_keys(self, keys):
        return [r[0] for r in self._in_chunks("SELECT key FROM rvq_vectors WHERE key IN ({})", keys)]

    def ids_for_keys(self, keys):
        return dict(self._in_chunks("SELECT key, id FROM rvq_vectors WHERE key IN ({})", keys))

    def keys_for_ids(self, ids):
        return dict(self._in_chunks("SELECT id, key FROM rvq_vectors WHERE id IN ({})", ids))

    def fetch_vectors(self, ids):
        """{id: blob} for the ids present."""
        return dict(self._in_chunks("SELECT id, vector FROM rvq_vectors WHERE id IN ({})", ids))

    def _originals_conn(self):
        """A second, read-only connection for rerank reads, by default without mmap.

        Mapped reads of scattered originals count every touched page (and its neighbours)
        as resident memory of the process; read through SQLite's bounded page cache memory
        stays flat, at ~0.2 ms more per query of 100 candidates (``mmap_originals=True``
        chooses speed).
        """
        if self._orig is None:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                   check_same_thread=False)
            _harden(conn)
            conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES if self.mmap_originals else 0}")
            conn.execute("PRAGMA cache_size = -8192")
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            self._orig = conn
        return self._orig

    def fetch_concat(self, ids):
        """The originals of sorted, unique ``ids`` as one concatenated BLOB, or None when
        some are missing: the rerank path. (Joining the rows here costs less than SQLite's
        group_concat, which regrows its result per row: ~25% at 200 candidates.)"""
        sql = "SELECT vector FROM rvq_vectors WHERE id IN ({}) ORDER BY id"
        try:
            rows = self._originals_conn().execute(
                sql.format(",".join("?" * len(ids))), ids).fetchall()
        except sqlite3.DatabaseError as exc:
            raise classify(exc, self.path, self.timeout) from exc
        if len(rows) != len(ids) or any(type(r[0]) is not bytes for r in rows):
            return None
        return b"".join([r[0] for r in rows])

    def delete_vectors(self, ids):
        self._unindex_documents(ids)
        n = 0
        for i in range(0, len(ids), 900):
            part = list(ids[i:i + 900])
            n += self.conn.execute(
                f"DELETE FROM rvq_vectors WHERE id IN ({','.join('?' * len(part))})", part).rowcount
        return n

    def iter_vectors(self, batch=8192):
        """Yield (ids, blobs) of the stored vectors in id order, ``batch`` at a time."""
        last = -(1 << 63)
        while True:
            rows = self.query("SELECT id, vector FROM rvq_vectors WHERE id > ? ORDER BY id LIMIT ?",
                              (last, batch)).fetchall()
            if not rows:
                return
            yield [r[0] for r in rows], [r[1] for r in rows]
            last = rows[-1][0]

    def all_ids(self):
        return [r[0] for r in self.query("SELECT id FROM rvq_vectors ORDER BY id")]

    def clear_originals(self):
        self.conn.execute("UPDATE rvq_vectors SET vector = NULL")

    # -- tombstones -------------------------------------------------------------------------

    def add_tombstones(self, ids):
        self.conn.executemany("INSERT OR IGNORE INTO rvq_deleted VALUES (?)", ((int(i),) for i in ids))

    def tombstones(self):
        return [r[0] for r in self.query("SELECT id FROM rvq_deleted")]

    def clear_tombstones(self, ids=None):
        if ids is None:
            self.conn.execute("DELETE FROM rvq_deleted")
        else:
            self.conn.executemany("DELETE FROM rvq_deleted WHERE id = ?", ((int(i),) for i in ids))

    # -- codebooks and blocks ---------------------------------------------------------------

    def insert_codebooks(self, version, state, stages, size, dim, data, train_count, train_mse):
        self.conn.execute(
            "INSERT INTO rvq_codebooks (version, state, stages, codebook_size, dim, data, "
            "created_at, train_count, train_mse, checksum) "
            "VALUES (?, ?, ?, ?, ?, ?, datetime('now'), ?, ?, ?)",
            (version, state, stages, size, dim, data, train_count, train_mse, checksum(data)))

    def codebooks_row(self, version):
        """The row of codebook ``version`` as a dict (``checksum`` None before schema 2),
        or None."""
        cur = self.query("SELECT * FROM rvq_codebooks WHERE version = ?", (version,))
        row = cur.fetchone()
        if row is None:
            return None
        out = dict(zip([c[0] for c in cur.description], row))
        out.setdefault("checksum", None)
        return out

    def next_version(self):
        return self.query("SELECT COALESCE(MAX(version), 0) + 1 FROM rvq_codebooks").fetchone()[0]

    def set_codebook_state(self, version, state):
        self.conn.execute("UPDATE rvq_codebooks SET state = ? WHERE version = ?", (state, version))

    def record_added_error(self, version, count, sq_error):
        self.conn.execute("UPDATE rvq_codebooks SET added_count = added_count + ?, "
                          "added_sq_error = added_sq_error + ? WHERE version = ?",
                          (count, sq_error, version))

    def drop_versions(self, keep):
        """Delete every codebook version but ``keep``, with their blocks."""
        self.conn.execute("DELETE FROM rvq_blocks WHERE version != ?", (keep,))
        self.conn.execute("DELETE FROM rvq_codebooks WHERE version != ?", (keep,))

    def stale_building_versions(self, active):
        return [r[0] for r in self.query(
            "SELECT version FROM rvq_codebooks WHERE state = 'building' AND version != ?",
            (active,))]

    def drop_version(self, version):
        self.conn.execute("DELETE FROM rvq_blocks WHERE version = ?", (version,))
        self.conn.execute("DELETE FROM rvq_codebooks WHERE version = ?", (version,))

    def write_block(self, version, block, count, ids, codes, norms, crc):
        self.conn.execute("INSERT OR REPLACE INTO rvq_blocks (version, block, count, ids, codes, "
                          "norms, checksum) VALUES (?, ?, ?, ?, ?, ?, ?)",
                          (version, block, count, ids, codes, norms, crc))

    def _block_columns(self):
        return "block, count, ids, codes, norms, " + ("checksum" if self.checked else "NULL")

    def read_blocks(self, version, first=0):
        """Rows (block, count, ids, codes, norms, checksum) of ``version`` from block
        ``first`` on (checksum None before schema 2)."""
        return self.iter_blocks(version, first).fetchall()

    def count_blocks(self, version, first=0):
        return self.query("SELECT COUNT(*) FROM rvq_blocks WHERE version = ? AND block >= ?",
                          (version, first)).fetchone()[0]

    def iter_blocks(self, version, first=0):
        """:meth:`read_blocks` one row at a time (a reader holds one block's BLOBs, not
        all of them)."""
        return self.query(f"SELECT {self._block_columns()} FROM rvq_blocks "
                          "WHERE version = ? AND block >= ? ORDER BY block", (version, first))

    def last_block(self, version):
        """(block, count, ids, codes, norms, checksum) of the highest block of ``version``,
        or None."""
        return self.query(f"SELECT {self._block_columns()} FROM rvq_blocks WHERE version = ? "
                          "ORDER BY block DESC LIMIT 1", (version,)).fetchone()

    def delete_blocks(self, version):
        self.conn.execute("DELETE FROM rvq_blocks WHERE version = ?", (version,))

    # -- housekeeping -----------------------------------------------------------------------

    def vacuum(self):
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.execute("VACUUM")
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def integrity_check(self):
        return [r[0] for r in self.query("PRAGMA integrity_check")]

    def bytes_by_part(self):
        """Stored bytes of originals, codes, codebooks and the whole file (with its WAL)."""
        q = lambda sql: self.query(sql).fetchone()[0] or 0
        size = os.path.getsize(self.path)
        wal = self.path + "-wal"
        return {
            "originals": q("SELECT SUM(LENGTH(vector)) FROM rvq_vectors"),
            "keys": q("SELECT SUM(LENGTH(key)) FROM rvq_vectors"),
            "metadata": q("SELECT SUM(LENGTH(metadata)) FROM rvq_vectors"),
            "documents": q("SELECT SUM(LENGTH(document)) FROM rvq_vectors"),
            "codes": q("SELECT SUM(LENGTH(codes) + LENGTH(norms) + LENGTH(ids)) FROM rvq_blocks"),
            "codebooks": q("SELECT SUM(LENGTH(data)) FROM rvq_codebooks"),
            "file": size,
            "wal": os.path.getsize(wal) if os.path.exists(wal) else 0,
        }

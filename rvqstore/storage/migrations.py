"""Numbered SQL migrations, applied in order, each recorded in the same transaction.

The files live in the top-level ``migrations/`` folder of the source tree and ship inside
the wheel as the ``rvqstore.migrations`` package data.
"""

import contextlib
import importlib.resources
import pathlib
import re
import sqlite3

import zstandard

from ..errors import BadFileError, SchemaTooNewError
from .blobs import ZSTD_MAX_RATIO, checksum, with_crc

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def _migration_files():
    candidates = []
    try:
        candidates.append(importlib.resources.files("rvqstore.migrations"))
    except ModuleNotFoundError:
        pass
    candidates.append(pathlib.Path(__file__).resolve().parents[2] / "migrations")
    for folder in candidates:
        try:
            files = sorted((f.name, f) for f in folder.iterdir() if _NAME.match(f.name))
        except (FileNotFoundError, NotADirectoryError):
            continue
        if files:
            return [(int(_NAME.match(n).group(1)), n, f) for n, f in files]
    raise RuntimeError("rvqstore's migrations/ folder is missing from this installation")


MIGRATIONS = _migration_files()
LATEST = MIGRATIONS[-1][0]

BOOTSTRAP = """CREATE TABLE IF NOT EXISTS rvq_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"""


def applied_version(conn):
    """Highest applied migration, 0 for a file without the migrations table."""
    row = conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name='rvq_migrations'").fetchone()
    if row is None:
        return 0
    return conn.execute("SELECT COALESCE(MAX(version), 0) FROM rvq_migrations").fetchone()[0]


def check_not_newer(version, path):
    if version > LATEST:
        raise SchemaTooNewError(
            f"{path} has schema version {version}, this rvqstore knows up to {LATEST}: "
            "upgrade rvqstore to open it (the file was left untouched)")


def apply_pending(conn, path, *, upto=None, progress=None):
    """Apply every migration newer than the file's (up to ``upto``), each in its own
    transaction with its record and its backfill."""
    current = applied_version(conn)
    check_not_newer(current, path)
    for version, name, file in MIGRATIONS:
        if version <= current or (upto is not None and version > upto):
            continue
        sql = file.read_text(encoding="utf-8")
        conn.execute("BEGIN IMMEDIATE")
        try:
            if applied_version(conn) >= version:  # another process applied it meanwhile
                conn.execute("COMMIT")
                continue
            conn.execute(BOOTSTRAP)
            # executescript would commit first; run statement by statement in our transaction
            for stmt in _statements(sql):
                conn.execute(stmt)
            if version in BACKFILLS:
                BACKFILLS[version](conn, progress)
            conn.execute("INSERT INTO rvq_migrations VALUES (?, ?, datetime('now'))",
                         (version, name))
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (a full disk): keep the error that ended it
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise


def _blob(value, what):
    if not isinstance(value, bytes):
        raise BadFileError(f"{what} holds a {type(value).__name__}, not a BLOB: "
                           "the file is corrupted (left at schema 1)")
    return value


def _original(vec, i, repack):
    """A schema-1 original as schema 2 stores it (without its CRC): zstd frames that
    inflate beyond ``ZSTD_MAX_RATIO``, or save nothing, are stored raw."""
    what = f"the original of id {i}"
    vec = _blob(vec, what)
    if repack:
        size = zstandard.frame_content_size(vec)
        # (a frame as long as its content would read as a raw row)
        if 0 < size <= 4 * 65536 and (len(vec) * ZSTD_MAX_RATIO < size or len(vec) >= size):
            try:
                return zstandard.ZstdDecompressor().decompress(vec, max_output_size=size)
            except zstandard.ZstdError as exc:
                raise BadFileError(f"{what} does not decompress ({exc})") from None
    return vec


def _add_checksums(conn, progress):
    """Schema 2: CRC-32 of every codebook and block, and appended to every original."""
    for version, data in conn.execute("SELECT version, data FROM rvq_codebooks").fetchall():
        crc = checksum(_blob(data, f"codebook version {version}"))
        conn.execute("UPDATE rvq_codebooks SET checksum = ? WHERE version = ?", (crc, version))
    keys = conn.execute("SELECT version, block FROM rvq_blocks").fetchall()
    for v, b in keys:  # one block in memory at a time
        row = conn.execute("SELECT ids, codes, norms FROM rvq_blocks WHERE version = ? AND "
                           "block = ?", (v, b)).fetchone()
        crc = checksum(*(_blob(x, f"code block {b}") for x in row))
        conn.execute("UPDATE rvq_blocks SET checksum = ? WHERE version = ? AND block = ?",
                     (crc, v, b))
    fmt = conn.execute("SELECT value FROM rvq_meta WHERE key = 'originals'").fetchone()
    repack = fmt is not None and fmt[0] == "zstd"
    total = conn.execute("SELECT COUNT(*) FROM rvq_vectors").fetchone()[0]
    last, done = -(1 << 63), 0
    while True:
        rows = conn.execute("SELECT id, vector FROM rvq_vectors WHERE id > ? ORDER BY id "
                            "LIMIT 8192", (last,)).fetchall()
        if not rows:
            break
        conn.executemany("UPDATE rvq_vectors SET vector = ? WHERE id = ?",
                         [(with_crc(_original(vec, i, repack)), i)
                          for i, vec in rows if vec is not None])
        last, done = rows[-1][0], done + len(rows)
        if progress is not None:
            progress("upgrade", done, total)


BACKFILLS = {2: _add_checksums}
"""Migrations whose SQL is followed by a Python step, in the same transaction."""


def _statements(sql):
    buf = ""
    for line in sql.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf
            buf = ""
    if buf.strip():
        yield buf

"""What a store file's schema must be, and the check that it is exactly that.

A store file is input: it may come from anywhere, and SQLite runs what a file's schema
holds (triggers on our writes, views read in place of our tables). Before a store runs any
statement on a file's tables, :func:`verify` compares the file's ``sqlite_master`` with the
schema our own migrations create, object by object, and refuses anything else.
"""

import functools
import re
import sqlite3

from ..errors import BadFileError
from . import migrations


def _norm(sql):
    return None if sql is None else re.sub(r"\s+", " ", sql).strip()


def _objects(conn):
    rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
    return {(t, n): (tb, _norm(s)) for t, n, tb, s in rows}


@functools.lru_cache(maxsize=None)
def expected(version):
    """``{(type, name): (table, sql)}`` of a store at schema ``version``, as our migrations
    make it."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        migrations.apply_pending(conn, ":memory:", upto=version)
        return _objects(conn)
    finally:
        conn.close()


def _describe(key):
    return f"{key[0]} {key[1]!r}"


def verify(conn, path):
    """The schema version of the file behind ``conn`` (0 for an empty file), after checking
    that its schema is exactly what our migrations made. Reads ``sqlite_master`` only
    until it has matched, so nothing the file holds runs."""
    found = _objects(conn)
    if not found:
        return 0
    for version in range(migrations.LATEST, 0, -1):
        if found == expected(version):
            applied = conn.execute("SELECT MAX(version) FROM rvq_migrations").fetchone()[0]
            if isinstance(applied, int):
                migrations.check_not_newer(applied, path)
            if applied != version:
                raise BadFileError(f"{path} records schema version {applied!r} but has the "
                                   f"tables of version {version}: the file is corrupted")
            return version
    newer = found.get(("table", "rvq_migrations")) == expected(1)[("table", "rvq_migrations")]
    if newer:
        # our own migrations table, so reading it runs nothing foreign
        applied = conn.execute("SELECT MAX(version) FROM rvq_migrations").fetchone()[0]
        if isinstance(applied, int) and applied > migrations.LATEST:
            migrations.check_not_newer(applied, path)
    if ("table", "rvq_migrations") not in found:
        raise BadFileError(f"{path} is an SQLite file but not an rvqstore store")
    want = expected(migrations.LATEST)
    extra = sorted(k for k in found if k not in want and k not in expected(1))
    changed = sorted(k for k in found if (k in want or k in expected(1))
                     and found[k] not in (want.get(k), expected(1).get(k)))
    missing = sorted(k for k in want if k not in found)
    what = ([f"unexpected {_describe(k)}" for k in extra]
            + [f"altered {_describe(k)}" for k in changed]
            + [f"missing {_describe(k)}" for k in missing])
    raise BadFileError(f"{path} is not a store this rvqstore wrote: its schema has "
                       f"{'; '.join(what[:5]) or 'a mix of versions'} (refused, nothing was run "
                       "or written)")


__all__ = ["verify", "expected"]

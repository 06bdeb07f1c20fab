"""Keyword ranking of the documents: FTS5's bm25 order, without FTS5 scoring every match.

FTS5 answers an OR query of a text's words by scoring every document that holds any of
them; with words such as "the" that is nearly every document (~100 ms per query over
100,000 short documents). :class:`KeywordIndex` keeps an in-memory copy of the index's
postings, read from the FTS5 index itself through ``fts5vocab`` tables, and ranks with
:func:`rvqstore.algo.bm25.top_k`, which reproduces FTS5's bm25 bit for bit and prunes the
documents that cannot enter the top.

Text is not tokenized in Python: query words and re-read documents go through a TEMP FTS5
table defined with the store index's tokenizer (fts5's default, unicode61, as in
migrations/0003), and the base postings are FTS5's own. The one shortcut is unicode61's
rule for an ASCII run of letters and digits: one token, lower-cased. Every statement is
built here and takes its values as parameters; the file's tables are only read (the TEMP
objects live in the connection, not in the file).

Which of FTS5's tied scores comes first is not specified by SQL; SQLite returns them in
rowid order for ``ORDER BY score`` over an FTS5 match (the order in which FTS5 visits
them), and both paths here order equal scores by ascending id.
"""

import contextlib
import re
import sys
import threading
import time

import numpy as np

# bm25 (numba) is imported by the functions that rank: a store opened without a keyword
# search never loads numba (see rvqstore/algo/quantizers.py).

FTS_TABLE = "rvq_documents_fts"
CONTENT_TABLE = "rvq_vectors"
_AVERAGES_ROWID = 1  # FTS5's row count and token count (ext/fts5: FTS5_AVERAGES_ROWID)
_STRUCTURE_ROWID = 10  # FTS5's list of segments, rewritten by every change to the index

# Connection-local objects (schema ``temp``). The scratch table must tokenize exactly as
# the store's index: same fts5 module, same (default) tokenizer options. Contentless, so
# that 'delete-all' empties its index (deleted rows of a table with content leave their
# traces in its segments, and its reads slow down use after use).
_TEMP_OBJECTS = (
    ("rvq_kw_rows", f"fts5vocab(main, '{FTS_TABLE}', 'row')"),
    ("rvq_kw_instances", f"fts5vocab(main, '{FTS_TABLE}', 'instance')"),
    ("rvq_kw_scratch", "fts5(document, content='')"),
    ("rvq_kw_scratch_rows", "fts5vocab(temp, 'rvq_kw_scratch', 'row')"),
    ("rvq_kw_scratch_instances", "fts5vocab(temp, 'rvq_kw_scratch', 'instance')"),
)
_CHUNK_INSTANCES = 1 << 22  # instances per group_concat read (bounds the text built)
_WORD_CACHE = 1 << 16
# unicode61 makes one token of an ASCII run of letters and digits, lower-cased (its ASCII
# table, no diacritics to fold): such words skip the trip through the scratch table
_ASCII_WORD = re.compile(r"[A-Za-z0-9]+\Z")


def _connection(db):
    return getattr(db, "conn", db)


@contextlib.contextmanager
def _snapshot(conn):
    """One read snapshot (and temp writes) for the statements inside, unless the caller
    already holds a transaction."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _create_temp_objects(conn):
    for name, using in _TEMP_OBJECTS:
        conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{name} USING {using}")


def _varints(blob):
    """The SQLite varints (big-endian, 7 bits a byte, a 9th byte of 8) making up ``blob``."""
    out, i = [], 0
    while i < len(blob):
        value = 0
        for n in range(9):
            if i >= len(blob):
                raise ValueError("a varint runs past the end of the record")
            byte = blob[i]
            i += 1
            if n == 8:
                value = (value << 8) | byte
                break
            value = (value << 7) | (byte & 0x7F)
            if byte < 0x80:
                break
        out.append(value)
    return out


def index_totals(conn, table=FTS_TABLE, schema="main"):
    """(rows, tokens) of an FTS5 table as its bm25 sees them (its averages record)."""
    row = conn.execute(f"SELECT block FROM {schema}.{table}_data WHERE id = ?",
                       (_AVERAGES_ROWID,)).fetchone()
    if row is None:
        return 0, 0
    if not isinstance(row[0], bytes):
        raise ValueError(f"{table}: the averages record is not a BLOB")
    values = _varints(row[0])
    if len(values) != 2:  # rows, then tokens of the one column
        raise ValueError(f"{table}: the averages record holds {len(values)} values, not 2")
    return values[0], values[1]


def _clear_scratch(conn):
    conn.execute("INSERT INTO temp.rvq_kw_scratch (rvq_kw_scratch) VALUES ('delete-all')")


def _fingerprint(conn):
    """Changes whenever the store's FTS5 index changes (its averages and segment list)."""
    return tuple(conn.execute(f"SELECT id, block FROM {FTS_TABLE}_data WHERE id IN (?, ?) "
                              "ORDER BY id", (_AVERAGES_ROWID, _STRUCTURE_ROWID)).fetchall())


def _vocabulary(conn, rows_table):
    """(terms, documents per term, instances per term) of an fts5vocab 'row' table, in
    the index's term order."""
    n, terms, docs, counts = conn.execute(
        "SELECT count(*), group_concat(term, char(31)), group_concat(doc), "
        f"group_concat(cnt) FROM temp.{rows_table}").fetchone()
    if not n:
        return [], np.empty(0, np.int64), np.empty(0, np.int64)
    terms = terms.split("\x1f")
    if len(terms) != n:  # a term holding the separator: one row at a time
        rows = conn.execute(f"SELECT term, doc, cnt FROM temp.{rows_table}").fetchall()
        terms = [r[0] for r in rows]
        docs, counts = (",".join(str(r[c]) for r in rows) for c in (1, 2))
    docs, counts = _integers(docs, n), _integers(counts, n)
    return terms, docs, counts


def _integers(text, n):
    values = np.fromstring(text, dtype=np.int64, sep=",") if n else np.empty(0, np.int64)
    if len(values) != n:
        raise ValueError(f"read {len(values)} integers, expected {n}")
    return values


def _instances(conn, instances_table, terms, counts):
    """The document of every token instance, term by term (as :func:`_vocabulary` lists
    them), read in chunks of whole terms."""
    parts, first = [], 0
    ends = np.cumsum(counts)
    while first < len(terms):
        last = int(np.searchsorted(ends, (ends[first - 1] if first else 0) + _CHUNK_INSTANCES,
                                   side="right"))
        last = max(last, first + 1)
        if first == 0 and last >= len(terms):
            n, text = conn.execute(f"SELECT count(*), group_concat(doc) "
                                   f"FROM temp.{instances_table}").fetchone()
        else:
            n, text = conn.execute(f"SELECT count(*), group_concat(doc) FROM "
                                   f"temp.{instances_table} WHERE term >= ? AND term <= ?",
                                   (terms[first], terms[last - 1])).fetchone()
        expected = int(counts[first:last].sum())
        if n != expected:
            raise ValueError(f"the index lists {n} instances of some terms, its vocabulary "
                             f"{expected}")
        parts.append(_integers(text, n))
        first = last
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _read_segment(conn, rows_table, instances_table, number):
    """A :class:`~rvqstore.algo.bm25.Segment` of an FTS5 index's postings, with each term
    numbered by ``number(term)``."""
    from ..algo import bm25

    terms, df, counts = _vocabulary(conn, rows_table)
    docs = _instances(conn, instances_table, terms, counts)
    nums = np.fromiter((number(t) for t in terms), np.int64, len(terms))
    if len(nums) > 1 and not (np.diff(nums) > 0).all():
        # numbers given earlier do not follow this index's term order: regroup
        per_instance = np.repeat(nums, counts)
        order = np.lexsort((docs, per_instance))
        docs = docs[order]
        by_number = np.argsort(nums)
        nums, df, counts = nums[by_number], df[by_number], counts[by_number]
    seg = bm25.Segment.from_instances(nums, counts, docs)
    if not np.array_equal(np.diff(seg.starts), df):
        raise ValueError("the index's document counts disagree with its instances")
    return seg


def tokenize(conn, texts):
    """The FTS5 tokens of each of ``texts``, in order (the store index's tokenizer)."""
    _create_temp_objects(conn)
    out = [[] for _ in texts]
    try:
        conn.executemany("INSERT INTO temp.rvq_kw_scratch (rowid, document) VALUES (?, ?)",
                         enumerate(texts))
        for doc, term in conn.execute("SELECT doc, term FROM temp.rvq_kw_scratch_instances "
                                      "ORDER BY doc, offset"):
            out[doc].append(term)
    finally:
        _clear_scratch(conn)
    return out


def _phrase_query(words):
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


def fts5_ranking(db, text_words, depth, allowed=None):
    """(id, bm25) of the best ``depth`` documents for ``text_words`` (any may match), best
    first, by FTS5 itself: the exact reference, which scores every match. ``allowed``:
    None or a sorted int64 array of the ids that may be returned."""
    conn = _connection(db)
    sql = (f"SELECT rowid, bm25({FTS_TABLE}) AS score FROM {FTS_TABLE} "
           f"WHERE {FTS_TABLE} MATCH ? ORDER BY score, rowid")
    if not text_words:
        return []
    if allowed is None:
        return conn.execute(sql + " LIMIT ?", (_phrase_query(text_words), int(depth))).fetchall()
    ok = set(np.asarray(allowed).tolist())
    out = []
    for row in conn.execute(sql, (_phrase_query(text_words),)):
        if row[0] in ok:
            out.append(row)
            if len(out) == depth:
                break
    return out


class KeywordIndex:
    """FTS5's keyword ranking from an in-memory copy of the index, for one store connection.

    Use :meth:`keyword_ranking` for every query. The copy is read from the FTS5 index on
    first use (0.3-0.8 s and ~40 MB for the 100,000 WordNet glosses) and kept in step
    after that:

    - Another connection's commit (``PRAGMA data_version``) that changed the index, or a
      change of the index this object was not told about, rebuilds the copy at the next
      query. Nothing is ever served from a copy that differs from the index as far as
      these checks see: both are made at every query.
    - Writes of the connection's own must be reported with :meth:`note_written`, after
      they commit, with every id whose document was added, changed or deleted; the next
      query then re-reads just those documents. (Reporting ids that did not change is
      harmless; a write left unreported costs a rebuild.)

    Queries whose words FTS5 splits into several tokens (``foo_bar`` is the phrase
    "foo bar"), an index whose postings disagree with its own totals, and platforms where
    the scores differ from FTS5's (checked once per process on a probe table) are answered
    by FTS5 itself (:func:`fts5_ranking`). Thread-safe: one query or refresh at a time.

    ``stats`` counts queries, fallbacks (to FTS5), builds, refreshes (reported writes
    applied), merges (of the small segments refreshes add), the segments held now, the
    last build's seconds and the bytes of its term dictionary (:meth:`nbytes` adds the
    arrays). ``disabled`` says why the copy is never used, or is None.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._conn = None
        self._segments = None
        self._numbers = {}
        self._n_rows = self._n_tokens = 0
        self._seen = None  # (data_version, fingerprint) the copy matches
        self._pending = set()
        self._words = {}
        self.stats = {"queries": 0, "fallbacks": 0, "builds": 0, "refreshes": 0,
                      "merges": 0, "segments": 0, "build_seconds": 0.0, "terms_bytes": 0}
        self.disabled = None  # why the copy is not used, or None

    def nbytes(self):
        """Bytes held: the segments' arrays and the term dictionary (as of the last build;
        terms first seen since add a little)."""
        with self._lock:
            arrays = sum(seg.nbytes for seg in self._segments or ())
            return arrays + self.stats["terms_bytes"]

    def note_written(self, ids):
        """Tell the index that this connection committed new documents for ``ids`` (added,
        updated or deleted)."""
        with self._lock:
            self._pending.update(int(i) for i in np.asarray(ids, np.int64).ravel())

    def keyword_ranking(self, db, text_words, depth, allowed=None):
        """(id, bm25 score) of the best ``depth`` documents holding any of ``text_words``
        (among ``allowed``: None or a sorted int64 array of ids), best first; equal scores
        by ascending id. The same list as FTS5's ``ORDER BY bm25(...), rowid``.
        """
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if allowed is not None:
            allowed = np.ascontiguousarray(allowed, np.int64)
            if len(allowed) > 1 and not (np.diff(allowed) > 0).all():
                allowed = np.unique(allowed)
        conn = _connection(db)
        with self._lock, _snapshot(conn):
            self.stats["queries"] += 1
            if self._conn is not conn:
                self._reset(conn)
            if self.disabled is None:
                _check_scoring(self, conn)
            tokens = self._tokens(conn, text_words)
            if self.disabled is not None or any(len(t) > 1 for t in tokens):
                self.stats["fallbacks"] += 1
                return fts5_ranking(conn, text_words, depth, allowed)
            terms = [t[0] for t in tokens if t]
            if not terms:
                return []
            try:
                self._sync(conn)
            except ValueError:
                # the index does not read as FTS5 indexes are laid out: let FTS5 answer
                self._reset(conn)
                self.stats["fallbacks"] += 1
                return fts5_ranking(conn, text_words, depth, allowed)
            phrases = [self._numbers.get(t, -1) for t in terms]
            from ..algo import bm25

            ids, scores = bm25.top_k(self._segments, phrases, self._n_rows, self._n_tokens,
                                     depth, allowed)
        return list(zip(ids.tolist(), scores.tolist()))

    # -- keeping the copy in step -----------------------------------------------------------

    def _reset(self, conn):
        self._conn = conn
        self._segments = None
        self._seen = None
        self._pending.clear()

    def tokens(self, db, words):
        """The FTS5 tokens of each of ``words`` as queries read them: a tuple per word, empty
        for a word without tokens, longer for one FTS5 reads as a phrase (cached)."""
        conn = _connection(db)
        with self._lock, _snapshot(conn):
            return self._tokens(conn, words)

    def _tokens(self, conn, words):
        missing = [w for w in dict.fromkeys(words) if w not in self._words]
        if missing:
            if len(self._words) + len(missing) > _WORD_CACHE:
                self._words.clear()
            other = []
            for w in missing:
                if _ASCII_WORD.match(w):
                    self._words[w] = (w.lower(),)
                else:
                    other.append(w)
            for w, toks in zip(other, tokenize(conn, other) if other else ()):
                self._words[w] = tuple(toks)
        return [self._words[w] for w in words]

    def _sync(self, conn):
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        fingerprint = _fingerprint(conn)
        if self._segments is not None and self._seen is not None:
            seen_version, seen_fingerprint = self._seen
            if fingerprint == seen_fingerprint:
                self._pending.clear()  # the index did not change
                self._seen = (version, fingerprint)
                return
            if version == seen_version and self._pending:
                if self._refresh(conn) and not self._outgrown():
                    self._seen = (version, fingerprint)
                    self.stats["segments"] = len(self._segments)
                    return
        self._build(conn)
        self._seen = (version, fingerprint)
        self.stats["segments"] = len(self._segments)

    def _build(self, conn):
        start = time.perf_counter()
        _create_temp_objects(conn)
        numbers = {}
        base = _read_segment(conn, "rvq_kw_rows", "rvq_kw_instances",
                             lambda t: numbers.setdefault(t, len(numbers)))
        self._numbers = numbers
        self._segments = [base]
        self._n_rows, self._n_tokens = index_totals(conn)
        self._pending.clear()
        if not self._consistent():
            raise ValueError(f"{FTS_TABLE}: its postings hold {self._live_tokens()} tokens, "
                             f"its averages record {self._n_tokens}")
        self.stats["builds"] += 1
        self.stats["build_seconds"] = time.perf_counter() - start
        self.stats["terms_bytes"] = sys.getsizeof(numbers) + sum(
            sys.getsizeof(t) for t in numbers)

    def _refresh(self, conn):
        """Re-read the documents of the pending ids into a new segment; False when the
        result does not agree with the index (the caller rebuilds)."""
        ids = np.asarray(sorted(self._pending), np.int64)
        self._pending.clear()
        rows = []
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500].tolist()
            rows += conn.execute(f"SELECT id, document FROM {CONTENT_TABLE} WHERE id IN "
                                 f"({','.join('?' * len(part))}) AND document IS NOT NULL",
                                 part).fetchall()
        _create_temp_objects(conn)
        try:
            conn.executemany("INSERT INTO temp.rvq_kw_scratch (rowid, document) VALUES (?, ?)",
                             rows)
            fresh = _read_segment(conn, "rvq_kw_scratch_rows", "rvq_kw_scratch_instances",
                                  self._number)
        finally:
            _clear_scratch(conn)
        for seg in self._segments:
            seg.retire(ids)
        self._segments.append(fresh)
        self._compact()
        self._n_rows, self._n_tokens = index_totals(conn)
        self.stats["refreshes"] += 1
        return self._consistent()

    def _number(self, term):
        return self._numbers.setdefault(term, len(self._numbers))

    def _compact(self):
        """Merge the later segments so that each holds at most a quarter of the postings
        of the one before (a few segments, each posting merged a few times)."""
        from ..algo import bm25

        segs = self._segments
        while len(segs) > 2 and 4 * segs[-1].postings_count >= segs[-2].postings_count:
            segs[-2:] = [bm25.merge(segs[-2:])]
            self.stats["merges"] += 1

    def _outgrown(self):
        """Whether the documents re-read since the build reach an eighth of the first
        segment's: then a fresh build (from the index itself) costs little more than
        merging them in."""
        segs = self._segments
        later = sum(len(s.ids) for s in segs[1:]) + len(segs[0].dead)
        return 8 * later > max(len(segs[0].ids), 1000)

    def _live_tokens(self):
        return sum(seg.live_tokens() for seg in self._segments)

    def _consistent(self):
        live = sum(s.live_docs for s in self._segments)
        return self._live_tokens() == self._n_tokens and live <= self._n_rows


_SCORING = {}  # "ok": whether bm25.top_k reproduced FTS5 on this platform (checked once)


def _check_scoring(index, conn):
    """Compare :func:`rvqstore.algo.bm25.top_k` with FTS5's bm25 on a seeded probe table,
    once per process; on any difference the index falls back to FTS5 for good."""
    if "ok" not in _SCORING:
        _SCORING["ok"] = _probe(conn)
    if not _SCORING["ok"]:
        index.disabled = "bm25 scores differ from FTS5's on this platform"


def _probe(conn):
    from ..algo import bm25

    rng = np.random.default_rng(20240611)
    words = [f"w{i}" for i in range(40)]
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(0, 30)), p=weights))
             for _ in range(300)]
    _create_temp_objects(conn)
    try:
        conn.executemany("INSERT INTO temp.rvq_kw_scratch (rowid, document) VALUES (?, ?)",
                         enumerate(texts))
        numbers = {}
        seg = _read_segment(conn, "rvq_kw_scratch_rows", "rvq_kw_scratch_instances",
                            lambda t: numbers.setdefault(t, len(numbers)))
        n_rows, n_tokens = index_totals(conn, "rvq_kw_scratch", "temp")
        for _ in range(20):
            query = list(rng.choice(words, size=int(rng.integers(1, 9)), p=weights))
            want = conn.execute(
                "SELECT rowid, bm25(rvq_kw_scratch) AS s FROM temp.rvq_kw_scratch "
                "WHERE rvq_kw_scratch MATCH ? ORDER BY s, rowid", (_phrase_query(query),)
            ).fetchall()
            ids, scores = bm25.top_k([seg], [numbers.get(w, -1) for w in query], n_rows,
                                     n_tokens, len(texts))
            if want != list(zip(ids.tolist(), scores.tolist())):
                return False
    finally:
        _clear_scratch(conn)
    return True

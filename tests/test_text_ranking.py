"""The keyword ranking (rvqstore.storage.text) against FTS5's own bm25 order.

Seeded corpora with a Zipf vocabulary, very common words, accented and non-Latin words,
empty and missing documents, and documents added, changed and deleted between queries;
every ranking must equal ``Database.text_matches`` (ids, order and scores bit for bit).
"""

import re

import numpy as np
import pytest

from rvqstore.algo import bm25
from rvqstore.storage import Database
from rvqstore.storage import text as kw

COMMON = ["the", "a", "of", "to", "and", "or", "in"]
FOREIGN = ["café", "Café", "CAFÉ", "cafe\u0301", "naïve", "straße", "STRASSE", "Ελλάδα",
           "ελλάδα", "Москва", "москва", "日本語", "東京", "İstanbul", "x²", "Ǆemal", "ﬁn",
           "ÆTHER", "øre", "Łódź"]
SEPARATORS = [" ", " ", " ", ", ", "; ", " - ", "'s ", "\n", ": \"", ") ("]


def vocabulary(rng, n=400):
    letters = list("abcdefghijklmnopqrstuvwxyz")
    made = {"".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(n)}
    return COMMON + FOREIGN + sorted(made - set(COMMON))


def zipf(n, s=1.1):
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def document(rng, vocab, p):
    r = rng.random()
    if r < 0.04:
        return None
    if r < 0.07:
        return ""
    if r < 0.09:
        return "... !!! ---"  # a document without tokens
    n = int(rng.integers(1, 40))
    words = [str(w).upper() if rng.random() < 0.05 else str(w)
             for w in rng.choice(vocab, size=n, p=p)]
    return "".join(w + str(rng.choice(SEPARATORS)) for w in words).strip()


def query_words(rng, vocab, p, size=None):
    """A query as the store makes one: the \\w+ words of a text, at most 64."""
    size = size or int(rng.integers(1, 25))
    pool = vocab + ["absentword", "zzzz", "Naïve", "MOSKVA"]
    q = zipf(len(pool), 0.6)
    text = " ".join(str(w) for w in rng.choice(pool, size=size, p=q))
    return re.findall(r"\w+", text)[:64]


def fts_query(words):
    return " OR ".join(f'"{w}"' for w in words)


def expected(db, words, depth, allowed=None):
    if allowed is None:
        return db.text_matches(fts_query(words), depth)
    ok = set(allowed.tolist())
    return [r for r in db.text_matches(fts_query(words)) if r[0] in ok][:depth]


class Corpus:
    """A store file written through the storage layer, as the Store writes documents."""

    def __init__(self, path, seed, n=600):
        self.rng = np.random.default_rng(seed)
        self.vocab = vocabulary(self.rng)
        self.p = zipf(len(self.vocab))
        self.db = Database(path)
        self.next_id = 1
        self.index = kw.KeywordIndex()
        self.add(n)

    def add(self, n, report=True):
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        docs = [document(self.rng, self.vocab, self.p) for _ in ids]
        with self.db.write():
            self.db.insert_vectors(ids, [None] * n, [None] * n, documents=docs)
        if report:
            self.index.note_written(ids)
        return ids

    def live_ids(self):
        return np.asarray(self.db.all_ids(), np.int64)

    def update(self, n, report=True):
        ids = self.rng.choice(self.live_ids(), size=n, replace=False).tolist()
        docs = [document(self.rng, self.vocab, self.p) for _ in ids]
        with self.db.write():
            self.db.set_documents(ids, docs)
        if report:
            self.index.note_written(ids)
        return ids

    def delete(self, n, report=True):
        ids = self.rng.choice(self.live_ids(), size=n, replace=False).tolist()
        with self.db.write():
            self.db.delete_vectors(ids)
        if report:
            self.index.note_written(ids)
        return ids

    def check(self, queries=40, allowed=None):
        check(self.index, self.db, self.rng, self.vocab, self.p, queries, allowed)


def check(index, db, rng, vocab, p, queries, allowed=None):
    """``queries`` random queries at random depths, each equal to FTS5's answer."""
    for _ in range(queries):
        words = query_words(rng, vocab, p)
        depth = int(rng.choice([1, 3, 10, 50, 1000]))
        got = index.keyword_ranking(db, words, depth, allowed)
        assert got == expected(db, words, depth, allowed), (words, depth)


@pytest.fixture(params=[0, 1, 2])
def corpus(request, tmp_path):
    c = Corpus(tmp_path / "docs.db", seed=request.param)
    yield c
    c.db.close()


def test_ranking_equals_fts5_through_adds_updates_and_deletes(corpus):
    corpus.check()
    for step in range(6):
        corpus.add([1, 30, 3, 20, 1, 7][step])
        corpus.update([5, 1, 10, 2, 6, 1][step])
        corpus.delete([3, 1, 5, 1, 5, 2][step])
        corpus.check(queries=25)
    stats = corpus.index.stats
    # the copy was built once and then kept in step from the reported ids alone
    assert stats["builds"] == 1 and stats["refreshes"] == 6, stats
    assert stats["merges"] >= 1 and stats["fallbacks"] == 0, stats
    # postings of ~12,000 tokens (8 bytes each) on top of the term dictionary
    assert 50_000 < corpus.index.nbytes() - stats["terms_bytes"] < 1_000_000
    corpus.add(150)  # re-reading more than an eighth of the documents: a fresh build
    corpus.check(queries=10)
    assert stats["builds"] == 2 and stats["refreshes"] == 7, stats


def test_ranking_among_allowed_ids(corpus):
    corpus.update(40)
    corpus.delete(20)
    live = corpus.live_ids()
    rng = np.random.default_rng(9)
    for size in [1, 2, 10, len(live) // 20, len(live) // 2, len(live)]:
        allowed = np.sort(rng.choice(live, size=size, replace=False)).astype(np.int64)
        corpus.check(queries=15, allowed=allowed)
    # ids that are not stored (deleted, never added) are allowed and simply absent
    corpus.check(queries=10, allowed=np.arange(-5, corpus.next_id + 50, dtype=np.int64))
    corpus.check(queries=5, allowed=np.empty(0, np.int64))
    assert corpus.index.stats["fallbacks"] == 0


def test_long_queries_with_common_and_repeated_words(corpus):
    db = corpus.db
    for _ in range(20):
        words = query_words(corpus.rng, corpus.vocab, corpus.p, size=64) + ["the"] * 5
        for depth in (1, 50):
            assert corpus.index.keyword_ranking(db, words, depth) == expected(db, words, depth)


def test_queries_without_usable_words(corpus):
    db = corpus.db
    for words in (["_"], ["__", "_"], ["absentword"], ["absentword", "_"], ["ZZZZ"]):
        assert corpus.index.keyword_ranking(db, words, 10) == expected(db, words, 10) == []
    assert corpus.index.keyword_ranking(db, ["_", "café"], 10) == expected(db, ["café"], 10)
    assert corpus.index.stats["fallbacks"] == 0  # a word without tokens needs no FTS5


def test_unreported_write_is_seen(corpus):
    corpus.check(queries=5)
    corpus.update(10, report=False)
    corpus.check(queries=20)
    assert corpus.index.stats["builds"] == 2  # the index changed under it: built again
    corpus.add(5, report=False)
    corpus.delete(5, report=False)
    corpus.check(queries=20)
    assert corpus.index.stats["builds"] == 3


def test_other_connections_writes_are_seen(corpus, tmp_path):
    with corpus.db.write():
        corpus.db.set_documents([1], ["alpha beta gamma"])
    corpus.index.note_written([1])
    corpus.check(queries=5)
    other = Database(tmp_path / "docs.db")
    try:
        # as many tokens as before: the index's totals alone would not tell
        with other.write():
            other.set_documents([1], ["zzzz zzzz zzzz"])
        # and a reported write of our own in between: both must be taken in
        corpus.update(3)
        assert corpus.index.keyword_ranking(corpus.db, ["zzzz"], 5)[0][0] == 1
        corpus.check(queries=20)
        with other.write():
            other.set_documents([2, 3], ["café café zzzz", None])
            other.insert_vectors([10_000], [None], [None], documents=["zzzz naïve"])
        corpus.check(queries=20)
        builds = corpus.index.stats["builds"]
        with other.write():  # a write that leaves the documents alone rebuilds nothing
            other.set_metadata([1], ['{"a": 1}'])
        corpus.check(queries=5)
        assert corpus.index.stats["builds"] == builds
    finally:
        other.close()


def test_readonly_connection(tmp_path):
    Corpus(tmp_path / "docs.db", seed=5).db.close()
    db = Database(tmp_path / "docs.db", readonly=True)
    rng = np.random.default_rng(5)
    vocab = vocabulary(np.random.default_rng(5))
    try:
        check(kw.KeywordIndex(), db, rng, vocab, zipf(len(vocab)), 20)
    finally:
        db.close()


def test_words_fts5_reads_as_phrases_are_answered_by_fts5(corpus):
    db = corpus.db
    with db.write():
        db.set_documents([1, 2], ["snake_case and snake case", "case snake"])
    corpus.index.note_written([1, 2])
    words = ["snake_case", "the"]
    assert corpus.index.keyword_ranking(db, words, 10) == expected(db, words, 10)
    assert corpus.index.stats["fallbacks"] == 1
    allowed = np.asarray([2, 5, 7], np.int64)
    assert corpus.index.keyword_ranking(db, words, 10, allowed) == expected(db, words, 10,
                                                                           allowed)


def test_scores_differing_from_fts5_disable_the_copy(corpus, monkeypatch):
    monkeypatch.setitem(kw._SCORING, "ok", False)
    corpus.check(queries=10)
    assert corpus.index.disabled is not None
    assert corpus.index.stats["fallbacks"] == 10 and corpus.index.stats["builds"] == 0


def test_probe_notices_a_scoring_difference(corpus, monkeypatch):
    conn = corpus.db.conn
    assert kw._probe(conn)
    real = bm25.idf
    monkeypatch.setattr(bm25, "idf", lambda n, h: real(n, h) * (1 + 1e-15))
    assert not kw._probe(conn)


def test_an_index_disagreeing_with_its_totals_is_left_to_fts5(corpus, monkeypatch):
    monkeypatch.setattr(kw, "index_totals", lambda conn, *a: (10**6, 10**7))
    corpus.check(queries=10)
    assert corpus.index.stats["fallbacks"] == 10


def test_depth_is_checked(corpus):
    with pytest.raises(ValueError, match="depth"):
        corpus.index.keyword_ranking(corpus.db, ["the"], 0)


def test_unsorted_allowed_ids_are_sorted(corpus):
    words = ["the", "of", str(corpus.vocab[30])]
    allowed = np.asarray([50, 3, 20, 3, 7, 100, 1], np.int64)
    assert corpus.index.keyword_ranking(corpus.db, words, 5, allowed) == \
        expected(corpus.db, words, 5, np.unique(allowed))


# -- the kernel alone -------------------------------------------------------------------------

def _random_segments(rng, n_docs=300, n_terms=25):
    """Documents as term lists, split into a base and two deltas (with superseded and
    deleted documents), as Segments and as the documents they leave live."""
    p = zipf(n_terms, 1.0)
    docs = {i: list(rng.choice(n_terms, size=int(rng.integers(1, 30)), p=p))
            for i in range(n_docs)}

    def segment(items):
        pairs = sorted((t, i) for i, toks in items for t in toks)
        terms, counts = np.unique([t for t, _ in pairs], return_counts=True)
        return bm25.Segment.from_instances(terms, counts, [i for _, i in pairs])

    base = segment(docs.items())
    changed = rng.choice(n_docs, size=40, replace=False)
    deleted = changed[:10]
    for i in changed[10:]:
        docs[int(i)] = list(rng.choice(n_terms, size=int(rng.integers(1, 30)), p=p))
    for i in deleted:
        del docs[int(i)]
    fresh = [(int(i), docs[int(i)]) for i in changed[10:]]
    d1, d2 = segment(fresh[:12]), segment(fresh[12:])
    base.retire(changed)
    d1.retire(changed[25:])  # d2 supersedes some of d1's documents
    return [base, d1, d2], docs


@pytest.mark.parametrize("seed", range(6))
def test_top_k_matches_the_reference(seed):
    rng = np.random.default_rng(seed)
    segments, docs = _random_segments(rng)
    if seed % 2:  # merged, the same index
        segments = [bm25.merge(segments)]
    n_rows = len(docs) + 7  # empty documents count as rows
    n_tokens = sum(len(t) for t in docs.values())
    for _ in range(30):
        phrases = [int(t) for t in rng.integers(0, 27, size=int(rng.integers(1, 12)))]
        phrases = [t if t < 25 else -1 for t in phrases]  # -1: a term nobody holds
        ref = bm25.reference_scores(docs, phrases, n_rows, n_tokens)
        want = sorted(ref.items(), key=lambda kv: (kv[1], kv[0]))
        for depth in (1, 5, 40, 500):
            ids, scores = bm25.top_k(segments, phrases, n_rows, n_tokens, depth)
            assert list(zip(ids.tolist(), scores.tolist())) == want[:depth]
        for size in (3, 150):  # scored one by one / among the postings walked
            allowed = np.sort(rng.choice(400, size=size, replace=False)).astype(np.int64)
            among = [kv for kv in want if kv[0] in set(allowed.tolist())]
            for depth in (1, 5, 500):
                stats = bm25.RankStats()
                ids, scores = bm25.top_k(segments, phrases, n_rows, n_tokens, depth, allowed,
                                         stats)
                assert list(zip(ids.tolist(), scores.tolist())) == among[:depth]
                assert (stats.listed > 0) == (size == 3 and any(t >= 0 for t in phrases))


def test_top_k_prunes():
    """Rare terms set a threshold that keeps the common term's documents unscored."""
    rng = np.random.default_rng(3)
    docs = {i: [0] * int(rng.integers(1, 4)) + ([1] if i % 97 == 0 else []) for i in range(5000)}
    pairs = sorted((t, i) for i, toks in docs.items() for t in toks)
    terms, counts = np.unique([t for t, _ in pairs], return_counts=True)
    seg = bm25.Segment.from_instances(terms, counts, [i for _, i in pairs])
    stats = bm25.RankStats()
    n_tokens = sum(len(t) for t in docs.values())
    ids, _ = bm25.top_k([seg], [1, 0], len(docs), n_tokens, 10, stats=stats)
    assert set(ids.tolist()) <= set(range(0, 5000, 97))
    assert stats.essential_terms == 1 and stats.scored < 100, stats


def test_segment_rejects_malformed_instances():
    with pytest.raises(ValueError, match="ascending"):
        bm25.Segment.from_instances([0], [3], [5, 2, 9])
    with pytest.raises(ValueError, match="add up"):
        bm25.Segment.from_instances([0, 1], [2, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="increasing"):
        bm25.Segment.from_instances([1, 0], [1, 1], [1, 2])


def test_ascii_words_are_lowercased_as_fts5_tokenizes_them(corpus):
    rng = np.random.default_rng(4)
    chars = np.asarray(list("abcxyzABCXYZ0189"))
    words = ["".join(rng.choice(chars, size=int(rng.integers(1, 12)))) for _ in range(300)]
    words += ["Running", "CATS", "x86", "2024", "été", "naïve", "Straße", "İ", "ǅ"]
    fts5 = kw.tokenize(corpus.db.conn, words)
    assert [list(t) for t in kw.KeywordIndex().tokens(corpus.db, words)] == fts5
    assert fts5[-9:] == [["running"], ["cats"], ["x86"], ["2024"], ["ete"], ["naive"],
                         ["straße"], ["i"], ["ǆ"]]


def test_varints():
    assert kw._varints(bytes([0x86, 0x8D, 0x20, 0xDC, 0x97, 0x42])) == [100000, 1510338]
    assert kw._varints(bytes([0xFF] * 8 + [0x01])) == [(1 << 64) - 255]
    with pytest.raises(ValueError):
        kw._varints(bytes([0x81]))

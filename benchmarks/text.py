"""Keyword ranking on the WordNet glosses: FTS5's bm25 query against two ways to get the
same top 50 without FTS5 scoring every match.

    python -m benchmarks.text ../shared/data/wordnet-minilm [--docs 100000] [--queries 200]
        [--depth 50] [--repeats 3]

The glosses (``base_texts.txt``) are written as documents into a store file through the
storage layer (``Database.insert_vectors``: the store's own schema and FTS5 index, no
vectors). Queries are the first ``--queries`` held-out glosses (``query_texts.txt``), as
hybrid search passes them: their ``\\w+`` words OR-ed (at most 64); "short" queries are 2-3
words drawn from each (seeded). Methods:

- fts5: ``Database.text_matches(query, depth)``, the plain FTS5 query (FTS5 scores every
  matching document, then sorts). It is the reference of the agreement column; with
  allowed ids, all its matches are read and filtered in Python.
- fts5 + pruning: exact top-k over FTS5 itself, MaxScore in SQL and Python. Document
  frequencies from a TEMP ``fts5vocab`` 'row' table; terms by decreasing idf; the postings
  (with tf) of the rarest ones from the 'instance' table, document lengths from FTS5's
  docsize table, giving partial sums. A document holding none of those terms scores at most
  sum(idf * (k1 + 1)) of the others; terms join until that is below the depth-th partial
  sum. The candidates that might still reach it are tokenized again by a TEMP FTS5 table
  and scored exactly, best partial sums first, until the rest cannot reach the depth-th
  exact score. Past 20,000 postings or 5,000 candidates it gives up and runs the full FTS5
  query (counted in the last column).
- memory copy: :class:`rvqstore.storage.text.KeywordIndex`, the postings read once from
  the FTS5 index, ranked by the numba MaxScore kernel of :mod:`rvqstore.algo.bm25`.

Timing: each query is timed once per round, the methods in turn within a round
(``--repeats`` rounds); a query's time is its median over the rounds; the table gives the
median and 90th percentile over queries. Agreement: the share of queries whose list (ids,
order and scores) equals fts5's. One thread (numpy, numba; SQLite runs in the caller's
thread). The refresh lines time the first query after writes reported with
``note_written``, and after a write left unreported (a rebuild).
"""

import argparse
import collections
import re
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from rvqstore.algo import bm25
from rvqstore.storage import Database
from rvqstore.storage import text as kw

from .common import Threads, fmt, markdown_table

CANDIDATE_CAP = 5000


def fts_query(words):
    return " OR ".join(f'"{w}"' for w in words)


def load(folder, n_docs, n_queries, seed=0):
    folder = Path(folder)
    docs = (folder / "base_texts.txt").read_text(encoding="utf-8").split("\n")[:n_docs]
    texts = (folder / "query_texts.txt").read_text(encoding="utf-8").split("\n")[:n_queries]
    rng = np.random.default_rng(seed)
    glosses = [re.findall(r"\w+", t)[:64] for t in texts]
    short = [list(rng.choice(w, size=min(len(w), int(rng.integers(2, 4))), replace=False))
             for w in glosses]
    return docs, glosses, [[str(x) for x in s] for s in short]


class PrunedFts5:
    """Exact top-k over FTS5 with MaxScore-style pruning (see the module docstring)."""

    def __init__(self, db):
        self.db = db
        self.conn = db.conn
        self.tokens = {}
        self.fallbacks = 0
        for name, kind in (("bench_vocab", "row"), ("bench_instances", "instance")):
            self.conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{name} USING "
                              f"fts5vocab(main, '{kw.FTS_TABLE}', '{kind}')")

    def _tokenize(self, words):
        missing = [w for w in dict.fromkeys(words) if w not in self.tokens]
        if missing:
            for w, t in zip(missing, kw.tokenize(self.conn, missing)):
                self.tokens[w] = t
        return [self.tokens[w] for w in words]

    def ranking(self, words, depth):
        with self.db.read():
            return self._ranking(words, depth)

    def _ranking(self, words, depth):
        conn = self.conn
        toks = self._tokenize(words)
        if any(len(t) > 1 for t in toks):
            return self._full(words, depth)
        phrases = [t[0] for t in toks if t]
        terms = sorted(set(phrases))
        if not terms:
            return []
        n_rows, n_tokens = kw.index_totals(conn)
        df = dict(conn.execute(
            f"SELECT term, doc FROM temp.bench_vocab WHERE term IN "
            f"({','.join('?' * len(terms))})", terms).fetchall())
        terms = [t for t in terms if df.get(t)]
        if not terms:
            return []
        mean = bm25.avgdl(n_rows, n_tokens)
        idf = {t: bm25.idf(n_rows, df[t]) for t in terms}
        weight = {t: idf[t] * phrases.count(t) for t in terms}
        order = sorted(terms, key=lambda t: (-weight[t], df[t]))
        rest = [0.0] * (len(order) + 1)  # a tf-part is below k1 + 1
        for j in range(len(order) - 1, -1, -1):
            rest[j] = rest[j + 1] + weight[order[j]] * (bm25.K1 + 1.0)
        rest = [r * (1 + bm25.SLACK) for r in rest]
        m, total = 0, 0
        while m < len(order) and total < depth:
            total += df[order[m]]
            m += 1
        partial, norm, done, fetched = {}, {}, 0, 0
        while True:
            for t in order[done:m]:  # essential terms: their postings, with tf
                fetched += df[t]
                if fetched > CANDIDATE_CAP * 4:
                    return self._full(words, depth)
                rows = conn.execute("SELECT doc, count(*) FROM temp.bench_instances "
                                    "WHERE term = ? GROUP BY doc", (t,)).fetchall()
                self._norms([d for d, _ in rows if d not in norm], norm, mean)
                for d, tf in rows:
                    tf = float(tf)
                    partial[d] = partial.get(d, 0.0) + \
                        weight[t] * ((tf * (bm25.K1 + 1.0)) / (tf + norm[d]))
            done = m
            vals = sorted(partial.values(), reverse=True)
            lower = vals[depth - 1] * (1 - bm25.SLACK) if len(vals) >= depth else 0.0
            while m < len(order) and rest[m] >= lower:
                m += 1
            if m == done:
                break
        # exact scores, best partial sums first, until the rest cannot reach the depth-th
        cand = sorted((d for d, v in partial.items() if v + rest[m] >= lower),
                      key=lambda d: -partial[d])
        if len(cand) > CANDIDATE_CAP:
            return self._full(words, depth)
        scored = {}
        for s in range(0, len(cand), 100):
            best = sorted(scored.values(), reverse=True)
            if len(best) >= depth and partial[cand[s]] + rest[m] < \
                    best[depth - 1] * (1 - bm25.SLACK):
                break
            scored.update(self._scores(cand[s:s + 100], phrases, idf, mean))
        best = sorted(scored.items(), key=lambda kv: (-kv[1], kv[0]))[:depth]
        return [(i, -1.0 * s) for i, s in best]

    def _norms(self, ids, norm, mean):
        """``k1 * (1 - b + b * |D| / avgdl)`` of ``ids``, |D| from FTS5's docsize table."""
        for s in range(0, len(ids), 500):
            part = ids[s:s + 500]
            for i, sz in self.conn.execute(
                    f"SELECT id, sz FROM {kw.FTS_TABLE}_docsize WHERE id IN "
                    f"({','.join('?' * len(part))})", part):
                size = float(kw._varints(sz)[0])
                norm[i] = bm25.K1 * (1 - bm25.B + bm25.B * size / mean)

    def _scores(self, ids, phrases, idf, mean):
        """Exact bm25 (positive) of ``ids``: their documents tokenized by FTS5 again."""
        rows = self.conn.execute(f"SELECT id, document FROM {kw.CONTENT_TABLE} WHERE id IN "
                                 f"({','.join('?' * len(ids))})", ids).fetchall()
        out = {}
        for (i, _), toks in zip(rows, kw.tokenize(self.conn, [d for _, d in rows])):
            counts = collections.Counter(toks)
            norm = bm25.K1 * (1 - bm25.B + bm25.B * float(len(toks)) / mean)
            score = 0.0
            for t in phrases:
                f = float(counts.get(t, 0))
                score += idf.get(t, 0.0) * ((f * (bm25.K1 + 1.0)) / (f + norm))
            out[i] = score
        return out

    def _full(self, words, depth):
        self.fallbacks += 1
        return self.db.text_matches(fts_query(words), depth)


def write_documents(db, texts, first_id):
    ids = list(range(first_id, first_id + len(texts)))
    with db.write():
        db.insert_vectors(ids, [None] * len(ids), [None] * len(ids), documents=texts)
    return ids


def time_rounds(methods, queries, repeats):
    """{name: (answers, per-query median seconds)}: rounds of every method in turn."""
    answers = {name: [fn(q) for q in queries] for name, fn in methods.items()}
    times = {name: [[] for _ in queries] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            for i, q in enumerate(queries):
                t = time.perf_counter()
                fn(q)
                times[name][i].append(time.perf_counter() - t)
    return {name: (answers[name], [statistics.median(t) for t in times[name]])
            for name in methods}


def summary(name, answers, seconds, reference, build="", fallbacks=""):
    agree = np.mean([a == r for a, r in zip(answers, reference)])
    ms = np.asarray(seconds) * 1e3
    return [name, fmt(float(np.median(ms))), fmt(float(np.percentile(ms, 90))),
            fmt(float(agree)), build, fallbacks]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    depth = args.depth
    docs, glosses, short = load(args.data, args.docs, args.queries)
    with tempfile.TemporaryDirectory() as tmp, Threads(1) as threads:
        db = Database(Path(tmp) / "docs.db")
        t = time.perf_counter()
        write_documents(db, docs, 1)
        print(f"{len(docs):,} documents written in {time.perf_counter() - t:.1f} s; "
              f"{len(glosses)} queries, depth {depth}; threads: {threads.describe()}\n")
        index = kw.KeywordIndex()
        t = time.perf_counter()
        index.keyword_ranking(db, glosses[0], depth)
        first = time.perf_counter() - t
        build = index.stats["build_seconds"]
        tracemalloc.start()  # a second build, the kernels loaded: its transient memory
        kw.KeywordIndex().keyword_ranking(db, glosses[0], depth)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        pruned = PrunedFts5(db)

        rows = []
        for label, queries in (("glosses", glosses), ("2-3 words", short)):
            fb = pruned.fallbacks
            res = time_rounds({
                "fts5": lambda q: db.text_matches(fts_query(q), depth),
                "fts5 + pruning": lambda q: pruned.ranking(q, depth),
                "memory copy": lambda q: index.keyword_ranking(db, q, depth),
            }, queries, args.repeats)
            ref = res["fts5"][0]
            n_pruned_fb = (pruned.fallbacks - fb) // (args.repeats + 1)
            rows.append(summary(f"fts5 ({label})", *res["fts5"], ref))
            rows.append(summary(f"fts5 + pruning ({label})", *res["fts5 + pruning"], ref,
                                fallbacks=f"{n_pruned_fb}/{len(queries)}"))
            rows.append(summary(f"memory copy ({label})", *res["memory copy"], ref,
                                build=f"{build:.2f} s", fallbacks=index.stats["fallbacks"]))

        rng = np.random.default_rng(1)
        all_ids = np.arange(1, len(docs) + 1, dtype=np.int64)
        for share in (0.1, 0.01):
            allowed = np.sort(rng.choice(all_ids, size=int(len(all_ids) * share),
                                         replace=False))
            ok = set(allowed.tolist())

            def filtered(q, ok=ok):  # every match read, then filtered in Python
                out = []
                for row in db.text_matches(fts_query(q)):
                    if row[0] in ok:
                        out.append(row)
                        if len(out) == depth:
                            break
                return out

            res = time_rounds({
                "fts5": filtered,
                "memory copy": lambda q, a=allowed: index.keyword_ranking(db, q, depth, a),
            }, glosses, args.repeats)
            ref = res["fts5"][0]
            rows.append(summary(f"fts5, {share:.0%} allowed (glosses)", *res["fts5"], ref))
            rows.append(summary(f"memory copy, {share:.0%} allowed (glosses)",
                                *res["memory copy"], ref))

        print(markdown_table(["method (queries)", "ms/query median", "ms/query p90",
                              "top-50 agreement", "build", "fallbacks"], rows))
        print(f"\nmemory copy: first query {first:.2f} s in all (build {build:.2f} s; the rest "
              f"is the once-per-process scoring check and kernel loading); it holds "
              f"{index.nbytes() / 1e6:.0f} MB (arrays and term dictionary), a build peaks at "
              f"{peak / 1e6:.0f} MB")

        print("\nrefresh (first query after the write, then the median over the glosses):")
        next_id = len(docs) + 1
        extra = (Path(args.data) / "query_texts.txt").read_text(encoding="utf-8").split("\n")
        for n in (1, 1000, 1):
            ids = write_documents(db, [extra[(next_id + j) % len(extra)] for j in range(n)],
                                  next_id)
            next_id += n
            index.note_written(ids)
            t = time.perf_counter()
            got = index.keyword_ranking(db, glosses[0], depth)
            after = time.perf_counter() - t
            assert got == db.text_matches(fts_query(glosses[0]), depth)
            res = time_rounds({"memory copy": lambda q: index.keyword_ranking(db, q, depth)},
                              glosses, 1)
            agree = np.mean([a == db.text_matches(fts_query(q), depth)
                             for a, q in zip(res["memory copy"][0], glosses)])
            print(f"- add of {n:,} reported: {after * 1e3:.1f} ms; then "
                  f"{statistics.median(res['memory copy'][1]) * 1e3:.3f} ms/query, "
                  f"agreement {agree:.3f} ({index.stats['segments']} segments)")
        with db.write():
            db.set_documents([5], ["an unreported change"])
        builds = index.stats["builds"]
        t = time.perf_counter()
        index.keyword_ranking(db, glosses[0], depth)
        print(f"- unreported update of 1: {(time.perf_counter() - t) * 1e3:.0f} ms "
              f"({index.stats['builds'] - builds} rebuild)")
        print(f"\nstats: {index.stats}")
        db.close()


if __name__ == "__main__":
    main()

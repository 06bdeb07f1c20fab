"""Filtered and hybrid search through the Store on real embeddings (the Store alone for now;
the peers' filtered search is still to be added, see issue 8).

    python -m benchmarks.filtered ../shared/data/wordnet-minilm [--queries 200] [--repeats 3]

Each base vector gets a uniform integer attribute ``u`` in [0, 1000) and a topic (its k-means
cluster among 100, fitted on the vectors); filters keep 50%, 10%, 1% and 0.1% of the store,
the query's own topic (correlated) and a far topic (anti-correlated). Columns: 10-recall@10
against the exact filtered answer (numpy brute force over the passing rows), share of short
results, QPS single (one query per call, 1 thread verified, median of --repeats passes timed
in interleaved rounds) and the plan the Store chose. The documents are the WordNet glosses;
the last rows time hybrid search (``text=`` the query's own gloss) against plain search.

Note: "time / unfiltered" is the time per query relative to the unfiltered search in the
same rounds (below 1 is faster).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from rvqstore import Store
from rvqstore.algo import kmeans

from .common import Threads, load_dataset


def exact_filtered(base, norms, q, passing, k=10):
    rows = np.flatnonzero(passing)
    d = norms[rows] - 2 * base[rows] @ q
    top = rows[np.argsort(d, kind="stable")[:k]]
    return top


def timed(fns, queries, repeats):
    """Median seconds per query of each fn, timed in interleaved rounds."""
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for q in queries:
                fn(q)
            runs[name].append((time.perf_counter() - t) / len(queries))
    return {name: statistics.median(v) for name, v in runs.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    base, queries, _ = load_dataset(args.dataset, queries=args.queries)
    n = len(base)
    texts = Path(args.dataset, "base_texts.txt").read_text(encoding="utf-8").splitlines()[:n]
    qtexts = Path(args.dataset, "query_texts.txt").read_text(encoding="utf-8").splitlines()
    rng = np.random.default_rng(0)
    u = rng.integers(1000, size=n)
    centers = kmeans(base, 100, seed=0, n_iter=10)
    norms = np.einsum("ij,ij->i", base, base)
    cn = np.einsum("ij,ij->i", centers, centers)
    topic = np.concatenate([np.argmin(cn[None] - 2 * base[i:i + 10000] @ centers.T, axis=1)
                            for i in range(0, n, 10000)])
    metas = [{"u": int(a), "topic": int(t)} for a, t in zip(u, topic)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        s = Store.open(Path(tmp) / "f.db", dim=base.shape[1], stages=16, durable=False)
        s.add(base, metadata=metas, documents=texts)
        s.train()
        print(f"# built in {time.perf_counter() - t0:.0f} s; {n:,} x {base.shape[1]}, S=16")
        qd = cn[None] - 2 * queries @ centers.T
        qtopic, far = np.argmin(qd, axis=1), np.argmax(qd, axis=1)
        cases = [("no filter", lambda i: None),
                 ("50%", lambda i: {"u": {"$lt": 500}}),
                 ("10%", lambda i: {"u": {"$lt": 100}}),
                 ("1%", lambda i: {"u": {"$lt": 10}}),
                 ("0.1%", lambda i: {"u": {"$lt": 1}}),
                 ("own topic", lambda i: {"topic": int(qtopic[i])}),
                 ("far topic", lambda i: {"topic": int(far[i])})]
        rows = []
        with Threads(1):
            s.search(queries[0], k=10, where={"u": 1})  # builds the metadata columns
            t = time.perf_counter()
            for _ in range(100):
                s.count({"u": {"$lt": 100}})
            count_ms = (time.perf_counter() - t) / 100 * 1e3
            fns, truth = {}, {}
            for name, where in cases:
                fns[name] = (lambda where: (lambda i: s.search(queries[i], k=10,
                                                               where=where(i))))(where)
            for name, where in cases:
                found, short = [], 0
                before = dict(s.info()["search_plans"])
                for i in range(len(queries)):
                    w = where(i)
                    passing = _passing(w, u, topic)
                    want = exact_filtered(base, norms, queries[i], passing)
                    got = s.search(queries[i], k=10, where=w).ids
                    short += int((got >= 0).sum() < min(10, passing.sum()))
                    found.append(len(set(got) & set(want)) / min(10, len(want)))
                after = s.info()["search_plans"]
                plan = "exact" if after["exact"] > before["exact"] else "scan"
                truth[name] = (float(np.mean(found)), short / len(queries), plan)
            idx = list(range(len(queries)))
            qps = timed(fns, idx, args.repeats)
            hyb = timed({"plain": lambda i: s.search(queries[i], k=10),
                         "hybrid": lambda i: s.search(queries[i], k=10, text=qtexts[i])},
                        idx, args.repeats)
        for name, _ in cases:
            r, sh, plan = truth[name]
            rows.append((name, r, sh, 1 / qps[name], qps[name] / qps["no filter"], plan))
        s.close()
    print(f"\nfilter evaluation (count, 10% filter, {n:,} items): {count_ms:.2f} ms")
    print("\n| filter | 10-recall@10 | short results | QPS single | time / unfiltered | plan |")
    print("|---|---|---|---|---|---|")
    for name, r, sh, q, rel, plan in rows:
        print(f"| {name} | {r:.3f} | {sh:.1%} | {q:,.0f} | {rel:.2f} | {plan} |")
    print(f"\nhybrid (text= the query's gloss): {hyb['hybrid'] * 1e3:.2f} ms/query against "
          f"{hyb['plain'] * 1e3:.2f} ms plain: +{(hyb['hybrid'] - hyb['plain']) * 1e3:.2f} ms")


def _passing(where, u, topic):
    if where is None:
        return np.ones(len(u), bool)
    if "u" in where:
        return u < where["u"]["$lt"]
    return topic == where["topic"]


if __name__ == "__main__":
    main()

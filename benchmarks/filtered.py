"""Filtered search on real embeddings: the Store next to sqlite-vec, LanceDB, Chroma and faiss.

    python -m benchmarks.filtered ../shared/data/wordnet-minilm
        [--peers sqlite-vec,lancedb,chroma,faiss | none] [--n N] [--queries 200] [--repeats 3]

Each base vector gets a uniform integer attribute ``u`` in [0, 1000) and a topic (its k-means
cluster among 100, fitted on the vectors); filters keep 50%, 10%, 1% and 0.1% of the items
(``u < 500/100/10/1``), the query's own topic (correlated) and a far topic (anti-correlated).
Every system answers the same queries under the same filters and is scored against the same
exact filtered answer (numpy brute force, squared L2, over the passing rows). Columns:
10-recall@10, share of short results (fewer than min(10, matches) ids), QPS single (one
query per call; the median of --repeats passes, timed in interleaved rounds that time every
system and filter in turn, ``common.interleaved_runs``), time relative to the same system's
unfiltered search, CPU time / wall time of the process over those passes (about the cores
the search kept busy; below 1 when it waited, or when other work on the machine had the
core), and our QPS over the peer's ("ours / peer"; the plan the Store chose
in its own table).

The systems (``--peers`` picks the peers; ``--n`` keeps the first N base vectors, the ground
truth recomputed over them):

- the Store: S=16, float32 originals, its default rerank, metadata ``{"u", "topic"}``,
  ``where=``.
- sqlite-vec: a ``vec0`` table with metadata columns ``u integer, topic integer``, KNN with
  ``embedding MATCH ? AND k = 10 AND u < ?`` (exact, L2), through apsw.
- LanceDB: one table per vector index (IVF_PQ with 48 sub-vectors, IVF_RQ), BTREE scalar
  indexes on ``u`` and ``topic``, ``where(..., prefilter=True)``, nprobes and refine_factor
  below.
- Chroma: a PersistentClient collection, HNSW with ``space: l2`` at Chroma's defaults,
  ``where=``.
- faiss: IndexHNSWFlat in RAM (M 32, efSearch 64), the filter as an ``IDSelectorBitmap``
  in ``SearchParametersHNSW``; the bitmap is computed from the attributes in each call (numpy
  comparison + packbits), as the other systems evaluate their filters in each call.

Threads: numpy/BLAS, numba and faiss are limited to 1 thread and verified (common.Threads).
LanceDB and Chroma run native pools that threadpoolctl cannot see; their sizes are set by the
environment variables in PEER_THREAD_ENV before either is imported (a value already set is
kept) and printed, with Chroma's HNSW ``num_threads: 1``. LanceDB cannot be held to one
thread (its I/O pool and tokio threads come on top; LANCE_IO_THREADS=1 hangs its BTREE build),
so the process's threads are counted and printed, and the CPU / wall column shows what each
system really used. Builds run with the libraries' defaults except where those variables
apply. The documents are the WordNet glosses; the last line times hybrid search through the
Store (``text=`` the query's own gloss) against plain search.
"""

import argparse
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from rvqstore import Store
from rvqstore.algo import kmeans

from .common import Threads, fmt, interleaved_runs, load_dataset, markdown_table

K = 10
PEERS = ("sqlite-vec", "lancedb", "chroma", "faiss")
# the native pools of LanceDB (lance's compute pool, its tokio runtime) and of Chroma (its
# tokio runtime and rayon pool): read when their runtimes start, so set before either is
# imported. Not LANCE_IO_THREADS: at 1, LanceDB 0.40 hangs building a BTREE index.
PEER_THREAD_ENV = {"LANCE_CPU_THREADS": "1", "TOKIO_WORKER_THREADS": "1",
                   "RAYON_NUM_THREADS": "1"}
LANCE_NPROBES, LANCE_REFINE = 50, 10
FAISS_M, FAISS_EF_SEARCH = 32, 64


class System:
    """One searchable system: ``search(q, f)`` returns the ids of the k nearest passing
    filter ``f`` (None, or ``(field, op, value)`` with op ``<`` or ``=``)."""

    def __init__(self, name, search, settings, build_s, disk, threads):
        self.name, self.search, self.settings = name, search, settings
        self.build_s, self.threads = build_s, threads
        self.disk = disk  # its folder, measured after the searches, or a note


def folder_bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def os_threads():
    """This process's threads, counted by name (Linux; the names are cut at 15 characters)."""
    try:
        names = [Path(f"/proc/self/task/{t}/comm").read_text().strip()
                 for t in os.listdir("/proc/self/task")]
    except OSError:
        return "unknown"
    return ", ".join(f"{name} {c}" for name, c in Counter(names).most_common())


def mib(nbytes):
    return f"{nbytes / 2**20:,.0f} MiB"


def passing(f, attrs):
    if f is None:
        return np.ones(len(attrs["u"]), bool)
    field, op, value = f
    return attrs[field] < value if op == "<" else attrs[field] == value


def exact_filtered(base, norms, q, mask, k=K):
    rows = np.flatnonzero(mask)
    d = norms[rows] - 2 * base[rows] @ q
    return rows[np.argsort(d, kind="stable")[:k]]


# -- the systems ------------------------------------------------------------------------

def store_system(base, attrs, texts, folder):
    t0 = time.perf_counter()
    s = Store.open(folder / "f.db", dim=base.shape[1], stages=16, durable=False)
    s.add(base, metadata=[{"u": int(a), "topic": int(t)}
                          for a, t in zip(attrs["u"], attrs["topic"])], documents=texts)
    s.train()
    build_s = time.perf_counter() - t0

    def where(f):
        if f is None:
            return None
        return {f[0]: {"$lt": f[2]}} if f[1] == "<" else {f[0]: f[2]}

    search = lambda q, f: s.search(q, k=K, where=where(f)).ids
    system = System("Store", search, "S=16, float32 originals, rerank default", build_s,
                    folder, "numpy/BLAS, numba 1 (verified)")
    return s, where, system


def sqlite_vec_system(base, attrs, folder):
    import apsw  # the stdlib sqlite3 of many Python builds cannot load extensions
    import sqlite_vec

    t0 = time.perf_counter()
    con = apsw.Connection(str(folder / "vec.db"))
    con.enable_load_extension(True)
    con.load_extension(sqlite_vec.loadable_path())
    con.execute(f"CREATE VIRTUAL TABLE v USING vec0(embedding float[{base.shape[1]}], "
                "u integer, topic integer)")
    with con:
        con.executemany("INSERT INTO v(rowid, embedding, u, topic) VALUES (?, ?, ?, ?)",
                        ((i, base[i].tobytes(), int(attrs["u"][i]), int(attrs["topic"][i]))
                         for i in range(len(base))))
    build_s = time.perf_counter() - t0
    knn = f"SELECT rowid FROM v WHERE embedding MATCH ? AND k = {K}"
    sql = {None: knn + " ORDER BY distance"}
    for field in ("u", "topic"):
        for op in ("<", "="):
            sql[field, op] = f"{knn} AND {field} {op} ? ORDER BY distance"

    def search(q, f):
        if f is None:
            rows = con.execute(sql[None], (q.tobytes(),))
        else:
            rows = con.execute(sql[f[:2]], (q.tobytes(), f[2]))
        return np.fromiter((r[0] for r in rows), np.int64)

    version = con.execute("SELECT vec_version()").fetchone()[0]
    return [System(f"sqlite-vec {version}", search,
                   "vec0 float[d] + metadata columns u, topic; exact KNN (L2)", build_s,
                   folder, "1 (SQLite runs the query in the calling thread)")]


def lancedb_systems(base, attrs, folder):
    import lancedb
    import pyarrow as pa
    from lancedb.index import BTree, IvfPq, IvfRq

    db = lancedb.connect(str(folder))
    data = pa.table({"id": np.arange(len(base)), "u": attrs["u"], "topic": attrs["topic"],
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(base.reshape(-1)),
                                                                 base.shape[1])})
    parts = max(1, min(256, len(base) // 256))
    threads = ", ".join(f"{k}={os.environ.get(k, 'unset (its default)')}" for k in
                        ("LANCE_CPU_THREADS", "LANCE_IO_THREADS", "TOKIO_WORKER_THREADS"))
    threads += " (not limitable to 1: lance's I/O pool and tokio threads come on top)"
    out = []
    for name, config in (
            ("IVF_PQ", IvfPq(distance_type="l2", num_partitions=parts, num_sub_vectors=48)),
            ("IVF_RQ", IvfRq(distance_type="l2", num_partitions=parts))):
        t0 = time.perf_counter()
        table = db.create_table(name.lower(), data)
        for column in ("u", "topic"):
            table.create_index(column, config=BTree())
        table.create_index("vector", config=config)
        build_s = time.perf_counter() - t0

        def search(q, f, table=table):
            query = (table.search(q).distance_type("l2").nprobes(LANCE_NPROBES)
                     .refine_factor(LANCE_REFINE).limit(K).select(["id", "_distance"]))
            if f is not None:
                query = query.where(f"{f[0]} {f[1]} {f[2]}", prefilter=True)
            return query.to_arrow().column("id").to_numpy()

        detail = "48 sub-vectors" if name == "IVF_PQ" else "RaBitQ"
        out.append(System(f"LanceDB {lancedb.__version__} {name}", search,
                          f"{name} ({detail}), {parts} partitions, nprobes {LANCE_NPROBES}, "
                          f"refine_factor {LANCE_REFINE}; BTREE on u, topic; prefilter=True",
                          build_s, folder / f"{name.lower()}.lance", threads))
    return out


def chroma_system(base, attrs, folder):
    import chromadb
    from chromadb.config import Settings

    t0 = time.perf_counter()
    client = chromadb.PersistentClient(path=str(folder),
                                       settings=Settings(anonymized_telemetry=False))
    col = client.create_collection("filtered", embedding_function=None,
                                   configuration={"hnsw": {"space": "l2", "num_threads": 1}})
    batch = client.get_max_batch_size()
    for s in range(0, len(base), batch):
        e = min(s + batch, len(base))
        col.add(ids=[str(i) for i in range(s, e)], embeddings=base[s:e],
                metadatas=[{"u": int(a), "topic": int(t)}
                           for a, t in zip(attrs["u"][s:e], attrs["topic"][s:e])])
    build_s = time.perf_counter() - t0

    def where(f):
        if f is None:
            return None
        return {f[0]: {"$lt" if f[1] == "<" else "$eq": f[2]}}

    def search(q, f):
        got = col.query(query_embeddings=q[None], n_results=K, where=where(f), include=[])
        return np.array([int(i) for i in got["ids"][0]], np.int64)

    hnsw = col.configuration.get("hnsw") or {}
    shown = ", ".join(f"{k} {hnsw[k]}" for k in ("space", "max_neighbors", "ef_construction",
                                                  "ef_search", "num_threads") if k in hnsw)
    threads = "hnsw num_threads 1, " + ", ".join(
        f"{k}={os.environ.get(k, 'unset')}" for k in ("TOKIO_WORKER_THREADS",
                                                      "RAYON_NUM_THREADS"))
    return [System(f"Chroma {chromadb.__version__}", search,
                   f"PersistentClient, HNSW ({shown}); where=; added in batches of {batch}",
                   build_s, folder, threads)]


def faiss_system(base, attrs, faiss):
    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(base.shape[1], FAISS_M)
    index.add(base)
    build_s = time.perf_counter() - t0
    plain = faiss.SearchParametersHNSW(efSearch=FAISS_EF_SEARCH)

    def search(q, f):
        if f is None:
            params = plain
        else:
            bits = np.packbits(passing(f, attrs), bitorder="little")
            params = faiss.SearchParametersHNSW(efSearch=FAISS_EF_SEARCH,
                                                sel=faiss.IDSelectorBitmap(bits))
        ids = index.search(q[None], K, params=params)[1][0]
        return ids[ids >= 0]

    size = faiss.serialize_index(index).nbytes
    return [System(f"faiss {faiss.__version__}", search,
                   f"IndexHNSWFlat M {FAISS_M}, efConstruction {index.hnsw.efConstruction}, "
                   f"efSearch {FAISS_EF_SEARCH}; IDSelectorBitmap built per call", build_s,
                   f"in RAM ({mib(size)} serialized)", "faiss OpenMP 1 (verified)")]


# -- the run ------------------------------------------------------------------------------

def score(answers, truth, filters, attrs):
    """Mean 10-recall@10, share of short results and the number of returned ids that are
    not passing items (wrong or duplicated) over one system's answers to one case."""
    found, short, wrong = [], 0, 0
    for i, got in enumerate(answers):
        got = np.asarray(got, np.int64)
        want, matches = truth[i]
        ok = got[(got >= 0) & (got < len(attrs["u"]))]
        ok = np.unique(ok[passing(filters(i), attrs)[ok]])
        wrong += len(got) - len(ok)
        short += int(len(ok) < min(K, matches))
        found.append(len(set(ok.tolist()) & set(want.tolist())) / min(K, len(want))
                     if len(want) else 1.0)
    return float(np.mean(found)), short / len(answers), wrong


def parse_peers(text):
    if text == "none":
        return []
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise SystemExit(f"--peers: unknown {', '.join(unknown)} (choose from "
                         f"{','.join(PEERS)} or none)")
    return names


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--peers", default=",".join(PEERS),
                    help=f"comma-separated, from {','.join(PEERS)}; 'none' for the Store alone")
    ap.add_argument("--n", type=int, default=None,
                    help="use only the first N base vectors (ground truth recomputed)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    peers = parse_peers(args.peers)
    for k, v in PEER_THREAD_ENV.items():  # before lancedb or chromadb is imported
        os.environ.setdefault(k, v)
    faiss = None
    if "faiss" in peers:
        import faiss  # before the thread limits, which no runtime may escape
    for name, module in (("sqlite-vec", "sqlite_vec"), ("sqlite-vec", "apsw"),
                         ("lancedb", "lancedb"), ("chroma", "chromadb")):
        if name in peers:
            __import__(module)

    base, queries, _ = load_dataset(args.dataset, limit=args.n, queries=args.queries)
    n, nq = len(base), len(queries)
    texts = Path(args.dataset, "base_texts.txt").read_text(encoding="utf-8").splitlines()[:n]
    qtexts = Path(args.dataset, "query_texts.txt").read_text(encoding="utf-8").splitlines()
    rng = np.random.default_rng(0)
    u = rng.integers(1000, size=n)
    centers = kmeans(base, 100, seed=0, n_iter=10)
    norms = np.einsum("ij,ij->i", base, base)
    cn = np.einsum("ij,ij->i", centers, centers)
    topic = np.concatenate([np.argmin(cn[None] - 2 * base[i:i + 10000] @ centers.T, axis=1)
                            for i in range(0, n, 10000)])
    attrs = {"u": u, "topic": topic}
    qd = cn[None] - 2 * queries @ centers.T
    qtopic, far = np.argmin(qd, axis=1), np.argmax(qd, axis=1)
    cases = [("no filter", lambda i: None),
             ("50%", lambda i: ("u", "<", 500)),
             ("10%", lambda i: ("u", "<", 100)),
             ("1%", lambda i: ("u", "<", 10)),
             ("0.1%", lambda i: ("u", "<", 1)),
             ("own topic (correlated)", lambda i: ("topic", "=", int(qtopic[i]))),
             ("far topic (anti-correlated)", lambda i: ("topic", "=", int(far[i])))]
    truth = {}
    for name, filters in cases:
        truth[name] = []
        for i in range(nq):
            mask = passing(filters(i), attrs)
            truth[name].append((exact_filtered(base, norms, queries[i], mask), int(mask.sum())))
    print(f"# {args.dataset}: {n:,} x {base.shape[1]}, {nq} queries; k={K}; QPS single: one "
          f"query per call, median of {args.repeats} passes in interleaved rounds", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for sub in ("store", "sqlite-vec", "lancedb", "chroma"):
            (tmp / sub).mkdir()
        s, where, ours = store_system(base, attrs, texts, tmp / "store")
        print(f"# Store built in {ours.build_s:.0f} s", flush=True)
        systems = [ours]
        if "sqlite-vec" in peers:
            systems += sqlite_vec_system(base, attrs, tmp / "sqlite-vec")
        if "lancedb" in peers:
            systems += lancedb_systems(base, attrs, tmp / "lancedb")
        if "chroma" in peers:
            systems += chroma_system(base, attrs, tmp / "chroma")
        if "faiss" in peers:
            systems += faiss_system(base, attrs, faiss)
        for system in systems[1:]:
            print(f"# {system.name} built in {system.build_s:.0f} s", flush=True)

        with Threads(1, faiss) as threads:
            s.search(queries[0], k=K, where={"u": 1})  # builds the metadata columns
            t = time.perf_counter()
            for _ in range(100):
                s.count({"u": {"$lt": 100}})
            count_ms = (time.perf_counter() - t) / 100 * 1e3
            plans = {}
            for name, filters in cases:  # the Store's plans, in a pass of its own
                before = dict(s.info()["search_plans"])
                for i in range(nq):
                    s.search(queries[i], k=K, where=where(filters(i)))
                after = s.info()["search_plans"]
                ran = {p: c - before.get(p, 0) for p, c in after.items()
                       if c > before.get(p, 0)}
                reads = ran.pop("originals_read", 0)  # a count of rows, not a plan
                plans[name] = " / ".join(p if c == nq else f"{p} {c / nq:.0%}"
                                         for p, c in ran.items())
                plans[name] += f"; {reads / nq:,.0f} originals read/query"
            searches = {(system.name, name): (lambda i, search=system.search, f=filters:
                                              search(queries[i], f(i)))
                        for system in systems for name, filters in cases}
            answers, seconds, cpu = interleaved_runs(searches, nq, args.repeats)
            census = os_threads()
            _, hyb, _ = interleaved_runs(
                {"plain": lambda i: s.search(queries[i], k=K),
                 "hybrid": lambda i: s.search(queries[i], k=K, text=qtexts[i])},
                nq, args.repeats)
        s.close()
        disk = {x.name: mib(folder_bytes(x.disk)) if isinstance(x.disk, Path) else x.disk
                for x in systems}

    results = {}
    for key in searches:
        name = key[1]
        filters = dict(cases)[name]
        results[key] = (*score(answers[key], truth[name], filters, attrs),
                        nq / seconds[key], cpu[key] / seconds[key])

    print(f"\nSearch threads: {threads.describe()} (verified on entry and exit); "
          f"peer pools: {', '.join(f'{k}={os.environ[k]}' for k in PEER_THREAD_ENV)}; "
          f"the process's threads after the timed passes: {census}")
    print(f"\nfilter evaluation (Store.count, 10% filter, {n:,} items): {count_ms:.2f} ms\n")
    print(markdown_table(
        ["system", "settings", "build s", "on disk", "search threads"],
        [[x.name, x.settings, f"{x.build_s:.1f}",
          disk[x.name], x.threads] for x in systems]))

    for system in systems:
        rows = []
        for name, _ in cases:
            rec, short, wrong, qps, busy = results[system.name, name]
            rel = results[system.name, "no filter"][3] / qps
            ratio = results[ours.name, name][3] / qps
            last = (plans[name] if system is ours
                    else f"{ratio:.1f}x" if ratio >= 1 else f"{ratio:.2f}x")
            rows.append([name, f"{rec:.3f}", f"{short:.1%}", fmt(qps, 1), f"{rel:.2f}",
                         f"{busy:.2f}", last]
                        + ([str(wrong)] if system is not ours else []))
        print(f"\n{system.name}: {system.settings}\n")
        print(markdown_table(["filter", "10-recall@10", "short results", "QPS single",
                              "time / unfiltered", "CPU / wall",
                              "plan" if system is ours else "ours / peer"]
                             + ([] if system is ours else ["ids not passing"]), rows))

    for x in systems:
        if results[x.name, "no filter"][0] < 0.95:
            print(f"\nnote: {x.name}'s unfiltered 10-recall@10 is below 0.95 at these settings")
    print(f"\nQPS single (10-recall@10) by filter, {n:,} items, {nq} queries:\n")
    print(markdown_table(["filter"] + [x.name for x in systems],
                         [[name] + [f"{fmt(results[x.name, name][3], 1)} "
                                    f"({results[x.name, name][0]:.3f})" for x in systems]
                          for name, _ in cases]))
    print(f"\nhybrid (Store, text= the query's gloss): {hyb['hybrid'] / nq * 1e3:.2f} ms/query "
          f"against {hyb['plain'] / nq * 1e3:.2f} ms plain: "
          f"+{(hyb['hybrid'] - hyb['plain']) / nq * 1e3:.2f} ms")


if __name__ == "__main__":
    main()

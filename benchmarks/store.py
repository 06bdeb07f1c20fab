"""The Store benchmark: search through the file against the codec in memory and the peers.

    python -m benchmarks.store ../shared/data/wordnet-minilm [--no-peers] [--peer-queries 200]
        [--repeats 3] [--limit N] [--queries N]

Builds a store (S=16, float32 originals) in a temporary folder, then prints: add and train
times, import and open + first query in fresh processes, single-query QPS and 10-recall@10
through the Store (rerank x1 to x20) next to the codec in memory on the same codes, the
cost of each originals format, the add rate to a trained store, and, when installed
(``pip install '.[bench]'``), sqlite-vec's float32 vec0 KNN and LanceDB's IVF_PQ and IVF_RQ
with refine at a few settings, on the same data, each next to the fastest Store setting
whose recall on the same queries is equal or better.

Every search row, ours and the peers', follows one protocol (``common.single_runs``): one
query per call in a Python loop, an untimed pass for recall, then the median of
``--repeats`` timed passes, taken in rounds that time each compared search in turn. The
peers and the Store rows set against them run on the same first ``--peer-queries``
queries, in the same rounds. Search runs with BLAS, OpenMP and numba
limited to 1 thread, verified and printed above each table; LanceDB runs its own pools.
"""

import argparse
import os
import tempfile
import time

import numpy as np

from rvqstore import Store
from rvqstore.algo import adc_search, rerank

from .common import (Threads, describe_threads, fmt, fresh_processes, lancedb_threads,
                     load_dataset, markdown_table, recall, single_runs, thread_counts)

FACTORS = (1, 4, 10, 12, 15, 20)


def build(base, path, notes):
    with Store.open(path, dim=base.shape[1], stages=16) as store:
        t = time.perf_counter()
        added_ids(store, base)
        notes["add untrained vec/s"] = len(base) / (time.perf_counter() - t)
        t = time.perf_counter()
        store.train()
        notes["train + encode all s"] = time.perf_counter() - t


def first_query(path, queries, folder, notes):
    """Import, then open + first query, each the median of 3 fresh processes."""
    qfile = os.path.join(folder, "query0.npy")
    np.save(qfile, queries[:1])
    runs, (imp, first) = fresh_processes(path, runs=3, queries=qfile)
    notes["import numpy + rvqstore s (fresh process, median of 3)"] = imp
    each = ", ".join(f"{r['open_first_query_s']:.3f}" for r in runs)
    notes["Store.open + first query s (fresh process, warm page cache, median of 3)"] = (
        f"{first:.3f} (each: {each})")


def in_memory(index, base, factor):
    """The Store's ADC and rerank on the same codes, originals in a numpy array."""
    def search(q):
        cand = index.ids[adc_search(index.rq, index.codes, q, k=10 * factor,
                                    bias=index.bias).ids]
        return cand if factor == 1 else rerank(q, cand, lambda i: base[i], k=10).ids
    return search


def store_table(store, mapped, base, queries, gt, repeats):
    """Rows of the main table: the Store, the Store mapped and memory at each factor."""
    index = store.code_index()
    rows = []
    with Threads(1) as threads:
        for factor in FACTORS:
            got = single_runs({
                "store": lambda q: store.search(q, k=10, rerank=factor).ids,
                "mapped": lambda q: mapped.search(q, k=10, rerank=factor).ids,
                "memory": in_memory(index, base, factor)}, queries, gt, repeats)
            ours, ours_mm, mem = got["store"], got["mapped"], got["memory"]
            rows.append([f"S=16 rerank x{factor}", fmt(ours[0]), fmt(ours[1]), fmt(ours_mm[1]),
                         fmt(mem[0]), fmt(mem[1]), f"{ours[1] / mem[1]:.2f}",
                         f"{ours_mm[1] / mem[1]:.2f}"])
            print("  " + " | ".join(rows[-1]), flush=True)
    return rows, threads.describe()


def originals_rows(store, base, queries, gt, folder):
    """What each originals format costs in bytes on disk and in recall after rerank x10 over
    the same candidates: each format's originals as a store of that format returns them."""
    index = store.code_index()
    cand = index.ids[adc_search(index.rq, index.codes, queries, k=100, bias=index.bias).ids]
    out = []
    for fmt_name in ("float32", "float16", "zstd"):
        path = os.path.join(folder, f"originals-{fmt_name}.db")
        with Store.open(path, dim=base.shape[1], originals=fmt_name) as other:
            stored = other.get(added_ids(other, base))
            per_vector = other.info()["bytes"]["originals"] / len(other)
        res = rerank(queries, cand, lambda i: stored[i], k=10)
        out.append([fmt_name, fmt(per_vector), fmt(recall(res.ids, gt))])
    return out


def added_ids(store, base):
    """Add ``base``; its ids, which must be its row numbers (the in-memory rows and the
    recall computations index ``base`` by id)."""
    ids = store.add(base)
    if not np.array_equal(ids, np.arange(len(base))):
        raise RuntimeError("the store numbered the vectors other than 0..n-1")
    return ids


# -- peers: each setup returns [(name, search_one, add vec/s or None)] ---------------------

def sqlite_vec_peers(base, folder):
    # apsw, because the stdlib sqlite3 of many Python builds cannot load extensions
    import apsw
    import sqlite_vec

    con = apsw.Connection(os.path.join(folder, "vec.db"))
    con.enable_load_extension(True)
    con.load_extension(sqlite_vec.loadable_path())
    con.execute(f"CREATE VIRTUAL TABLE v USING vec0(embedding float[{base.shape[1]}])")
    t = time.perf_counter()
    with con:
        con.executemany("INSERT INTO v(rowid, embedding) VALUES (?, ?)",
                        ((i, base[i].tobytes()) for i in range(len(base))))
    add_rate = len(base) / (time.perf_counter() - t)
    sql = "SELECT rowid FROM v WHERE embedding MATCH ? AND k = 10 ORDER BY distance"
    search = lambda q: np.array([[r[0] for r in con.execute(sql, (q[0].tobytes(),))]])
    version = con.execute("SELECT vec_version()").fetchone()[0]
    return [(f"sqlite-vec {version} vec0 float32 KNN (exact)", search, add_rate)]


def lancedb_peers(base, folder):
    import lancedb
    import pyarrow as pa
    from lancedb.index import IvfPq, IvfRq

    db = lancedb.connect(os.path.join(folder, "lance"))
    vec = pa.FixedSizeListArray.from_arrays(pa.array(base.reshape(-1)), base.shape[1])
    parts = max(1, min(256, len(base) // 256))
    out = []
    for name, config in (("IVF_PQ (48 sub-vectors)", IvfPq(distance_type="l2", num_partitions=parts,
                                                             num_sub_vectors=48)),
                         ("IVF_RQ (RaBitQ)", IvfRq(distance_type="l2", num_partitions=parts))):
        table = db.create_table(name[:6], pa.table({"id": np.arange(len(base)), "vector": vec}))
        t = time.perf_counter()
        table.create_index("vector", config=config)
        build_s = time.perf_counter() - t
        for nprobes, refine in ((20, 10), (50, 10), (50, 20)):
            def search(q, table=table, nprobes=nprobes, refine=refine):
                r = (table.search(q[0]).nprobes(nprobes).refine_factor(refine).limit(10)
                     .select(["id", "_distance"]).to_arrow())
                return np.array([r.column("id").to_numpy()])
            out.append((f"LanceDB {name}, nprobes {nprobes}, refine {refine} "
                        f"(index {build_s:.0f} s)", search, None))
    return out


def peer_setups():
    """The peers whose packages import here; a note for each one skipped."""
    setups = []
    for setup, modules in ((sqlite_vec_peers, ("apsw", "sqlite_vec")),
                           (lancedb_peers, ("lancedb", "pyarrow"))):
        try:
            for m in modules:  # imported before any thread limit, which they must not escape
                __import__(m)
        except ImportError as exc:
            print(f"# {setup.__name__} skipped: {exc}", flush=True)
            continue
        setups.append(setup)
    return setups


def compare(store, base, queries, gt, folder, repeats):
    """Peers and the Store on the same queries, same protocol, timed in the same rounds."""
    peers = [p for setup in peer_setups() for p in setup(base, folder)]
    searches = {name: search for name, search, _ in peers}
    for factor in FACTORS:
        searches[factor] = lambda q, factor=factor: store.search(q, k=10, rerank=factor).ids
    with Threads(1) as threads:
        got = single_runs(searches, queries, gt, repeats)
    for name, (rec, qps) in got.items():
        label = f"Store rerank x{name}" if name in FACTORS else name
        print(f"  {label} | {fmt(rec)} | {fmt(qps)}", flush=True)
    peer_rows = [(name, *got[name], add_rate) for name, _, add_rate in peers]
    points = [(factor, *got[factor]) for factor in FACTORS]
    return peer_rows, points, threads.describe()


def matched(peers, points):
    """Each peer next to the fastest Store setting with equal or better recall on the same
    queries: (setting, its recall, its QPS, ratio), or the default setting, marked, when
    none reaches it."""
    rows = []
    for name, rec, qps, _ in peers:
        ok = [p for p in points if p[1] >= rec]
        if ok:
            (factor, r, q), label = max(ok, key=lambda p: p[2]), ""
        else:  # an exact peer: the default setting, its lower recall shown
            (factor, r, q), label = [p for p in points if p[0] == 10][0], " (lower recall)"
        rows.append([name, fmt(rec), fmt(qps), f"rerank x{factor}{label}", fmt(r), fmt(q),
                     f"{q / qps:.1f}x"])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--peer-queries", type=int, default=200,
                   help="queries for the peers and the Store rows set against them (the first N)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed passes per QPS figure, Store and peers alike (median)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N base vectors (ground truth recomputed)")
    p.add_argument("--queries", type=int, default=None, help="use only the first N queries")
    args = p.parse_args(argv)
    base, queries, gt = load_dataset(args.dataset, limit=args.limit, queries=args.queries)
    default_threads = describe_threads(thread_counts())
    print(f"# dataset {args.dataset}: base {base.shape}, queries {queries.shape}; "
          f"QPS single: one query per call, median of {args.repeats} timed passes", flush=True)
    print(f"# default threads (add, train): {default_threads}", flush=True)
    notes = {}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "bench.db")
        build(base, path, notes)
        first_query(path, queries, folder, notes)
        with Store.open(path) as store, Store.open(path, mmap_originals=True) as mapped:
            rows, threads = store_table(store, mapped, base, queries, gt, args.repeats)
            print(f"\nSearch threads in force: {threads}; {len(queries)} queries\n")
            print(markdown_table(["config", "10-recall@10 Store", "QPS single Store",
                                  "QPS single Store mmap_originals",
                                  "10-recall@10 codec in memory", "QPS single in memory",
                                  "Store / memory", "Store mmap / memory"], rows))
            orig = originals_rows(store, base, queries, gt, folder)
            if not args.no_peers:
                n = args.peer_queries
                peers, points, peer_threads = compare(store, base, queries[:n], gt[:n], folder,
                                                      args.repeats)
            # last: it changes the store the rows above measured
            extra = base[:20000] + np.float32(1e-3)
            t = time.perf_counter()
            store.add(extra)
            notes[f"add to trained store vec/s (greedy; {default_threads})"] = (
                len(extra) / (time.perf_counter() - t))
            notes["bytes on disk"] = store.info()["bytes"]
        print()
        for k, v in notes.items():
            print(f"- {k}: {fmt(v) if not isinstance(v, dict) else v}")
        print()
        print(markdown_table(["originals", "bytes/vector", "10-recall@10 after rerank x10"], orig))
        if not args.no_peers and peers:
            nq = len(queries[:args.peer_queries])
            print(f"\nPeers on the first {nq} queries, median of {args.repeats} passes; search "
                  f"threads in force: {peer_threads}; LanceDB's own pools: "
                  f"{lancedb_threads()} compute thread(s) plus its I/O threads\n")
            print(markdown_table(["peer", "10-recall@10", "QPS single", "add vec/s"],
                                 [[n, fmt(r), fmt(q), fmt(a)] for n, r, q, a in peers]))
            print(f"\nAt equal or better recall on the same {nq} queries (the Store timed in "
                  f"the same rounds as the peers, float32 originals read from the file):\n")
            print(markdown_table(["peer", "peer recall", "peer QPS", "Store setting",
                                  "Store recall", "Store QPS", "Store / peer"],
                                 matched(peers, points)))


if __name__ == "__main__":
    main()

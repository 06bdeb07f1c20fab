"""The Store benchmark: search through the file against the codec in memory and the peers.

    python -m benchmarks.store ../shared/data/wordnet-minilm [--no-peers] [--peer-queries 200]

Builds a store (S=16, float32 originals) in a temporary folder, then prints: add and train
times, the add rate to a trained store, single-query QPS and 10-recall@10 through the Store
(rerank x1/x4/x10) next to the codec in memory on the same codes, the cost of each
originals format, and, when installed (``pip install '.[bench]'``), sqlite-vec's float32
vec0 KNN and LanceDB's IVF_PQ and IVF_RQ with refine at a few settings, on the same data,
each next to the fastest Store setting whose recall on the same queries is equal or better.
Search runs on 1 thread (LanceDB runs its own thread pool over both cores).
"""

import argparse
import os
import tempfile
import time

import numpy as np

from rvqstore import Store
from rvqstore.algo import adc_search, rerank
from rvqstore.storage import pack_originals, unpack_originals

from .common import Threads, fmt, load_dataset, markdown_table, qps_single, recall


FACTORS = (1, 4, 10, 12, 15, 20)


def store_rows(base, queries, gt, folder, args):
    rows, notes = [], {}
    path = os.path.join(folder, "bench.db")
    with Store.open(path, dim=base.shape[1], stages=16) as store:
        t = time.perf_counter()
        store.add(base)
        notes["add untrained vec/s"] = len(base) / (time.perf_counter() - t)
        t = time.perf_counter()
        store.train()
        notes["train + encode all s"] = time.perf_counter() - t
    # a fresh process would see the same: reopen, first query
    t = time.perf_counter()
    store = Store.open(path)
    store.search(queries[0], k=10)
    notes["open + first query s"] = time.perf_counter() - t
    state = store._current()
    rq, codes, bias, ids = state["rq"], state["codes"], state["bias"], state["ids"]
    mapped = Store.open(path, mmap_originals=True)
    sub = slice(0, args.peer_queries)
    notes["store points"] = []
    for factor in FACTORS:
        with Threads(1):
            res = store.search(queries, k=10, rerank=factor)
            ours = qps_single(lambda q: store.search(q, k=10, rerank=factor), queries)
            ours_mm = qps_single(lambda q: mapped.search(q, k=10, rerank=factor), queries)

            def in_memory(q, factor=factor):
                cand = adc_search(rq, codes, q, k=10 * factor, bias=bias).ids
                cand = ids[cand]
                return cand if factor == 1 else rerank(q, cand, lambda i: base[i], k=10).ids
            mem = qps_single(in_memory, queries)
            mem_recall = recall(np.vstack([in_memory(queries[i:i + 1])
                                           for i in range(len(queries))]), gt)
        notes["store points"].append((factor, recall(res.ids[sub], gt[sub]), ours))
        rows.append([f"S=16 rerank x{factor}", fmt(recall(res.ids, gt)), fmt(ours), fmt(ours_mm),
                     fmt(mem_recall), fmt(mem), f"{ours / mem:.2f}", f"{ours_mm / mem:.2f}"])
        print("  " + " | ".join(rows[-1]), flush=True)
    mapped.close()
    notes["originals"] = originals_rows(base, queries, gt, (rq, codes, bias))
    extra = base[:20000] + np.float32(1e-3)
    t = time.perf_counter()
    store.add(extra)
    notes["add to trained store vec/s (greedy, 2 threads)"] = len(extra) / (time.perf_counter() - t)
    info = store.info()
    notes["bytes on disk"] = info["bytes"]
    store.close()
    return rows, notes


def originals_rows(base, queries, gt, rq_codes):
    """What each originals format costs in bytes and in recall after rerank x10."""
    rq, codes, bias = rq_codes
    cand = adc_search(rq, codes, queries, k=100, bias=bias).ids
    out = []
    for fmt_name in ("float32", "float16", "zstd"):
        blobs = pack_originals(base, fmt_name)
        stored = unpack_originals(blobs, fmt_name, base.shape[1])
        res = rerank(queries, cand, lambda i: stored[i], k=10)
        out.append([fmt_name, fmt(sum(map(len, blobs)) / len(blobs)), fmt(recall(res.ids, gt))])
    return out


def sqlite_vec_row(base, queries, gt, folder):
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
    found = np.vstack([search(queries[i:i + 1]) for i in range(len(queries))])
    qps = qps_single(search, queries, repeats=1)
    version = con.execute("SELECT vec_version()").fetchone()[0]
    return [f"sqlite-vec {version} vec0 float32 KNN (exact)", fmt(recall(found, gt)), fmt(qps),
            fmt(add_rate)]


def lancedb_rows(base, queries, gt, folder):
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
        build = time.perf_counter() - t
        for nprobes, refine in ((20, 10), (50, 10), (50, 20)):
            def search(q, nprobes=nprobes, refine=refine):
                r = (table.search(q[0]).nprobes(nprobes).refine_factor(refine).limit(10)
                     .select(["id", "_distance"]).to_arrow())
                return np.array([r.column("id").to_numpy()])
            found = np.vstack([search(queries[i:i + 1]) for i in range(len(queries))])
            qps = qps_single(search, queries, repeats=1)
            out.append([f"LanceDB {name}, nprobes {nprobes}, refine {refine} (index {build:.0f} s)",
                        fmt(recall(found, gt)), fmt(qps), ""])
            print("  " + " | ".join(out[-1]), flush=True)
    return out


def matched(peers, points):
    """Each peer next to the fastest Store setting with equal or better recall on the same
    queries: (setting, its recall, its QPS, ratio), or blanks when no setting reaches it."""
    rows = []
    for name, rec, qps, _ in peers:
        ok = [p for p in points if p[1] >= float(rec)]
        if ok:
            (factor, r, q), label = max(ok, key=lambda p: p[2]), ""
        else:  # an exact peer: the default setting, its lower recall shown
            (factor, r, q), label = [p for p in points if p[0] == 10][0], " (lower recall)"
        rows.append([name, rec, qps, f"rerank x{factor}{label}", fmt(r), fmt(q),
                     f"{q / float(qps.replace(',', '')):.1f}x"])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--peer-queries", type=int, default=200,
                   help="queries for the slower peers (the first N of the query set)")
    args = p.parse_args(argv)
    base, queries, gt = load_dataset(args.dataset)
    print(f"# dataset {args.dataset}: base {base.shape}, queries {queries.shape}; "
          "search on 1 thread", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        rows, notes = store_rows(base, queries, gt, folder, args)
        print()
        print(markdown_table(["config", "10-recall@10 Store", "QPS single Store",
                              "QPS single Store mmap_originals", "10-recall@10 codec in memory",
                              "QPS single in memory", "Store / memory",
                              "Store mmap / memory"], rows))
        print()
        orig = notes.pop("originals")
        for k, v in notes.items():
            if k == "store points":
                continue
            print(f"- {k}: {fmt(v) if not isinstance(v, dict) else v}")
        print()
        print(markdown_table(["originals", "bytes/vector", "10-recall@10 after rerank x10"], orig))
        if not args.no_peers:
            peer = []
            qn = queries[: args.peer_queries]
            gn = gt[: args.peer_queries]
            for fn in (sqlite_vec_row, lancedb_rows):
                try:
                    with Threads(1):
                        got = fn(base, qn, gn, folder)
                except (ImportError, AttributeError) as exc:
                    # AttributeError: this Python's sqlite3 cannot load extensions
                    print(f"# {fn.__name__} skipped: {exc}", flush=True)
                    continue
                got = got if isinstance(got[0], list) else [got]
                peer += got
                if fn is sqlite_vec_row:
                    print("  " + " | ".join(got[0]), flush=True)
            print()
            print(markdown_table(["peer", "10-recall@10", "QPS single", "add vec/s"], peer))
            print(f"\nAt equal or better recall on the same {len(qn)} queries (Store QPS over "
                  f"all {len(queries)} queries, float32 originals read from the file):\n")
            print(markdown_table(["peer", "peer recall", "peer QPS", "Store setting",
                                  "Store recall", "Store QPS", "Store / peer"],
                                 matched(peer, notes["store points"])))

if __name__ == "__main__":
    main()

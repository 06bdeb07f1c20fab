"""A synthetic million-vector store: open time, first-query latency, memory and file size.

    python -m benchmarks.big [--n 1000000] [--dim 384] [--stages 16] [--path /tmp/big.db]

Builds (once; reused when the file exists) a store of ``n`` seeded clustered vectors, then
starts three fresh Python processes that import rvqstore, open the store and answer 200
queries (``common.fresh_process``), and reports: the import time and the time from open to
first answer (each the median of the three), resident memory while searching (total,
anonymous and file-backed) against the in-memory index (``Store.code_index().nbytes``), and
the file size against the bytes it has to hold. One more process searches with
``mmap_originals=True`` to show what mapping the originals costs.
"""

import argparse
import os
import time

import numpy as np

from rvqstore import Store

from .common import fresh_process, fresh_processes

def build(path, n, dim, stages, seed=0, chunk=100_000):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1000, dim)).astype(np.float32)
    with Store.open(path, dim=dim, stages=stages) as store:
        t = time.perf_counter()
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            x = (centers[rng.integers(1000, size=m)]
                 + 0.5 * rng.standard_normal((m, dim)).astype(np.float32))
            store.add(x)
            print(f"  added {start + m:,}", flush=True)
        add_s = time.perf_counter() - t
        t = time.perf_counter()
        store.train()
        train_s = time.perf_counter() - t
        store.compact()  # checkpoint the WAL so the file size is the store's
    return add_s, train_s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--stages", type=int, default=16)
    p.add_argument("--path", default="/tmp/rvqstore-big.db")
    args = p.parse_args(argv)
    if not os.path.exists(args.path):
        add_s, train_s = build(args.path, args.n, args.dim, args.stages)
        print(f"built: add {add_s:.1f} s ({args.n / add_s:,.0f} vec/s untrained), "
              f"train + encode all {train_s:.1f} s")
    # readonly: the processes only read; 200 queries each for the per-query time and memory
    runs, (imp, first) = fresh_processes(args.path, runs=3, dim=args.dim, n_queries=200,
                                         readonly=True)
    mapped = fresh_process(args.path, dim=args.dim, n_queries=200, readonly=True, mmap=True)
    med = sorted(runs, key=lambda r: r["open_first_query_s"])[1]
    with Store.open(args.path, readonly=True) as s:
        info = s.info()
    b = info["bytes"]
    n = info["count"]
    needed = b["originals"] + b["keys"] + n * (args.stages + 4 + 8)
    mib = lambda v: f"{v / 2**20:,.0f} MiB"
    ra = med["rss_after"]
    firsts = ", ".join(f"{r['open_first_query_s']:.3f}" for r in runs)
    print(f"\nstore: {n:,} x {args.dim}, S={args.stages}; 3 fresh processes (medians; "
          f"memory from the median one by first query), default threads, warm page cache")
    print(f"- import numpy + rvqstore: {imp:.2f} s; Store.open + first query: {first:.3f} s "
          f"(each: {firsts}); then {med['query_ms']:.2f} ms/query")
    print(f"- resident after 200 queries: {mib(ra['VmRSS'])} (anonymous {mib(ra['RssAnon'])}, "
          f"file-backed {mib(ra['RssFile'])}); before opening: {mib(med['rss_before']['VmRSS'])}; "
          f"in-memory index (code_index().nbytes: ids+codes+norms+bias) "
          f"{mib(med['index_bytes'])}")
    print(f"- growth from opening and searching: "
          f"{mib(ra['VmRSS'] - med['rss_before']['VmRSS'])} (budget: index + 200 MiB = "
          f"{mib(med['index_bytes'] + 200 * 2**20)})")
    rm = mapped["rss_after"]
    print(f"- the same with mmap_originals=True (one process): {mapped['query_ms']:.2f} ms/query, "
          f"resident after 200 queries {mib(rm['VmRSS'])} (file-backed {mib(rm['RssFile'])})")
    print(f"- file {mib(b['file'])} vs originals+codes+norms+ids+keys {mib(needed)}: "
          f"{b['file'] / needed:.3f}x")


if __name__ == "__main__":
    main()

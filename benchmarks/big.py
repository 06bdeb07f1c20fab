"""A synthetic million-vector store: open time, first-query latency, memory and file size.

    python -m benchmarks.big [--n 1000000] [--dim 384] [--stages 16] [--path /tmp/big.db]

Builds (once; reused when the file exists) a store of ``n`` seeded clustered vectors, then
starts a fresh Python process that imports rvqstore, opens the store and answers its first
query, and reports: the time from open to first answer (beyond interpreter and import
time), resident memory while searching (total, anonymous and file-backed) against the
in-memory codes + norms + ids, and the file size against the bytes it has to hold. One more
process searches with ``mmap_originals=True`` to show what mapping the originals costs.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from rvqstore import Store

CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
import numpy as np
from rvqstore import Store
t_import = time.perf_counter() - t0

def rss():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon", "RssFile")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out

before = rss()
NQ = 200
q = np.random.default_rng(1).standard_normal((NQ, int(sys.argv[2]))).astype(np.float32)
t1 = time.perf_counter()
store = Store.open(sys.argv[1], readonly=True, mmap_originals=sys.argv[3] == "mmap")
store.search(q[0], k=10)
first = time.perf_counter() - t1
t2 = time.perf_counter()
for i in range(1, NQ):
    store.search(q[i], k=10)
per_query = (time.perf_counter() - t2) / (NQ - 1)
after = rss()
st = store._current()
arrays = st["codes"].nbytes + st["norms"].nbytes + st["ids"].nbytes + st["bias"].nbytes
print(json.dumps(dict(import_s=t_import, open_first_query_s=first, query_ms=per_query * 1e3,
                      rss_before=before, rss_after=after, arrays_bytes=arrays)))
"""


def build(path, n, dim, stages, seed=0, chunk=100_000):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1000, dim)).astype(np.float32)
    with Store.open(path, dim=dim, stages=stages) as store:
        t = time.perf_counter()
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            x = centers[rng.integers(1000, size=m)] + 0.5 * rng.standard_normal((m, dim)).astype(np.float32)
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
    def child(mode):
        out = subprocess.run([sys.executable, "-c", CHILD, args.path, str(args.dim), mode],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout)
    runs = [child("default") for _ in range(3)]
    mapped = child("mmap")
    med = sorted(runs, key=lambda r: r["open_first_query_s"])[1]
    with Store.open(args.path, readonly=True) as s:
        info = s.info()
    b = info["bytes"]
    n = info["count"]
    needed = b["originals"] + b["keys"] + n * (args.stages + 4 + 8)
    mib = lambda v: f"{v / 2**20:,.0f} MiB"
    ra = med["rss_after"]
    firsts = ", ".join(f"{r['open_first_query_s']:.3f}" for r in runs)
    print(f"\nstore: {n:,} x {args.dim}, S={args.stages}; 3 fresh processes, median by first query")
    print(f"- import rvqstore: {med['import_s']:.2f} s; open + first query: "
          f"{med['open_first_query_s']:.3f} s (all: {firsts}); then {med['query_ms']:.2f} ms/query")
    print(f"- resident after 200 queries: {mib(ra['VmRSS'])} (anonymous {mib(ra['RssAnon'])}, "
          f"file-backed {mib(ra['RssFile'])}); before opening: {mib(med['rss_before']['VmRSS'])}; "
          f"in-memory codes+norms+ids+mask {mib(med['arrays_bytes'])}")
    print(f"- growth from opening and searching: "
          f"{mib(ra['VmRSS'] - med['rss_before']['VmRSS'])} (budget: arrays + 200 MiB = "
          f"{mib(med['arrays_bytes'] + 200 * 2**20)})")
    rm = mapped["rss_after"]
    print(f"- the same with mmap_originals=True (one process): {mapped['query_ms']:.2f} ms/query, "
          f"resident after 200 queries {mib(rm['VmRSS'])} (file-backed {mib(rm['RssFile'])})")
    print(f"- file {mib(b['file'])} vs originals+codes+norms+ids+keys {mib(needed)}: "
          f"{b['file'] / needed:.3f}x")


if __name__ == "__main__":
    main()

"""What checksum verification costs a store: on open (every code block and the codebooks
are checked when a reader loads them) and per query (every rerank candidate's original).

    python -m benchmarks.verify_cost /tmp/rvqstore-big.db [--queries 200] [--rerank 10]

Reads the store's BLOBs with plain sqlite3 and times the same checks the store makes
(CRC-32 of each block's three BLOBs and of the codebooks, the code range, finite norms;
CRC-32 of each candidate original), next to the time of reading those BLOBs and of a whole
``Store.open`` + first query and a query through the Store, all in this one process, on one
thread. Medians of five passes.
"""

import argparse
import sqlite3
import statistics
import time
import zlib

import numpy as np

from rvqstore import Store

from .common import Threads, median_time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rerank", type=int, default=10)
    args = ap.parse_args()
    con = sqlite3.connect(f"file:{args.path}?mode=ro", uri=True)
    blocks = con.execute("SELECT ids, codes, norms FROM rvq_blocks").fetchall()
    books = con.execute("SELECT data FROM rvq_codebooks").fetchall()
    n = sum(len(i) // 8 for i, _, _ in blocks)
    max_id = con.execute("SELECT MAX(id) FROM rvq_vectors").fetchone()[0]

    def read_blocks():
        con.execute("SELECT ids, codes, norms FROM rvq_blocks").fetchall()

    def check_blocks():
        for i, c, nm in blocks:
            zlib.crc32(nm, zlib.crc32(c, zlib.crc32(i)))
            int(np.frombuffer(c, np.uint8).max())
            np.isfinite(np.frombuffer(nm, "<f4")).all()
            (np.frombuffer(i, "<i8") == -1).any()
        for (d,) in books:
            zlib.crc32(d)
            np.isfinite(np.frombuffer(d, "<f4")).all()

    rng = np.random.default_rng(0)
    q_dim = len(con.execute("SELECT vector FROM rvq_vectors LIMIT 1").fetchone()[0])
    cand = [np.sort(rng.choice(max_id + 1, 10 * args.rerank, replace=False))
            for _ in range(args.queries)]
    rows = [[r[0] for r in con.execute(
        f"SELECT vector FROM rvq_vectors WHERE id IN ({','.join(map(str, c.tolist()))})")]
        for c in cand]
    joined = [b"".join(r) for r in rows]

    def check_candidates():  # as the rerank does: one concatenated BLOB per query
        for blob in joined:
            mv, w = memoryview(blob), q_dim
            [zlib.crc32(mv[o:o + w - 4]) for o in range(0, len(blob), w)]

    with Threads(1):
        t_read = median_time(read_blocks, 5)
        t_check = median_time(check_blocks, 5)
        t_cand = median_time(check_candidates, 5) / args.queries
        with Store.open(args.path, readonly=True) as s:  # loads the compiled kernels
            dim = s.dim
            qs = np.random.default_rng(1).standard_normal((args.queries, dim)).astype(np.float32)
            s.search(qs[0], k=10, rerank=args.rerank)
        t0 = time.perf_counter()
        with Store.open(args.path, readonly=True) as s:
            s.search(qs[0], k=10, rerank=args.rerank)
            t_open = time.perf_counter() - t0
            t_query = median_time(lambda: [s.search(q, k=10, rerank=args.rerank) for q in qs], 5)
            t_query /= args.queries
    print(f"store: {n:,} vectors, {len(blocks)} code blocks, originals of {q_dim} bytes; "
          "1 thread")
    print("\n| what | time | share |")
    print("|---|---|---|")
    print(f"| read every code block from SQLite | {t_read * 1e3:.1f} ms | |")
    print(f"| verify them (CRC-32, code range, finite norms) and the codebooks | "
          f"{t_check * 1e3:.1f} ms | {t_check / t_open:.0%} of open + first query |")
    print(f"| Store.open + first query (in this process) | {t_open * 1e3:.1f} ms | |")
    print(f"| CRC-32 of {10 * args.rerank} candidate originals | {t_cand * 1e6:.0f} us | "
          f"{t_cand / t_query:.1%} of a query |")
    print(f"| a query through the Store, k=10, rerank x{args.rerank} | {t_query * 1e3:.2f} ms | |")


if __name__ == "__main__":
    main()

"""Shared helpers for the benchmarks: dataset loading, recall, timing, thread limits."""

import os
import pathlib
import statistics
import time

import numpy as np


def load_dataset(folder, metric="l2"):
    """base, queries, ground truth (nq, 100) from a dataset folder in DESIGN.md's format."""
    folder = pathlib.Path(folder)
    base = np.load(folder / "base.npy").astype(np.float32)
    queries = np.load(folder / "queries.npy").astype(np.float32)
    gt = np.load(folder / ("gt_ip.npy" if metric in ("ip", "cosine") else "gt_l2.npy"))
    return base, queries, gt


def recall(ids, gt, at=10, of=10):
    """at-recall@of: fraction of the true ``at`` nearest found among the returned ``of``."""
    hits = [len(set(ids[i, :of].tolist()) & set(gt[i, :at].tolist())) for i in range(len(ids))]
    return float(np.mean(hits)) / at


def median_time(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def qps_single(search_one, queries, repeats=3):
    """Queries per second, one query per call in a Python loop; median of ``repeats`` runs."""
    def loop():
        for i in range(len(queries)):
            search_one(queries[i:i + 1])
    search_one(queries[:1])  # warm-up (JIT, caches)
    return len(queries) / median_time(loop, repeats)


def qps_batch(search_all, queries, repeats=3):
    search_all(queries[:2])
    return len(queries) / median_time(lambda: search_all(queries), repeats)


class Threads:
    """Limit BLAS, numba and (when given) faiss to ``n`` threads inside a with-block."""

    def __init__(self, n, faiss=None):
        self.n = n
        self.faiss = faiss

    def __enter__(self):
        import numba
        from threadpoolctl import threadpool_limits

        self._numba_prev = numba.get_num_threads()
        numba.set_num_threads(min(self.n, numba.config.NUMBA_NUM_THREADS))
        self._limits = threadpool_limits(self.n)
        if self.faiss is not None:
            self.faiss.omp_set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        import numba

        numba.set_num_threads(self._numba_prev)
        self._limits.restore_original_limits()
        if self.faiss is not None:
            self.faiss.omp_set_num_threads(os.cpu_count() or 1)


def markdown_table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt(v, digits=3):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if v >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)

"""Measure a store on a dataset folder: 10-recall@10 and single-query QPS by rerank factor.

What ``rvqstore bench`` runs. A dataset folder holds ``base.npy`` (n, dim), ``queries.npy``
(nq, dim) and ``gt_l2.npy`` (nq, >= 10) of exact neighbour ids, as in the project's
benchmark protocol. The store is built in a temporary folder (add, train), then searched
one query per call with numba and BLAS limited to one thread where that can be done (the
result says how many threads there were), median of ``repeats`` runs. The time spent in
the progress callback is left out of every timing. The full comparison with other indexes
lives in ``benchmarks/``; this is the quick check of one configuration.
"""

import contextlib
import os
import statistics
import tempfile
import time
from typing import NamedTuple, Optional

import numpy as np

from .algo import exact_search
from .inputs import InputFileError
from .store import Store


class Dataset(NamedTuple):
    """base float32 (n, dim), queries float32 (nq, dim), gt int64 (nq, >= 10)."""

    base: np.ndarray
    queries: np.ndarray
    gt: np.ndarray


def load_dataset(folder, *, limit=None, queries=None):
    """Read a dataset folder; ``limit`` keeps the first base vectors (the ground truth is
    then recomputed by brute force), ``queries`` the first queries."""
    folder = os.fspath(folder)
    arrays = {}
    for name in ("base", "queries", "gt_l2"):
        path = os.path.join(folder, name + ".npy")
        try:
            arrays[name] = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise InputFileError(f"{folder} has no {name}.npy (a dataset folder holds "
                                 "base.npy, queries.npy and gt_l2.npy)") from None
        except (OSError, ValueError, EOFError) as exc:
            raise InputFileError(f"{path} is not a valid .npy file ({exc})") from None
    base = arrays["base"].astype(np.float32)
    q = arrays["queries"].astype(np.float32)
    gt = arrays["gt_l2"].astype(np.int64)
    if base.ndim != 2 or q.ndim != 2 or q.shape[1] != base.shape[1]:
        raise InputFileError(f"{folder}: base {base.shape} and queries {q.shape} must be "
                             "2-D with the same dim")
    if gt.ndim != 2 or gt.shape[0] != len(q) or gt.shape[1] < 10:
        raise InputFileError(f"{folder}: gt_l2 has shape {gt.shape}, expected "
                             f"({len(q)}, >= 10)")
    if queries is not None:
        q, gt = q[:queries], gt[:queries]
    if limit is not None and limit < len(base):
        base = base[:limit]
        gt = exact_search(base, q, k=10, metric="l2").ids
    return Dataset(np.ascontiguousarray(base), np.ascontiguousarray(q), gt)


def recall_10_at_10(found, gt):
    """Fraction of the true 10 nearest found among the returned 10, averaged over queries."""
    return float(np.mean([len(set(f[:10].tolist()) & set(t[:10].tolist())) / 10
                          for f, t in zip(found, gt)]))


class Threads(NamedTuple):
    """Threads in use: ``numba``'s, and the most of any BLAS or OpenMP pool as threadpoolctl
    reports them (``blas`` None when threadpoolctl is not installed: not known)."""

    numba: int
    blas: Optional[int]


@contextlib.contextmanager
def one_thread():
    """Limit numba, and BLAS and OpenMP when threadpoolctl is installed, to one thread;
    yield the :class:`Threads` then in use, read back rather than assumed."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    limits = threadpoolctl.threadpool_limits(1) if threadpoolctl else contextlib.nullcontext()
    try:
        with limits:
            blas = None
            if threadpoolctl:  # no pool loaded: nothing to start threads
                blas = max((p["num_threads"] for p in threadpoolctl.threadpool_info()),
                           default=1)
            yield Threads(numba.get_num_threads(), blas)
    finally:
        numba.set_num_threads(before)


class _Untimed:
    """Calls ``progress`` and adds up the seconds spent in it, to take out of a timing."""

    def __init__(self, progress):
        self.progress = progress
        self.seconds = 0.0

    def __call__(self, phase, done, total):
        if self.progress is not None:
            t = time.perf_counter()
            self.progress(phase, done, total)
            self.seconds += time.perf_counter() - t

    def timed(self, fn, *args, **kwargs):
        """``(fn(*args, **kwargs, progress=self), seconds)`` without the time in progress."""
        spent, t = self.seconds, time.perf_counter()
        result = fn(*args, **kwargs, progress=self)
        return result, time.perf_counter() - t - (self.seconds - spent)


def run(dataset, *, stages=16, codebook_size=256, reranks=(1, 4, 10), repeats=3,
        progress=None):
    """Build a store from ``dataset`` in a temporary folder and measure it.

    Parameters
    ----------
    dataset : Dataset
    stages, codebook_size : the store's configuration
    reranks : rerank factors to measure
    repeats : runs over all queries per factor; QPS is the median
    progress : callable(phase, done, total) or None

    Returns
    -------
    dict with the data's shape, add and train seconds, bytes on disk, the threads the
    searches ran on (``threads``: ``{"numba", "blas"}``, blas None when unknown;
    ``search_threads``: the larger, None when unknown) and one row per rerank factor:
    ``{"rerank", "recall_10_at_10", "qps_single"}``.
    """
    base, queries, gt = dataset
    out = {"vectors": len(base), "dim": base.shape[1], "queries": len(queries),
           "stages": stages, "codebook_size": codebook_size, "metric": "l2",
           "search_threads": None, "repeats": repeats}
    untimed = _Untimed(progress)
    with tempfile.TemporaryDirectory(prefix="rvqstore-bench-") as folder:
        with Store.open(os.path.join(folder, "bench.db"), dim=base.shape[1], metric="l2",
                        stages=stages, codebook_size=codebook_size) as store:
            _, out["add_s"] = untimed.timed(store.add, base)
            info, out["train_s"] = untimed.timed(store.train)
            out["train_mse"] = info["train_mse"]
            out["file_bytes"] = info["bytes"]["file"] + info["bytes"]["wal"]
            with one_thread() as threads:
                out["rows"] = [_measure(store, queries, gt, factor, repeats, progress)
                               for factor in reranks]
    out["threads"] = threads._asdict()
    if threads.blas is not None:
        out["search_threads"] = max(threads)
    return out


def _measure(store, queries, gt, factor, repeats, progress, chunk=64):
    """Time the queries ``chunk`` at a time and report progress between chunks, where
    the clock is stopped."""
    phase = f"search x{factor}"
    store.search(queries[0], k=10, rerank=factor)  # warm-up: JIT, caches
    found = np.empty((len(queries), 10), np.int64)
    times = []
    total = repeats * len(queries)
    for r in range(repeats):
        seconds = 0.0
        for start in range(0, len(queries), chunk):
            if progress is not None:
                progress(phase, r * len(queries) + start, total)
            t = time.perf_counter()
            for i in range(start, min(start + chunk, len(queries))):
                found[i] = store.search(queries[i], k=10, rerank=factor).ids
            seconds += time.perf_counter() - t
        times.append(seconds)
    if progress is not None:
        progress(phase, total, total)
    return {"rerank": factor, "recall_10_at_10": recall_10_at_10(found, gt),
            "qps_single": len(queries) / statistics.median(times)}

"""Measure a store on a dataset folder: 10-recall@10 and single-query QPS by rerank factor.

What ``rvqstore bench`` runs. A dataset folder holds ``base.npy`` (n, dim), ``queries.npy``
(nq, dim) and ``gt_l2.npy`` (nq, >= 10) of exact neighbour ids, as in the project's
benchmark protocol. The store is built in a temporary folder (add, train), then searched
one query per call on one thread, median of ``repeats`` runs. The full comparison with
other indexes lives in ``benchmarks/``; this is the quick check of one configuration.
"""

import contextlib
import os
import statistics
import tempfile
import time
from typing import NamedTuple

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


@contextlib.contextmanager
def one_thread():
    """Numba (and BLAS, when threadpoolctl is installed) limited to one thread."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(1)
    try:
        with limits:
            yield
    finally:
        numba.set_num_threads(before)


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
    dict with the data's shape, add and train seconds, bytes on disk and one row per
    rerank factor: ``{"rerank", "recall_10_at_10", "qps_single"}``.
    """
    base, queries, gt = dataset
    out = {"vectors": len(base), "dim": base.shape[1], "queries": len(queries),
           "stages": stages, "codebook_size": codebook_size, "metric": "l2",
           "search_threads": 1, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="rvqstore-bench-") as folder:
        with Store.open(os.path.join(folder, "bench.db"), dim=base.shape[1], metric="l2",
                        stages=stages, codebook_size=codebook_size) as store:
            t = time.perf_counter()
            store.add(base, progress=progress)
            out["add_s"] = time.perf_counter() - t
            t = time.perf_counter()
            info = store.train(progress=progress)
            out["train_s"] = time.perf_counter() - t
            out["train_mse"] = info["train_mse"]
            out["file_bytes"] = info["bytes"]["file"] + info["bytes"]["wal"]
            rows = []
            with one_thread():
                for factor in reranks:
                    rows.append(_measure(store, queries, gt, factor, repeats, progress))
            out["rows"] = rows
    return out


def _measure(store, queries, gt, factor, repeats, progress):
    phase = f"search x{factor}"
    store.search(queries[0], k=10, rerank=factor)  # warm-up: JIT, caches
    found = np.empty((len(queries), 10), np.int64)
    times = []
    total = repeats * len(queries)
    for r in range(repeats):
        t = time.perf_counter()
        for i in range(len(queries)):
            found[i] = store.search(queries[i], k=10, rerank=factor).ids
            if progress is not None and i % 64 == 0:
                progress(phase, r * len(queries) + i, total)
        times.append(time.perf_counter() - t)
    if progress is not None:
        progress(phase, total, total)
    return {"rerank": factor, "recall_10_at_10": recall_10_at_10(found, gt),
            "qps_single": len(queries) / statistics.median(times)}

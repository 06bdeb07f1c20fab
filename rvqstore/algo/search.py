"""ADC search over codes, exact search, and exact rerank of candidates.

Distances are "smaller is nearer" for every metric: squared L2 for ``l2``,
``-<q, x>`` for ``ip`` and ``1 - cos(q, x)`` for ``cosine`` (queries and vectors
normalised by the caller, see :func:`normalize`).
"""

from typing import NamedTuple, Optional

import numpy as np

from ..errors import InvalidInputError
from .validate import check_k, check_metric

numba = kernels = None  # the modules, once _kernels() has imported them


def _kernels():
    """numba and its kernels, imported by the first ADC search (see quantizers._kernels)."""
    global numba, kernels
    if kernels is None:
        import numba
        from . import kernels
    return kernels


SPLIT_ROWS = 1 << 18
"""A single query scans this many rows or more on all of numba's threads."""


class SearchResult(NamedTuple):
    """ids : int64 (nq, k), -1 where fewer than k were found; distances : float32 (nq, k),
    +inf there; keys, metadata, documents : nested lists (nq, k) of str / dict / str or
    None, when asked for (1-D for a 1-D query)."""

    ids: np.ndarray
    distances: np.ndarray
    keys: Optional[list] = None
    metadata: Optional[list] = None
    documents: Optional[list] = None


def normalize(x):
    """Rows scaled to unit L2 norm (zero rows are refused: cosine is undefined for them)."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    if (n == 0).any():
        bad = int(np.flatnonzero(n[:, 0] == 0)[0])
        raise InvalidInputError(f"cosine metric: row {bad} has zero norm")
    return (x / n).astype(np.float32)


def exact_distances(queries, vectors, metric, vector_norms=None):
    """Distances (nq, n) float32 between every query and every vector.

    ``vector_norms`` (n,), the squared norms of ``vectors``, saves a pass over them (L2)."""
    ip = queries @ vectors.T
    if metric == "l2":
        d = np.einsum("ij,ij->i", queries, queries)[:, None] - 2.0 * ip
        if vector_norms is None:
            vector_norms = np.einsum("ij,ij->i", vectors, vectors)
        d += vector_norms[None, :]
        return np.maximum(d, 0.0, out=d)
    if metric == "cosine":
        return 1.0 - ip
    return -ip


def _topk_rows(dist, k):
    """Per-row k smallest of ``dist`` (nq, n): (idx int64, dist float32), padded with -1/+inf."""
    nq, n = dist.shape
    ids = np.full((nq, k), -1, dtype=np.int64)
    out = np.full((nq, k), np.inf, dtype=np.float32)
    kk = min(k, n)
    if kk == 0:
        return ids, out
    part = np.argpartition(dist, kk - 1, axis=1)[:, :kk] if kk < n else \
        np.broadcast_to(np.arange(n), (nq, n))
    pd = np.take_along_axis(dist, part, axis=1)
    order = np.argsort(pd, axis=1, kind="stable")
    ids[:, :kk] = np.take_along_axis(part, order, axis=1)
    out[:, :kk] = np.take_along_axis(pd, order, axis=1)
    bad = ~np.isfinite(out)
    ids[bad] = -1
    return ids, out


def exact_search(vectors, queries, *, k, metric="l2", batch=256, vector_norms=None):
    """Brute-force k nearest rows of ``vectors`` (n, d) for ``queries`` (nq, d).

    ``vector_norms``: precomputed squared norms of ``vectors`` for repeated L2 searches."""
    check_metric(metric)
    k = check_k(k)
    if metric == "l2" and vector_norms is None:
        vector_norms = np.einsum("ij,ij->i", vectors, vectors)
    ids = np.empty((len(queries), k), dtype=np.int64)
    dist = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), batch):
        qb = queries[start:start + batch]
        ids[start:start + batch], dist[start:start + batch] = _topk_rows(
            exact_distances(qb, vectors, metric, vector_norms), k)
    return SearchResult(ids, dist)


def adc_search(quantizer, codes, queries, *, k, metric="l2", bias=None, rows=None, stages=None):
    """k nearest stored rows by ADC estimate (among ``rows`` when given).

    Parameters
    ----------
    quantizer : ResidualQuantizer or ProductQuantizer
    codes : uint8 (n, S)
    queries : float32 (nq, d), already normalised for cosine
    k : int
    bias : float32 (n,) or None. For L2 with a quantizer that needs norms this must be
        ``||x^||^2`` per row; a row set to +inf is never returned (deleted).
    rows : int64 (m,) ascending row numbers or None. Only these rows are scanned (a
        filter's passing rows): the scan costs what they cost, not what the store does.
    stages : int or None, rank by the first ``stages`` stages' codes only (see
        :func:`prefix_table`); None: all of them

    Returns
    -------
    SearchResult with row numbers as ids.
    """
    kernels = _kernels()
    check_metric(metric)
    k = check_k(k)
    n = codes.shape[0]
    if bias is None:
        if metric == "l2" and quantizer.needs_norms:
            raise InvalidInputError("L2 ADC with this quantizer needs the stored norms as bias")
        bias = np.zeros(n, dtype=np.float32)
    lut, const = quantizer.lut(queries, metric)
    lut, codes = prefix_table(lut, codes, stages)
    threads = numba.get_num_threads()
    if rows is not None and len(queries) == 1 and len(rows) >= SPLIT_ROWS and threads > 1:
        # a lone query over many passing rows: the split scan below, the others masked out
        masked = np.full(n, np.inf, np.float32)
        masked[rows] = bias[rows]
        bias, rows = masked, None
    subset = rows is not None
    rows = np.ascontiguousarray(rows, dtype=np.int64) if subset else kernels.ALL_ROWS
    if len(queries) > 1:
        d, i = kernels.scan_topk_batch(codes, rows, subset, lut, bias, k)
    elif subset:
        d, i = kernels.scan_topk_rows(codes, rows, lut[0], bias, k)
        d, i = d[None], i[None]
    elif n >= SPLIT_ROWS and threads > 1:
        # a lone query on a large store: split its scan over the threads, merge the tops
        pd, pi = kernels.scan_topk_split(codes, lut[0], bias, k, threads)
        pd, pi = pd.reshape(1, -1), pi.reshape(1, -1)
        top, d = _topk_rows(pd, k)
        i = np.where(top >= 0, np.take_along_axis(pi, np.maximum(top, 0), axis=1), -1)
    else:
        d, i = kernels.scan_topk(codes, lut[0], bias, k)
        d, i = d[None], i[None]
    d = d + const[:, None].astype(np.float32)
    i = np.where(np.isfinite(d), i, -1)
    return SearchResult(i, d)


def prefix_table(lut, codes, stages):
    """The tables (nq, S*K) and codes (n, S) cut to the first ``stages`` stages (None: all).

    An RVQ prefix is a coarser code of the same vector, so its ADC ranks by it: for inner
    products and cosine the estimate is the prefix's exactly; for L2 it is ``||q||^2 -
    2 <q, x^_s> + ||x^||^2``, the prefix's inner product with the whole code's norm (the
    only norm stored), which differs from ``||q - x^_s||^2`` by the norm the later stages
    add. The codes come back as a view (no copy): the scan reads the first columns."""
    S = codes.shape[1]
    if stages is not None and stages < S:
        K = lut.shape[1] // S
        lut, codes = lut[:, :stages * K], codes[:, :stages]
    return np.ascontiguousarray(lut, dtype=np.float32), codes


ERROR_Z = 3.0
"""How many standard deviations of ADC error an adaptive rerank covers (see rerank_depths)."""


def rerank_depths(queries, distances, *, k, metric, rms_error, floor, z=ERROR_Z):
    """How many of each query's ADC candidates an adaptive rerank reads.

    A candidate whose estimate exceeds the k-th best estimate by more than the estimates'
    error can hardly be among the true k nearest; the others are reranked. With ``x^`` the
    decoded vector and ``r = x - x^`` its residual (per-dimension RMS ``rms_error``, from
    the codebooks' measured squared error), an estimate is off by ``2 <q - x^, r> - |r|^2``
    for L2 and ``<q, r>`` for inner products, so the margin is ``ERROR_Z`` standard
    deviations of that (``z``, default ERROR_Z): ``2 z rms sqrt(d_k)`` for L2, ``z rms |q|``
    for ip and cosine.
    Far queries (a filter that keeps only items far from the query) get deeper reranks,
    near ones shallower.

    queries : float32 (nq, d); distances : float32 (nq, m) ascending ADC estimates
    (+inf padding); floor : int, the least depth. Returns int64 (nq,) depths <= m.
    """
    nq, m = distances.shape
    kth = distances[:, min(k, m) - 1].astype(np.float64)
    if metric == "l2":
        margin = 2.0 * z * rms_error * np.sqrt(np.maximum(kth, 0.0))
    else:
        margin = z * rms_error * np.linalg.norm(queries, axis=1)
    limit = np.where(np.isfinite(kth), kth + margin, np.inf)
    depth = np.array([np.searchsorted(distances[i], limit[i], side="right")
                      for i in range(nq)], np.int64)
    return np.clip(depth, min(floor, m), m)


def rerank(queries, candidates, fetch, *, k, metric="l2"):
    """Exact top-k among candidate ids, reading their vectors through ``fetch``.

    Parameters
    ----------
    queries : float32 (nq, d)
    candidates : int64 (nq, m), -1 for no candidate
    fetch : callable(ids int64 (u,) sorted unique) -> float32 (u, d)
        Serves the originals (from memory or from disk).
    k : int

    Returns
    -------
    SearchResult with the candidates' ids.
    """
    check_metric(metric)
    k = check_k(k)
    nq, m = candidates.shape
    valid = candidates >= 0
    uniq, inv = np.unique(candidates[valid], return_inverse=True)
    ids = np.full((nq, k), -1, dtype=np.int64)
    dist = np.full((nq, k), np.inf, dtype=np.float32)
    if len(uniq) == 0:
        return SearchResult(ids, dist)
    vecs = np.asarray(fetch(uniq), dtype=np.float32)
    pos = np.full((nq, m), -1, dtype=np.int64)
    pos[valid] = inv
    for q in range(nq):
        row = pos[q][pos[q] >= 0]
        d = exact_distances(queries[q:q + 1], vecs[row], metric)
        top, td = _topk_rows(d, k)
        keep = top[0] >= 0
        ids[q, :keep.sum()] = uniq[row[top[0][keep]]]
        dist[q, :keep.sum()] = td[0][keep]
    return SearchResult(ids, dist)

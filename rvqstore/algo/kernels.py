"""Numba kernels for the hot loops: centroid sums, beam-search steps, ADC scan + top-k.

Each kernel has a plain numpy twin in :mod:`rvqstore.algo.reference`, and the
tests check that the two agree. Kernels take clean, C-contiguous arrays of the
documented dtypes; the callers in this package prepare them.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic


@njit(cache=True, nogil=True)
def centroid_sums(x, labels, k):
    """Per-cluster sums (k, d) float64 and counts (k,) int64 of the rows of ``x``."""
    n, d = x.shape
    sums = np.zeros((k, d), dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    for i in range(n):
        c = labels[i]
        counts[c] += 1
        for j in range(d):
            sums[c, j] += x[i, j]
    return sums, counts


@njit(cache=True, parallel=True)
def beam_step(xc, dist, codes, cross, cnorm, stage, beam_out):
    """One stage of beam-search encoding, scored with codeword inner products.

    The squared residual after choosing codeword k of this stage for beam entry b is
    ``dist[b] + cnorm[k] - 2 * (xc[k] - sum_t cross[t, codes[b, t], k])``,
    where ``xc = x @ C_stage.T`` and ``cross[t] = C_t @ C_stage.T``: no residual is decoded.

    Parameters
    ----------
    xc : float32 (n, K)
    dist : float32 (n, B_in), squared residual norms of the current beam
    codes : uint8 (n, B_in, S), codes of the current beam (columns < stage are valid)
    cross : float32 (stage, K, K)
    cnorm : float32 (K,)
    stage : int, the stage being chosen
    beam_out : int, beam width after this step (<= B_in * K)

    Returns
    -------
    new_dist : float32 (n, beam_out), ascending per row
    new_codes : uint8 (n, beam_out, S)
    """
    n, K = xc.shape
    b_in = dist.shape[1]
    S = codes.shape[2]
    new_dist = np.empty((n, beam_out), dtype=np.float32)
    new_codes = np.zeros((n, beam_out, S), dtype=np.uint8)
    for i in prange(n):
        acc = np.empty(K, dtype=np.float32)
        best_d = np.full(beam_out, np.inf, dtype=np.float32)
        best_b = np.zeros(beam_out, dtype=np.int64)
        best_k = np.zeros(beam_out, dtype=np.int64)
        for b in range(b_in):
            for kk in range(K):
                acc[kk] = xc[i, kk]
            for t in range(stage):
                row = codes[i, b, t]
                for kk in range(K):
                    acc[kk] -= cross[t, row, kk]
            base = dist[i, b]
            for kk in range(K):
                s = base + cnorm[kk] - 2.0 * acc[kk]
                if s < best_d[beam_out - 1]:
                    # insertion into the short sorted list of the best candidates
                    p = beam_out - 1
                    while p > 0 and best_d[p - 1] > s:
                        best_d[p] = best_d[p - 1]
                        best_b[p] = best_b[p - 1]
                        best_k[p] = best_k[p - 1]
                        p -= 1
                    best_d[p] = s
                    best_b[p] = b
                    best_k[p] = kk
        for j in range(beam_out):
            new_dist[i, j] = best_d[j]
            pb = best_b[j]
            for t in range(stage):
                new_codes[i, j, t] = codes[i, pb, t]
            new_codes[i, j, stage] = best_k[j]
    return new_dist, new_codes


@njit(cache=True, nogil=True)
def _sift_down(hd, hi, k):
    # max-heap on hd: the root is the worst of the k kept so far
    p = 0
    while True:
        c = 2 * p + 1
        if c >= k:
            break
        if c + 1 < k and hd[c + 1] > hd[c]:
            c += 1
        if hd[c] <= hd[p]:
            break
        hd[p], hd[c] = hd[c], hd[p]
        hi[p], hi[c] = hi[c], hi[p]
        p = c


@njit(nogil=True, inline="always")
def _scan_core(codes, rows, subset, lut, bias, k, K, S, out_d, out_i):
    # rows (m,) ascending row numbers scanned when ``subset``; every row otherwise
    n = rows.shape[0] if subset else codes.shape[0]
    hd = np.full(k, np.inf, dtype=np.float32)
    hi = np.full(k, -1, dtype=np.int64)
    top = np.float32(np.inf)
    for j in range(n):
        i = rows[j] if subset else j
        acc = bias[i]
        for s in range(S):
            acc += lut[s * K + codes[i, s]]
        if acc < top:
            hd[0] = acc
            hi[0] = i
            _sift_down(hd, hi, k)
            top = hd[0]
    order = np.argsort(hd, kind="mergesort")
    for j in range(k):
        out_d[j] = hd[order[j]]
        out_i[j] = hi[order[j]]


@njit(cache=True, nogil=True)
def _scan_one(codes, rows, subset, lut, bias, k, out_d, out_i):
    S = codes.shape[1]
    # K (and S) as compile-time constants make the table index a shift and let the stage
    # loop unroll: 2x faster scans than the generic loop
    if lut.shape[0] == S * 256:
        if S == 16:
            _scan_core(codes, rows, subset, lut, bias, k, 256, 16, out_d, out_i)
        elif S == 8:
            _scan_core(codes, rows, subset, lut, bias, k, 256, 8, out_d, out_i)
        elif S == 32:
            _scan_core(codes, rows, subset, lut, bias, k, 256, 32, out_d, out_i)
        else:
            _scan_core(codes, rows, subset, lut, bias, k, 256, S, out_d, out_i)
    else:
        _scan_core(codes, rows, subset, lut, bias, k, lut.shape[0] // S, S, out_d, out_i)


ALL_ROWS = np.empty(0, dtype=np.int64)
"""The ``rows`` argument of a scan over every row (``subset`` False)."""


@njit(cache=True, nogil=True)
def scan_topk(codes, lut, bias, k):
    """The k smallest ``bias[i] + sum_s lut[s*K + codes[i, s]]`` over all rows i.

    Parameters
    ----------
    codes : uint8 (n, S)
    lut : float32 (S*K,), one query's table
    bias : float32 (n,), per-row term (||x^||^2 for L2, 0 for IP, +inf for a deleted row)
    k : int

    Returns
    -------
    dist : float32 (k,) ascending; idx : int64 (k,) row numbers, -1 where fewer than k rows
    are finite.
    """
    out_d = np.empty(k, dtype=np.float32)
    out_i = np.empty(k, dtype=np.int64)
    _scan_one(codes, ALL_ROWS, False, lut, bias, k, out_d, out_i)
    return out_d, out_i


@njit(cache=True, nogil=True)
def scan_topk_rows(codes, rows, lut, bias, k):
    """:func:`scan_topk` over the rows ``rows`` (int64 (m,), ascending) only: a filtered
    search reads the codes of the rows that pass and no others. Returns row numbers."""
    out_d = np.empty(k, dtype=np.float32)
    out_i = np.empty(k, dtype=np.int64)
    _scan_one(codes, rows, True, lut, bias, k, out_d, out_i)
    return out_d, out_i


@njit(cache=True, parallel=True)
def scan_topk_batch(codes, rows, subset, luts, bias, k):
    """:func:`scan_topk` for a batch of tables ``luts`` (nq, S*K), queries spread over
    threads; over ``rows`` only when ``subset`` (as :func:`scan_topk_rows`)."""
    nq = luts.shape[0]
    out_d = np.empty((nq, k), dtype=np.float32)
    out_i = np.empty((nq, k), dtype=np.int64)
    for q in prange(nq):
        _scan_one(codes, rows, subset, luts[q], bias, k, out_d[q], out_i[q])
    return out_d, out_i


PROBE_BUCKETS = 1024
"""Score buckets a partitioned search's probe sorts its cells into (see probe_cells)."""


@njit(cache=True, nogil=True)
def probe_cells(lut, K, c0, c1, two, cell_bias, weight, budget):
    """The cells nearest a query, as many as hold ``budget`` of ``weight`` (rows, or rows
    passing a filter): a partitioned search's probe.

    Cell j (codes ``c0[j]``, ``c1[j]`` of the first two stages) scores ``cell_bias[j] +
    lut[c0[j]] + lut[K + c1[j]]`` (the second term only when ``two``): the ADC estimate of
    its centre. The cells are bucketed by score (``PROBE_BUCKETS`` equal-width buckets from
    the best to the worst score) and taken bucket by bucket from the nearest until their
    weights reach ``budget``; the last bucket is taken whole (a little more than
    ``budget`` may come). Returns int64 (m,) cell numbers j, in no particular order.
    """
    m = c0.shape[0]
    score = np.empty(m, dtype=np.float32)
    lo = np.float32(np.inf)
    hi = np.float32(-np.inf)
    for j in range(m):
        v = cell_bias[j] + lut[c0[j]]
        if two:
            v += lut[K + c1[j]]
        score[j] = v
        lo = min(lo, v)
        hi = max(hi, v)
    nb = PROBE_BUCKETS
    width = (hi - lo) / nb
    if not width > 0:
        width = np.float32(1.0)
    held = np.zeros(nb + 1, dtype=np.int64)
    bucket = np.empty(m, dtype=np.int64)
    for j in range(m):
        b = min(int((score[j] - lo) / width), nb)
        bucket[j] = b
        held[b] += weight[j]
    last = nb
    total = 0
    for b in range(nb + 1):
        total += held[b]
        if total >= budget:
            last = b
            break
    out = np.empty(m, dtype=np.int64)
    n = 0
    for j in range(m):
        if bucket[j] <= last and weight[j] > 0:
            out[n] = j
            n += 1
    return out[:n]


@njit(nogil=True, inline="always")
def _ranges_core(codes, starts, ends, allow, rows, lut, bias, k, K, S, out_d, out_i):
    hd = np.full(k, np.inf, dtype=np.float32)
    hi = np.full(k, -1, dtype=np.int64)
    top = np.float32(np.inf)
    check = allow.shape[0] > 0
    for r in range(starts.shape[0]):
        for i in range(starts[r], ends[r]):
            if check and not allow[rows[i]]:
                continue
            acc = bias[i]
            for s in range(S):
                acc += lut[s * K + codes[i, s]]
            if acc < top:
                hd[0] = acc
                hi[0] = i
                _sift_down(hd, hi, k)
                top = hd[0]
    order = np.argsort(hd, kind="mergesort")
    for j in range(k):
        out_d[j] = hd[order[j]]
        out_i[j] = hi[order[j]]


@njit(cache=True, nogil=True)
def scan_topk_ranges(codes, starts, ends, allow, rows, lut, bias, k):
    """:func:`scan_topk` over the row ranges ``[starts[r], ends[r])`` only (a partitioned
    search's probed cells, contiguous in memory), skipping row i unless
    ``allow[rows[i]]`` when ``allow`` (bool, indexed by ``rows``) is not empty. Returns
    row numbers."""
    out_d = np.empty(k, dtype=np.float32)
    out_i = np.empty(k, dtype=np.int64)
    S = codes.shape[1]
    if lut.shape[0] == S * 256 and S == 16:
        _ranges_core(codes, starts, ends, allow, rows, lut, bias, k, 256, 16, out_d, out_i)
    elif lut.shape[0] == S * 256 and S == 8:
        _ranges_core(codes, starts, ends, allow, rows, lut, bias, k, 256, 8, out_d, out_i)
    else:
        _ranges_core(codes, starts, ends, allow, rows, lut, bias, k, lut.shape[0] // S, S,
                     out_d, out_i)
    return out_d, out_i


@njit(cache=True, nogil=True)
def cell_counts(codes, head, K, two, ncells):
    """int64 (ncells,): how many of the rows ``[0, head)`` fall in each cell, the cell of
    row i being ``codes[i, 0] * K + codes[i, 1]`` when ``two``, else ``codes[i, 0]``."""
    counts = np.zeros(ncells, dtype=np.int64)
    for i in range(head):
        c = np.int64(codes[i, 0])
        if two:
            c = c * K + codes[i, 1]
        counts[c] += 1
    return counts


@njit(cache=True, nogil=True)
def cells_ascending(codes, head, K, two):
    """Whether the rows ``[0, head)`` are already in ascending order of their cells (as
    :func:`cell_counts` numbers them)."""
    last = np.int64(-1)
    for i in range(head):
        c = _cell(codes, i, K, two)
        if c < last:
            return False
        last = c
    return True


@njit(nogil=True, inline="always")
def _cell(codes, i, K, two):
    c = np.int64(codes[i, 0])
    if two:
        c = c * K + codes[i, 1]
    return c


@njit(nogil=True, inline="always")
def _place(codes, bias, i, p, out_codes, out_bias, rows):
    for s in range(codes.shape[1]):
        out_codes[p, s] = codes[i, s]
    out_bias[p] = bias[i]
    rows[p] = i


@njit(cache=True, parallel=True)
def scatter_by_cell(codes, bias, head, K, two, first, which, out_codes, out_bias, rows,
                    cell_of, threads=1):
    """Group rows by cell (a counting sort, stable: rows stay in order within a cell): the
    rows of cell c among ``[0, head)`` go to positions ``first[c]`` on, cell c as in
    :func:`cell_counts`; rows from ``head`` on keep their place. Fills ``out_codes`` and
    ``out_bias`` (by position), ``rows`` (the row at each position) and ``cell_of``
    (``which[c]`` of each grouped position). The rows are split over ``threads`` (numba's),
    each placing its share after the earlier shares' rows of the same cell."""
    n = codes.shape[0]
    ncells = first.shape[0]
    parts = max(1, min(threads, head // 65536))
    step = (head + parts - 1) // parts
    counts = np.zeros((parts, ncells), dtype=np.int64)
    for t in prange(parts):
        for i in range(t * step, min((t + 1) * step, head)):
            counts[t, _cell(codes, i, K, two)] += 1
    nxt = np.empty((parts, ncells), dtype=np.int64)
    for c in range(ncells):
        at = first[c]
        for t in range(parts):
            nxt[t, c] = at
            at += counts[t, c]
    for t in prange(parts):
        for i in range(t * step, min((t + 1) * step, head)):
            c = _cell(codes, i, K, two)
            p = nxt[t, c]
            nxt[t, c] += 1
            cell_of[p] = which[c]
            _place(codes, bias, i, p, out_codes, out_bias, rows)
    for i in prange(head, n):
        _place(codes, bias, i, i, out_codes, out_bias, rows)


@njit(cache=True, nogil=True)
def count_by_cell(cell_of, allow, rows, ncells):
    """int64 (ncells,): how many rows i of each cell ``cell_of[i]`` have ``allow[rows[i]]``
    (the passing rows per cell a filtered probe weighs cells by)."""
    out = np.zeros(ncells, dtype=np.int64)
    for i in range(cell_of.shape[0]):
        if allow[rows[i]]:
            out[cell_of[i]] += 1
    return out


@njit(cache=True, nogil=True)
def normal_equations(codes, x, K):
    """B^T B (S*K, S*K) and B^T X (S*K, d), float64, for the one-hot code matrix B of ``codes``."""
    n, S = codes.shape
    d = x.shape[1]
    btb = np.zeros((S * K, S * K), dtype=np.float64)
    btx = np.zeros((S * K, d), dtype=np.float64)
    for i in range(n):
        for s in range(S):
            a = s * K + codes[i, s]
            for j in range(d):
                btx[a, j] += x[i, j]
            for t in range(S):
                btb[a, t * K + codes[i, t]] += 1.0
    return btb, btx


@njit(cache=True, nogil=True, fastmath=True)
def matvec(a, v):
    """``a @ v`` for a float32 (m, d) and (d,) on one thread: a single query's table,
    free of BLAS's thread start-up, which dominates a lone query on a busy machine."""
    m, d = a.shape
    out = np.empty(m, dtype=np.float32)
    for j in range(m):
        acc = np.float32(0.0)
        for t in range(d):
            acc += a[j, t] * v[t]
        out[j] = acc
    return out


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret a uint32 as the float32 with the same bits (no conversion)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@njit(cache=True, nogil=True, fastmath=True)
def matvec_bf16(a, v):
    """``a @ v`` where ``a`` (m, d) uint16 holds the upper halves of float32 values
    (bfloat16): half the bytes of :func:`matvec`, which is memory-bound."""
    m, d = a.shape
    out = np.empty(m, dtype=np.float32)
    for j in range(m):
        acc = np.float32(0.0)
        for t in range(d):
            acc += _f32_from_bits(np.uint32(a[j, t]) << np.uint32(16)) * v[t]
        out[j] = acc
    return out


@njit(cache=True, parallel=True)
def scan_topk_split(codes, lut, bias, k, parts):
    """:func:`scan_topk` for one query with the rows split over ``parts`` threads.

    Returns per-part results (parts, k) with global row numbers; the caller merges them.
    """
    n = codes.shape[0]
    out_d = np.empty((parts, k), dtype=np.float32)
    out_i = np.empty((parts, k), dtype=np.int64)
    step = (n + parts - 1) // parts
    for p in prange(parts):
        lo = min(p * step, n)
        hi = min(lo + step, n)
        _scan_one(codes[lo:hi], ALL_ROWS, False, lut, bias[lo:hi], k, out_d[p], out_i[p])
        for j in range(k):
            if out_i[p, j] >= 0:
                out_i[p, j] += lo
    return out_d, out_i

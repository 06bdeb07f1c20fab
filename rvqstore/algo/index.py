"""In-memory indexes a store searches: one interface, one implementation per way of searching.

:class:`ExactIndex` holds the originals of an untrained store and searches them exactly;
:class:`FlatCodeIndex` holds every vector's RVQ codes and scans them all by ADC. Both map
their rows to the store's ids, grow by :meth:`~CodeIndex.append`, drop rows by
:meth:`~CodeIndex.remove`, and search under an optional allow-mask over their rows (the
hook filters and exclusions use). A new way of searching (partitions) is a new class here.
"""

from dataclasses import dataclass, field
from typing import Optional, Protocol

import numpy as np

from .quantizers import ResidualQuantizer
from .search import ERROR_Z, SearchResult, adc_search, exact_search, prefix_table

# numba and its kernels are imported by the methods that run them (see quantizers._kernels);
# those of a partitioned store, whose queries take milliseconds, afford the import statement.


class CodeIndex(Protocol):
    """What a store needs of its in-memory index."""

    ids: np.ndarray  # int64 (n,), the store id of each row

    @property
    def nbytes(self) -> int:
        """Bytes held in memory."""

    def search(self, queries: np.ndarray, *, k: int, allow: Optional[np.ndarray] = None,
               nprobe: Optional[int] = None, stages: Optional[int] = None) -> SearchResult:
        """The k best rows for each query as store ids (padded with -1/+inf); ``nprobe``
        bounds how much of a partitioned index a query visits (others scan everything);
        ``stages`` ranks code indexes by their first stages only (exact ones ignore it)."""

    def remove(self, ids: np.ndarray) -> None:
        """Stop returning ``ids`` (deleted)."""

    def live(self) -> np.ndarray:
        """bool (n,): rows not deleted."""

    def truncated(self, n: int) -> "CodeIndex":
        """The first ``n`` rows (a reader drops the tail it is about to re-read)."""


PREFIX_SAMPLE = 4096
"""Rows decoded to measure how much coarser a prefix of the codes is (see _Prefixes)."""


class _Prefixes:
    """What ranking by the first s stages of a code index needs, computed once per s: the
    per-row term of the estimate (for L2 ``||x^_s||^2``, the prefix's own norm, so the ADC
    stays exact-form; +inf where the row is deleted) and the prefix's RMS error per
    dimension (the codes' own plus what the later stages add, measured on a sample)."""

    def __init__(self):
        self._done = {}

    def get(self, index, stages, bias, codes):
        """(bias, rms_error) for ``stages``; ``bias`` and ``codes`` by the index's rows."""
        if stages not in self._done:
            if index.metric == "l2":
                term = index.rq.prefix_norms(codes, stages)
                term[~np.isfinite(bias)] = np.inf
            else:
                term = bias.copy()
            live = np.flatnonzero(np.isfinite(bias))
            pick = live if len(live) <= PREFIX_SAMPLE else \
                np.random.default_rng(0).choice(live, PREFIX_SAMPLE, replace=False)
            extra = 0.0
            if len(pick):
                c = codes[np.sort(pick)]
                gap = index.rq.decode(c) - index.rq.decode(c, stages)
                extra = float(np.einsum("ij,ij->", gap, gap)) / len(pick) / index.rq.dim
            self._done[stages] = (term, float(np.sqrt(index.rms_error ** 2 + extra)))
        return self._done[stages]

    def drop(self, at):
        """Rows at ``at`` were deleted."""
        for term, _ in self._done.values():
            term[at] = np.inf


def _prefix_terms(index, stages, bias, codes):
    """(codes, bias, rms_error) a search of ``index`` ranks by for ``stages`` (None: all)."""
    if stages is None or stages >= codes.shape[1]:
        return codes, bias, index.rms_error
    term, rms = index.prefixes.get(index, stages, bias, codes)
    return codes[:, :stages], term, rms


def _to_store_ids(res, row_ids):
    ids = np.where(res.ids >= 0, row_ids[np.maximum(res.ids, 0)], -1)
    return SearchResult(ids, res.distances)


@dataclass
class ExactIndex:
    """The originals of an untrained store, searched exactly.

    ids : int64 (n,); vectors : float32 (n, dim); norms : float32 (n,) squared norms
    """

    metric: str
    ids: np.ndarray
    vectors: np.ndarray
    norms: np.ndarray = field(default=None)

    def __post_init__(self):
        if self.norms is None:
            self.norms = np.einsum("ij,ij->i", self.vectors, self.vectors)

    @property
    def nbytes(self):
        return self.ids.nbytes + self.vectors.nbytes + self.norms.nbytes

    def search(self, queries, *, k, allow=None, nprobe=None, stages=None):
        vectors, norms, row_ids = self.vectors, self.norms, self.ids
        if allow is not None:
            vectors, norms, row_ids = vectors[allow], norms[allow], row_ids[allow]
        if len(row_ids) == 0:
            return SearchResult(np.full((len(queries), k), -1, np.int64),
                                np.full((len(queries), k), np.inf, np.float32))
        res = exact_search(vectors, queries, k=k, metric=self.metric, vector_norms=norms)
        return _to_store_ids(res, row_ids)

    def append(self, ids, vectors):
        self.ids = np.concatenate([self.ids, ids])
        self.vectors = np.concatenate([self.vectors, vectors])
        self.norms = np.concatenate([self.norms, np.einsum("ij,ij->i", vectors, vectors)])

    def remove(self, ids):
        keep = ~np.isin(self.ids, ids)
        self.ids, self.vectors, self.norms = self.ids[keep], self.vectors[keep], self.norms[keep]

    def live(self):
        return np.ones(len(self.ids), bool)

    def truncated(self, n):
        return ExactIndex(self.metric, self.ids[:n], self.vectors[:n], self.norms[:n])


@dataclass
class FlatCodeIndex:
    """Every vector's RVQ codes, scanned in full by ADC.

    rq : the codec; ids : int64 (n,); codes : uint8 (n, stages); norms : float32 (n,)
    ``||x^||^2``, read only to make ``bias`` when it is not given (then dropped: None);
    bias : float32 (n,) added to each row's estimate (the norms for l2, 0 otherwise; +inf
    for deleted rows, which are never returned); rms_error : float, the
    codes' root mean squared error per dimension (how far an estimate may be off, for
    :func:`~rvqstore.algo.search.rerank_depths`).
    """

    metric: str
    rq: ResidualQuantizer
    ids: np.ndarray
    codes: np.ndarray
    norms: np.ndarray
    bias: np.ndarray = field(default=None)
    rms_error: float = 0.0
    prefixes: _Prefixes = field(default_factory=_Prefixes, repr=False)
    error_z: float = ERROR_Z  # the adaptive rerank's margin in standard deviations

    def __post_init__(self):
        self.codes = np.ascontiguousarray(self.codes)
        if self.bias is None:
            self.bias = self._bias_of(self.norms)
        self.norms = None  # the bias holds what searches need of them (4 bytes a vector)

    def error_of(self, stages=None):
        """The RMS error per dimension of ranking by the first ``stages`` stages."""
        return _prefix_terms(self, stages, self.bias, self.codes)[2]

    def _bias_of(self, norms):
        return norms.copy() if self.metric == "l2" else np.zeros(len(norms), np.float32)

    @property
    def nbytes(self):
        return self.ids.nbytes + self.codes.nbytes + self.bias.nbytes

    def search(self, queries, *, k, allow=None, nprobe=None, stages=None):
        # under an allow-mask only the passing rows are scanned: a selective filter makes
        # the scan cheaper, not just its answer shorter
        rows = None if allow is None else np.flatnonzero(allow)
        _, bias, _ = _prefix_terms(self, stages, self.bias, self.codes)
        res = adc_search(self.rq, self.codes, queries, k=k, metric=self.metric,
                         bias=bias, rows=rows, stages=stages)
        return _to_store_ids(res, self.ids)

    def append(self, ids, codes, norms, *, own=False):
        """Add rows; ``own``: the caller hands the arrays over (a store's first read), so an
        empty index keeps them, the norms becoming the L2 bias, instead of copying them."""
        self.prefixes = _Prefixes()
        if not len(self.ids):
            self.ids = np.asarray(ids, np.int64)
            self.codes = np.ascontiguousarray(codes)
            self.bias = norms if own and self.metric == "l2" and norms.dtype == np.float32 \
                else self._bias_of(norms)
            return
        self.ids = np.concatenate([self.ids, ids])
        self.codes = np.ascontiguousarray(np.concatenate([self.codes, codes]))
        self.bias = np.concatenate([self.bias, self._bias_of(norms)])

    def remove(self, ids):
        at = np.isin(self.ids, ids)
        self.bias[at] = np.inf
        self.prefixes.drop(at)

    def live(self):
        return np.isfinite(self.bias)

    def truncated(self, n):
        return FlatCodeIndex(self.metric, self.rq, self.ids[:n], self.codes[:n], None,
                             self.bias[:n].copy(), self.rms_error)



DEFAULT_NPROBE = 64
"""Cells' worth of rows a partitioned search scans when none was calibrated (see
:class:`PartitionedCodeIndex`)."""


@dataclass
class PartitionedCodeIndex:
    """RVQ codes grouped into cells by their first stages' codes, scanned near a query.

    The first RVQ stage is a coarse quantizer and the later stages encode the residual
    from it, so the codes need no other training: the ``prefix`` first stages' codes name a
    vector's cell (up to ``K ** prefix`` of them; ``prefix`` 2 by default, 65,536 cells at
    K = 256). A query's probe scores every non-empty cell by the ADC estimate of its centre
    (the prefix's reconstruction, exact-form: the same table as the scan) and scans the
    rows of the nearest cells, contiguous in memory, until it has scanned ``nprobe``
    average cells' worth of rows (and at least the k asked for); the estimates are the
    flat index's, over a few percent of the rows. Under an allow-mask it counts passing rows only, so a selective or
    anti-correlated filter visits more cells instead of returning fewer results.

    Rows (the store's order, as :class:`FlatCodeIndex` holds them) are kept in memory by
    position: positions ``[0, grouped)`` grouped by cell, the later ones appended since
    and scanned by every query until the next regrouping.

    ids : int64 (n,) store id of each row; codes uint8 (n, S), bias float32 (n,) by
    position (norms: None, as in :class:`FlatCodeIndex` once the bias is made); rows (n,)
    the row at each position (int32 below 2**31 rows; :meth:`positions` its inverse,
    computed when asked); rms_error as for
    :class:`FlatCodeIndex`; nprobe : the default for :meth:`search`.
    """

    metric: str
    rq: ResidualQuantizer
    ids: np.ndarray
    codes: np.ndarray
    norms: np.ndarray
    bias: np.ndarray
    rows: np.ndarray
    rms_error: float = 0.0
    prefix: int = 2
    nprobe: int = DEFAULT_NPROBE
    grouped: int = 0
    cell_of: np.ndarray = field(default=None)   # (grouped,) cell j of each position
    starts: np.ndarray = field(default=None)    # int64 (m+1,) positions of cell j
    c0: np.ndarray = field(default=None)        # int64 (m,) the cells' first stage codes
    c1: np.ndarray = field(default=None)        # int64 (m,) second stage codes (0: prefix 1)
    cell_bias: np.ndarray = field(default=None)  # float32 (m,)
    calibration: Optional[float] = None  # coverage the default nprobe reached, when calibrated
    prefixes: _Prefixes = field(default_factory=_Prefixes, repr=False)
    error_z: float = ERROR_Z  # the adaptive rerank's margin in standard deviations
    recall_by_z: Optional[dict] = None  # the calibration's held-out recall by margin
    sizes: np.ndarray = field(default=None, init=False, repr=False)  # rows per cell, cached

    @classmethod
    def group(cls, metric, rq, ids, codes, norms, *, bias=None, rms_error=0.0, prefix=2,
              nprobe=DEFAULT_NPROBE, tail_from=None, calibration=None, error_z=ERROR_Z):
        """The index of rows given in the store's order (``bias`` as for FlatCodeIndex);
        rows from ``tail_from`` on are left ungrouped (a last code block that appends by
        other connections will rewrite: a reader then re-reads it without regrouping)."""
        import numba

        from . import kernels

        if prefix not in (1, 2) or prefix > max(codes.shape[1], 1):
            raise ValueError(f"prefix must be 1 or 2 and at most the stages, got {prefix}")
        if bias is None:
            bias = norms.copy() if metric == "l2" else np.zeros(len(norms), np.float32)
        K = rq.codebook_size
        n = len(ids)
        head = n if tail_from is None else max(0, min(tail_from, n))
        ncells = K ** prefix
        codes = np.ascontiguousarray(codes)
        counts = kernels.cell_counts(codes, head, K, prefix == 2, ncells)
        nonempty = np.flatnonzero(counts)
        starts = np.zeros(len(nonempty) + 1, np.int64)
        np.cumsum(counts[nonempty], out=starts[1:])
        which = np.full(ncells, -1, np.int64)
        which[nonempty] = np.arange(len(nonempty))
        c0 = nonempty // K if prefix == 2 else nonempty
        c1 = nonempty % K if prefix == 2 else np.zeros(len(nonempty), np.int64)
        if metric == "l2":  # ||c0 + c1||^2 of each cell's centre
            books = rq.codebooks.astype(np.float64)
            n0 = np.einsum("kd,kd->k", books[0], books[0])
            cell_bias = n0[c0]
            if prefix == 2:
                n1 = np.einsum("kd,kd->k", books[1], books[1])
                cell_bias = cell_bias + n1[c1] + 2.0 * (books[0] @ books[1].T)[c0, c1]
            cell_bias = cell_bias.astype(np.float32)
        else:
            cell_bias = np.zeros(len(nonempty), np.float32)
        # row and cell numbers in the narrowest type that holds them (12 of 24 bytes a
        # vector at ten million rows): the kernels take any integer type
        rows_t = _row_type(n)
        cell_t = np.uint16 if len(nonempty) <= 65536 else rows_t
        if kernels.cells_ascending(codes, head, K, prefix == 2):
            # laid out by cell already (a compacted store): keep the arrays where they are
            return cls(metric, rq, np.asarray(ids, np.int64), codes, None,
                       np.ascontiguousarray(bias, np.float32), np.arange(n, dtype=rows_t),
                       rms_error, prefix, nprobe, head,
                       np.repeat(np.arange(len(nonempty), dtype=cell_t), counts[nonempty]),
                       starts, c0, c1, cell_bias, calibration, error_z=error_z)
        first = np.zeros(ncells, np.int64)
        first[nonempty] = starts[:-1]
        out_codes = np.empty_like(codes)
        out_bias = np.empty(n, np.float32)
        rows = np.empty(n, rows_t)
        cell_of = np.empty(head, cell_t)
        kernels.scatter_by_cell(codes, np.ascontiguousarray(bias, np.float32), head, K,
                                prefix == 2, first, which, out_codes, out_bias, rows, cell_of,
                                numba.get_num_threads())
        return cls(metric, rq, np.asarray(ids, np.int64), out_codes, None, out_bias, rows,
                   rms_error, prefix, nprobe, head, cell_of, starts, c0, c1, cell_bias,
                   calibration, error_z=error_z)

    @property
    def partitions(self):
        """Cells a vector can fall in (``K ** prefix``)."""
        return self.rq.codebook_size ** self.prefix

    @property
    def nbytes(self):
        arrays = (self.ids, self.codes, self.bias, self.rows,
                  self.cell_of, self.starts, self.c0, self.c1, self.cell_bias)
        return sum(a.nbytes for a in arrays)

    def cell_sizes(self):
        """int64 (m,): live rows in each non-empty cell of the grouped rows."""
        live = np.isfinite(self.bias[:self.grouped])
        return np.bincount(self.cell_of[live], minlength=len(self.c0))

    def error_of(self, stages=None):
        """The RMS error per dimension of ranking by the first ``stages`` stages."""
        return _prefix_terms(self, stages, self.bias, self.codes)[2]

    def search(self, queries, *, k, allow=None, nprobe=None, stages=None):
        from . import kernels

        nprobe = self.nprobe if nprobe is None else int(nprobe)
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        K, m, n = self.rq.codebook_size, len(self.c0), len(self.rows)
        # at least k rows (passing rows under a mask): never fewer results than can pass
        budget = max(k, -(-nprobe * self.grouped // max(m, 1)))
        if allow is None:
            if self.sizes is None:
                self.sizes = np.diff(self.starts)
            weight, mask = self.sizes, _NO_MASK
        else:
            mask = np.ascontiguousarray(allow, dtype=np.bool_)
            weight = kernels.count_by_cell(self.cell_of, mask, self.rows, m)
        lut, const = self.rq.lut(queries, self.metric)
        lut = np.ascontiguousarray(lut, np.float32)
        codes, bias, _ = _prefix_terms(self, stages, self.bias, self.codes)
        scan_lut = prefix_table(lut, self.codes, stages)[0]
        ids = np.full((len(queries), k), -1, np.int64)
        dist = np.full((len(queries), k), np.inf, np.float32)
        two = self.prefix == 2
        for q in range(len(queries)):
            sel = kernels.probe_cells(lut[q], K, self.c0, self.c1, two, self.cell_bias,
                                      weight, budget)
            starts, ends = self.starts[sel], self.starts[sel + 1]
            if n > self.grouped:  # appended since the grouping: always scanned
                starts = np.append(starts, self.grouped)
                ends = np.append(ends, n)
            d, i = kernels.scan_topk_ranges(codes, starts, ends, mask, self.rows, scan_lut[q],
                                            bias, k)
            ok = np.isfinite(d)
            ids[q, ok] = self.ids[self.rows[i[ok]]]
            dist[q, ok] = d[ok] + np.float32(const[q])
        return SearchResult(ids, dist)

    def append(self, ids, codes, norms):
        self.prefixes = _Prefixes()
        n = len(self.rows)
        self.ids = np.concatenate([self.ids, ids])
        self.codes = np.ascontiguousarray(np.concatenate([self.codes, codes]))
        extra = norms.copy() if self.metric == "l2" else np.zeros(len(norms), np.float32)
        self.bias = np.concatenate([self.bias, extra])
        rows_t = np.promote_types(self.rows.dtype, _row_type(n + len(ids)))
        new = np.arange(n, n + len(ids), dtype=rows_t)
        self.rows = np.concatenate([self.rows.astype(rows_t, copy=False), new])
        if len(self.rows) - self.grouped > max(REGROUP_ROWS, self.grouped // REGROUP_SHARE):
            self._regroup()

    def positions(self):
        """(n,) the position of each row: the inverse of ``rows``, computed when asked (a
        write or a filter's live mask), not kept (4 bytes a vector)."""
        pos = np.empty(len(self.rows), self.rows.dtype)
        pos[self.rows] = np.arange(len(self.rows), dtype=self.rows.dtype)
        return pos

    def _regroup(self):
        at = self.positions()
        fresh = PartitionedCodeIndex.group(
            self.metric, self.rq, self.ids, self.codes[at], None, bias=self.bias[at],
            rms_error=self.rms_error, prefix=self.prefix, nprobe=self.nprobe,
            calibration=self.calibration, error_z=self.error_z)
        self.__dict__.update(fresh.__dict__)

    def remove(self, ids):
        at = np.flatnonzero(np.isin(self.ids, ids)[self.rows])
        self.bias[at] = np.inf
        self.prefixes.drop(at)

    def live(self):
        out = np.empty(len(self.rows), bool)
        out[self.rows] = np.isfinite(self.bias)
        return out

    def truncated(self, n):
        if self.grouped == 0 or self.rows[:self.grouped].max() < n:
            # only ungrouped rows go: the grouping stands
            keep = np.concatenate([np.arange(self.grouped),
                                   self.grouped + np.flatnonzero(self.rows[self.grouped:] < n)])
            return PartitionedCodeIndex(
                self.metric, self.rq, self.ids[:n], self.codes[keep], None,
                self.bias[keep], self.rows[keep], self.rms_error, self.prefix, self.nprobe,
                self.grouped, self.cell_of, self.starts, self.c0, self.c1, self.cell_bias,
                self.calibration, error_z=self.error_z)
        at = self.positions()[:n]
        return PartitionedCodeIndex.group(self.metric, self.rq, self.ids[:n], self.codes[at],
                                          None, bias=self.bias[at].copy(),
                                          rms_error=self.rms_error, prefix=self.prefix,
                                          nprobe=self.nprobe, calibration=self.calibration,
                                          error_z=self.error_z)


def cell_order(codes, K):
    """The stable order of rows ``codes`` (n, S) by the cell of their first two stages'
    codes (first stage only when S is 1): sorted by cell, rows grouped by two stages are
    grouped by the first too. A store lays its code blocks out in this order (compact), so
    that a partitioned index finds them grouped and need not move them."""
    cell = codes[:, 0].astype(np.int64)
    if codes.shape[1] > 1:
        cell = cell * K + codes[:, 1]
    return np.argsort(cell.astype(np.uint16 if K * K <= 65536 else np.int64), kind="stable")


def _row_type(n):
    return np.int32 if n < 2 ** 31 else np.int64


REGROUP_ROWS = 65536
REGROUP_SHARE = 32
"""Rows appended since the last grouping that a partitioned index scans whole (every query
does) before it regroups: REGROUP_ROWS, or 1/REGROUP_SHARE of the grouped rows, whichever
is more. Measured at 1M mixtures: a tail of 1/32 adds 0.16 ms to the index's 0.78 ms per
query, 1/8 adds 0.58 ms; regrouping a million rows takes 0.03-0.08 s."""

_NO_MASK = np.empty(0, np.bool_)


def scan_every_code(index, queries, k):
    """The k best rows of a partitioned index for each query by scanning every code (what
    its cells approximate): a SearchResult whose ids are positions in ``index``."""
    positions = np.arange(len(index.rows), dtype=np.int64)
    return FlatCodeIndex(index.metric, index.rq, positions, index.codes, None,
                         index.bias).search(queries, k=k)


def calibrate_nprobe(index, queries, own, *, k, target=0.99, full=None):
    """The least ``nprobe`` at which a partitioned index's probe would reach ``target`` of
    the queries' k nearest by the codes (what scanning every row ranks first), over all
    queries together.

    queries : float32 (nq, d), stored vectors (held out of their own answers: ``own``,
    int64 (nq,), their ids). Each such neighbour is found once the probe has taken its
    cell, that is once it has scanned the rows of every cell whose centre scores no worse;
    the budget reaching ``target`` of them, in average cells' worth of rows, is the answer
    (the probe's buckets only add rows). ``full``: :func:`scan_every_code` of the queries
    with at least k + 1 columns, when the caller has it. Returns (nprobe, share of
    neighbours it reaches).
    """
    m = len(index.c0)
    if m == 0 or not len(queries):
        return DEFAULT_NPROBE, None
    K = index.rq.codebook_size
    if full is None:
        full = scan_every_code(index, queries, k + 1)
    sizes = np.diff(index.starts)
    lut, _ = index.rq.lut(queries, index.metric)
    need = []
    for q in range(len(queries)):
        found = [p for p in full.ids[q].tolist()
                 if p >= 0 and index.ids[index.rows[p]] != own[q]][:k]
        score = index.cell_bias + lut[q, index.c0]
        if index.prefix == 2:
            score = score + lut[q, K + index.c1]
        for at in found:
            if at >= index.grouped:  # appended since the grouping: every query scans it
                need.append(0)
            else:
                need.append(int(sizes[score <= score[index.cell_of[at]]].sum()))
    if not need:
        return DEFAULT_NPROBE, None
    budget = float(np.quantile(np.asarray(need, np.float64), target, method="higher"))
    nprobe = max(1, int(np.ceil(budget * m / max(index.grouped, 1))))
    reached = float(np.mean(np.asarray(need) <= budget))
    return min(nprobe, m), reached

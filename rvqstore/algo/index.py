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
from .search import SearchResult, adc_search, exact_search


class CodeIndex(Protocol):
    """What a store needs of its in-memory index."""

    ids: np.ndarray  # int64 (n,), the store id of each row

    @property
    def nbytes(self) -> int:
        """Bytes held in memory."""

    def search(self, queries: np.ndarray, *, k: int,
               allow: Optional[np.ndarray] = None) -> SearchResult:
        """The k best rows for each query as store ids (padded with -1/+inf)."""

    def remove(self, ids: np.ndarray) -> None:
        """Stop returning ``ids`` (deleted)."""

    def live(self) -> np.ndarray:
        """bool (n,): rows not deleted."""

    def truncated(self, n: int) -> "CodeIndex":
        """The first ``n`` rows (a reader drops the tail it is about to re-read)."""


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

    def search(self, queries, *, k, allow=None):
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
    ``||x^||^2``; bias : float32 (n,) added to each row's estimate (the norms for l2, 0
    otherwise; +inf for deleted rows, which are never returned); rms_error : float, the
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

    def __post_init__(self):
        self.codes = np.ascontiguousarray(self.codes)
        if self.bias is None:
            self.bias = self._bias_of(self.norms)

    def _bias_of(self, norms):
        return norms.copy() if self.metric == "l2" else np.zeros(len(norms), np.float32)

    @property
    def nbytes(self):
        return self.ids.nbytes + self.codes.nbytes + self.norms.nbytes + self.bias.nbytes

    def search(self, queries, *, k, allow=None):
        # under an allow-mask only the passing rows are scanned: a selective filter makes
        # the scan cheaper, not just its answer shorter
        rows = None if allow is None else np.flatnonzero(allow)
        res = adc_search(self.rq, self.codes, queries, k=k, metric=self.metric,
                         bias=self.bias, rows=rows)
        return _to_store_ids(res, self.ids)

    def append(self, ids, codes, norms):
        self.ids = np.concatenate([self.ids, ids])
        self.codes = np.ascontiguousarray(np.concatenate([self.codes, codes]))
        self.norms = np.concatenate([self.norms, norms])
        self.bias = np.concatenate([self.bias, self._bias_of(norms)])

    def remove(self, ids):
        self.bias[np.isin(self.ids, ids)] = np.inf

    def live(self):
        return np.isfinite(self.bias)

    def truncated(self, n):
        return FlatCodeIndex(self.metric, self.rq, self.ids[:n], self.codes[:n], self.norms[:n],
                             self.bias[:n].copy(), self.rms_error)

"""BM25 over an in-memory inverted index, computed exactly as SQLite FTS5's ``bm25()``.

For a query of phrases p_1..p_n, FTS5 scores a document D as

    -sum_i idf_i * f_i * (k1 + 1) / (f_i + k1 * (1 - b + b * |D| / avgdl))

with k1 = 1.2, b = 0.75, f_i the number of instances of p_i in D, |D| its token count,
avgdl = (tokens in the table) / (rows in the table) and
idf_i = log((N - n_i + 0.5) / (n_i + 0.5)), replaced by 1e-6 when it is not positive
(n_i: rows holding p_i). The sum runs over the phrases in query order, repeated phrases
included. :func:`idf` and the kernels evaluate these expressions operation by operation
as FTS5's C code does in double precision, so the scores are equal bit for bit; that
holds where neither side fuses multiply-adds, which a caller can check once against FTS5
(:mod:`rvqstore.storage.text` does).

:func:`top_k` ranks with MaxScore pruning (Turtle and Flood): the terms are taken by
decreasing upper bound (idf times the largest tf-part any of their documents reaches).
The postings of the first few are accumulated into partial scores; a document holding
none of them scores at most the sum of the other terms' bounds, so once that sum is below
the ``depth``-th partial score no such document can enter or tie into the result, and a
partial score plus that sum below it rules a document out too. The documents left are
scored exactly, phrase by phrase in query order. When no threshold can be set (fewer
matches than ``depth``) every matching document is scored.

The index comes as :class:`Segment` objects (a base and small deltas), each holding its
postings with documents numbered densely. Plain numpy around numba kernels;
:func:`reference_scores` is the plain-Python check of them.
"""

from dataclasses import dataclass, field
import math
from typing import Optional

import numpy as np
from numba import njit

K1 = 1.2
B = 0.75
IDF_FLOOR = 1e-6
# relative slack on bounds: they are compared with sums of rounded contributions
SLACK = 1e-9
# accumulate terms until the rest's bound is below ALPHA times the threshold (measured on
# the WordNet glosses: 1.0 leaves too many candidates to score, 0 walks every posting)
ALPHA = 0.5
# score the allowed documents one by one when LISTED_COST * allowed * phrases < postings
LISTED_COST = 4

_EMPTY_I64 = np.empty(0, np.int64)
_NO_MASK = np.empty(0, np.bool_)


def idf(n_rows: int, n_hits: int) -> float:
    """FTS5's idf of a phrase found in ``n_hits`` of ``n_rows`` rows."""
    value = math.log((n_rows - n_hits + 0.5) / (n_hits + 0.5))
    return IDF_FLOOR if value <= 0.0 else value


def avgdl(n_rows: int, n_tokens: int) -> float:
    return float(n_tokens) / float(n_rows)


@dataclass
class Segment:
    """Part of an inverted index: postings per term, as compressed sparse rows.

    terms : int64 (t,), sorted term numbers present
    starts : int64 (t + 1,), postings of ``terms[j]`` are ``[starts[j], starts[j+1])``
    docs : int32 (p,), positions in ``ids`` (ascending within a term)
    tfs : int32 (p,), instances of the term in the document (>= 1)
    ids : int64 (d,), sorted ids of the documents holding at least one token
    lengths : float64 (d,), their token counts
    dead : int64, sorted ids whose postings here are out of date (superseded or deleted)
    alive : bool (d,) or None (all alive), the same as a mask over ``ids``
    """

    terms: np.ndarray
    starts: np.ndarray
    docs: np.ndarray
    tfs: np.ndarray
    ids: np.ndarray
    lengths: np.ndarray
    dead: np.ndarray = field(default_factory=lambda: _EMPTY_I64)
    alive: Optional[np.ndarray] = None
    _acc: Optional[np.ndarray] = field(default=None, repr=False)
    _norm: Optional[tuple] = field(default=None, repr=False)

    @classmethod
    def from_instances(cls, terms, counts, docs):
        """A segment from a term-major stream of token instances.

        terms : int64 (t,), strictly increasing term numbers
        counts : int64 (t,), instances of each term (>= 1)
        docs : int64 (sum(counts),), the document id of each instance, ascending within
            a term. Raises ValueError when the stream is not shaped so.
        """
        terms = np.asarray(terms, np.int64)
        counts = np.asarray(counts, np.int64)
        docs = np.asarray(docs, np.int64)
        if len(terms) != len(counts) or (len(counts) and counts.min() < 1) \
                or int(counts.sum()) != len(docs):
            raise ValueError("instance counts do not add up to the instances")
        if len(terms) > 1 and not (np.diff(terms) > 0).all():
            raise ValueError("terms are not strictly increasing")
        first = np.zeros(len(docs), bool)
        first[np.cumsum(counts[:-1])] = True  # an instance that starts a term
        if len(docs):
            first[0] = True
            if (np.diff(docs)[~first[1:]] < 0).any():
                raise ValueError("documents are not ascending within a term")
        new_doc = first.copy()
        new_doc[1:] |= docs[1:] != docs[:-1]
        at = np.flatnonzero(new_doc)
        tfs = np.diff(np.append(at, len(docs)))
        per_term = (np.add.reduceat(new_doc.astype(np.int64), np.cumsum(counts) - counts)
                    if len(docs) else counts)
        starts = np.zeros(len(terms) + 1, np.int64)
        np.cumsum(per_term, out=starts[1:])
        return cls._finish(terms, starts, docs[at], tfs)

    @classmethod
    def _finish(cls, terms, starts, doc_ids, tfs):
        """The segment of postings ``doc_ids``/``tfs`` laid out by ``terms``/``starts``;
        a document's length is the sum of its tfs."""
        tfs = np.asarray(tfs, np.int32)
        if len(doc_ids) and int(doc_ids.max()) - int(doc_ids.min()) < 4 * len(doc_ids):
            lo = int(doc_ids.min())  # compact ids (the usual case): count by offset
            per_id = np.bincount(doc_ids - lo, weights=tfs)
            ids = np.flatnonzero(per_id) + lo
            position = np.cumsum(per_id > 0) - 1
            docs = position[doc_ids - lo]
            lengths = per_id[ids - lo]
        else:
            ids, docs = np.unique(doc_ids, return_inverse=True)
            lengths = np.bincount(docs, weights=tfs, minlength=len(ids))
        return cls(terms, starts, docs.astype(np.int32), tfs, ids.astype(np.int64),
                   lengths.astype(np.float64))

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held (postings, documents, cached norms and scratch)."""
        arrays = [self.terms, self.starts, self.docs, self.tfs, self.ids, self.lengths,
                  self.dead, self.alive, self._acc, None if self._norm is None else self._norm[1]]
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def postings_count(self) -> int:
        return len(self.docs)

    @property
    def live_docs(self) -> int:
        return len(self.ids) - len(self.dead)

    def live_tokens(self) -> int:
        total = float(self.lengths.sum())
        if len(self.dead):
            total -= float(self.lengths[np.searchsorted(self.ids, self.dead)].sum())
        return int(total)

    def slot(self, term):
        """Index of ``term`` in ``terms``, or -1."""
        j = int(np.searchsorted(self.terms, term))
        return j if j < len(self.terms) and self.terms[j] == term else -1

    def live_df(self, j):
        """Live documents holding term ``terms[j]``."""
        a, b = self.starts[j], self.starts[j + 1]
        if not len(self.dead):
            return int(b - a)
        dead = np.searchsorted(self.ids, self.dead).astype(np.int32)
        return int(b - a) - int(np.count_nonzero(_member(dead, self.docs[a:b])))

    def retire(self, ids):
        """Mark ``ids`` (int64) out of date here."""
        ids = np.unique(np.asarray(ids, np.int64))
        gone = ids[_member(ids, self.ids)]
        if len(gone):
            self.dead = np.union1d(self.dead, gone)
            if self.alive is None:
                self.alive = np.ones(len(self.ids), np.bool_)
            self.alive[np.searchsorted(self.ids, gone)] = False

    def scratch(self):
        """Per-document partial sums for the kernel, all zero between calls."""
        if self._acc is None:
            self._acc = np.zeros(len(self.ids), np.float64)
        return self._acc

    def norms(self, mean):
        """``k1 * (1 - b + b * |D| / avgdl)`` of every document (FTS5's operations), kept
        for the last ``mean``."""
        if self._norm is None or self._norm[0] != mean:
            self._norm = (mean, K1 * (1 - B + B * self.lengths / mean), {})
        return self._norm[1]

    def peak(self, j, mean):
        """The largest tf-part ``tf * (k1 + 1) / (tf + norm)`` among the postings of
        ``terms[j]`` (dead ones included), kept for the last ``mean``."""
        norms = self.norms(mean)
        cache = self._norm[2]
        if j not in cache:
            cache[j] = _peak(self.docs, self.tfs, norms, self.starts[j], self.starts[j + 1])
        return cache[j]


def _member(values, sorted_pool):
    """Boolean mask: which of ``values`` occur in sorted ``sorted_pool``."""
    if not len(sorted_pool) or not len(values):
        return np.zeros(len(values), bool)
    at = np.searchsorted(sorted_pool, values)
    at[at == len(sorted_pool)] = 0
    return sorted_pool[at] == values


def merge(segments):
    """One segment holding the live postings of ``segments`` (a document live in at most
    one of them)."""
    parts = []
    for seg in segments:
        term_of = np.repeat(seg.terms, np.diff(seg.starts))
        ids = seg.ids[seg.docs]
        keep = seg.alive[seg.docs] if seg.alive is not None else slice(None)
        parts.append((term_of[keep], ids[keep], seg.tfs[keep]))
    t, d, f = (np.concatenate([p[i] for p in parts]) for i in range(3))
    order = np.lexsort((d, t))
    t, d, f = t[order], d[order], f[order]
    if len(t) > 1 and ((t[1:] == t[:-1]) & (d[1:] == d[:-1])).any():
        raise ValueError("a document is live in two segments")
    terms, first = np.unique(t, return_index=True)
    starts = np.append(first, len(t)).astype(np.int64)
    return Segment._finish(terms.astype(np.int64), starts, d, f)


@dataclass
class RankStats:
    """How a :func:`top_k` call went, summed over segments: terms whose postings were
    accumulated, terms present, documents touched, documents scored exactly, segments
    whose allowed documents were scored one by one."""
    essential_terms: int = 0
    terms: int = 0
    touched: int = 0
    scored: int = 0
    listed: int = 0


def top_k(segments, phrases, n_rows, n_tokens, depth, allowed=None, stats=None):
    """The best ``depth`` documents for a query, as FTS5's bm25 ranks them.

    Parameters
    ----------
    segments : list of Segment, a document live in at most one
    phrases : list of int, the term number of each query phrase in query order (-1 for a
        term the index does not hold); every phrase is a single term
    n_rows, n_tokens : int, the table's row count (empty documents included) and token count
    depth : int > 0
    allowed : None or sorted int64 array, only these ids may be returned
    stats : RankStats or None, filled in

    Returns
    -------
    ids : int64 (m,), m <= depth, best first; equal scores by ascending id
    scores : float64 (m,), FTS5's bm25 values (negative: smaller is better)
    """
    present = sorted({t for t in phrases if t >= 0})
    if not present or n_rows <= 0 or n_tokens <= 0:
        return _EMPTY_I64, np.empty(0, np.float64)
    mean = avgdl(n_rows, n_tokens)
    slots = [[seg.slot(t) for t in present] for seg in segments]
    df = [sum(seg.live_df(js[k]) for seg, js in zip(segments, slots) if js[k] >= 0)
          for k in range(len(present))]
    idf_of = dict(zip(present, (idf(n_rows, n) for n in df)))
    out_ids, out_scores = [], []
    for seg, js in zip(segments, slots):
        ids, scores = _segment_top(seg, js, present, phrases, idf_of, mean, depth, allowed,
                                   stats)
        out_ids.append(ids)
        out_scores.append(scores)
    ids = np.concatenate(out_ids)
    scores = np.concatenate(out_scores)
    best = np.lexsort((ids, -scores))[:depth]
    return ids[best], -1.0 * scores[best]


def _segment_top(seg, js, present, phrases, idf_of, mean, depth, allowed, stats):
    """Candidates of one segment with exact (positive) scores: its best ``depth`` and
    possibly more. ``js``: the slot of each of ``present`` in ``seg`` (-1: absent)."""
    here = [k for k, j in enumerate(js) if j >= 0]
    if not here:
        return _EMPTY_I64, np.empty(0)
    weight, bound, first, last, size = [], [], [], [], []
    for k in here:
        t, j = present[k], js[k]
        w = idf_of[t] * phrases.count(t)
        weight.append(w)
        bound.append(w * seg.peak(j, mean))
        first.append(seg.starts[j])
        last.append(seg.starts[j + 1])
        size.append(seg.starts[j + 1] - seg.starts[j])
    order = sorted(range(len(here)), key=lambda i: (-bound[i], size[i]))
    rank_of = {present[here[i]]: r for r, i in enumerate(order)}
    p_term = np.asarray([rank_of[t] for t in phrases if t in rank_of], np.int64)
    p_idf = np.asarray([idf_of[t] for t in phrases if t in rank_of], np.float64)
    pick = lambda values, dtype: np.asarray([values[i] for i in order], dtype)  # noqa: E731
    t_first, t_last = pick(first, np.int64), pick(last, np.int64)
    norms = seg.norms(mean)
    if allowed is not None and LISTED_COST * len(allowed) * len(p_term) < sum(size):
        # few allowed documents: scoring each of them costs less than walking the postings
        at = np.searchsorted(seg.ids, allowed)
        at = at[(at < len(seg.ids)) & (seg.ids[np.minimum(at, len(seg.ids) - 1)] == allowed)]
        if seg.alive is not None:
            at = at[seg.alive[at]]
        scores = _score_listed(at.astype(np.int32), seg.docs, seg.tfs, norms, t_first, t_last,
                               p_term, p_idf)
        held = scores > 0.0
        if stats is not None:
            stats.terms += len(order)
            stats.scored += len(at)
            stats.listed += 1
        return seg.ids[at[held]], scores[held]
    m0, total = 0, 0
    while m0 < len(order) and total < depth:  # enough postings to fill depth
        total += size[order[m0]]
        m0 += 1
    mask = _NO_MASK if allowed is None else _sorted_mask(seg.ids, allowed)
    pos, scores, m, touched = _rank_segment(
        seg.docs, seg.tfs, norms, _NO_MASK if seg.alive is None else seg.alive,
        mask, t_first, t_last, pick(weight, np.float64), pick(bound, np.float64), p_term,
        p_idf, depth, m0, seg.scratch())
    if stats is not None:
        stats.essential_terms += m
        stats.terms += len(order)
        stats.touched += touched
        stats.scored += len(pos)
    return seg.ids[pos], scores


@njit(cache=True, nogil=True)
def _sorted_mask(ids, allowed):
    """Which of sorted ``ids`` are in sorted ``allowed`` (one merge pass)."""
    out = np.zeros(len(ids), np.bool_)
    j = 0
    for i in range(len(ids)):
        while j < len(allowed) and allowed[j] < ids[i]:
            j += 1
        if j == len(allowed):
            break
        out[i] = allowed[j] == ids[i]
    return out


@njit(cache=True, nogil=True)
def _tf_part(tf, norm):
    # the operations of FTS5's fts5Bm25Function, in its order (norm: Segment.norms)
    return (tf * (K1 + 1.0)) / (tf + norm)


@njit(cache=True, nogil=True)
def _peak(docs, tfs, norms, first, last):
    best = 0.0
    for p in range(first, last):
        best = max(best, _tf_part(float(tfs[p]), norms[docs[p]]))
    return best


@njit(cache=True, nogil=True)
def _exact(d, docs, tfs, norms, t_first, t_last, p_term, p_idf):
    """The bm25 sum (positive) of document ``d``: phrase by phrase in query order."""
    s = 0.0
    for q in range(len(p_term)):
        j = p_term[q]
        lo, hi = t_first[j], t_last[j]
        while lo < hi:
            mid = (lo + hi) >> 1
            if docs[mid] < d:
                lo = mid + 1
            else:
                hi = mid
        if lo < t_last[j] and docs[lo] == d:
            s += p_idf[q] * _tf_part(float(tfs[lo]), norms[d])
    return s


@njit(cache=True, nogil=True)
def _score_listed(positions, docs, tfs, norms, t_first, t_last, p_term, p_idf):
    """Exact scores of the documents at ``positions`` (0 for those holding no term)."""
    out = np.empty(len(positions))
    for i in range(len(positions)):
        out[i] = _exact(positions[i], docs, tfs, norms, t_first, t_last, p_term, p_idf)
    return out


@njit(cache=True, nogil=True)
def _sift_down(heap, who, n, i):
    """Restore the min-heap ``heap[:n]`` below ``i``, moving ``who`` alike."""
    while True:
        c = 2 * i + 1
        if c >= n:
            return
        if c + 1 < n and heap[c + 1] < heap[c]:
            c += 1
        if heap[i] <= heap[c]:
            return
        heap[i], heap[c] = heap[c], heap[i]
        who[i], who[c] = who[c], who[i]
        i = c


@njit(cache=True, nogil=True)
def _rank_segment(docs, tfs, norms, alive, allowed, t_first, t_last, t_weight, t_bound,
                  p_term, p_idf, depth, m, acc):
    """MaxScore over one segment (see the module docstring).

    Terms come by decreasing bound: postings ``[t_first[j], t_last[j])``, weight (idf summed
    over the term's phrases) and bound. Phrases in query order: ``p_term`` (index of their
    term), ``p_idf``. ``norms``: per document, see :meth:`Segment.norms`. ``m``: terms
    to accumulate at first. ``alive``/``allowed``: dense masks, or empty for none.
    ``acc``: per-document scratch, all zero (and left so; every contribution is > 0).

    Returns the positions of the documents scored exactly (a superset of the best
    ``depth``), their scores (positive sums), the number of terms accumulated and the
    number of documents touched.
    """
    nt = len(t_first)
    rest = np.zeros(nt + 1)  # bound of a document holding none of the first j terms
    for j in range(nt - 1, -1, -1):
        rest[j] = rest[j + 1] + t_bound[j]
    for j in range(nt + 1):
        rest[j] *= 1.0 + SLACK
    cap = 0
    for j in range(nt):
        cap += t_last[j] - t_first[j]
    touched = np.empty(cap, np.int32)
    n = 0
    done = 0
    lower = 0.0
    while True:
        for j in range(done, m):
            w = t_weight[j]
            for p in range(t_first[j], t_last[j]):
                d = docs[p]
                if len(alive) and not alive[d]:
                    continue
                if len(allowed) and not allowed[d]:
                    continue
                if acc[d] == 0.0:
                    touched[n] = d
                    n += 1
                acc[d] += w * _tf_part(float(tfs[p]), norms[d])
        done = m
        lower = 0.0
        if n >= depth:
            # a threshold: the exact scores of the depth best partial sums, the lowest of
            # which no final depth-th score can be below
            heap = np.empty(depth)
            who = np.empty(depth, np.int32)
            h = 0
            for i in range(n):
                d = touched[i]
                if h < depth:
                    heap[h] = acc[d]
                    who[h] = d
                    h += 1
                    if h == depth:
                        for r in range(depth // 2 - 1, -1, -1):
                            _sift_down(heap, who, depth, r)
                elif acc[d] > heap[0]:
                    heap[0] = acc[d]
                    who[0] = d
                    _sift_down(heap, who, depth, 0)
            least = np.inf
            for i in range(depth):
                least = min(least, _exact(who[i], docs, tfs, norms, t_first, t_last, p_term,
                                          p_idf))
            lower = least * (1.0 - SLACK)
        while m < nt and rest[m] >= lower * ALPHA:
            m += 1
        if m == done:
            break
    # documents that might still reach the threshold, best partial sums first
    cand = np.empty(n, np.int32)
    part = np.empty(n)
    c = 0
    for i in range(n):
        d = touched[i]
        if acc[d] + rest[m] >= lower:
            cand[c] = d
            part[c] = acc[d]
            c += 1
        acc[d] = 0.0
    order = np.argsort(-part[:c])
    pos = np.empty(c, np.int32)
    out = np.empty(c)
    heap = np.empty(depth)
    who = np.empty(depth, np.int32)
    h = 0
    k = 0
    for i in order:
        d = cand[i]
        if h == depth and part[i] + rest[m] < heap[0] * (1.0 - SLACK):
            break  # this one and all after it stay below depth scored documents
        s = _exact(d, docs, tfs, norms, t_first, t_last, p_term, p_idf)
        pos[k] = d
        out[k] = s
        k += 1
        if h < depth:
            heap[h] = s
            who[h] = d
            h += 1
            if h == depth:
                for r in range(depth // 2 - 1, -1, -1):
                    _sift_down(heap, who, depth, r)
        elif s > heap[0]:
            heap[0] = s
            who[0] = d
            _sift_down(heap, who, depth, 0)
    return pos[:k], out[:k], m, n


def reference_scores(documents, phrases, n_rows, n_tokens):
    """Plain-Python bm25 of every document holding a query term: ``{id: score}``.

    documents : {id: list of term numbers}; phrases as for :func:`top_k`. Checks
    :func:`top_k` in the tests.
    """
    mean = avgdl(n_rows, n_tokens)
    hits = {t: sum(1 for toks in documents.values() if t in toks) for t in set(phrases)}
    out = {}
    for i, toks in documents.items():
        if not any(t in toks for t in phrases):
            continue
        score = 0.0
        for t in phrases:
            f = float(toks.count(t))
            score += idf(n_rows, hits[t]) * ((f * (K1 + 1.0)) /
                                            (f + K1 * (1 - B + B * len(toks) / mean)))
        out[i] = -1.0 * score
    return out

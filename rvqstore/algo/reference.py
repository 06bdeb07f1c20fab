"""Plain numpy twins of the numba kernels, slow and obvious, for the tests.

Each computes the same thing as its kernel by the direct route (decoding residuals,
sorting full score arrays) so that agreement means something.
"""

import numpy as np


def centroid_sums_ref(x, labels, k):
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, x.astype(np.float64))
    return sums, np.bincount(labels, minlength=k).astype(np.int64)


def beam_step_ref(x, codebooks, codes, stage, beam_out):
    """Beam step by decoding each beam entry's residual explicitly.

    x : (n, d); codebooks : (S, K, d); codes : (n, B_in, S) uint8.
    Returns (dist (n, beam_out), codes (n, beam_out, S)) like ``kernels.beam_step``.
    """
    n, b_in, S = codes.shape
    K = codebooks.shape[1]
    new_dist = np.empty((n, beam_out), dtype=np.float64)
    new_codes = np.zeros((n, beam_out, S), dtype=np.uint8)
    for i in range(n):
        scores = np.empty((b_in, K))
        for b in range(b_in):
            r = x[i].astype(np.float64)
            for t in range(stage):
                r = r - codebooks[t, codes[i, b, t]]
            scores[b] = ((r[None, :] - codebooks[stage]) ** 2).sum(axis=1)
        flat = np.argsort(scores.ravel(), kind="stable")[:beam_out]
        for j, f in enumerate(flat):
            b, k = divmod(int(f), K)
            new_dist[i, j] = scores[b, k]
            new_codes[i, j, :stage] = codes[i, b, :stage]
            new_codes[i, j, stage] = k
    return new_dist, new_codes


def scan_topk_ref(codes, lut, bias, k):
    n, S = codes.shape
    K = lut.shape[0] // S
    est = bias.astype(np.float64) + lut.reshape(S, K)[np.arange(S)[None, :], codes].sum(axis=1)
    order = np.argsort(est, kind="stable")[:k]
    dist = np.full(k, np.inf)
    idx = np.full(k, -1, dtype=np.int64)
    keep = order[np.isfinite(est[order])]
    dist[:len(keep)] = est[keep]
    idx[:len(keep)] = keep
    return dist, idx


def normal_equations_ref(codes, x, K):
    n, S = codes.shape
    B = np.zeros((n, S * K))
    B[np.arange(n)[:, None], np.arange(S)[None, :] * K + codes] = 1.0
    return B.T @ B, B.T @ x.astype(np.float64)


def group_by_cell_ref(codes, bias, head, K, two):
    """Rows ``[0, head)`` in order of their cell (stable argsort), the rest after in place:
    (codes, bias, rows, cell numbers of the grouped positions) like the counting sort of
    ``kernels.cell_counts`` + ``kernels.scatter_by_cell``."""
    cell = codes[:head, 0].astype(np.int64)
    if two:
        cell = cell * K + codes[:head, 1]
    order = np.concatenate([np.argsort(cell, kind="stable"),
                            np.arange(head, len(codes), dtype=np.int64)])
    return codes[order], bias[order], order, cell[order[:head]]

"""k-means in float32: k-means++ seeding, Lloyd iterations, empty-cluster repair."""

import numpy as np

from ..errors import InvalidInputError
from .validate import as_matrix

# kernels (numba) is imported by _lloyd, which runs it (see quantizers._kernels).


def assign(x, centroids, centroid_norms=None, batch=16384):
    """Nearest centroid (squared L2) of each row of ``x``.

    Returns
    -------
    labels : int64 (n,); dist : float32 (n,) squared distances
    """
    if centroid_norms is None:
        centroid_norms = np.einsum("ij,ij->i", centroids, centroids)
    n = x.shape[0]
    labels = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float32)
    for start in range(0, n, batch):
        xb = x[start:start + batch]
        # ||x||^2 is constant per row, so the argmin needs only ||c||^2 - 2 x.c
        scores = xb @ centroids.T
        scores *= -2.0
        scores += centroid_norms
        lab = np.argmin(scores, axis=1)
        labels[start:start + batch] = lab
        best = scores[np.arange(len(xb)), lab] + np.einsum("ij,ij->i", xb, xb)
        dist[start:start + batch] = np.maximum(best, 0.0)
    return labels, dist


def _kmeans_plusplus(x, k, rng, n_trials):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii; several trials per step as in scikit-learn)."""
    n = x.shape[0]
    xnorm = np.einsum("ij,ij->i", x, x)
    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    first = rng.integers(n)
    centers[0] = x[first]
    closest = np.maximum(xnorm - 2.0 * (x @ x[first]) + xnorm[first], 0.0)
    for c in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:  # every point already sits on a centre: take any
            cand = rng.integers(n, size=n_trials)
        else:
            cand = np.searchsorted(np.cumsum(closest, dtype=np.float64), rng.random(n_trials) * total)
            cand = np.minimum(cand, n - 1)
        d_cand = np.maximum(xnorm[cand, None] - 2.0 * (x[cand] @ x.T) + xnorm[None, :], 0.0)
        np.minimum(d_cand, closest[None, :], out=d_cand)
        best = int(np.argmin(d_cand.sum(axis=1)))
        centers[c] = x[cand[best]]
        closest = d_cand[best]
    return centers


def _repair_empty(centroids, counts, rng):
    """Split a large cluster into each empty one (faiss's approach): both halves nudged apart."""
    eps = np.float32(1.0 / 1024.0)
    n_fixed = 0
    for c in np.flatnonzero(counts == 0):
        probs = counts / counts.sum()
        big = int(rng.choice(len(counts), p=probs))
        centroids[c] = centroids[big] * (1 + eps)
        centroids[big] *= (1 - eps)
        counts[c] = counts[big] // 2
        counts[big] -= counts[c]
        n_fixed += 1
    return n_fixed


def kmeans(x, k, *, n_iter=20, seed=0, max_points_per_centroid=256, init_points_per_centroid=32,
           n_trials=None, tol=1e-4, progressive_dim=False):
    """Cluster the rows of ``x`` into ``k`` centroids.

    Parameters
    ----------
    x : array-like of shape (n, d)
    k : int, 1 <= k <= n
    n_iter : int, maximum Lloyd iterations (stops earlier when the objective moves by < tol)
    seed : int or numpy.random.Generator
    max_points_per_centroid : int or None
        Train on at most ``k * max_points_per_centroid`` random rows (faiss uses 256).
    init_points_per_centroid : int
        k-means++ runs on a subsample of at most ``k * init_points_per_centroid`` rows,
        since each of its k steps reads every row.
    n_trials : int, candidates per k-means++ step (default 2 + log k)
    progressive_dim : bool
        Cluster in the PCA basis on a growing number of leading dimensions, each step
        starting from the previous centroids (faiss's progressive-dimension k-means):
        slower, and a better optimum in high dimensions.

    Returns
    -------
    centroids : float32 (k, d)
    """
    x = as_matrix(x, name="training vectors")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"k must be a positive integer, got {k!r}")
    if x.shape[0] < k:
        raise InvalidInputError(f"k-means needs at least k={k} training vectors, got {x.shape[0]}")
    rng = np.random.default_rng(seed)
    k = int(k)
    n = x.shape[0]
    if max_points_per_centroid and n > k * max_points_per_centroid:
        x = x[np.sort(rng.choice(n, k * max_points_per_centroid, replace=False))]
    if n_trials is None:
        n_trials = 2 + int(np.log(k))
    if progressive_dim and x.shape[1] > 1:
        return _kmeans_progressive(x, k, n_iter, rng, init_points_per_centroid, n_trials, tol)
    centroids = _seed(x, k, rng, init_points_per_centroid, n_trials)
    return _lloyd(x, centroids, n_iter, rng, tol)


def _seed(x, k, rng, init_ppc, n_trials):
    n = x.shape[0]
    init = x if n <= k * init_ppc else x[rng.choice(n, k * init_ppc, replace=False)]
    return _kmeans_plusplus(init, k, rng, n_trials)


def _lloyd(x, centroids, n_iter, rng, tol):
    from . import kernels

    k = centroids.shape[0]
    prev = np.inf
    for _ in range(n_iter):
        labels, dist = assign(x, centroids)
        obj = float(dist.mean())
        sums, counts = kernels.centroid_sums(x, labels, k)
        nonempty = counts > 0
        centroids[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
        _repair_empty(centroids, counts, rng)
        if prev - obj <= tol * max(obj, 1e-30):
            break
        prev = obj
    return centroids


def _kmeans_progressive(x, k, n_iter, rng, init_ppc, n_trials, tol, steps=10):
    d = x.shape[1]
    mean = x.mean(axis=0)
    xc = x - mean
    _, vecs = np.linalg.eigh((xc.T @ xc).astype(np.float64))
    basis = np.ascontiguousarray(vecs[:, ::-1]).astype(np.float32)  # leading components first
    xr = xc @ basis
    dims = sorted({max(1, min(d, int(round(d ** ((i + 1) / steps))))) for i in range(steps)} | {d})
    centroids = None
    for di in dims:
        xs = np.ascontiguousarray(xr[:, :di])
        if centroids is None:
            start = _seed(xs, k, rng, init_ppc, n_trials)
        else:
            start = np.zeros((k, di), dtype=np.float32)
            start[:, :centroids.shape[1]] = centroids
        centroids = _lloyd(xs, start, n_iter, rng, tol)
    return (centroids @ basis.T + mean).astype(np.float32)

"""The demo: ``python -m rvqstore.demo``.

Builds a store in a temporary folder from generated clustered data, searches it with and
without rerank, and prints recall against brute force and the bytes it keeps per vector.
"""

import tempfile
import time

import numpy as np

from .algo import ResidualQuantizer, adc_search, exact_search, rerank


def generated(n, dim, seed):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((64, dim)).astype(np.float32)
    x = centers[rng.integers(64, size=n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x.astype(np.float32)


def recall_at_10(found, truth):
    return float(np.mean([len(set(f[:10]) & set(t[:10])) / 10 for f, t in zip(found, truth)]))


def main(n=20000, dim=64, stages=8, seed=0):
    base = generated(n, dim, seed)
    queries = generated(200, dim, seed + 1)
    truth = exact_search(base, queries, k=10).ids
    t = time.perf_counter()
    rq = ResidualQuantizer.train(base, stages=stages, seed=seed)
    codes = rq.encode(base)
    norms = rq.norms(codes)
    print(f"trained {stages} stages and encoded {n} x {dim} vectors in {time.perf_counter() - t:.1f} s")
    print(f"bytes per vector: {stages} code + 4 norm (originals: {dim * 4})")
    approx = adc_search(rq, codes, queries, k=100, bias=norms)
    print(f"10-recall@10 from codes alone: {recall_at_10(approx.ids, truth):.3f}")
    exact = rerank(queries, approx.ids, lambda ids: base[ids], k=10)
    print(f"10-recall@10 with rerank x10:  {recall_at_10(exact.ids, truth):.3f}")


if __name__ == "__main__":
    main()

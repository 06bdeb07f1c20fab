"""The demo: ``python -m rvqstore.demo [N]``.

Creates a store in a temporary folder from generated clustered data (no download, no
model), searches it before and after training, deletes, adds and retrains, and prints
recall against brute force with the bytes it keeps per vector.
"""

import os
import sys
import tempfile
import time

import numpy as np

from . import Store
from .algo import exact_search


def generated(n, dim, seed):
    """Seeded Gaussian clusters, a stand-in for real embeddings."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((64, dim)).astype(np.float32)
    x = centers[rng.integers(64, size=n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x.astype(np.float32)


def recall_at_10(found, truth):
    return float(np.mean([len(set(f[:10]) & set(t[:10])) / 10 for f, t in zip(found, truth)]))


def main(n=20000, dim=64, stages=8):
    base = generated(n, dim, seed=0)
    queries = generated(200, dim, seed=1)
    truth = exact_search(base, queries, k=10).ids
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "demo.db")
        with Store.open(path, dim=dim, stages=stages) as store:
            t = time.perf_counter()
            store.add(base)
            print(f"added {n} vectors of dim {dim} in {time.perf_counter() - t:.2f} s")
            res = store.search(queries, k=10)
            print(f"before training (exact search):  10-recall@10 = {recall_at_10(res.ids, truth):.3f}")
            t = time.perf_counter()
            store.train()
            print(f"trained {stages} stages and encoded everything in {time.perf_counter() - t:.1f} s")
            codes_only = store.search(queries, k=10, rerank=1)
            print(f"codes alone ({stages} + 4 bytes/vector): 10-recall@10 = "
                  f"{recall_at_10(codes_only.ids, truth):.3f}")
            before = store.info()["search_plans"]["originals_read"]
            res = store.search(queries, k=10)
            reads = (store.info()["search_plans"]["originals_read"] - before) / len(queries)
            print(f"with exact rerank:               10-recall@10 = {recall_at_10(res.ids, truth):.3f} "
                  f"({reads:.0f} originals read per query)")
            print(f"deleted {store.delete(np.arange(100))} vectors; {len(store)} left")
            store.add(generated(1000, dim, seed=2))
            info = store.retrain()
            print(f"retrained: codebook version {info['codebook_version']}, "
                  f"mean squared error {info['train_mse']:.3f}, {info['count']} vectors, "
                  f"{info['bytes']['file'] + info['bytes']['wal']:,} bytes on disk")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000)

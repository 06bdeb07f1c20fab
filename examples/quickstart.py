"""Quickstart: create, add, train, search, delete, retrain on generated data.

    python examples/quickstart.py [N]

Prints recall against brute force at each step.
"""

import os
import sys
import tempfile

import numpy as np

from rvqstore import Store
from rvqstore.algo import exact_search


def main(n=5000, dim=32):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((32, dim)).astype(np.float32)
    vectors = (centers[rng.integers(32, size=n)]
               + 0.4 * rng.standard_normal((n, dim))).astype(np.float32)
    queries = vectors[:50] + 0.05 * rng.standard_normal((50, dim)).astype(np.float32)

    def recall(ids, live):
        truth = live[exact_search(vectors[live], queries, k=10).ids]
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])

    path = os.path.join(tempfile.mkdtemp(), "quickstart.db")
    with Store.open(path, dim=dim, stages=8, codebook_size=256) as store:
        ids = store.add(vectors, keys=[f"doc-{i}" for i in range(n)])
        live = np.arange(n)
        print(f"exact (untrained) recall@10: {recall(store.search(queries, k=10).ids, live):.3f}")
        store.train()
        print(f"trained, rerank x10 recall@10: {recall(store.search(queries, k=10).ids, live):.3f}")
        store.delete(ids[:500])
        live = live[500:]
        print(f"after deleting 500, recall@10: {recall(store.search(queries, k=10).ids, live):.3f}")
        store.retrain()
        print(f"retrained, recall@10:          {recall(store.search(queries, k=10).ids, live):.3f}")
        print("nearest to doc-600:", store.search(store.get(keys=["doc-600"])[0], k=3,
                                                  with_keys=True).keys)
    return path


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)

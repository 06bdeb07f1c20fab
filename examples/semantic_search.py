"""Semantic search over the shipped WordNet sample: real sentence embeddings, no model needed.

    python examples/semantic_search.py [N] [PATH]

Builds a store from the first N (default all 5,000) all-MiniLM-L6-v2 embeddings of WordNet
glosses in ``examples/data/wordnet-sample``, keyed ``wn-<row>``, trains it, and prints the
nearest glosses of a few stored items looked up by key. The texts stay beside the store, in
this script: the store keeps vectors and keys, the key leads back to the text. With PATH the
store is kept there and a second run reuses it (rows already stored are skipped).
"""

import os
import pathlib
import sys
import tempfile

import numpy as np

from rvqstore import Store

DATA = pathlib.Path(__file__).resolve().parent / "data" / "wordnet-sample"
SHOW = ["wn-0", "wn-3", "wn-147", "wn-862", "wn-1417"]
"""Items whose neighbours are printed (those within the first N rows)."""


def load_sample(n=None):
    """The first ``n`` sample rows: float32 embeddings (n, 384) and their texts."""
    vectors = np.load(DATA / "embeddings.npy")[:n].astype(np.float32)
    texts = (DATA / "texts.txt").read_text(encoding="utf-8").split("\n")[:-1][:n]
    return vectors, texts


def main(n=None, path=None):
    """Build (or reuse) the store at ``path`` from ``n`` rows; returns {key: neighbour keys}."""
    vectors, texts = load_sample(n)
    n = len(vectors)
    keys = [f"wn-{i}" for i in range(n)]
    text_of = dict(zip(keys, texts))
    path = path or os.path.join(tempfile.mkdtemp(), "wordnet.db")
    # k-means wants many vectors per codeword: a small sample gets 16 codewords per stage
    new = dict(stages=16, codebook_size=256 if n >= 4096 else 16)
    with Store.open(path, dim=vectors.shape[1], metric="cosine",
                    **({} if os.path.exists(path) else new)) as store:
        store.add(vectors, keys=keys, skip_existing_keys=True)
        if not store.info()["trained"] and len(store) >= store.config.codebook_size:
            store.train()
        info = store.info()
        how = (f"ADC over {info['stages']}-byte codes ({info['codebook_size']} codewords per "
               "stage), exact rerank" if info["trained"] else "exact (too few vectors to train)")
        print(f"{len(store)} WordNet glosses in {path}, search: {how}")
        shown = [k for k in SHOW if k in text_of] or keys[:1]
        neighbours = {}
        for key in shown:
            query = store.get(keys=[key])[0]
            res = store.search(query, k=6, with_keys=True)
            print(f"\n{key}  {text_of[key]:.100}")
            for found, dist in zip(res.keys, res.distances):
                if found != key:  # the item itself comes first, at distance 0
                    print(f"  {1 - dist:.3f}  {found:>8}  {text_of.get(found, '?'):.90}")
            neighbours[key] = res.keys
    return neighbours


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None, sys.argv[2] if len(sys.argv) > 2 else None)

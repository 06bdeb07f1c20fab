"""A LangChain ``VectorStore`` over an rvqstore file (``pip install 'rvqstore[langchain]'``).

Documents are stored items: the LangChain id is the item's key, ``page_content`` its
document and ``metadata`` its metadata (the types the store's metadata takes: strings,
numbers, booleans, lists of those; see :mod:`rvqstore.filters`). Adding an id that is
stored replaces it (the store's upsert). ``filter=`` is the store's ``where`` (MongoDB
style). Scores are the store's distances (smaller is nearer; squared L2 by default).

One store connection serves every thread: calls are serialised by a lock (LangChain's async
methods run the sync ones in a thread pool).
"""

import math
import threading
import uuid
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore
from langchain_core.vectorstores.utils import maximal_marginal_relevance

from ..cache import EmbeddingCache
from ..store import Store

__all__ = ["RvqstoreVectorStore", "RvqstoreCachedEmbeddings"]


class RvqstoreVectorStore(VectorStore):
    """LangChain's view of the store at ``path``, embedding texts with ``embedding``;
    ``store_options`` go to :meth:`rvqstore.Store.open` (``metric=``, ``partitions=``...)."""

    def __init__(self, embedding: Embeddings, path, **store_options: Any):
        self._embedding = embedding
        self._store = Store.open(path, **store_options)
        self._lock = threading.RLock()

    @property
    def embeddings(self) -> Embeddings:
        return self._embedding

    @property
    def store(self) -> Store:
        """The underlying :class:`rvqstore.Store` (use it under no other thread's call)."""
        return self._store

    def close(self) -> None:
        with self._lock:
            self._store.close()

    # -- writing ---------------------------------------------------------------------------

    def add_texts(self, texts: Iterable[str], metadatas: Optional[List[dict]] = None, *,
                  ids: Optional[List[Optional[str]]] = None, **kwargs: Any) -> List[str]:
        texts = list(texts)
        if not texts:
            return []
        if ids is None:
            ids = [None] * len(texts)
        if len(ids) != len(texts) or (metadatas is not None and len(metadatas) != len(texts)):
            raise ValueError(f"{len(texts)} texts, {len(ids)} ids and "
                             f"{len(metadatas) if metadatas is not None else 0} metadatas")
        keys = [str(uuid.uuid4()) if i is None else str(i) for i in ids]
        metas = [dict(m) if m else None for m in metadatas] if metadatas is not None else None
        vectors = np.asarray(self._embedding.embed_documents(texts), np.float32)
        # the last of repeated ids wins, as successive adds would
        last = {k: j for j, k in enumerate(keys)}
        keep = sorted(last.values())
        with self._lock:
            self._store.upsert(vectors[keep], keys=[keys[j] for j in keep],
                               metadata=None if metas is None else [metas[j] for j in keep],
                               documents=[texts[j] for j in keep])
        return keys

    def delete(self, ids: Optional[List[str]] = None, **kwargs: Any) -> Optional[bool]:
        """Delete the documents of ``ids`` (ids not stored are ignored)."""
        if ids is None:
            raise ValueError("delete needs ids")
        with self._lock:
            found = self._store.ids_for_keys([str(i) for i in ids], missing="skip")
            found = np.unique(found[found >= 0])
            if len(found):
                self._store.delete(found)
        return True

    # -- reading ---------------------------------------------------------------------------

    def get_by_ids(self, ids: Sequence[str], /) -> List[Document]:
        with self._lock:
            keys = [str(i) for i in ids]
            found = self._store.ids_for_keys(keys, missing="skip")
            rows = [(k, int(i)) for k, i in zip(keys, found) if i >= 0]
            if not rows:
                return []
            at = [i for _, i in rows]
            docs = self._store.documents(at)
            metas = self._store.metadata(at)
        return [Document(id=k, page_content=d or "", metadata=m or {})
                for (k, _), d, m in zip(rows, docs, metas)]

    def _ranked(self, vector, k, filter, with_vectors=False):
        with self._lock:
            if len(self._store) == 0:
                return []
            res = self._store.search(np.asarray(vector, np.float32), k=k, where=filter,
                                     with_keys=True, with_metadata=True, with_documents=True)
            hits = [(int(i), key, float(d), m, doc) for i, key, d, m, doc in
                    zip(res.ids, res.keys, res.distances, res.metadata, res.documents) if i >= 0]
            vecs = self._store.get([h[0] for h in hits]) if with_vectors and hits else None
        out = [(Document(id=key, page_content=doc or "", metadata=m or {}), d)
               for _, key, d, m, doc in hits]
        return (out, vecs) if with_vectors else out

    def similarity_search_with_score(self, query: str, k: int = 4,
                                     filter: Optional[dict] = None,
                                     **kwargs: Any) -> List[Tuple[Document, float]]:
        return self._ranked(self._embedding.embed_query(query), k, filter)

    def similarity_search_by_vector_with_score(self, embedding: List[float], k: int = 4,
                                               filter: Optional[dict] = None,
                                               **kwargs: Any) -> List[Tuple[Document, float]]:
        return self._ranked(embedding, k, filter)

    def similarity_search(self, query: str, k: int = 4, filter: Optional[dict] = None,
                          **kwargs: Any) -> List[Document]:
        return [d for d, _ in self.similarity_search_with_score(query, k, filter)]

    def similarity_search_by_vector(self, embedding: List[float], k: int = 4,
                                    filter: Optional[dict] = None,
                                    **kwargs: Any) -> List[Document]:
        return [d for d, _ in self._ranked(embedding, k, filter)]

    def max_marginal_relevance_search_by_vector(self, embedding: List[float], k: int = 4,
                                                fetch_k: int = 20, lambda_mult: float = 0.5,
                                                filter: Optional[dict] = None,
                                                **kwargs: Any) -> List[Document]:
        got = self._ranked(embedding, max(fetch_k, k), filter, with_vectors=True)
        if not got:
            return []
        ranked, vecs = got
        chosen = maximal_marginal_relevance(np.asarray(embedding, np.float32), vecs, k=k,
                                            lambda_mult=lambda_mult)
        return [ranked[j][0] for j in chosen]

    def max_marginal_relevance_search(self, query: str, k: int = 4, fetch_k: int = 20,
                                      lambda_mult: float = 0.5, filter: Optional[dict] = None,
                                      **kwargs: Any) -> List[Document]:
        return self.max_marginal_relevance_search_by_vector(
            self._embedding.embed_query(query), k, fetch_k, lambda_mult, filter)

    def _select_relevance_score_fn(self):
        """Relevance in [0, 1] from the store's distance: squared L2 of unit vectors is
        0..4, so 1 - sqrt(d) / 2; cosine distance 0..2, so 1 - d / 2; inner product: -d."""
        metric = self._store.metric
        if metric == "cosine":
            return lambda d: 1.0 - d / 2.0
        if metric == "ip":
            return lambda d: -d
        return lambda d: 1.0 - math.sqrt(max(d, 0.0)) / 2.0

    @classmethod
    def from_texts(cls, texts: List[str], embedding: Embeddings,
                   metadatas: Optional[List[dict]] = None, *,
                   ids: Optional[List[str]] = None, path=None,
                   **kwargs: Any) -> "RvqstoreVectorStore":
        """A store at ``path`` (required) holding ``texts``; other keyword arguments go to
        :meth:`rvqstore.Store.open`."""
        if path is None:
            raise ValueError("from_texts needs path=, the store file")
        store = cls(embedding, path, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store


QUERY_MARK = "\0query\0"
"""Prefix of a query's text in the cache's keys (queries and documents may embed
differently); a document text may not start with it."""


class RvqstoreCachedEmbeddings(Embeddings):
    """Any LangChain ``Embeddings`` with its results kept in an rvqstore file
    (:class:`rvqstore.EmbeddingCache`): each text is embedded once per ``model`` name,
    across calls, runs and processes sharing the file; queries are cached apart from
    documents (``cache_queries=False`` leaves them uncached). The vectors come back as
    stored: float32, and unchanged otherwise (the cache's store uses ``metric="l2"`` unless
    ``store_options`` say otherwise). An alternative to LangChain's ``CacheBackedEmbeddings``
    whose file is also a searchable store.
    """

    def __init__(self, underlying: Embeddings, path, *, model: str, cache_queries: bool = True,
                 batch_size: int = 64, **store_options: Any):
        self._underlying = underlying
        self._cache_queries = cache_queries
        self._lock = threading.RLock()
        store_options.setdefault("metric", "l2")
        self._cache = EmbeddingCache.open(path, model=model, embed=self._compute,
                                          batch_size=batch_size, **store_options)

    @property
    def cache(self) -> EmbeddingCache:
        return self._cache

    def close(self) -> None:
        with self._lock:
            self._cache.close()

    def _compute(self, texts):
        out = [None] * len(texts)
        docs = [j for j, t in enumerate(texts) if not t.startswith(QUERY_MARK)]
        if docs:
            for j, v in zip(docs, self._underlying.embed_documents([texts[j] for j in docs])):
                out[j] = v
        for j, t in enumerate(texts):
            if t.startswith(QUERY_MARK):
                out[j] = self._underlying.embed_query(t[len(QUERY_MARK):])
        return np.asarray(out, np.float32)

    def embed_documents(self, texts: List[str]) -> List[List[float]]:
        texts = list(texts)
        bad = next((t for t in texts if isinstance(t, str) and t.startswith(QUERY_MARK)), None)
        if bad is not None:
            raise ValueError(f"a document text may not start with {QUERY_MARK!r}: {bad[:40]!r}")
        with self._lock:
            return self._cache.embed(texts).tolist()

    def embed_query(self, text: str) -> List[float]:
        if not self._cache_queries:
            return self._underlying.embed_query(text)
        with self._lock:
            return self._cache.embed([QUERY_MARK + text])[0].tolist()

"""A LlamaIndex vector store over an rvqstore file (``pip install 'rvqstore[llama-index]'``).

Nodes are stored items: the node id is the item's key, the node's text its document (so
the store's keyword and hybrid search see it) and the node's metadata its metadata (the
types the store's metadata takes: strings, numbers, booleans, lists of those; see
:mod:`rvqstore.filters`). Like LlamaIndex's other stores (``node_to_metadata_dict``), the
metadata also holds ``ref_doc_id``, ``doc_id`` and ``document_id`` (the source document's
id, for ``delete(ref_doc_id)`` and filters), ``_node_type`` and ``_node_content``: the rest
of the node (relationships, character span...) as JSON without its text, metadata or
embedding, and without fields left at their defaults. The store keeps metadata in memory
to filter it, so each node costs its ``_node_content`` there too (a few hundred bytes for a
chunk with source, previous and next relationships).

Adding a node whose id is stored replaces it (the store's upsert).

``MetadataFilters`` become the store's ``where``, with the meaning LlamaIndex's own filter
function (``build_metadata_filter_fn``) gives them, operator by operator, including its
Python equality (``1 == True``), and its rule that a missing or None value passes only
``!=`` and ``nin``: ``==``, ``!=``, ``>``, ``>=``, ``<``, ``<=``, ``in``, ``nin``,
``contains`` (a list member, or a piece of a string), ``any``, ``all``, ``text_match``,
``text_match_insensitive``, ``is_empty``; conditions ``and``, ``or`` and ``not``, nested
to any depth. What the store cannot express (``==`` with a list value, an ``in`` whose
value is not a list) is refused with a ``ValueError`` naming it.

Query modes: ``default`` (vector search, exact rerank), ``mmr`` (``mmr_threshold``),
``text_search`` (the store's BM25 keyword ranking of the documents) and ``hybrid`` (the
store's fusion of both by reciprocal rank; ``alpha`` is not used). Similarities are
computed from the store's distances: cosine similarity for ``metric="cosine"``, the inner
product for ``"ip"`` and ``1 / (1 + d)`` for squared L2 (the default metric).

One store connection serves every thread: calls are serialised by a lock (LlamaIndex's
async methods call the sync ones).
"""

import json
import threading
from typing import Any, List, Optional, Sequence

import numpy as np
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.indices.query.embedding_utils import get_top_k_mmr_embeddings
from llama_index.core.schema import BaseNode, MetadataMode
from llama_index.core.vector_stores.types import (BasePydanticVectorStore, FilterCondition,
                                                   FilterOperator, MetadataFilter,
                                                   MetadataFilters, VectorStoreQuery,
                                                   VectorStoreQueryMode,
                                                   VectorStoreQueryResult)
from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict

from ..store import Store

__all__ = ["RvqstoreVectorStore", "to_where", "RESERVED_KEYS"]

RESERVED_KEYS = ("_node_content", "_node_type", "document_id", "doc_id", "ref_doc_id")
"""Metadata keys the store writes beside a node's own metadata (LlamaIndex's names)."""


class RvqstoreVectorStore(BasePydanticVectorStore):
    """LlamaIndex's view of the store at ``path``; ``store_options`` go to
    :meth:`rvqstore.Store.open` (``metric=``, ``partitions=``...). The vectors come from the
    nodes (LlamaIndex embeds them before ``add``)."""

    stores_text: bool = True
    flat_metadata: bool = False

    _store: Store = PrivateAttr()
    _lock: Any = PrivateAttr()

    def __init__(self, path, **store_options: Any):
        super().__init__()
        self._store = Store.open(path, **store_options)
        self._lock = threading.RLock()

    @classmethod
    def class_name(cls) -> str:
        return "RvqstoreVectorStore"

    @property
    def client(self) -> Store:
        """The underlying :class:`rvqstore.Store` (use it under no other thread's call)."""
        return self._store

    @property
    def store(self) -> Store:
        return self._store

    def close(self) -> None:
        with self._lock:
            self._store.close()

    # -- writing ---------------------------------------------------------------------------

    def add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> List[str]:
        """Store ``nodes`` (each with its embedding); a node id already stored is replaced,
        and of repeated ids in one call the last wins. Returns the node ids."""
        nodes = list(nodes)
        if not nodes:
            return []
        missing = [n.node_id for n in nodes if n.embedding is None]
        if missing:
            raise ValueError(f"{len(missing)} nodes have no embedding (first: {missing[0]!r}); "
                             "embed them first (VectorStoreIndex does)")
        last = {n.node_id: j for j, n in enumerate(nodes)}
        keep = [nodes[j] for j in sorted(last.values())]
        vectors = np.asarray([n.embedding for n in keep], np.float32)
        metas = [_stored_metadata(n) for n in keep]
        texts = [n.get_content(metadata_mode=MetadataMode.NONE) or None for n in keep]
        with self._lock:
            self._store.upsert(vectors, keys=[n.node_id for n in keep], metadata=metas,
                               documents=texts)
        return [n.node_id for n in nodes]

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of the source document ``ref_doc_id`` (none stored: nothing)."""
        with self._lock:
            if len(self._store):
                self._store.delete(where={"ref_doc_id": str(ref_doc_id)})

    def delete_nodes(self, node_ids: Optional[List[str]] = None,
                     filters: Optional[MetadataFilters] = None, **delete_kwargs: Any) -> None:
        """Delete the nodes of ``node_ids`` (ids not stored are ignored) that pass
        ``filters``; with neither, nothing (``clear()`` deletes all)."""
        if node_ids is None and filters is None:
            return
        with self._lock:
            ids = self._selected(node_ids, filters)
            if len(ids):
                self._store.delete(ids)

    def clear(self) -> None:
        """Delete every node."""
        with self._lock:
            if len(self._store):
                self._store.delete(where={})

    # -- reading ---------------------------------------------------------------------------

    def get_nodes(self, node_ids: Optional[List[str]] = None,
                  filters: Optional[MetadataFilters] = None) -> List[BaseNode]:
        """The stored nodes of ``node_ids`` (in that order; ids not stored are left out)
        that pass ``filters``; with neither, every node (by insertion)."""
        with self._lock:
            ids = self._selected(node_ids, filters, keep_order=True)
            if not len(ids):
                return []
            at = ids.tolist()
            vectors = self._store.get(at)
            return [_node(m, d, v) for m, d, v in
                    zip(self._store.metadata(at), self._store.documents(at), vectors)]

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        mode = query.mode
        k = query.similarity_top_k
        if mode == VectorStoreQueryMode.HYBRID and query.hybrid_top_k:
            k = query.hybrid_top_k
        where = _restrict(to_where(query.filters), query.doc_ids)
        with self._lock:
            if len(self._store) == 0 or k < 1:
                return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
            exclude = self._outside(query.node_ids)
            if exclude is _NOTHING:
                return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
            if mode == VectorStoreQueryMode.TEXT_SEARCH:
                if not query.query_str:
                    raise ValueError("text_search needs query_str")
                if exclude is not None:
                    raise ValueError("text_search does not take node_ids")
                res = self._store.text_search(query.query_str, k=k, where=where)
                # the store ranks keyword matches by BM25 as a distance (smaller is
                # better): as a similarity, its negative
                hits = [(int(i), -float(s)) for i, s in zip(res.ids, res.distances) if i >= 0]
                return self._result(hits)
            if query.query_embedding is None:
                raise ValueError(f"a {mode.value} query needs query_embedding")
            q = np.asarray(query.query_embedding, np.float32)
            if mode == VectorStoreQueryMode.DEFAULT:
                res = self._store.search(q, k=k, where=where, exclude=exclude)
            elif mode == VectorStoreQueryMode.HYBRID:
                if not query.query_str:
                    raise ValueError("hybrid needs query_str")
                res = self._store.search(q, k=k, where=where, exclude=exclude,
                                         text=query.query_str)
            elif mode == VectorStoreQueryMode.MMR:
                return self._mmr(q, k, where, exclude, query.mmr_threshold
                                 if query.mmr_threshold is not None
                                 else kwargs.get("mmr_threshold"), kwargs)
            else:
                raise ValueError(f"query mode {mode.value!r} is not supported "
                                 "(default, mmr, text_search, hybrid are)")
            sim = self._similarity()
            hits = [(int(i), sim(float(d))) for i, d in zip(res.ids, res.distances)
                    if i >= 0]
            return self._result(hits)

    def _mmr(self, q, k, where, exclude, threshold, kwargs):
        fetch_k = max(int(kwargs.get("mmr_prefetch_k") or 0),
                      k * int(kwargs.get("mmr_prefetch_factor") or 4))
        res = self._store.search(q, k=fetch_k, where=where, exclude=exclude)
        ids = [int(i) for i in res.ids if i >= 0]
        if not ids:
            return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
        vectors = self._store.get(ids)
        sims, chosen = get_top_k_mmr_embeddings(q.tolist(), vectors.tolist(),
                                                similarity_top_k=k, embedding_ids=ids,
                                                mmr_threshold=threshold)
        return self._result(list(zip(chosen, sims)))

    def _result(self, hits):
        """VectorStoreQueryResult of [(store id, similarity)], in that order."""
        if not hits:
            return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
        at = [i for i, _ in hits]
        nodes = [_node(m, d) for m, d in
                 zip(self._store.metadata(at), self._store.documents(at))]
        return VectorStoreQueryResult(nodes=nodes, similarities=[s for _, s in hits],
                                      ids=[n.node_id for n in nodes])

    def _similarity(self):
        metric = self._store.metric
        if metric == "cosine":
            return lambda d: 1.0 - d
        if metric == "ip":
            return lambda d: -d
        return lambda d: 1.0 / (1.0 + max(d, 0.0))

    def _selected(self, node_ids, filters, keep_order=False):
        """Store ids of the nodes of ``node_ids`` (None: all) passing ``filters``."""
        if len(self._store) == 0:
            return np.zeros(0, np.int64)
        where = to_where(filters)
        passing = self._store.ids(where) if where is not None else None
        if node_ids is None:
            return passing if passing is not None else self._store.ids()
        if not node_ids:
            return np.zeros(0, np.int64)
        ids = self._store.ids_for_keys([str(i) for i in node_ids], missing="skip")
        ids = ids[ids >= 0]
        if not keep_order:
            ids = np.unique(ids)
        else:
            _, first = np.unique(ids, return_index=True)
            ids = ids[np.sort(first)]
        if passing is not None:
            ids = ids[np.isin(ids, passing)]
        return ids

    def _outside(self, node_ids):
        """``exclude=`` restricting a search to ``node_ids``; None or empty: no restriction
        (``VectorStoreIndex`` passes its own, empty, node list for a store that keeps text,
        as the other integrations read it)."""
        if not node_ids:
            return None
        inside = self._store.ids_for_keys([str(i) for i in node_ids], missing="skip")
        inside = inside[inside >= 0]
        if not len(inside):
            return _NOTHING
        every = self._store.ids()
        return every[~np.isin(every, inside)]


_NOTHING = object()


def _stored_metadata(node: BaseNode) -> dict:
    """The node's metadata plus LlamaIndex's reserved keys, ``_node_content`` slimmed."""
    meta = node_to_metadata_dict(node, remove_text=True, flat_metadata=False)
    rest = node.model_dump(mode="json", exclude_defaults=True,
                           exclude={"embedding", "metadata", "text", "text_resource"})
    meta["_node_content"] = json.dumps(rest, ensure_ascii=False)
    return meta


def _node(meta: Optional[dict], text: Optional[str], vector=None) -> BaseNode:
    if not meta or "_node_content" not in meta:
        raise ValueError("a stored item without LlamaIndex's _node_content: the store was not "
                         "written by this adapter")
    node = metadata_dict_to_node(meta, text=text or "")
    node.metadata = {k: v for k, v in meta.items() if k not in RESERVED_KEYS}
    if vector is not None:
        node.embedding = vector.tolist()
    return node


def _restrict(where, doc_ids):
    if not doc_ids:
        return where
    docs = {"ref_doc_id": {"$in": [str(d) for d in doc_ids]}}
    return docs if where is None else {"$and": [where, docs]}


# ----------------------------------------------------------------------------- filters

_ORDER = {FilterOperator.GT: ("$gt", lambda a, b: a > b),
          FilterOperator.GTE: ("$gte", lambda a, b: a >= b),
          FilterOperator.LT: ("$lt", lambda a, b: a < b),
          FilterOperator.LTE: ("$lte", lambda a, b: a <= b)}
_NONE = {"$or": []}   # matches nothing
_ALL = {"$and": []}   # matches everything


def to_where(filters: Optional[MetadataFilters]) -> Optional[dict]:
    """The store's ``where`` for LlamaIndex ``MetadataFilters`` (None for None or no
    filters), with LlamaIndex's meaning (see the module docstring)."""
    if filters is None or not filters.filters:
        return None
    return _condition(filters)


def _condition(filters: MetadataFilters) -> dict:
    parts = [_condition(f) if isinstance(f, MetadataFilters) else _filter(f)
             for f in filters.filters]
    cond = filters.condition or FilterCondition.AND
    if cond == FilterCondition.AND:
        return {"$and": parts}
    if cond == FilterCondition.OR:
        return {"$or": parts}
    if cond == FilterCondition.NOT:  # none of them
        return {"$not": {"$or": parts}}
    raise ValueError(f"filter condition {cond!r} is not supported (and, or, not are)")


def _equals(x) -> list:
    """The stored values Python's ``==`` calls equal to the filter value x (1 == True)."""
    if isinstance(x, (int, float)) and x in (0, 1):
        return [x, bool(x)]
    return [x]


def _present(key):
    """The field holds a value (LlamaIndex reads a missing field and None alike)."""
    return {key: {"$exists": True, "$ne": None}}


def _piece(key, x):
    """Python's ``x in value``: a list member or, for a string value, a piece of it."""
    member = {"$or": [{key: {"$contains": e}} for e in _equals(x)]}
    if isinstance(x, str):
        return {"$or": [member, {key: {"$substring": x}}]}
    return member


def _filter(f: MetadataFilter) -> dict:
    key, op, x = f.key, f.operator, f.value
    if op == FilterOperator.IS_EMPTY:
        return {"$or": [{key: {"$exists": False}}, {key: None}, {key: ""},
                        {key: {"$size": 0}}]}
    if op in (FilterOperator.EQ, FilterOperator.NE):
        if isinstance(x, list):
            raise ValueError(f"filter {op.value!r} on {key!r} with a list value is not "
                             "supported (use in, any or all)")
        eq = _NONE if x is None else {key: {"$in": _equals(x)}}
        return eq if op == FilterOperator.EQ else {"$not": eq}
    if op in (FilterOperator.IN, FilterOperator.NIN):
        if not isinstance(x, list):
            raise ValueError(f"filter {op.value!r} on {key!r} needs a list value, "
                             f"got {type(x).__name__}")
        vals = [e for v in x if v is not None for e in _equals(v)]
        inside = {key: {"$in": vals}} if vals else _NONE
        return inside if op == FilterOperator.IN else {"$not": inside}
    if op in _ORDER:
        if not isinstance(x, (int, float, str)):
            raise ValueError(f"filter {op.value!r} on {key!r} needs a number or a string, "
                             f"got {type(x).__name__}")
        name, cmp = _ORDER[op]
        parts = [{key: {name: x}}]
        if isinstance(x, (int, float)):  # Python orders bools as 0 and 1
            bools = [b for b in (False, True) if cmp(b, x)]
            if bools:
                parts.append({key: {"$in": bools}})
        return parts[0] if len(parts) == 1 else {"$or": parts}
    if op == FilterOperator.CONTAINS:
        if isinstance(x, list) or x is None:
            raise ValueError(f"filter 'contains' on {key!r} needs one value, got "
                             f"{type(x).__name__}")
        return _piece(key, x)
    if op in (FilterOperator.ANY, FilterOperator.ALL):
        if not isinstance(x, list):
            raise ValueError(f"filter {op.value!r} on {key!r} needs a list value, "
                             f"got {type(x).__name__}")
        pieces = [_piece(key, v) for v in x]
        if op == FilterOperator.ANY:
            return {"$or": pieces}
        return {"$and": [_present(key)] + pieces}
    if op in (FilterOperator.TEXT_MATCH, FilterOperator.TEXT_MATCH_INSENSITIVE):
        if not isinstance(x, str):
            raise ValueError(f"filter {op.value!r} on {key!r} needs a string, got "
                             f"{type(x).__name__}")
        name = "$substring" if op == FilterOperator.TEXT_MATCH else "$isubstring"
        return {key: {name: x}}
    raise ValueError(f"filter operator {op!r} is not supported")

"""The LlamaIndex vector store. LlamaIndex ships no conformance suite, so: a VectorStoreIndex
built over it and queried end to end (the same answers as LlamaIndex's own in-memory
SimpleVectorStore, and after reopening the file), every filter operator and condition
checked against LlamaIndex's own Python filter function on the same nodes, and the store
methods (delete by source document, delete_nodes, get_nodes, clear, query modes).

Outside CI a machine without llama-index-core skips these; CI (.ci/run sets RVQSTORE_CI=1)
installs the extra and fails here if it cannot import it.
"""

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("RVQSTORE_CI"):
    import llama_index.core  # noqa: F401  CI installs it: missing fails here
else:
    pytest.importorskip("llama_index.core")

from llama_index.core import Document, StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.base.embeddings.base import BaseEmbedding  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode  # noqa: E402
from llama_index.core.vector_stores.types import (FilterCondition, FilterOperator,  # noqa: E402
                                                   MetadataFilter, MetadataFilters,
                                                   VectorStoreQuery, VectorStoreQueryMode)
from llama_index.core.vector_stores.utils import build_metadata_filter_fn  # noqa: E402

from rvqstore.integrations.llama_index import RvqstoreVectorStore, to_where  # noqa: E402

DIM = 256
STOP = {"a", "an", "and", "the", "in", "at", "on", "of", "from", "with", "what", "which",
        "where", "do", "before", "across"}


class WordsEmbedding(BaseEmbedding):
    """A deterministic bag-of-words embedding: each word hashed to a seeded random vector,
    summed, unit length. Texts sharing words are near; no model, no network."""

    def _vector(self, text):
        v = np.zeros(DIM)
        for w in re.findall(r"\w+", text.lower()):
            if w in STOP:
                continue
            seed = int.from_bytes(hashlib.sha256(w.encode()).digest()[:4], "little")
            v += np.random.default_rng(seed).standard_normal(DIM)
        n = np.linalg.norm(v)
        return (v / n if n else v).tolist()

    def _get_text_embedding(self, text):
        return self._vector(text)

    def _get_query_embedding(self, query):
        return self._vector(query)

    async def _aget_query_embedding(self, query):
        return self._vector(query)


TOPICS = {
    "cats": "Cats purr and sleep in the sun. A cat chases mice at night. Kittens play with yarn.",
    "ships": "Ships sail across the ocean. A harbour shelters boats from storms. Sailors "
             "tie knots on deck.",
    "bread": "Bakers knead dough before dawn. Bread rises in a warm oven. Flour and yeast "
             "make a loaf.",
    "stars": "Stars shine in the night sky. Telescopes reveal distant galaxies. A comet "
             "crosses the sky.",
}


def _documents():
    return [Document(text=(text + " ") * 3, id_=f"doc-{name}",
                     metadata={"topic": name, "year": 2020 + i, "tags": [name, "demo"]})
            for i, (name, text) in enumerate(TOPICS.items())]


def _index(vector_store, embed):
    ctx = StorageContext.from_defaults(vector_store=vector_store)
    return VectorStoreIndex.from_documents(
        _documents(), storage_context=ctx, embed_model=embed,
        transformations=[SentenceSplitter(chunk_size=60, chunk_overlap=0)])


@pytest.fixture()
def embed():
    return WordsEmbedding(model_name="words")


@pytest.fixture()
def vs(tmp_path):
    store = RvqstoreVectorStore(tmp_path / "li.db", metric="cosine")
    yield store
    store.close()


# ----------------------------------------------------------------------------- end to end

QUESTIONS = ["which cat purr sun kittens", "where do boats shelter from storms",
             "what bread rises in a warm oven", "what do telescopes reveal in the sky"]


def test_index_end_to_end_matches_llama_index_own_store(vs, embed):
    ours = _index(vs, embed)
    theirs = _index(None, embed)  # LlamaIndex's in-memory SimpleVectorStore
    assert len(vs.store) > len(TOPICS)  # the splitter made several nodes per document
    for q, topic in zip(QUESTIONS, TOPICS):
        got = ours.as_retriever(similarity_top_k=3).retrieve(q)
        want = theirs.as_retriever(similarity_top_k=3).retrieve(q)
        assert [n.node.get_content() for n in got] == [n.node.get_content() for n in want]
        assert np.allclose([n.score for n in got], [n.score for n in want], atol=1e-5)
        top = got[0].node
        assert top.metadata["topic"] == topic and top.ref_doc_id == f"doc-{topic}"
        assert top.relationships[NodeRelationship.SOURCE].node_id == f"doc-{topic}"


def test_reopened_file_answers_the_same(tmp_path, embed):
    first = RvqstoreVectorStore(tmp_path / "keep.db", metric="cosine")
    before = [n.node.node_id for n in
              _index(first, embed).as_retriever(similarity_top_k=4).retrieve(QUESTIONS[1])]
    nodes = {n.node_id: n for n in first.get_nodes()}
    first.close()
    again = RvqstoreVectorStore(tmp_path / "keep.db")
    index = VectorStoreIndex.from_vector_store(again, embed_model=embed)
    after = index.as_retriever(similarity_top_k=4).retrieve(QUESTIONS[1])
    assert [n.node.node_id for n in after] == before
    for n in after:  # the node comes back whole: text, metadata, relationships, span
        want = nodes[n.node.node_id]
        assert n.node.get_content() == want.get_content()
        assert n.node.metadata == want.metadata
        assert n.node.relationships == want.relationships
        assert (n.node.start_char_idx, n.node.end_char_idx) == (want.start_char_idx,
                                                               want.end_char_idx)
    again.close()


def test_filtered_retrieval_and_query_engine(vs, embed):
    from llama_index.core.llms import MockLLM

    index = _index(vs, embed)
    only_bread = MetadataFilters(filters=[MetadataFilter(key="topic", value="bread")])
    got = index.as_retriever(similarity_top_k=5, filters=only_bread).retrieve(QUESTIONS[0])
    assert got and {n.node.metadata["topic"] for n in got} == {"bread"}
    engine = index.as_query_engine(llm=MockLLM(), similarity_top_k=2)
    answer = engine.query(QUESTIONS[3])
    assert answer.source_nodes[0].node.metadata["topic"] == "stars"


# ----------------------------------------------------------------------------- filters

VALUES = [  # per node: what LlamaIndex's filter function must tell apart
    {"n": 1, "s": "Apple pie", "tags": ["a", "b"], "nums": [1, 2]},
    {"n": 2.5, "s": "apple", "tags": ["b"], "nums": [3]},
    {"n": True, "s": "", "tags": [], "nums": []},
    {"n": 0, "s": "banana split", "tags": ["c", "a"], "nums": [0, 1]},
    {"n": None, "s": None, "tags": None, "nums": None},
    {},
    {"n": -3, "s": "Cherry", "tags": ["x"], "nums": [2]},
    {"n": 1.0, "s": "pie", "tags": ["a"], "nums": [True]},
    {"n": False, "s": "APPLE", "tags": ["B", "b"], "nums": [5, 1]},
]

CASES = [  # (key, operator, values to try)
    ("n", FilterOperator.EQ, [1, 0, 2.5, 7, "1"]),
    ("s", FilterOperator.EQ, ["apple", "", "pie"]),
    ("n", FilterOperator.NE, [1, 0, 2.5]),
    ("s", FilterOperator.NE, ["apple", ""]),
    ("n", FilterOperator.GT, [0, 1, -5, 0.5]),
    ("n", FilterOperator.GTE, [1, 0, 2.5]),
    ("n", FilterOperator.LT, [1, 0, 2.5]),
    ("n", FilterOperator.LTE, [1, 0, -3]),
    ("s", FilterOperator.GT, ["apple", "B"]),
    ("s", FilterOperator.LTE, ["apple", "Cherry"]),
    ("n", FilterOperator.IN, [[1, 2.5], [0], [7, -3], []]),
    ("s", FilterOperator.IN, [["apple", "pie"], [""]]),
    ("n", FilterOperator.NIN, [[1, 2.5], [0], []]),
    ("s", FilterOperator.NIN, [["apple", "pie"]]),
    ("tags", FilterOperator.CONTAINS, ["a", "b", "zz"]),
    ("nums", FilterOperator.CONTAINS, [1, 2, 0]),
    ("s", FilterOperator.CONTAINS, ["pie", "apple", "p"]),
    ("tags", FilterOperator.ANY, [["a", "x"], ["zz"], []]),
    ("tags", FilterOperator.ALL, [["a", "b"], ["b"], []]),
    ("nums", FilterOperator.ANY, [[1, 5], [9]]),
    ("nums", FilterOperator.ALL, [[1, 2], [1]]),
    ("s", FilterOperator.ANY, [["pie", "zz"]]),
    ("s", FilterOperator.TEXT_MATCH, ["pie", "apple", "APP", ""]),
    ("s", FilterOperator.TEXT_MATCH_INSENSITIVE, ["apple", "PIE", "cherry"]),
    ("s", FilterOperator.IS_EMPTY, [None]),
    ("tags", FilterOperator.IS_EMPTY, [None]),
    ("n", FilterOperator.IS_EMPTY, [None]),
]


@pytest.fixture()
def filter_nodes(vs):
    rng = np.random.default_rng(3)
    nodes = [TextNode(id_=f"n{i}", text=f"node {i}", metadata=m,
                      embedding=rng.standard_normal(8).tolist())
             for i, m in enumerate(VALUES)]
    vs.add(nodes)
    return {n.node_id: n.metadata for n in nodes}


def _theirs(metas, filters):
    fn = build_metadata_filter_fn(lambda node_id: metas[node_id], filters)
    return {i for i in metas if fn(i)}


def _ours(vs, filters):
    got = {n.node_id for n in vs.get_nodes(filters=filters)}
    q = VectorStoreQuery(query_embedding=[1.0] * 8, similarity_top_k=len(VALUES),
                         filters=filters)
    assert set(vs.query(q).ids) == got  # the search applies the same filter
    return got


@pytest.mark.parametrize("key, op, values", CASES, ids=[f"{c[0]}-{c[1].value}" for c in CASES])
def test_each_operator_agrees_with_llama_index_filter_function(vs, filter_nodes, key, op,
                                                               values):
    for value in values:
        filters = MetadataFilters(filters=[MetadataFilter(key=key, value=value, operator=op)])
        want = _theirs(filter_nodes, filters)
        assert _ours(vs, filters) == want, (key, op, value, to_where(filters))


def test_cases_cover_every_operator_and_tell_nodes_apart(vs, filter_nodes):
    assert {op for _, op, _ in CASES} == set(FilterOperator)
    sizes = {len(_theirs(filter_nodes, MetadataFilters(filters=[
        MetadataFilter(key=k, value=v, operator=op)]))) for k, op, vs_ in CASES for v in vs_}
    assert min(sizes) == 0 and max(sizes) == len(VALUES)  # neither always empty nor full
    assert len(sizes) >= 6


@pytest.mark.parametrize("condition", list(FilterCondition))
def test_conditions_agree_with_llama_index(vs, filter_nodes, condition):
    parts = [MetadataFilter(key="n", value=1, operator=FilterOperator.GTE),
             MetadataFilter(key="tags", value="a", operator=FilterOperator.CONTAINS),
             MetadataFilter(key="s", value="pie", operator=FilterOperator.TEXT_MATCH)]
    filters = MetadataFilters(filters=parts, condition=condition)
    want = _theirs(filter_nodes, filters)
    assert 0 < len(want) < len(VALUES)
    assert _ours(vs, filters) == want


def test_nested_filters(vs, filter_nodes):
    """LlamaIndex's own function refuses nesting; the store combines to any depth."""
    inner = MetadataFilters(filters=[MetadataFilter(key="s", value="apple",
                                                    operator=FilterOperator.TEXT_MATCH_INSENSITIVE),
                                     MetadataFilter(key="n", value=0,
                                                    operator=FilterOperator.EQ)],
                            condition=FilterCondition.OR)
    outer = MetadataFilters(filters=[inner, MetadataFilter(key="tags", value=["b"],
                                                           operator=FilterOperator.ANY)])
    # Apple pie (tags a b), apple (b), banana split (n=0, tags c a: no b), APPLE (B b)
    assert _ours(vs, outer) == {"n0", "n1", "n8"}


@pytest.mark.parametrize("flt, words", [
    (MetadataFilter(key="s", value=["a", "b"], operator=FilterOperator.EQ), ["'=='", "'s'",
                                                                             "list"]),
    (MetadataFilter(key="n", value="x", operator=FilterOperator.IN), ["'in'", "'n'",
                                                                       "needs a list"]),
    (MetadataFilter(key="tags", value="a", operator=FilterOperator.ALL), ["'all'",
                                                                          "needs a list"]),
    (MetadataFilter(key="s", value=3, operator=FilterOperator.TEXT_MATCH), ["text_match",
                                                                            "needs a string"]),
])
def test_what_the_store_cannot_express_is_refused_by_name(vs, filter_nodes, flt, words):
    with pytest.raises(ValueError) as e:
        vs.get_nodes(filters=MetadataFilters(filters=[flt]))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# ----------------------------------------------------------------------------- methods

def _nodes(doc, n, start=0):
    rng = np.random.default_rng(len(doc) + start)
    return [TextNode(id_=f"{doc}-{i}", text=f"{doc} part {i}", metadata={"part": i},
                     embedding=rng.standard_normal(8).tolist(),
                     relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=doc)})
            for i in range(start, start + n)]


def test_delete_by_source_document_and_by_node(vs):
    vs.add(_nodes("alpha", 3) + _nodes("beta", 2) + _nodes("gamma", 2))
    vs.delete("beta")
    assert sorted(n.node_id for n in vs.get_nodes()) == [
        "alpha-0", "alpha-1", "alpha-2", "gamma-0", "gamma-1"]
    vs.delete("no-such-document")  # nothing to delete: no error
    vs.delete_nodes(["alpha-1", "not-stored"])
    assert [n.node_id for n in vs.get_nodes()] == ["alpha-0", "alpha-2", "gamma-0", "gamma-1"]
    part0 = MetadataFilters(filters=[MetadataFilter(key="part", value=0)])
    vs.delete_nodes(["alpha-0", "alpha-2"], filters=part0)  # both: only alpha-0
    assert [n.node_id for n in vs.get_nodes()] == ["alpha-2", "gamma-0", "gamma-1"]
    vs.delete_nodes(filters=part0)
    assert [n.node_id for n in vs.get_nodes()] == ["alpha-2", "gamma-1"]
    vs.clear()
    assert vs.get_nodes() == [] and len(vs.store) == 0
    vs.clear()


def test_get_nodes_order_vectors_and_upsert(vs):
    nodes = _nodes("doc", 4)
    vs.add(nodes)
    got = vs.get_nodes(["doc-2", "missing", "doc-0", "doc-2"])
    assert [n.node_id for n in got] == ["doc-2", "doc-0"]
    unit = np.asarray(nodes[2].embedding) / np.linalg.norm(nodes[2].embedding)
    assert np.allclose(got[0].embedding, unit, atol=1e-6)  # a cosine store keeps unit vectors
    assert got[0].ref_doc_id == "doc" and got[0].metadata == {"part": 2}
    changed = TextNode(id_="doc-1", text="rewritten", metadata={"part": 9},
                       embedding=nodes[1].embedding)
    assert vs.add([changed]) == ["doc-1"]
    assert len(vs.store) == 4
    again = vs.get_nodes(["doc-1"])[0]
    assert again.get_content() == "rewritten" and again.metadata == {"part": 9}
    assert again.ref_doc_id is None
    assert vs.get_nodes([]) == []


def test_query_restrictions_and_modes(vs):
    vs.add(_nodes("alpha", 6) + _nodes("beta", 6))
    q = np.asarray(_nodes("alpha", 1)[0].embedding)
    plain = vs.query(VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=3))
    assert plain.ids[0] == "alpha-0" and plain.similarities[0] == pytest.approx(1.0, abs=1e-5)
    assert plain.similarities == sorted(plain.similarities, reverse=True)
    by_doc = vs.query(VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=20,
                                       doc_ids=["beta"]))
    assert sorted(by_doc.ids) == [f"beta-{i}" for i in range(6)]
    by_node = vs.query(VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=20,
                                        node_ids=["beta-3", "alpha-4", "gone"]))
    assert sorted(by_node.ids) == ["alpha-4", "beta-3"]
    assert vs.query(VectorStoreQuery(query_embedding=q.tolist(),
                                     node_ids=["gone"])).ids == []
    mmr = vs.query(VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=4,
                                    mode=VectorStoreQueryMode.MMR, mmr_threshold=0.3))
    assert len(mmr.ids) == 4 == len(set(mmr.ids)) and mmr.ids[0] == "alpha-0"
    text = vs.query(VectorStoreQuery(query_str="beta part 5", similarity_top_k=3,
                                     mode=VectorStoreQueryMode.TEXT_SEARCH))
    assert text.ids[0] == "beta-5"
    assert text.similarities == sorted(text.similarities, reverse=True)  # best first, highest
    assert text.similarities[0] > text.similarities[-1]
    text = vs.query(VectorStoreQuery(query_str="beta", similarity_top_k=3,
                                     mode=VectorStoreQueryMode.TEXT_SEARCH))
    assert len(text.ids) == 3 and all(i.startswith("beta") for i in text.ids)
    hybrid = vs.query(VectorStoreQuery(query_embedding=q.tolist(), query_str="beta part 5",
                                       similarity_top_k=3, mode=VectorStoreQueryMode.HYBRID))
    assert {"alpha-0", "beta-5"} <= set(hybrid.ids)
    with pytest.raises(ValueError, match="svm"):
        vs.query(VectorStoreQuery(query_embedding=q.tolist(), mode=VectorStoreQueryMode.SVM))
    with pytest.raises(ValueError, match="no embedding"):
        vs.add([TextNode(id_="bare", text="no vector")])


def test_empty_store_and_async(vs):
    import asyncio

    q = VectorStoreQuery(query_embedding=[0.0] * 8, similarity_top_k=2)
    assert vs.query(q).ids == [] and vs.get_nodes() == []
    vs.delete("anything")

    async def run():
        await vs.async_add(_nodes("doc", 3))
        return await vs.aquery(VectorStoreQuery(
            query_embedding=_nodes("doc", 1)[0].embedding, similarity_top_k=1))

    assert asyncio.run(run()).ids == ["doc-0"]


def test_readme_llama_index_example_runs(tmp_path, monkeypatch, capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = text.split("## LlamaIndex", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (LlamaIndex)", "exec"), {})
    assert capsys.readouterr().out.strip() == "Bread rises in a warm oven."
    assert (tmp_path / "li.db").exists()

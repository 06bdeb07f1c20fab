"""The LangChain vector store: LangChain's own standard suite, unchanged, plus what it does
not cover (filters, MMR, from_texts, a retriever, relevance scores).

Outside CI a machine without langchain-tests skips these; CI (.ci/run sets RVQSTORE_CI=1)
installs the extras and fails here if it cannot import them.
"""

import os

import pytest

if os.environ.get("RVQSTORE_CI"):
    import langchain_tests  # noqa: F401  CI installs it: missing fails here
else:
    pytest.importorskip("langchain_tests")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.embeddings import DeterministicFakeEmbedding  # noqa: E402
from langchain_tests.integration_tests import VectorStoreIntegrationTests  # noqa: E402

from rvqstore.integrations.langchain import RvqstoreVectorStore  # noqa: E402


class TestStandard(VectorStoreIntegrationTests):
    @pytest.fixture()
    def vectorstore(self, tmp_path):
        store = RvqstoreVectorStore(self.get_embeddings(), tmp_path / "lc.db")
        try:
            yield store
        finally:
            store.close()


@pytest.fixture
def filled(tmp_path):
    store = RvqstoreVectorStore(DeterministicFakeEmbedding(size=8), tmp_path / "f.db")
    texts = [f"text {i}" for i in range(40)]
    store.add_texts(texts, [{"year": 2000 + i % 5, "tag": "ab"[i % 2]} for i in range(40)],
                    ids=[f"id{i}" for i in range(40)])
    yield store, texts
    store.close()


def test_filter_is_the_stores_where(filled):
    store, texts = filled
    got = store.similarity_search("text 3", k=5, filter={"year": {"$gte": 2003}, "tag": "b"})
    assert len(got) == 5 and all(d.metadata["year"] >= 2003 and d.metadata["tag"] == "b"
                                 for d in got)
    assert got[0].page_content == "text 3" and got[0].id == "id3"
    scored = store.similarity_search_with_score("text 3", k=3)
    assert scored[0][1] == pytest.approx(0.0, abs=1e-5) and scored[1][1] > scored[0][1]


def test_mmr_retriever_and_relevance(filled):
    store, texts = filled
    mmr = store.max_marginal_relevance_search("text 7", k=4, fetch_k=20)
    assert len(mmr) == 4 and mmr[0].id == "id7" and len({d.id for d in mmr}) == 4
    docs = store.as_retriever(search_kwargs={"k": 2}).invoke("text 9")
    assert [d.id for d in docs][:1] == ["id9"] and len(docs) == 2



def test_relevance_scores_of_a_cosine_store(tmp_path):
    store = RvqstoreVectorStore(DeterministicFakeEmbedding(size=8), tmp_path / "c.db",
                                metric="cosine")
    store.add_texts([f"text {i}" for i in range(30)])
    rel = store.similarity_search_with_relevance_scores("text 9", k=5)
    assert rel[0][0].page_content == "text 9" and rel[0][1] == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 <= r <= 1.0 for _, r in rel) and rel[-1][1] < rel[0][1]
    store.close()


def test_from_texts_needs_a_path_and_persists(tmp_path):
    emb = DeterministicFakeEmbedding(size=8)
    with pytest.raises(ValueError, match="path"):
        RvqstoreVectorStore.from_texts(["a"], emb)
    store = RvqstoreVectorStore.from_texts(["alpha", "beta"], emb, ids=["a", "b"],
                                           path=tmp_path / "t.db")
    store.close()
    again = RvqstoreVectorStore(emb, tmp_path / "t.db")
    assert again.get_by_ids(["b", "zz"]) == [Document(id="b", page_content="beta")]
    again.close()


def test_readme_langchain_example_runs(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = text.split("## LangChain", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (LangChain)", "exec"), {})
    assert capsys.readouterr().out.strip() == "a dog barked"
    assert (tmp_path / "lc.db").exists()


class _Counting(DeterministicFakeEmbedding):
    """The fake model, counting the texts it embeds (documents and queries apart)."""

    calls: list = []

    def embed_documents(self, texts):
        self.calls.append(("documents", list(texts)))
        return super().embed_documents(texts)

    def embed_query(self, text):
        self.calls.append(("query", text))
        return super().embed_query(text)


def test_cached_embeddings_compute_each_text_once(tmp_path):
    from rvqstore.integrations.langchain import RvqstoreCachedEmbeddings

    model = _Counting(size=6)
    model.calls = []
    emb = RvqstoreCachedEmbeddings(model, tmp_path / "cache.db", model="fake-6")
    first = emb.embed_documents(["a", "b", "a"])
    assert first[0] == first[2] and model.calls == [("documents", ["a", "b"])]
    assert emb.embed_documents(["b", "c"])[0] == first[1]
    assert model.calls[-1] == ("documents", ["c"])
    want = DeterministicFakeEmbedding(size=6)
    assert first[1] == pytest.approx(want.embed_documents(["b"])[0], rel=1e-6)
    q = emb.embed_query("a")  # cached apart from the document "a"
    assert model.calls[-1] == ("query", "a") and q == pytest.approx(want.embed_query("a"),
                                                                      rel=1e-6)
    calls = len(model.calls)
    assert emb.embed_query("a") == q and len(model.calls) == calls
    with pytest.raises(ValueError, match="may not start"):
        emb.embed_documents(["\0query\0x"])
    emb.close()
    again = RvqstoreCachedEmbeddings(_Counting(size=6), tmp_path / "cache.db", model="fake-6")
    assert again.embed_documents(["a", "b", "c"])[:2] == first[:2]  # from the file
    assert again.cache.computed == 0
    again.close()


CHILD = """
import json, sys
from langchain_core.embeddings import DeterministicFakeEmbedding
from rvqstore.integrations.langchain import RvqstoreCachedEmbeddings
emb = RvqstoreCachedEmbeddings(DeterministicFakeEmbedding(size=6), sys.argv[1], model="fake-6",
                               batch_size=7)
texts = [f"t{i}" for i in range(int(sys.argv[2]), int(sys.argv[3]))]
vecs = emb.embed_documents(texts)
print(json.dumps({"computed": emb.cache.computed, "vecs": dict(zip(texts, vecs))}))
"""


def test_cached_embeddings_shared_by_two_processes(tmp_path):
    import json
    import subprocess
    import sys

    from rvqstore.integrations.langchain import RvqstoreCachedEmbeddings

    path = tmp_path / "shared.db"
    RvqstoreCachedEmbeddings(DeterministicFakeEmbedding(size=6), path, model="fake-6").close()
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(path), lo, hi],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for lo, hi in (("0", "60"), ("30", "90"))]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    got = [json.loads(o) for o, _ in outs]
    for t in (f"t{i}" for i in range(30, 60)):  # both asked: the same stored vector
        assert got[0]["vecs"][t] == got[1]["vecs"][t]
    emb = RvqstoreCachedEmbeddings(DeterministicFakeEmbedding(size=6), path, model="fake-6")
    assert len(emb.cache) == 90  # every text stored exactly once
    emb.embed_documents([f"t{i}" for i in range(90)])
    assert emb.cache.computed == 0
    emb.close()

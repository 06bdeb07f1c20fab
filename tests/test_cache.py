"""EmbeddingCache: keys, misses only, duplicates once, model record, validation, processes."""

import hashlib
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rvqstore import (ConfigMismatchError, DimensionMismatchError, EmbeddingCache,
                      InvalidInputError, ReadOnlyError, StoreClosedError, Store, UnknownIdError)

from conftest import read_line

DIM = 32


def hashed_words(texts, dim=DIM):
    """Deterministic stand-in model: the sum of one sha256-seeded Gaussian vector per word,
    unit-normalised. Texts sharing words are near; no state, same result in any process."""
    out = np.zeros((len(texts), dim), np.float32)
    for i, text in enumerate(texts):
        for word in text.lower().split() or [""]:
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
            out[i] += np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


class Counting:
    """An embed function that records every batch it is called with."""

    def __init__(self, fn=hashed_words):
        self.fn = fn
        self.batches = []

    def __call__(self, texts):
        self.batches.append(list(texts))
        return self.fn(texts)

    @property
    def texts(self):
        return [t for b in self.batches for t in b]


def corpus(n, seed=0):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(200)]
    return [" ".join(rng.choice(words, size=5)) + f" #{i}" for i in range(n)]


@pytest.fixture
def path(tmp_path):
    return tmp_path / "cache.db"


def test_embed_returns_input_order_and_computes_each_text_once(path):
    fn = Counting()
    texts = ["red apple", "green pear", "red apple", "blue sky", "green pear"]
    with EmbeddingCache.open(path, model="m", embed=fn, batch_size=2) as cache:
        out = cache.embed(texts)
        assert out.dtype == np.float32 and out.shape == (5, DIM)
        np.testing.assert_allclose(out, hashed_words(texts), atol=1e-6)
        assert sorted(fn.texts) == ["blue sky", "green pear", "red apple"]
        assert all(len(b) <= 2 for b in fn.batches)
        assert len(cache) == 3 and cache.computed == 3
        again = cache.embed(list(reversed(texts)))
        np.testing.assert_array_equal(again, out[::-1])
        assert cache.computed == 3 and len(fn.batches) == 2
        assert "blue sky" in cache and "grey sky" not in cache


def test_only_missing_texts_are_computed(path):
    texts = corpus(300)
    with EmbeddingCache.open(path, model="m", embed=hashed_words, dim=DIM) as cache:
        cache.embed(texts[::3])
    fn = Counting()
    with EmbeddingCache.open(path, model="m", embed=fn, batch_size=16) as cache:
        out = cache.embed(texts)
        np.testing.assert_allclose(out, hashed_words(texts), atol=1e-6)
        missing = [t for i, t in enumerate(texts) if i % 3]
        assert sorted(fn.texts) == sorted(missing)
        assert [len(b) for b in fn.batches] == [16] * (len(missing) // 16) + [len(missing) % 16]
        assert len(cache) == 300
        assert cache.embed([]).shape == (0, DIM)


def test_key_is_sha256_of_model_nul_text(path):
    with EmbeddingCache.open(path, model="model-a", embed=hashed_words) as cache:
        assert cache.key_for("héllo") == hashlib.sha256("model-a\0héllo".encode()).hexdigest()
        cache.embed(["héllo"])
        assert cache.store.ids_for_keys([cache.key_for("héllo")]).shape == (1,)


def test_two_models_same_text_same_file_never_share_a_vector(path):
    """One file caches one model: another model name is refused, and its key is not there."""
    def other_model(texts):
        return -hashed_words(texts)

    with EmbeddingCache.open(path, model="model-a", embed=hashed_words) as a:
        va = a.embed(["the same text"])
        key_a = a.key_for("the same text")
    with pytest.raises(ConfigMismatchError, match="model='model-a'.*model='model-b'"):
        EmbeddingCache.open(path, model="model-b", embed=other_model)
    with Store.open(path) as store:
        assert len(store) == 1
        key_b = hashlib.sha256(b"model-b\0the same text").hexdigest()
        assert key_b != key_a
        with pytest.raises(UnknownIdError):
            store.ids_for_keys([key_b])
    fn = Counting()
    with EmbeddingCache.open(path, model="model-a", embed=fn) as a:
        np.testing.assert_array_equal(a.embed(["the same text"]), va)
        assert fn.batches == []
    # the same two model names in two files: each gets its own vector
    with EmbeddingCache.open(path.with_name("b.db"), model="model-b", embed=other_model) as b:
        np.testing.assert_allclose(b.embed(["the same text"]), -va, atol=1e-6)


def test_a_plain_store_with_vectors_is_not_taken_for_a_cache(path, tmp_path):
    with Store.open(path, dim=DIM, metric="cosine") as store:
        store.add(hashed_words(["x"]), keys=["x"])
    with pytest.raises(ConfigMismatchError, match="not an embedding cache"):
        EmbeddingCache.open(path, model="m", embed=hashed_words)
    empty = tmp_path / "empty.db"
    Store.open(empty, dim=DIM, metric="cosine").close()
    with EmbeddingCache.open(empty, model="m", embed=hashed_words) as cache:
        assert cache.embed(["x"]).shape == (1, DIM)


def test_conflicting_store_options_are_refused(path):
    EmbeddingCache.open(path, model="m", embed=hashed_words, dim=DIM).close()
    with pytest.raises(ConfigMismatchError, match="metric"):
        EmbeddingCache.open(path, model="m", embed=hashed_words, metric="l2")
    with pytest.raises(ConfigMismatchError, match="dim"):
        EmbeddingCache.open(path, model="m", embed=hashed_words, dim=DIM + 1)
    with pytest.raises(InvalidInputError, match="keep_originals"):
        EmbeddingCache.open(path.with_name("k.db"), model="m", embed=hashed_words,
                            keep_originals=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(model=""), "model must be"),
    (dict(model="a\0b"), "NUL"),
    (dict(model=3), "model must be"),
    (dict(embed="not callable"), "embed must be callable"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=True), "batch_size"),
])
def test_open_arguments_are_checked(path, kwargs, match):
    args = dict(model="m", embed=hashed_words)
    args.update(kwargs)
    with pytest.raises(InvalidInputError, match=match):
        EmbeddingCache.open(path, **args)


@pytest.mark.parametrize("texts, match", [
    ("one string", "single str"),
    ([1, "two"], "got int 1 at position 0"),
    (["one", None], "got NoneType None at position 1"),
    ([b"bytes"], "got bytes"),
    (5, "sequence of str"),
])
def test_non_str_texts_are_refused(path, texts, match):
    """Decision: no repr() keys. 1, 1.0 and True would be three entries; the caller converts."""
    fn = Counting()
    with EmbeddingCache.open(path, model="m", embed=fn) as cache:
        with pytest.raises(InvalidInputError, match=match):
            cache.embed(texts)
        assert fn.batches == [] and len(cache) == 0
        with pytest.raises(InvalidInputError):
            cache.key_for(1.0)


def _bad(result):
    return lambda texts: result(len(texts))


@pytest.mark.parametrize("embed, error, match", [
    (_bad(lambda n: np.ones((n + 1, DIM))), InvalidInputError, r"shape \(3, 32\) for 2 texts"),
    (_bad(lambda n: np.ones(DIM)), InvalidInputError, r"shape \(32,\)"),
    (_bad(lambda n: np.ones((n, DIM), np.int64)), InvalidInputError, "dtype int64"),
    (_bad(lambda n: [["a"] * DIM] * n), InvalidInputError, "dtype <U1"),
    (_bad(lambda n: [[1.0, 2.0], [1.0]]), InvalidInputError, "not an array"),
    (_bad(lambda n: np.full((n, DIM), np.nan)), InvalidInputError, "NaN or inf for 2 of 2 texts"),
    (_bad(lambda n: np.zeros((n, DIM))), InvalidInputError, "zero vector for text 'alpha'"),
    (_bad(lambda n: np.ones((n, DIM + 1))), DimensionMismatchError, "dim=33, the cache has dim=32"),
    (_bad(lambda n: None), InvalidInputError, "dtype object"),
])
def test_embed_output_is_checked_and_nothing_is_stored(path, embed, error, match):
    with EmbeddingCache.open(path, model="m", embed=embed, dim=DIM) as cache:
        with pytest.raises(error, match=match):
            cache.embed(["alpha", "beta"])
        assert len(cache) == 0


def test_dim_comes_from_the_first_embeddings(path):
    flip = {"dim": 8}

    def changing(texts):
        return hashed_words(texts, dim=flip["dim"])

    with EmbeddingCache.open(path, model="m", embed=changing) as cache:
        assert cache.dim is None and cache.embed([]).shape == (0, 0)
        cache.embed(["a"])
        assert cache.dim == 8
        flip["dim"] = 16
        with pytest.raises(DimensionMismatchError, match="dim=16, the cache has dim=8"):
            cache.embed(["b"])
        assert len(cache) == 1


def test_search_by_text_vector_and_texts(path):
    texts = corpus(200)
    with EmbeddingCache.open(path, model="m", embed=hashed_words) as cache:
        cache.embed(texts)
        res = cache.search(texts[7], k=5)
        assert res.keys[0] == cache.key_for(texts[7]) and res.distances[0] < 1e-5
        assert len(cache) == 200  # a stored text is not added again
        vec = hashed_words([texts[9]])[0]
        assert cache.search(vec, k=3).keys[0] == cache.key_for(texts[9])
        both = cache.search([texts[1], texts[2]], k=2)
        assert [row[0] for row in both.keys] == [cache.key_for(texts[1]), cache.key_for(texts[2])]
        new = cache.search("a query never seen", k=3)
        assert len(cache) == 201 and new.keys[0] == cache.key_for("a query never seen")


def test_trained_float16_cache_keeps_serving(path):
    texts = corpus(400)
    with EmbeddingCache.open(path, model="m", embed=hashed_words, stages=4, codebook_size=16,
                             originals="float16") as cache:
        first = cache.embed(texts[:300])
        cache.store.train()
        out = cache.embed(texts)  # 100 new ones are encoded with the trained codebooks
        np.testing.assert_array_equal(out[:300], first)
        np.testing.assert_allclose(out, hashed_words(texts), atol=2e-3)  # float16 originals
        assert cache.search(texts[350], k=1).keys[0] == cache.key_for(texts[350])
        assert cache.store.check() == []


def test_readonly_cache_serves_stored_texts_only(path):
    with EmbeddingCache.open(path, model="m", embed=hashed_words) as cache:
        cache.embed(["a", "b"])
    with EmbeddingCache.open(path, model="m", embed=hashed_words, readonly=True) as cache:
        assert cache.embed(["b", "a"]).shape == (2, DIM)
        with pytest.raises(ReadOnlyError):
            cache.embed(["c"])
    with pytest.raises(ConfigMismatchError):
        EmbeddingCache.open(path, model="other", embed=hashed_words, readonly=True)


def test_closed_cache_refuses_use(path):
    with EmbeddingCache.open(path, model="m", embed=hashed_words) as cache:
        cache.embed(["a"])
    cache.close()  # twice is fine
    with pytest.raises(StoreClosedError):
        cache.embed(["a"])


def worker_model(texts, worker):
    """What worker 0 and worker 1 compute: two slightly different vectors per text (unit
    norm, as the cosine cache stores them), so that the file shows whose entry it kept."""
    x = hashed_words(texts) + np.float32(0.05 * worker)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_cache import corpus, worker_model
    from rvqstore import EmbeddingCache

    path, worker, order, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

    def in_step(texts):
        # a barrier before each batch: the parent lets both workers go on together, so
        # that both compute the same batch and add it at the same moment
        print("batch", len(texts), flush=True)
        if sys.stdin.readline() != "go\\n":
            raise SystemExit("no go from the parent")
        return worker_model(texts, worker)

    every = corpus(900)
    texts = [every[i] for i in map(int, order.split(","))]
    with EmbeddingCache.open(path, model="m", embed=in_step, batch_size=8) as cache:
        np.save(out, cache.embed(texts))
        print("computed", cache.computed, flush=True)
""")


def test_two_processes_fill_one_cache_without_losing_or_doubling(path, tmp_path):
    """Two processes embed overlapping texts in step, batch for batch: both compute the same
    300 texts and add each batch of them at the same moment. Every text is stored once,
    both processes get the stored vector back, and the one stored is one of theirs."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(pathlib.Path(__file__).parent)))
    # created before the workers start: Store.open of a new file is not safe to race
    EmbeddingCache.open(path, model="m", embed=hashed_words, dim=DIM).close()
    shared = list(range(300, 600))  # first in both workers' lists, in the same order
    orders = [shared + list(range(0, 300)), shared + list(range(600, 900))]
    outs = [tmp_path / f"out{w}.npy" for w in range(2)]
    errs = [tmp_path / f"worker{w}.err" for w in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(path), str(w),
                               ",".join(map(str, orders[w])), str(outs[w])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=open(errs[w], "w"), bufsize=0)
             for w in range(2)]
    try:
        rounds = 0
        while True:
            lines = [read_line(p) for p in procs]
            if not all(line.startswith("batch ") for line in lines):
                break
            rounds += 1
            for p in procs:  # both have looked their texts up and committed every batch
                p.stdin.write(b"go\n")  # before this one: release them together
        assert all(line.startswith("computed ") for line in lines), (
            lines, [e.read_text() for e in errs])
        for p, err in zip(procs, errs):
            assert p.wait(timeout=60) == 0, err.read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert rounds == 600 // 8
    # both looked their texts up before either stored any: each computed all of its 600,
    # and the 300 shared ones were added by both at once
    assert [int(line.split()[1]) for line in lines] == [600, 600]
    texts = corpus(900)
    fn = Counting()
    with EmbeddingCache.open(path, model="m", embed=fn, readonly=True) as cache:
        assert len(cache) == 900  # keys are unique in the file: 900 rows = each text once
        stored = cache.embed(texts)
        assert fn.batches == []
        assert cache.store.check() == []
    got = [np.load(out) for out in outs]
    for w in range(2):  # each worker got back what the file holds
        np.testing.assert_array_equal(got[w], stored[orders[w]])
    # its own texts as it computed them; each shared one as one of the two computed it
    np.testing.assert_allclose(stored[:300], worker_model(texts[:300], 0), atol=1e-6)
    np.testing.assert_allclose(stored[600:], worker_model(texts[600:], 1), atol=1e-6)
    mine = [np.abs(stored[300:600] - worker_model(texts[300:600], w)).max(axis=1) < 1e-6
            for w in range(2)]
    assert (mine[0] ^ mine[1]).all()

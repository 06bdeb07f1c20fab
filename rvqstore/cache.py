"""EmbeddingCache: every (model, text) embedded once, kept in a store, found again by similarity.

An offline embedding job calls :meth:`EmbeddingCache.embed` on its texts. Only the texts whose
key is not in the file yet go to the embedding function, in batches, and each batch is added
in one transaction, so a job that is stopped keeps the batches it finished and a second run
computes only the rest. The file is an ordinary store: the cached vectors can be searched,
trained and compressed like any other.
"""

import hashlib

import numpy as np

from .errors import ConfigMismatchError, DimensionMismatchError, InvalidInputError
from .store import Store

MODEL_META = "cache.model"
"""Name under which the file records the model whose embeddings it caches."""



def cache_key(model, text):
    """The key of ``text`` embedded by ``model``: hex sha256 of ``model + NUL + text`` (UTF-8).

    A model name holds no NUL, so the first NUL separates the two and no (model, text)
    pair shares its key with another.
    """
    data = f"{model}\0{text}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def _check_model(model):
    if not isinstance(model, str) or not model:
        raise InvalidInputError(f"model must be a non-empty str naming the embedding model, got {model!r}")
    if "\0" in model:
        raise InvalidInputError(f"model must not contain a NUL character, got {model!r}")
    return model


def _check_texts(texts):
    if isinstance(texts, (str, bytes)):
        raise InvalidInputError(
            f"texts must be a sequence of str, got a single {type(texts).__name__}: "
            "pass [text] to embed one text")
    try:
        texts = list(texts)
    except TypeError:
        raise InvalidInputError(f"texts must be a sequence of str, got {type(texts).__name__}") from None
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            # keying by repr() would make 1, 1.0 and True three entries and tie the key to
            # a repr that may change between versions: the caller converts explicitly
            raise InvalidInputError(
                f"texts must be str, got {type(text).__name__} {text!r:.60} at position {i}: "
                "convert it first (str(x)) so that its key is the text you mean")
    return texts


class EmbeddingCache:
    """Embeddings of one model, computed once per text and kept in a store file.

    Open with :meth:`EmbeddingCache.open`; use as a context manager.

    Attributes
    ----------
    model : str, the model name the file is recorded for
    computed : int, how many texts this object has sent to the embedding function
    store : Store, the underlying store (``train()``, ``info()``, ...)
    """

    def __init__(self, store, model, embed, batch_size):
        self.store = store
        self.model = model
        self.computed = 0
        self._embed = embed
        self._batch_size = batch_size

    @classmethod
    def open(cls, path, *, model, embed, dim=None, metric="cosine", batch_size=64, **store_options):
        """Open the cache at ``path``, creating it when missing.

        Parameters
        ----------
        path : str or os.PathLike
        model : str, name of the embedding model. It is part of every key and is recorded in
            the file; a file recorded for another model is refused (ConfigMismatchError).
        embed : callable(list of str) -> array of shape (n, dim), floating point
        dim : int or None, taken from the first embeddings when omitted
        metric : "cosine" (default), "l2" or "ip", as for :meth:`Store.open`
        batch_size : int >= 1, texts per call of ``embed`` (and per transaction)
        **store_options : passed to :meth:`Store.open` (``stages``, ``originals``,
            ``readonly``, ...). ``keep_originals=False`` is refused: the cache returns the
            stored vectors.

        Processes may share one cache file; create it (open it once) before starting them,
        since two ``Store.open`` calls racing to create a new file can fail.
        """
        _check_model(model)
        if not callable(embed):
            raise InvalidInputError(f"embed must be callable(list of str) -> array, got {embed!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if store_options.get("keep_originals") is False:
            raise InvalidInputError("an embedding cache returns its stored vectors: "
                                    "keep_originals=False is not possible")
        store = Store.open(path, dim=dim, metric=metric, **store_options)
        try:
            if not store.config.keep_originals:
                raise ConfigMismatchError(f"{store.path} does not keep original vectors "
                                          "(keep_originals=False), which an embedding cache needs")
            _claim(store, model, readonly=bool(store_options.get("readonly")))
        except BaseException:
            store.close()
            raise
        return cls(store, model, embed, batch_size)

    # -- the cache --------------------------------------------------------------------------

    def key_for(self, text):
        """The key under which the embedding of ``text`` by this model is stored (hex str)."""
        if not isinstance(text, str):
            raise InvalidInputError(f"text must be str, got {type(text).__name__} {text!r:.60}")
        return cache_key(self.model, text)

    def embed(self, texts):
        """Embeddings of ``texts`` in input order, computing only the ones not stored yet.

        Parameters
        ----------
        texts : sequence of str (other types are refused: convert them first)

        Returns
        -------
        ndarray of shape (n, dim), float32: the stored vectors, so a text gets the same
        values on every call (cosine: unit-normalised; ``originals="float16"``: rounded).

        Distinct texts missing from the file are sent to ``embed`` in batches of
        ``batch_size``; a text repeated in ``texts`` is computed once. Each batch is added
        in one transaction with ``skip_existing_keys``: when another process stored the
        same text meanwhile, its entry is kept and ours dropped, so every text is stored
        exactly once.
        """
        texts = _check_texts(texts)
        keys = [cache_key(self.model, t) for t in texts]
        if not keys:
            return np.empty((0, self.dim or 0), np.float32)
        text_of = dict(zip(keys, texts))  # distinct keys in first-seen order
        stored = self._stored(list(text_of))
        missing = [k for k in text_of if k not in stored]
        for start in range(0, len(missing), self._batch_size):
            batch = missing[start:start + self._batch_size]
            vectors = self._compute([text_of[k] for k in batch])
            self.store.add(vectors, keys=batch, skip_existing_keys=True)
        return self.store.get(keys=keys)

    def search(self, query, *, k=10, rerank=None):
        """The k cached vectors nearest to ``query``.

        Parameters
        ----------
        query : str, sequence of str, or array-like of shape (dim,) or (nq, dim).
            Texts are embedded through the cache, so they are stored too (and a stored
            text is its own nearest neighbour).
        k, rerank : as for :meth:`Store.search`

        Returns
        -------
        SearchResult(ids, distances, keys); map keys back to texts with :meth:`key_for`.
        """
        if isinstance(query, str):
            vectors = self.embed([query])[0]
        elif isinstance(query, (list, tuple)) and query and all(isinstance(q, str) for q in query):
            vectors = self.embed(query)
        else:
            vectors = query
        return self.store.search(vectors, k=k, rerank=rerank, with_keys=True)

    def __contains__(self, text):
        """Whether the embedding of ``text`` (a str) by this model is stored."""
        return bool(self._stored([self.key_for(text)]))

    def __len__(self):
        return len(self.store)

    @property
    def dim(self):
        return self.store.dim

    @property
    def metric(self):
        return self.store.metric

    @property
    def path(self):
        return self.store.path

    def close(self):
        """Close the file; safe to call twice."""
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- private ----------------------------------------------------------------------------

    def _stored(self, keys):
        """{key: id} of the distinct ``keys`` already in the file."""
        ids = self.store.ids_for_keys(keys, missing="skip")
        return {k: i for k, i in zip(keys, ids.tolist()) if i >= 0}

    def _compute(self, texts):
        """Call the embedding function on ``texts`` and check what it returns."""
        n = len(texts)
        out = self._embed(list(texts))
        self.computed += n
        try:
            arr = np.asarray(out)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"embed returned {type(out).__name__}, not an array: {exc}") from None
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.floating):
            raise InvalidInputError(
                f"embed must return floating-point vectors, it returned dtype {arr.dtype} for {n} texts")
        if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] == 0:
            raise InvalidInputError(
                f"embed returned shape {arr.shape} for {n} texts, expected ({n}, dim)")
        if self.dim is not None and arr.shape[1] != self.dim:
            raise DimensionMismatchError(
                f"embed returned vectors of dim={arr.shape[1]}, the cache has dim={self.dim}")
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InvalidInputError(f"embed returned NaN or inf for {int(bad.sum())} of {n} texts, "
                                    f"first for text {texts[i]!r:.80}")
        if self.metric == "cosine":
            zero = ~arr.any(axis=1)
            if zero.any():
                i = int(np.flatnonzero(zero)[0])
                raise InvalidInputError(f"embed returned a zero vector for text {texts[i]!r:.80}: "
                                        "the cosine metric needs a non-zero norm")
        return arr.astype(np.float32)


def _claim(store, model, *, readonly):
    """Record ``model`` in the file, or check that the file is recorded for it.

    A file holds one model: the vectors of two models live in different spaces (often of
    different dims), so searching them together would mean nothing. Keys carry the model
    name as well, so an entry of one model is never found under another's key.
    """
    recorded = store.user_meta().get(MODEL_META)
    _check_recorded(store, recorded, model)
    if recorded is None and not readonly:
        # one transaction: two processes creating the same cache agree on the first name
        _check_recorded(store, store.set_user_meta(MODEL_META, model, only_if_absent=True), model)


def _check_recorded(store, recorded, model):
    if recorded is None:
        n = len(store)
        if n:
            raise ConfigMismatchError(
                f"{store.path} is a store of {n} vectors, not an embedding cache: open it with "
                "Store.open, or give the cache a new file")
    elif recorded != model:
        raise ConfigMismatchError(
            f"{store.path} caches embeddings of model={recorded!r}, it was opened with "
            f"model={model!r}: one file caches one model, use another file for this one")

"""The Store: one SQLite file of codebooks, code blocks and originals, searched by ADC + rerank.

This facade is the only module that joins the codec (:mod:`rvqstore.algo`) and the file
(:mod:`rvqstore.storage`).
"""

import os

import numpy as np

from . import algo
from .algo import ResidualQuantizer, SearchResult
from .algo.validate import METRICS, as_matrix, check_k, check_metric
from .errors import (BadFileError, ConfigMismatchError, DimensionMismatchError, DuplicateError, EmptyStoreError,
                     InvalidInputError,
                     NotTrainedError, OriginalsMissingError, RvqstoreError, StoreClosedError,
                     UnknownIdError)
from .storage import (ORIGINAL_FORMATS, Database, pack_codebooks, pack_originals,
                      unpack_block, unpack_codebooks, unpack_originals)
from .storage import codes as codeblocks

__all__ = ["Store", "DEFAULT_RERANK", "METRICS", "ORIGINAL_FORMATS"]

DEFAULT_RERANK = 10
"""Candidates per result for the exact second pass: 10-recall@10 >= 0.95 at S=16 (README)."""

_CONFIG = {  # name: (type, default)
    "dim": (int, None),
    "metric": (str, "l2"),
    "stages": (int, 16),
    "codebook_size": (int, 256),
    "keep_originals": (bool, True),
    "originals": (str, "float32"),
    "block_size": (int, 16384),
    "train_beam": (int, 1),
    "add_beam": (int, 1),
    "train_sample": (int, 65536),
    "seed": (int, 0),
}


def _parse(kind, text):
    return (text == "1") if kind is bool else kind(text)


def _report(progress, phase, done, total):
    if progress is not None:
        progress(phase, done, total)


def _without(res, exclude, k):
    """The first k results of each row whose id is not in ``exclude``, padded again."""
    ids = np.full((len(res.ids), k), -1, np.int64)
    dist = np.full((len(res.ids), k), np.inf, np.float32)
    for r in range(len(res.ids)):
        keep = (res.ids[r] >= 0) & ~np.isin(res.ids[r], exclude)
        row_ids, row_d = res.ids[r][keep][:k], res.distances[r][keep][:k]
        ids[r, :len(row_ids)], dist[r, :len(row_d)] = row_ids, row_d
    return SearchResult(ids, dist)


class Store:
    """A persistent vector store in one SQLite file.

    Open with :meth:`Store.open`; use as a context manager. See the README for the
    guarantees (atomic batches, crash safety, concurrent readers).
    """

    def __init__(self, db, config):
        self._db = db
        self.config = config
        self._closed = False
        self._seen_version = None
        self._state = None  # in-memory arrays, loaded lazily and refreshed on change

    # -- opening and closing ----------------------------------------------------------------

    @classmethod
    def open(cls, path, *, dim=None, metric=None, stages=None, codebook_size=None,
             keep_originals=None, originals=None, readonly=False, create=True, block_size=None,
             train_beam=None, add_beam=None, train_sample=None, seed=None, mmap_originals=False):
        """Open the store at ``path``, creating it when missing (unless ``readonly``).

        Parameters
        ----------
        path : str or os.PathLike
        dim : int, vector dimension (taken from the first add when omitted on creation)
        metric : "l2" (squared L2), "ip" (distance -<q, x>) or "cosine" (1 - cos)
        stages : int in [1, 64], RVQ stages = code bytes per vector (default 16)
        codebook_size : int in [2, 256], codewords per stage (default 256)
        keep_originals : bool, keep the vectors for rerank, get() and retrain (default True)
        originals : "float32", "float16" or "zstd", how originals are stored
        readonly : bool, open without write access
        create : bool, create the store when ``path`` is missing (else ``BadFileError``)
        mmap_originals : bool, read rerank candidates through memory-mapped I/O: ~0.2 ms
            faster per query, but touched pages count as resident memory (default False)
        block_size : int, vectors per code block (default 16384)
        train_beam, add_beam : int, beam width when (re)training encodes everything and
            when add() encodes new vectors (default 1, greedy: see the README's measurements)
        train_sample : int, vectors sampled to fit the codebooks (default 65536)
        seed : int, seed of training

        On an existing file the configuration is read from the file, and an argument
        that conflicts with it is an error naming both values.
        """
        given = dict(dim=dim, metric=metric, stages=stages, codebook_size=codebook_size,
                     keep_originals=keep_originals, originals=originals, block_size=block_size,
                     train_beam=train_beam, add_beam=add_beam, train_sample=train_sample,
                     seed=seed)
        fresh = {k: (given[k] if given[k] is not None else d) for k, (t, d) in _CONFIG.items()}
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            if not create and not readonly:
                raise BadFileError(f"{os.fspath(path)} does not exist")
            cls._validate_config(fresh)  # before a file is made: a refused open leaves none
        db = Database(path, readonly=readonly, mmap_originals=mmap_originals)
        try:
            stored = db.meta()
            if not stored and not readonly:
                # create under the write lock: another process may be creating it right now
                cls._validate_config(fresh)
                with db.write():
                    stored = db.meta()
                    if not stored:
                        db.set_meta(format=1, active_version=0, next_id=0,
                                    **{k: (int(v) if isinstance(v, bool) else v)
                                       for k, v in fresh.items() if v is not None})
                        stored = db.meta()
            if stored:
                config = {k: _parse(t, stored[k]) if k in stored else d
                          for k, (t, d) in _CONFIG.items()}
                if "dim" in stored:
                    config["dim"] = int(stored["dim"])
                for name, value in given.items():
                    if value is not None and config[name] is not None and value != config[name]:
                        raise ConfigMismatchError(
                            f"{name}={value!r} was asked for, but {db.path} has {name}={config[name]!r}")
                if config["dim"] is None and dim is not None and not readonly:
                    with db.write():
                        now = db.meta().get("dim")
                        if now is not None and int(now) != dim:
                            raise ConfigMismatchError(
                                f"dim={dim} was asked for, but {db.path} has dim={now}")
                        db.set_meta(dim=dim)
                    config["dim"] = dim
            else:
                raise RvqstoreError(f"{db.path} is not initialised and was opened read-only")
            store = cls(db, config)
            if not readonly:
                store._drop_stale_builds()
            return store
        except BaseException:
            db.close()
            raise

    @staticmethod
    def _validate_config(c):
        check_metric(c["metric"])
        if c["dim"] is not None and (not isinstance(c["dim"], int) or c["dim"] < 1):
            raise InvalidInputError(f"dim must be a positive integer, got {c['dim']!r}")
        if not 1 <= c["stages"] <= 64:
            raise InvalidInputError(f"stages must be in [1, 64], got {c['stages']}")
        if not 2 <= c["codebook_size"] <= 256:
            raise InvalidInputError(f"codebook_size must be in [2, 256], got {c['codebook_size']}")
        if c["originals"] not in ORIGINAL_FORMATS:
            raise InvalidInputError(
                f"originals must be one of {', '.join(ORIGINAL_FORMATS)}, got {c['originals']!r}")
        for name in ("block_size", "train_beam", "add_beam", "train_sample"):
            if c[name] < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {c[name]}")

    def close(self):
        """Close the file; safe to call twice."""
        if not self._closed:
            self._closed = True
            self._state = None
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _live(self):
        if self._closed:
            raise StoreClosedError("the store is closed")
        return self._db

    @property
    def path(self):
        return self._db.path

    @property
    def dim(self):
        return self.config["dim"]

    @property
    def metric(self):
        return self.config["metric"]

    # -- in-memory state --------------------------------------------------------------------

    def _meta_int(self, meta, name):
        return int(meta.get(name, 0))

    def _current(self):
        """The in-memory arrays, refreshed when another connection has committed.

        Appends by others only touch the last code block and new ones, so a refresh reads
        just those unless the blocks were rewritten (compact, retrain: ``blocks_epoch``).
        """
        db = self._live()
        dv = db.data_version()
        if self._state is not None and dv == self._seen_version:
            return self._state
        old = self._state
        with db.read():
            meta = db.meta()
            version = self._meta_int(meta, "active_version")
            epoch = self._meta_int(meta, "blocks_epoch")
            state = {"version": version, "epoch": epoch, "count": db.count()}
            if version:
                stages = self.config["stages"]
                if old is not None and old["version"] == version and old["epoch"] == epoch:
                    state["rq"] = old["rq"]
                    first = max(old["nblocks"] - 1, 0)
                    kept = [a[: first * self.config["block_size"]]
                            for a in (old["ids"], old["codes"], old["norms"])]
                else:
                    row = db.codebooks_row(version)
                    state["rq"] = ResidualQuantizer(unpack_codebooks(
                        row["data"], row["stages"], row["codebook_size"], row["dim"]))
                    first, kept = 0, codeblocks.empty(stages)
                *tail, nread = codeblocks.read_codes(db, version, stages, first)
                ids, codes, norms = (np.concatenate([k, t]) for k, t in zip(kept, tail))
                state["nblocks"] = first + nread
                bias = norms.copy() if self.metric == "l2" else np.zeros(len(ids), np.float32)
                dead = db.tombstones()
                if dead:
                    bias[np.isin(ids, np.asarray(dead, np.int64))] = np.inf
                state.update(ids=ids, codes=np.ascontiguousarray(codes), norms=norms, bias=bias)
            else:
                ids, vecs = self._load_all_originals(db)
                state.update(ids=ids, vectors=vecs, vector_norms=np.einsum("ij,ij->i", vecs, vecs))
        self._state = state
        self._seen_version = db.data_version()
        return state

    def _load_all_originals(self, db):
        ids, blobs = [], []
        for bid, bblobs in db.iter_vectors():
            ids += bid
            blobs += bblobs
        if not ids:
            return np.empty(0, np.int64), np.empty((0, self.dim or 0), np.float32)
        return np.asarray(ids, np.int64), self._unpack(blobs)

    def _unpack(self, blobs):
        if any(b is None for b in blobs):
            raise OriginalsMissingError("this store does not keep original vectors")
        return unpack_originals(blobs, self.config["originals"], self.dim)

    def _invalidate(self):
        self._state = None

    # -- input checks -----------------------------------------------------------------------

    def _vectors(self, x, name="vectors", allow_1d=False):
        if self.dim is None:
            arr = as_matrix(x, name=name, allow_1d=allow_1d)
        else:
            arr = as_matrix(x, name=name, dim=self.dim, allow_1d=allow_1d)
        if self.metric == "cosine":
            arr = algo.normalize(arr)
        return arr

    @staticmethod
    def _id_array(ids, name="ids"):
        arr = np.asarray(ids)
        if arr.ndim == 0:
            arr = arr[None]
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise InvalidInputError(f"{name} must be a 1-D sequence of integers, got {arr.dtype} {arr.shape}")
        return arr.astype(np.int64)

    @staticmethod
    def _key_list(keys, n, allow_none=False):
        keys = list(keys)
        if len(keys) != n:
            raise InvalidInputError(f"got {len(keys)} keys for {n} vectors")
        bad = [k for k in keys if not isinstance(k, str) and not (allow_none and k is None)]
        if bad:
            raise InvalidInputError(f"keys must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
        return keys

    # -- writing ----------------------------------------------------------------------------

    def add(self, vectors, *, ids=None, keys=None, skip_existing_keys=False, progress=None):
        """Add vectors in one transaction; returns their ids.

        Parameters
        ----------
        vectors : array-like of shape (n, dim)
        ids : sequence of n distinct int64 not in the store, or None to number them
        keys : sequence of n distinct str not in the store, or None
        skip_existing_keys : bool
            With ``keys``: rows whose key is already stored are skipped instead of refused,
            and their stored ids are returned (what a cache shared by processes needs).
        progress : callable(phase, done, total) or None

        Returns
        -------
        ids : int64 ndarray of shape (n,)

        Once trained, new vectors are encoded with the current codebooks at once.
        """
        db = self._live()
        x = self._vectors(vectors)
        n = len(x)
        if keys is not None:
            keys = self._key_list(keys, n, allow_none=True)  # None: this row has no key
            named = [k for k in keys if k is not None]
            if len(set(named)) != len(named):
                raise DuplicateError("keys contain duplicates")
        if ids is not None:
            ids = self._id_array(ids)
            if len(ids) != n:
                raise InvalidInputError(f"got {len(ids)} ids for {n} vectors")
            if len(np.unique(ids)) != n:
                raise DuplicateError("ids contain duplicates")
        with db.write():
            fresh = self._state is not None and db.data_version() == self._seen_version
            meta = db.meta()
            if self.dim is None:
                if "dim" in meta and int(meta["dim"]) != x.shape[1]:
                    # another connection set the dimension first
                    raise DimensionMismatchError(
                        f"vectors have dim={x.shape[1]}, store has dim={meta['dim']}")
                self.config["dim"] = x.shape[1]
                db.set_meta(dim=x.shape[1])
            out = None
            if keys is not None and skip_existing_keys:
                found = db.ids_for_keys([k for k in keys if k is not None])
                if found:
                    out = np.asarray([found.get(k, -1) for k in keys], np.int64)
                    new = out < 0
                    x, keys = x[new], [k for k, f in zip(keys, new) if f]
                    ids = ids[new] if ids is not None else None
                    if not len(x):
                        return out
            m = len(x)
            next_id = self._meta_int(meta, "next_id")
            if ids is None:
                ids = np.arange(next_id, next_id + m, dtype=np.int64)
            else:
                taken = db.existing_ids(ids.tolist())
                if taken:
                    raise DuplicateError(f"ids already in the store: {sorted(taken)[:5]}")
            if keys is not None:
                taken = db.existing_keys([k for k in keys if k is not None])
                if taken:
                    raise DuplicateError(f"keys already in the store: {sorted(taken)[:5]}")
            version = self._meta_int(meta, "active_version")
            _report(progress, "add", 0, m)
            keep = self.config["keep_originals"] or not version
            blobs = pack_originals(x, self.config["originals"]) if keep else [None] * m
            db.insert_vectors(ids.tolist(), keys if keys is not None else [None] * m, blobs)
            appended = self._append_codes(db, version, x, ids, progress) if version else None
            db.set_meta(next_id=max(next_id, int(ids.max()) + 1))
        _report(progress, "add", m, m)
        self._after_add(fresh, version, x, ids, appended)
        if out is not None:
            out[out < 0] = ids
            return out
        return ids

    def _after_add(self, fresh, version, x, ids, appended):
        """Extend the in-memory arrays with our own commit instead of reloading them all."""
        st = self._state
        if not fresh or st is None or st["version"] != version or (version and appended is None):
            self._invalidate()
            return
        st["count"] += len(ids)
        st["ids"] = np.concatenate([st["ids"], ids])
        if version:
            st["nblocks"] = -(-len(st["ids"]) // self.config["block_size"])
        if version:
            codes, norms = appended
            st["codes"] = np.ascontiguousarray(np.concatenate([st["codes"], codes]))
            st["norms"] = np.concatenate([st["norms"], norms])
            extra = norms if self.metric == "l2" else np.zeros(len(ids), np.float32)
            st["bias"] = np.concatenate([st["bias"], extra])
        else:
            st["vectors"] = np.concatenate([st["vectors"], x])
            st["vector_norms"] = np.concatenate([st["vector_norms"], np.einsum("ij,ij->i", x, x)])

    def _append_codes(self, db, version, x, ids, progress):
        row = db.codebooks_row(version)
        rq = self._quantizer(version, row)
        codes = rq.encode(x, beam_width=self.config["add_beam"], progress=progress)
        xh = rq.decode(codes)
        norms = np.einsum("ij,ij->i", xh, xh).astype(np.float32)
        db.record_added_error(version, len(x), float(((x - xh) ** 2).sum()))
        dead = set(db.tombstones())
        reused = [i for i in ids.tolist() if i in dead]
        if reused:
            # a deleted id comes back: its old codes must go before the new ones are written
            old_ids, old_codes, old_norms, _ = codeblocks.read_codes(db, version, row["stages"])
            keep = ~np.isin(old_ids, np.asarray(reused, np.int64))
            db.clear_tombstones(reused)
            self._write_blocks(db, version, np.concatenate([old_ids[keep], ids]),
                               np.concatenate([old_codes[keep], codes]),
                               np.concatenate([old_norms[keep], norms]))
            return None
        appended = (codes, norms)
        last = codeblocks.read_last_block(db, version, row["stages"])
        start_block = 0 if last is None else last[0] + 1
        if last is not None and len(last[1]) < self.config["block_size"]:
            # top up the last, partly filled block
            start_block, lids, lcodes, lnorms = last
            ids = np.concatenate([lids, ids])
            codes = np.concatenate([lcodes, codes])
            norms = np.concatenate([lnorms, norms])
        self._write_blocks(db, version, ids, codes, norms, first_block=start_block)
        return appended

    def _quantizer(self, version, row):
        """The codec of ``version``, reused from the in-memory state when it matches."""
        if self._state is not None and self._state.get("version") == version:
            return self._state["rq"]
        return ResidualQuantizer(unpack_codebooks(row["data"], row["stages"], row["codebook_size"],
                                                  row["dim"]))

    def _write_blocks(self, db, version, ids, codes, norms, first_block=0):
        codeblocks.write_codes(db, version, ids, codes, norms, self.config["block_size"],
                               first_block)

    def delete(self, ids=None, *, keys=None):
        """Delete vectors by id or by key at once (one transaction); returns how many.

        Unknown ids or keys are an error and nothing is deleted. Their code space is
        reclaimed by :meth:`compact`.
        """
        db = self._live()
        if (ids is None) == (keys is None):
            raise InvalidInputError("give either ids or keys to delete")
        with db.write():
            fresh = self._state is not None and db.data_version() == self._seen_version
            ids = self._resolve(db, ids, keys)
            n = db.delete_vectors(ids.tolist())
            version = self._meta_int(db.meta(), "active_version")
            if version:
                db.add_tombstones(ids.tolist())
        st = self._state
        if fresh and st is not None and st["version"] == version and version:
            st["bias"][np.isin(st["ids"], ids)] = np.inf  # masked at once, no reload
            st["count"] -= n
        else:
            self._invalidate()
        return n

    def _resolve(self, db, ids, keys):
        """Ids for ``ids`` or ``keys``, refusing unknown ones."""
        if keys is not None:
            keys = self._key_list(keys, len(list(keys)))
            found = db.ids_for_keys(keys)
            missing = [k for k in keys if k not in found]
            if missing:
                raise UnknownIdError(f"unknown keys: {missing[:5]}")
            return np.asarray([found[k] for k in keys], np.int64)
        ids = self._id_array(ids)
        present = set(db.existing_ids(ids.tolist()))
        missing = [i for i in ids.tolist() if i not in present]
        if missing:
            raise UnknownIdError(f"unknown ids: {missing[:5]}")
        return ids

    # -- training ---------------------------------------------------------------------------

    def train(self, *, progress=None):
        """Fit codebooks on (a sample of) the stored originals and encode every vector.

        On a trained store this is :meth:`retrain`. Needs at least ``codebook_size`` vectors.
        """
        return self._fit(progress)

    def retrain(self, *, progress=None):
        """New codebooks from the originals, every vector re-encoded, switched atomically.

        The new version's codes are written in batches; readers keep searching the old
        version until the final transaction switches to the new one.
        """
        if not self.config["keep_originals"] and self._meta_int(self._live().meta(), "active_version"):
            raise OriginalsMissingError(
                "retrain() needs the original vectors and this store was created with "
                "keep_originals=False")
        return self._fit(progress)

    def _fit(self, progress):
        db = self._live()
        c = self.config
        n = db.count()
        if n < c["codebook_size"]:
            raise NotTrainedError(
                f"training needs at least codebook_size={c['codebook_size']} vectors, the store has {n}")
        rng = np.random.default_rng(c["seed"])
        all_ids = np.asarray(db.all_ids(), np.int64)
        sample_ids = np.sort(rng.choice(all_ids, min(n, c["train_sample"]), replace=False))
        blobs = db.fetch_vectors(sample_ids.tolist())
        sample = self._unpack([blobs[i] for i in sample_ids.tolist()])
        rq = ResidualQuantizer.train(sample, stages=c["stages"], codebook_size=c["codebook_size"],
                                     beam_width=c["train_beam"], seed=rng, progressive_dim=True,
                                     n_iter=10, progress=progress)
        codes = rq.encode(sample, beam_width=c["train_beam"])
        train_mse = float(((sample - rq.decode(codes)) ** 2).sum(axis=1).mean())
        with db.write():
            version = db.next_version()
            db.insert_codebooks(version, "building", c["stages"], c["codebook_size"], self.dim,
                                pack_codebooks(rq.codebooks), len(sample), train_mse)
        # encode everything in batches, each committed: a crash leaves a 'building'
        # version that the next writer drops, and the active version untouched
        done, block, last = 0, 0, None
        for ids, blobs in db.iter_vectors(batch=c["block_size"]):
            _report(progress, "encode", done, n)
            cd = rq.encode(self._unpack(blobs), beam_width=c["train_beam"])
            last = (np.asarray(ids, np.int64), cd, rq.norms(cd))
            with db.write():
                # first_block > 0 appends; block 0 of a brand-new version has nothing to replace
                codeblocks.write_codes(db, version, *last, c["block_size"], first_block=block)
            block += 1
            done += len(ids)
        with db.write():
            # vectors added meanwhile by another connection are encoded here, in the switch
            covered = set()
            for _, cnt, i, _, _ in db.read_blocks(version):
                covered.update(np.frombuffer(i, "<i8").tolist())
            live = db.all_ids()
            late = [i for i in live if i not in covered]
            if late:
                blobs = db.fetch_vectors(late)
                cd = rq.encode(self._unpack([blobs[i] for i in late]), beam_width=c["train_beam"])
                new = (np.asarray(late, np.int64), cd, rq.norms(cd))
                if last is not None:  # keep every block but the last one full
                    new = tuple(np.concatenate([a, b]) for a, b in zip(last, new))
                self._write_blocks(db, version, *new, first_block=max(block - 1, 0))
            gone = covered - set(live)  # deleted meanwhile
            db.clear_tombstones()
            if gone:
                db.add_tombstones(sorted(gone))
            db.set_codebook_state(version, "active")
            db.drop_versions(keep=version)
            db.set_meta(active_version=version)
            if not c["keep_originals"]:
                db.clear_originals()
        _report(progress, "encode", n, n)
        self._invalidate()
        return self.info()

    def _drop_stale_builds(self):
        db = self._db
        active = self._meta_int(db.meta(), "active_version")
        stale = db.stale_building_versions(active)
        if stale:
            with db.write():
                for v in stale:
                    db.drop_version(v)

    # -- reading ----------------------------------------------------------------------------

    def __len__(self):
        return self._live().count()

    def get(self, ids=None, *, keys=None):
        """The stored originals, float32 (n, dim), in the order asked (cosine: normalised)."""
        db = self._live()
        if (ids is None) == (keys is None):
            raise InvalidInputError("give either ids or keys to get")
        with db.read():
            ids = self._resolve(db, ids, keys)
            blobs = db.fetch_vectors(ids.tolist())
        return self._unpack([blobs[i] for i in ids.tolist()])

    def iter(self, *, batch_size=8192):
        """Yield ``(ids int64 (m,), keys list, vectors float32 (m, dim))`` over the whole
        store in id order, ``batch_size`` at a time (the originals; for export)."""
        db = self._live()
        for ids, blobs in db.iter_vectors(batch=batch_size):
            found = db.keys_for_ids(ids)
            yield (np.asarray(ids, np.int64), [found.get(i) for i in ids], self._unpack(blobs))

    def ids_for_keys(self, keys, *, missing="raise"):
        """Ids of ``keys`` (int64). Unknown keys raise ``UnknownIdError``, or with
        ``missing="skip"`` get id -1."""
        db = self._live()
        if missing == "raise":
            return self._resolve(db, None, keys)
        if missing != "skip":
            raise InvalidInputError(f'missing must be "raise" or "skip", got {missing!r}')
        keys = self._key_list(keys, len(list(keys)))
        found = db.ids_for_keys(keys)
        return np.asarray([found.get(k, -1) for k in keys], np.int64)

    _USER = "user."

    def user_meta(self):
        """The application's own key/value strings kept in the file (``set_user_meta``)."""
        meta = self._live().meta()
        return {k[len(self._USER):]: v for k, v in meta.items() if k.startswith(self._USER)}

    def set_user_meta(self, name, value, *, only_if_absent=False):
        """Keep ``name = value`` (strings) in the file, in one transaction; returns the value
        stored afterwards (with ``only_if_absent``, an existing value wins and is returned)."""
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidInputError("user metadata names and values must be strings")
        db = self._live()
        with db.write():
            current = db.meta().get(self._USER + name)
            if current is not None and only_if_absent:
                return current
            db.set_meta(**{self._USER + name: value})
        return value

    def keys(self, ids):
        """Keys of ``ids`` (None where a vector has no key)."""
        found = self._live().keys_for_ids(self._id_array(ids).tolist())
        return [found.get(i) for i in self._id_array(ids).tolist()]

    def search(self, queries, *, k=10, rerank=None, with_keys=False, exclude=None):
        """The k nearest stored vectors of each query.

        Parameters
        ----------
        queries : array-like of shape (nq, dim) or (dim,)
        k : int > 0
        rerank : int >= 1 or None. ADC picks ``k * rerank`` candidates, which are reranked
            exactly against the originals; 1 ranks by codes alone. Default 10 when the store
            keeps originals, else 1. Ignored before training (search is exact then).
        with_keys : bool, also return the keys of the results
        exclude : sequence of ids or None, left out of every result (e.g. the item a query
            was taken from)

        Returns
        -------
        SearchResult(ids int64 (nq, k), distances float32 (nq, k), keys): 1-D for a 1-D
        query; padded with id -1 and distance +inf when fewer than k vectors exist.
        """
        db = self._live()
        single = np.ndim(queries) == 1
        q = self._vectors(queries, name="queries", allow_1d=True)
        k = check_k(k)
        ex = None if exclude is None else np.unique(self._id_array(exclude, "exclude"))
        want = k if ex is None else k + len(ex)
        if rerank is None:
            rerank = DEFAULT_RERANK if self.config["keep_originals"] else 1
        if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 1:
            raise InvalidInputError(f"rerank must be an integer >= 1, got {rerank!r}")
        if rerank > 1 and not self.config["keep_originals"]:
            raise OriginalsMissingError("rerank needs the originals; this store does not keep them")
        state = self._current()
        if state["count"] == 0:
            raise EmptyStoreError(f"{db.path} holds no vectors")
        if not state["version"]:
            res = algo.exact_search(state["vectors"], q, k=want, metric=self.metric,
                                    vector_norms=state["vector_norms"])
            ids = np.where(res.ids >= 0, state["ids"][np.maximum(res.ids, 0)], -1)
            res = SearchResult(ids, res.distances)
        else:
            res = algo.adc_search(state["rq"], state["codes"], q, k=want * rerank,
                                  metric=self.metric, bias=state["bias"])
            ids = np.where(res.ids >= 0, state["ids"][np.maximum(res.ids, 0)], -1)
            if rerank > 1:
                res = algo.rerank(q, ids, self._fetch, k=want, metric=self.metric)
            else:
                res = SearchResult(ids, res.distances)
        if ex is not None:
            res = _without(res, ex, k)
        keys = None
        if with_keys:
            found = db.keys_for_ids(np.unique(res.ids[res.ids >= 0]).tolist())
            keys = [[found.get(i) for i in row] for row in res.ids.tolist()]
        if single:
            return SearchResult(res.ids[0], res.distances[0], keys[0] if keys else None)
        return SearchResult(res.ids, res.distances, keys)

    def _fetch(self, ids):
        """Originals of the sorted unique ``ids`` a rerank asks for."""
        fmt = self.config["originals"]
        if fmt != "zstd" and len(ids) <= 900:
            blob = self._db.fetch_concat(ids.tolist())
            if blob is not None:
                return unpack_originals([blob], fmt, self.dim * len(ids)).reshape(len(ids), self.dim)
        # some candidates were deleted by another connection since our arrays were read:
        # NaN rows rank them last and rerank drops them
        blobs = self._db.fetch_vectors(ids.tolist())
        out = np.full((len(ids), self.dim), np.nan, np.float32)
        have = [j for j, i in enumerate(ids.tolist()) if i in blobs]
        if have:
            out[have] = self._unpack([blobs[int(ids[j])] for j in have])
        return out

    # -- maintenance ------------------------------------------------------------------------

    def compact(self, *, progress=None):
        """Free the space of deleted vectors: rewrite the code blocks, then VACUUM the file."""
        db = self._live()
        with db.write():
            version = self._meta_int(db.meta(), "active_version")
            dead = db.tombstones()
            if version and dead:
                _report(progress, "compact", 0, 2)
                ids, codes, norms, _ = codeblocks.read_codes(db, version, self.config["stages"])
                keep = ~np.isin(ids, np.asarray(dead, np.int64))
                self._write_blocks(db, version, ids[keep], codes[keep], norms[keep])
                db.clear_tombstones()
        _report(progress, "compact", 1, 2)
        db.vacuum()
        _report(progress, "compact", 2, 2)
        self._invalidate()

    def info(self):
        """Counts, configuration, codebook version and error, and bytes on disk by part."""
        db = self._live()
        with db.read():
            meta = db.meta()
            version = self._meta_int(meta, "active_version")
            out = {"path": db.path, "count": db.count(), **self.config,
                   "trained": bool(version), "codebook_version": version,
                   "deleted_pending_compact": len(db.tombstones()),
                   "bytes": db.bytes_by_part()}
            if version:
                row = db.codebooks_row(version)
                out["train_mse"] = row["train_mse"]
                out["trained_at"] = row["created_at"]
                out["added_since_training"] = row["added_count"]
                out["added_mse"] = (row["added_sq_error"] / row["added_count"]
                                    if row["added_count"] else None)
        return out

    def check(self):
        """The store's own consistency check: a list of problems, empty when all is well."""
        db = self._live()
        problems = [p for p in db.integrity_check() if p != "ok"]
        with db.read():
            meta = db.meta()
            version = self._meta_int(meta, "active_version")
            live = set(db.all_ids())
            dead = set(db.tombstones())
            if version:
                row = db.codebooks_row(version)
                if row is None or row["state"] != "active":
                    problems.append(f"active codebook version {version} is missing or not active")
                    return problems
                seen = []
                for b, cnt, i, cd, nm in db.read_blocks(version):
                    try:
                        seen.append(unpack_block(cnt, row["stages"], i, cd, nm)[0])
                    except RvqstoreError as exc:
                        problems.append(f"block {b}: {exc}")
                ids = np.concatenate(seen) if seen else np.empty(0, np.int64)
                if len(np.unique(ids)) != len(ids):
                    problems.append("an id appears twice in the code blocks")
                in_blocks = set(ids.tolist())
                if live - in_blocks:
                    problems.append(f"{len(live - in_blocks)} stored vectors have no codes")
                if in_blocks - live - dead:
                    problems.append(f"{len(in_blocks - live - dead)} codes belong to no vector")
            if self.config["keep_originals"] or not version:
                blobs = db.fetch_vectors(sorted(live)[:1000])
                try:
                    if blobs:
                        self._unpack(list(blobs.values()))
                except RvqstoreError as exc:
                    problems.append(f"originals: {exc}")
        return problems

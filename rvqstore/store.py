"""The Store: one SQLite file of codebooks, code blocks and originals, searched by ADC + rerank.

This facade and its private helpers are the only modules that join the codec
(:mod:`rvqstore.algo`) and the file (:mod:`rvqstore.storage`): ``_config`` (settings,
opening, input checks), ``_snapshot`` (the in-memory arrays searches scan), ``_writes``
(adds and compaction) and ``_training`` (codebook versions and the consistency check).
"""

import collections
import dataclasses
import functools
import os
import re
import sqlite3

import numpy as np

from . import _config, _snapshot, _training, _writes
from . import algo
from ._config import meta_int
from .algo import SearchResult
from .algo.index import PartitionedCodeIndex, calibrate_nprobe, scan_every_code
from .algo.validate import MAX_K, METRICS, check_k
from .filters import Filter
from .errors import (BadFileError, ConfigMismatchError, DuplicateError, EmptyStoreError,
                     InvalidInputError, NotTrainedError, OriginalsMissingError, StoreClosedError)
from .storage import ORIGINAL_FORMATS, classify, pack_originals, translate_errors
from .storage.text import KeywordIndex

__all__ = ["Store", "DEFAULT_RERANK", "METRICS", "ORIGINAL_FORMATS"]

DEFAULT_RERANK = 10
"""The candidates per result a filtered search weighs against comparing the passing items
exactly (see EXACT_PLAN_ROWS), and the usual explicit ``rerank=``."""

AUTO_RERANK = (5, 50)
"""The least and most candidates per result the adaptive rerank (``rerank=None``) reads;
between them, every candidate within the ADC error margin (:func:`algo.search.rerank_depths`).
"""

EXACT_PLAN_ROWS = 2
"""A filtered search compares the passing items exactly when at most this many times
``k * DEFAULT_RERANK`` pass: reading them costs no more than a scan's rerank reads."""


RRF_K = 60
"""Reciprocal rank fusion's constant (Cormack et al.): score = sum of 1 / (RRF_K + rank)."""


def _text_query(text):
    """A user's text as the words a keyword search looks for, any of which may match (plain
    words: no query syntax reaches FTS5)."""
    if not isinstance(text, str):
        raise InvalidInputError(f"text must be a string, got {type(text).__name__}")
    words = re.findall(r"\w+", text)
    if not words:
        raise InvalidInputError(f"text {text[:50]!r} has no words to search for")
    return words[:64]


def _partition_choice(partitions, config):
    """``partitions`` checked against the store's codebook size (K: partitions, K**2:
    cells; 0 and None pass)."""
    if not partitions:
        return partitions
    K = config.codebook_size
    if partitions not in (K, K * K):
        raise InvalidInputError(
            f"partitions={partitions}: a store with codebook_size {K} has {K} partitions "
            f"(its first stage's codewords) or {K * K} cells (its first two stages'); "
            "give one of those, 0 (no partitions) or None (automatic)")
    if partitions == K * K and config.stages < 2:
        raise InvalidInputError(f"partitions={partitions} (cells of two stages) needs at "
                                f"least 2 stages, the store has {config.stages}")
    return int(partitions)


def _rows_of(ids, found):
    """``found[id]`` laid out like ``ids`` (nq, k): None for -1 and for ids not found."""
    return [[found.get(i) for i in row] for row in ids.tolist()]


def _figures(train_count, train_mse, added_count, added_sq_error):
    """Training figures checked: counts ints >= 0, errors finite floats >= 0."""
    out = []
    for name, v, kind in (("train_count", train_count, int), ("train_mse", train_mse, float),
                          ("added_count", added_count, int),
                          ("added_sq_error", added_sq_error, float)):
        ok = (not isinstance(v, bool) and isinstance(v, (int, np.integer)) if kind is int
              else isinstance(v, (int, float, np.integer, np.floating))
              and not isinstance(v, bool) and np.isfinite(v))
        if not ok or v < 0:
            raise InvalidInputError(f"{name} must be a {'count' if kind is int else 'number'} "
                                    f">= 0, got {v!r}")
        out.append(kind(v))
    return out


def _calibration(c):
    """(stages per cell, nprobe, coverage, z) of a calibration dict, checked; or None."""
    if c is None:
        return None
    try:
        out = (c["stages_per_cell"], c["nprobe"], c["coverage"], c["rerank_error_z"])
    except (TypeError, KeyError) as exc:
        raise InvalidInputError(f"calibration must be recorded_calibration()'s dict "
                                f"(missing {exc})") from None
    p, n, cov, z = out
    ok = (p in (1, 2) and not isinstance(n, bool) and isinstance(n, (int, np.integer))
          and 1 <= n < 10**10 and isinstance(cov, (int, float)) and 0 <= cov <= 1
          and isinstance(z, (int, float)) and 0 < z <= 10)
    if not ok:
        raise InvalidInputError(f"calibration out of range: {c!r}")
    return int(p), int(n), float(cov), float(z)


def _padded(res, k):
    """The first k columns of ``res``, padded with id -1 and distance +inf."""
    if res.ids.shape[1] >= k:
        return SearchResult(res.ids[:, :k], res.distances[:, :k])
    ids = np.full((len(res.ids), k), -1, np.int64)
    dist = np.full((len(res.ids), k), np.inf, np.float32)
    m = min(k, res.ids.shape[1])
    ids[:, :m], dist[:, :m] = res.ids[:, :m], res.distances[:, :m]
    return SearchResult(ids, dist)


def _translated(method):
    """Let no SQLite error escape ``method`` unnamed: each becomes an ``RvqstoreError``
    subclass naming the file (disk full, locked, I/O, corruption)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:  # not a context manager: this wraps every search
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise classify(exc, self._db.path, self._db.timeout) from exc
    return wrapper


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
        self._snap = None  # the in-memory index, loaded lazily and refreshed on change
        self._codecs = _snapshot.Codecs()
        # FTS5's bm25 ranking from an in-memory copy of the keyword index (storage/text.py)
        self._keywords = KeywordIndex()
        self._partitions = None  # Store.open(partitions=): see _snapshot.cell_prefix
        # searches by plan and originals read (rerank, exact plan), for info()
        self._plans = collections.Counter(scan=0, exact=0, originals_read=0)

    # -- opening and closing ----------------------------------------------------------------

    @classmethod
    def open(cls, path, *, dim=None, metric=None, stages=None, codebook_size=None,
             keep_originals=None, originals=None, readonly=False, create=True, block_size=None,
             train_beam=None, add_beam=None, train_sample=None, seed=None, mmap_originals=False,
             durable=True, timeout=10.0, max_bytes=None, partitions=None):
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
        mmap_originals : bool, read rerank candidates through memory-mapped I/O: ~0.1 ms
            faster per query while the file sits in the page cache, but touched pages count
            as resident memory, and a million-vector store is no faster (default False)
        block_size : int, vectors per code block (default 16384)
        train_beam, add_beam : int, beam width when (re)training encodes everything and
            when add() encodes new vectors (default 1, greedy: see the README's measurements)
        train_sample : int, vectors sampled to fit the codebooks (default 65536)
        seed : int, seed of training
        durable : bool, a commit that returned survives power loss (SQLite
            ``synchronous=FULL``, the default); False syncs less (``NORMAL``: a killed
            process still loses nothing, a power cut may lose the last commits), for bulk
            loads
        timeout : float, seconds to wait for another connection's write lock before a
            ``LockedError`` (default 10)
        max_bytes : int or None, a quota for this connection: a write that would grow the
            file beyond it fails with ``DiskFullError`` and is rolled back, as on a full disk
        partitions : how this connection's searches group a trained store's codes. The
            first RVQ stage is a coarse quantizer: a vector's first stage codes name its
            partition (K = ``codebook_size`` of them) and its first two stages' codes its
            cell (K**2). A partitioned search scans only the cells nearest the query
            (``search(nprobe=)``). None (the default) partitions by cells from 200,000
            vectors on and scans every code below; 0 always scans every code; K or K**2
            force partitions or cells. The grouping is made in memory (``compact()`` lays
            the file's code blocks out by cell so that it is there already); the choice
            changes nothing in the file.

        On an existing file the configuration is read from the file, and an argument
        that conflicts with it is an error naming both values.
        """
        given = dict(dim=dim, metric=metric, stages=stages, codebook_size=codebook_size,
                     keep_originals=keep_originals, originals=originals, block_size=block_size,
                     train_beam=train_beam, add_beam=add_beam, train_sample=train_sample,
                     seed=seed)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
                not 0 <= timeout <= 86400:
            raise InvalidInputError(f"timeout must be seconds in [0, 86400], got {timeout!r}")
        if partitions is not None and (isinstance(partitions, bool) or
                                       not isinstance(partitions, (int, np.integer)) or
                                       partitions < 0):
            raise InvalidInputError(f"partitions must be None or an integer >= 0, got "
                                    f"{partitions!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or
                                      not isinstance(max_bytes, (int, np.integer)) or max_bytes < 1):
            raise InvalidInputError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        with translate_errors(os.fspath(path), timeout):
            db, config = _config.open_database(path, given, readonly=readonly, create=create,
                                               mmap_originals=mmap_originals, durable=durable,
                                               timeout=timeout, max_bytes=max_bytes)
            try:
                store = cls(db, config)
                store._partitions = _partition_choice(partitions, config)
                if not readonly:
                    _training.drop_stale_builds(db)
                return store
            except BaseException:
                db.close()
                raise

    def close(self):
        """Close the file; safe to call twice."""
        if not self._closed:
            self._closed = True
            self._snap = None
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
        return self.config.dim

    @property
    def metric(self):
        return self.config.metric

    # -- in-memory state --------------------------------------------------------------------

    def _current(self):
        """The in-memory snapshot, refreshed when another connection has committed.

        Appends by others only touch the last code block and new ones, so a refresh reads
        just those unless the blocks were rewritten (compact, retrain: ``blocks_epoch``).
        """
        db = self._live()
        dv = db.data_version()
        if self._snap is not None and dv == self._seen_version:
            return self._snap
        self._learn_dim()
        with db.read():
            snap = _snapshot.load(db, self.config, self._snap, self._partitions)
        self._snap = snap
        # the version seen before the read: a commit landing meanwhile triggers one more
        # refresh rather than being missed
        self._seen_version = dv
        return snap

    def _learn_dim(self):
        """Take the dimension another connection gave the store (by its first add)."""
        if self.config.dim is None:
            with self._db.read():
                dim = _config.Config.from_meta(self._db.meta(), self.path).dim
            if dim is not None:
                self.config = dataclasses.replace(self.config, dim=dim)

    def _invalidate(self):
        self._snap = None

    @_translated
    def code_index(self):
        """The in-memory index searches use, as of now (for inspection and benchmarks).

        Returns
        -------
        ExactIndex (untrained: ``ids``, ``vectors``, ``norms``) or FlatCodeIndex (trained:
        ``rq``, ``ids`` int64 (n,), ``codes`` uint8 (n, stages), ``bias`` float32 (n,), the
        L2 norms or 0, +inf for deleted rows), or PartitionedCodeIndex (the same grouped by
        cell: ``codes`` and ``bias`` by position, ``rows`` the row of each position; see
        ``Store.open(partitions=)``); all have ``nbytes``. Read-only:
        the store updates it in place after its own writes.
        """
        return self._current().index

    def _unpack(self, blobs, ids=None):
        self._learn_dim()
        return _config.unpack(self._db, blobs, self.config, ids)

    # -- input checks -----------------------------------------------------------------------

    def _vectors(self, x, name="vectors", allow_1d=False):
        return _config.as_vectors(x, dim=self.dim, metric=self.metric, name=name,
                                  allow_1d=allow_1d)

    _id_array = staticmethod(_config.id_array)
    _key_list = staticmethod(_config.key_list)

    # -- writing ----------------------------------------------------------------------------

    @_translated
    def add(self, vectors, *, ids=None, keys=None, metadata=None, documents=None,
            skip_existing_keys=False, progress=None):
        """Add vectors in one transaction; returns their ids.

        Parameters
        ----------
        vectors : array-like of shape (n, dim)
        ids : sequence of n distinct int64 not in the store, or None to number them
        keys : sequence of n distinct str not in the store, or None
        metadata : sequence of n dict or None, JSON objects whose values are str, int,
            float, bool, None or lists of those (what ``where`` filters select on)
        documents : sequence of n str or None, the items' texts
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
            ids = _config.new_id_array(ids, n)
        metas = None if metadata is None else _config.metadata_texts(metadata, n)
        docs = None if documents is None else _config.document_list(documents, n)
        added = _writes.add(db, self.config, x, ids, keys, skip_existing_keys=skip_existing_keys,
                            snap=self._snap, codecs=self._codecs, seen_version=self._seen_version,
                            progress=progress, metas=metas, docs=docs)
        self.config = added.config
        if added.ids is None:  # every key was stored already
            return added.out
        if docs is not None:
            self._keywords.note_written(added.ids)
        if not _snapshot.after_add(self._snap if added.fresh else None, self.config,
                                   added.version, added.x, added.ids, added.appended,
                                   added.metas):
            self._invalidate()
        if added.out is not None:
            added.out[added.out < 0] = added.ids
            return added.out
        return added.ids

    @_translated
    def upsert(self, vectors, *, keys, metadata=None, documents=None, progress=None):
        """Replace the items whose key is stored (vector, codes, metadata, document; the id
        stays) and add the rest, in one transaction; returns the ids in the order given."""
        db = self._live()
        x = self._vectors(vectors)
        n = len(x)
        keys = self._key_list(keys, n)
        if len(set(keys)) != n:
            raise DuplicateError("keys contain duplicates")
        metas = None if metadata is None else _config.metadata_texts(metadata, n)
        docs = None if documents is None else _config.document_list(documents, n)
        if self.config.dim is None:  # a first write fixes the dimension, as add() does
            return self.add(x, keys=keys, metadata=metadata, documents=documents,
                            progress=progress)
        ids = _writes.upsert(db, self.config, x, keys, metas=metas, docs=docs, snap=self._snap,
                             codecs=self._codecs, progress=progress)
        self._keywords.note_written(ids)
        self._invalidate()
        return ids

    @_translated
    def update(self, ids=None, *, keys=None, metadata=None, documents=None):
        """Change the metadata and/or documents of items (by id or key) without touching
        their vectors, in one transaction. ``metadata``/``documents``: one value per item
        (None clears it); leave the argument out to keep what is stored."""
        db = self._live()
        if (ids is None) == (keys is None):
            raise InvalidInputError("give either ids or keys to update")
        if keys is not None:
            keys = self._key_list(keys, len(list(keys)))
        n = len(keys) if keys is not None else len(self._id_array(ids))
        metas = None if metadata is None else _config.metadata_texts(metadata, n)
        docs = None if documents is None else _config.document_list(documents, n)
        ids = _writes.update(db, None if ids is None else self._id_array(ids), keys,
                             metas=metas, docs=docs)
        if docs is not None:
            self._keywords.note_written(ids)
        if metas is not None and self._snap is not None:
            self._snap.columns = None  # rebuilt from the file on the next filtered search
        return ids

    @_translated
    def delete(self, ids=None, *, keys=None, where=None):
        """Delete vectors by id, by key or by filter at once (one transaction); returns
        how many.

        Unknown ids or keys are an error and nothing is deleted. Their code space is
        reclaimed by :meth:`compact`. ``where`` deletes every item that passes the filter.
        """
        db = self._live()
        if sum(a is not None for a in (ids, keys, where)) != 1:
            raise InvalidInputError("give one of ids, keys or where to delete")
        if where is not None:
            ids = self._matching_ids(where)
            if not len(ids):
                return 0
        with db.write():
            fresh = self._snap is not None and db.data_version() == self._seen_version
            if where is not None:  # those another connection deleted meanwhile are gone
                ids = np.asarray(sorted(db.existing_ids(ids.tolist())), np.int64)
            else:
                ids = _config.resolve(db, ids, keys)
            n = db.delete_vectors(ids.tolist())
            version = meta_int(db.meta(), "active_version", db.path)
            if version:
                db.add_tombstones(ids.tolist())
        self._keywords.note_written(ids)
        if not _snapshot.after_delete(self._snap if fresh else None, version, ids, n):
            self._invalidate()
        return n

    # -- training ---------------------------------------------------------------------------

    @_translated
    def train(self, *, progress=None):
        """Fit codebooks on (a sample of) the stored originals and encode every vector.

        On a trained store this is :meth:`retrain`. Needs at least ``codebook_size`` vectors.
        """
        return self._fit(progress)

    @_translated
    def retrain(self, *, progress=None):
        """New codebooks from the originals, every vector re-encoded, switched atomically.

        The new version's codes are written in batches; readers keep searching the old
        version until the final transaction switches to the new one.
        """
        if not self.config.keep_originals and meta_int(self._live().meta(), "active_version", self.path):
            raise OriginalsMissingError(
                "retrain() needs the original vectors and this store was created with "
                "keep_originals=False")
        return self._fit(progress)

    def _fit(self, progress):
        _training.fit(self._live(), self.config, progress)
        self._invalidate()
        if self._partitions or len(self) >= _snapshot.AUTO_PARTITION_ROWS:
            self.calibrate()
        return self.info()

    # -- the quantized form -----------------------------------------------------------------

    @_translated
    def quantizer(self):
        """The active codebooks, a :class:`ResidualQuantizer` (its ``encode``/``decode``
        read and make the codes :meth:`iter_codes` yields); ``NotTrainedError`` before
        training. The training figures are in :meth:`info`."""
        db = self._live()
        with db.read():
            version = meta_int(db.meta(), "active_version", db.path)
            if not version:
                raise NotTrainedError(f"{db.path} is not trained: it has no codebooks yet")
            return _snapshot.codec(db, self.config, version)

    @_translated
    def rerank_margin(self, stages=None):
        """The adaptive rerank's margin on this connection's codes: ``{"rms_error": the
        codes' per-dimension RMS error, "z": standard deviations}`` (partitioned: as
        calibrated). What :mod:`rvqstore.shards` needs to rerank candidates merged from
        several stores as deep as one store would."""
        db = self._live()
        with db.read():
            snap = self._current()
            if not snap.version:
                raise NotTrainedError(f"{db.path} is not trained: it has no codes yet")
            index = snap.index
            self._calibrate(index)
            return {"rms_error": float(index.error_of(stages)), "z": float(index.error_z)}

    @_translated
    def recorded_calibration(self):
        """The partitioned search calibration the file records for the active codebooks
        (:meth:`calibrate`): ``{"stages_per_cell", "nprobe", "coverage", "rerank_error_z"}``,
        or None when it records none."""
        db = self._live()
        with db.read():
            meta = db.meta()
            version = meta_int(meta, "active_version", db.path)
            for prefix in (2, 1):
                got = version and _snapshot.recorded_calibration(meta, version, prefix, db.path)
                if got:
                    return {"stages_per_cell": prefix, "nprobe": got[0], "coverage": got[1],
                            "rerank_error_z": got[2]}
        return None

    def iter_codes(self):
        """Yield ``(ids int64 (n,), codes uint8 (n, stages), sq_norms float32 (n,))`` of every
        stored vector, a code block (``block_size`` rows) at a time, as of one snapshot
        (one read transaction, held until the generator is finished or closed). ``sq_norms``
        are the decoded vectors' squared norms ``||x^||^2``, which L2 search adds to the
        lookup-table sums. The file's block order: by cell after :meth:`compact`."""
        db = self._live()
        try:
            with db.read():
                yield from _training.live_codes(db, self.config)
        except sqlite3.Error as exc:
            raise classify(exc, db.path, db.timeout) from exc

    @_translated
    def import_codes(self, quantizer, batches, *, train_count=0, train_mse=0.0, added_count=0,
                     added_sq_error=0.0, calibration=None, next_id=None, total=None,
                     progress=None):
        """Fill an empty, untrained store with vectors already encoded by ``quantizer`` (a
        :class:`ResidualQuantizer` of this store's stages, codebook size and dimension): no
        training, no encoding. All rows in one transaction: all or nothing.

        batches : iterable of dicts with ``ids`` and ``codes`` (uint8 (n, stages)) and
            optionally ``keys``, ``vectors`` (the originals: required when the store keeps
            them, refused when it does not), ``metadata``, ``documents`` and ``sq_norms``
            (checked against the codes' own, then recomputed)
        train_count, train_mse, added_count, added_sq_error : the codebooks' figures
            (:meth:`info`), which set the adaptive rerank's depth: give the exporting
            store's to search as it did
        calibration : None or :meth:`recorded_calibration`'s dict, recorded for the new
            codebooks so that partitioned searches probe as deep as the exporting store's
        next_id : None or the id the store numbers its next row from (at least one above
            every imported id): the exporting store's ``info()["next_id"]``, so that ids it
            had given and deleted are not given again
        total : rows expected, for progress; returns the number of rows imported
        """
        db = self._live()
        rq = quantizer
        if not isinstance(rq, algo.ResidualQuantizer):
            raise InvalidInputError(f"quantizer must be a ResidualQuantizer, got "
                                    f"{type(rq).__name__}")
        c = self.config
        shape = (c.stages, c.codebook_size, c.dim if c.dim is not None else rq.dim)
        if rq.codebooks.shape != shape:
            raise ConfigMismatchError(f"codebooks have shape {rq.codebooks.shape} (stages, "
                                      f"size, dim); the store's settings say {shape}")
        if not np.isfinite(rq.codebooks).all():
            raise InvalidInputError("codebooks hold values that are not finite")
        figures = _training.Figures(*_figures(train_count, train_mse, added_count,
                                              added_sq_error), _calibration(calibration))
        if c.dim is None:
            with db.write():
                db.set_meta(dim=rq.dim)
            self.config = c = dataclasses.replace(c, dim=rq.dim)
        if next_id is not None and (isinstance(next_id, bool) or
                                    not isinstance(next_id, (int, np.integer)) or
                                    not 0 <= next_id <= _config.MAX_META_INT):
            raise InvalidInputError(f"next_id must be an id >= 0, got {next_id!r}")
        n = _training.install(db, c, rq, figures, self._import_rows(rq, batches), progress,
                              total, next_id=next_id)
        self._invalidate()
        return n

    def _import_rows(self, rq, batches):
        """Each batch of :meth:`import_codes`, checked and packed for the file."""
        c = self.config
        for j, b in enumerate(batches):
            if not isinstance(b, dict) or "ids" not in b or "codes" not in b:
                raise InvalidInputError(f"batch {j} must be a dict with 'ids' and 'codes'")
            codes = np.asarray(b["codes"])
            if codes.ndim != 2 or codes.shape[1] != c.stages or codes.dtype != np.uint8:
                raise InvalidInputError(f"batch {j}: codes must be uint8 of shape (n, "
                                        f"{c.stages}), got {codes.dtype} {codes.shape}")
            n = len(codes)
            if codes.size and int(codes.max()) >= c.codebook_size:
                raise InvalidInputError(f"batch {j}: a code is {int(codes.max())}, beyond "
                                        f"codebook_size={c.codebook_size}")
            ids = _config.new_id_array(b["ids"], n)
            keys = b.get("keys")
            keys = [None] * n if keys is None else self._key_list(keys, n, allow_none=True)
            named = [k for k in keys if k is not None]
            if len(set(named)) != len(named):
                raise DuplicateError(f"batch {j}: keys contain duplicates")
            vectors = b.get("vectors")
            if vectors is None and c.keep_originals:
                raise OriginalsMissingError(
                    f"batch {j} has no vectors and {self._db.path} keeps originals (open it "
                    "with keep_originals=False to import codes alone)")
            if vectors is not None and not c.keep_originals:
                raise InvalidInputError(f"batch {j} has vectors but {self._db.path} keeps no "
                                        "originals")
            blobs = [None] * n
            if vectors is not None:
                x = self._vectors(vectors)
                if len(x) != n:
                    raise InvalidInputError(f"batch {j}: {len(x)} vectors for {n} codes")
                blobs = pack_originals(x, c.originals)
            norms = rq.norms(codes)
            given = b.get("sq_norms")
            if given is not None:
                given = np.asarray(given, np.float64)
                if given.shape != (n,) or not np.allclose(given, norms, rtol=1e-4, atol=1e-5):
                    raise InvalidInputError(
                        f"batch {j}: sq_norms disagree with the codes' decoded vectors (the "
                        "codes or the codebooks are not the ones they were made with)")
            metas = b.get("metadata")
            metas = None if metas is None else _config.metadata_texts(metas, n)
            docs = b.get("documents")
            docs = None if docs is None else _config.document_list(docs, n)
            yield ids, keys, blobs, metas, docs, codes, norms

    @_translated
    def calibrate(self):
        """Choose the default ``nprobe`` of partitioned searches on this store's own vectors
        and record it in the file, for every connection of this codebook version.

        ``train()``/``retrain()`` do this for a store partitioned by default (200,000
        vectors or more) or opened with ``partitions=``; otherwise the first partitioned
        search calibrates in memory (on 64 held-out stored vectors: one scan of every
        code for each, ~0.4 s at a million vectors). Cells are those the connection's
        ``partitions`` choose (two stages' codes unless K partitions were forced). Returns
        ``{"nprobe", "coverage", "error_z", "recall_by_z"}``: the held-out recall at each
        margin tried (None in a store without originals, which does not rerank).
        """
        db = self._live()
        snap = self._current()
        if not snap.version:
            raise EmptyStoreError(f"{db.path} is not trained: calibrate() needs codes")
        prefix = _snapshot.cell_prefix(self._partitions, self.config, snap.count) or \
            min(2, self.config.stages)
        index = snap.index
        if not isinstance(index, PartitionedCodeIndex) or index.prefix != prefix:
            index = _snapshot.arranged(index, prefix, None)
        index.calibration = None
        with db.read():
            self._calibrate(index)
        if index.calibration is None:
            return {"nprobe": index.nprobe, "coverage": None}
        with db.write():
            if meta_int(db.meta(), "active_version", db.path) == snap.version:
                db.set_meta(**{_snapshot.CALIBRATION_KEY: _snapshot.calibration_text(
                    snap.version, prefix, index.nprobe, index.calibration, index.error_z)})
        return {"nprobe": index.nprobe, "coverage": index.calibration,
                "error_z": index.error_z, "recall_by_z": index.recall_by_z}

    # -- reading ----------------------------------------------------------------------------

    @_translated
    def __len__(self):
        return self._live().count()

    @_translated
    def get(self, ids=None, *, keys=None):
        """The stored originals, float32 (n, dim), in the order asked (cosine: normalised)."""
        db = self._live()
        if (ids is None) == (keys is None):
            raise InvalidInputError("give either ids or keys to get")
        with db.read():
            ids = _config.resolve(db, ids, keys)
            blobs = db.fetch_vectors(ids.tolist())
        return self._unpack([blobs[i] for i in ids.tolist()], ids.tolist())

    def iter(self, *, batch_size=8192, with_metadata=False, with_documents=False):
        """Yield ``(ids int64 (m,), keys list, vectors float32 (m, dim))`` over the whole
        store in id order, ``batch_size`` at a time (the originals; for export), followed
        in each tuple by the metadata list and/or the documents list when asked for.

        Each batch is read as of one commit (its keys, vectors, metadata and documents
        agree); no transaction is held between batches, so the caller may write meanwhile,
        and a batch may see commits made since the one before (ids only grow: nothing is
        repeated).
        """
        db = self._live()
        with translate_errors(db.path, db.timeout):
            batches = db.iter_vectors(batch=batch_size)
            while True:
                with db.read():
                    batch = next(batches, None)
                    if batch is None:
                        return
                    ids, blobs = batch
                    found = db.keys_for_ids(ids)
                    out = (np.asarray(ids, np.int64), [found.get(i) for i in ids],
                           self._unpack(blobs, ids))
                    if with_metadata:
                        metas = _config.stored_metadata(db, ids)
                        out += ([metas.get(i) for i in ids],)
                    if with_documents:
                        docs = _config.stored_documents(db, ids)
                        out += ([docs.get(i) for i in ids],)
                yield out

    def add_arrow(self, source, *, upsert=False, skip_existing_keys=False, progress=None):
        """Add the rows of a Parquet file (path) or a ``pyarrow.Table`` ``source``: a
        ``vector`` (or ``embedding``) column of lists of numbers and optional ``id``,
        ``key``, ``metadata`` (JSON text or struct) and ``document`` columns (see
        :mod:`rvqstore.arrow`). Read and added 65,536 rows per transaction, so a file of
        any length never sits in memory whole; a batch that fails leaves the earlier ones.
        ``upsert``: replace by key (as :meth:`upsert`). Returns the rows read. Needs the
        ``arrow`` extra (pyarrow)."""
        from . import arrow

        source = os.fspath(source) if isinstance(source, (str, os.PathLike)) else source
        return arrow.add_batches(self, source, upsert=upsert,
                                 skip_existing_keys=skip_existing_keys, progress=progress)

    def to_arrow(self, *, batch_size=8192):
        """Every stored item as a ``pyarrow.Table`` (id, key, vector, metadata as JSON text,
        document; see :mod:`rvqstore.arrow`, which also streams it to Parquet). Needs the
        ``arrow`` extra (pyarrow)."""
        from . import arrow

        return arrow.to_arrow(self, batch_size=batch_size)

    def export_quantized(self, directory, *, with_vectors=None, progress=None):
        """Write the codebooks (with their version and training figures) and every
        vector's codes and squared norm (and, by default when kept, its original, metadata
        and document) as Parquet files in ``directory``, with the documented schema of
        :mod:`rvqstore.arrow`; returns the rows written. Needs the ``arrow`` extra."""
        from . import arrow

        return arrow.write_quantized(self, os.fspath(directory), with_vectors=with_vectors,
                                     progress=progress)

    @classmethod
    def import_quantized(cls, directory, path, *, progress=None, **options):
        """A new store at ``path`` rebuilt from :meth:`export_quantized`'s ``directory``
        without training or encoding (same ids, codes and figures: the same search
        results). ``options`` go to :meth:`open`. Needs the ``arrow`` extra."""
        from . import arrow

        return arrow.read_quantized(os.fspath(directory), os.fspath(path), progress=progress,
                                    **options)

    @_translated
    def ids(self, where=None):
        """Every stored id, ascending (int64); with ``where``, those of the items that pass
        the filter."""
        if where is None:
            return np.asarray(self._live().all_ids(), np.int64)
        self._live()
        self._learn_dim()
        if self.config.dim is None:
            Filter.parse(where)  # still refuse a malformed filter
            return np.zeros(0, np.int64)
        return self._matching_ids(where)

    @_translated
    def ids_for_keys(self, keys, *, missing="raise"):
        """Ids of ``keys`` (int64). Unknown keys raise ``UnknownIdError``, or with
        ``missing="skip"`` get id -1."""
        db = self._live()
        if missing == "raise":
            return _config.resolve(db, None, keys)
        if missing != "skip":
            raise InvalidInputError(f'missing must be "raise" or "skip", got {missing!r}')
        keys = self._key_list(keys, len(list(keys)))
        found = db.ids_for_keys(keys)
        return np.asarray([found.get(k, -1) for k in keys], np.int64)

    _USER = "user."

    @_translated
    def user_meta(self):
        """The application's own key/value strings kept in the file (``set_user_meta``)."""
        meta = self._live().meta()
        return {k[len(self._USER):]: v for k, v in meta.items() if k.startswith(self._USER)}

    @_translated
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

    @_translated
    def keys(self, ids):
        """Keys of ``ids`` (None where a vector has no key)."""
        wanted = self._id_array(ids).tolist()
        found = self._live().keys_for_ids(wanted)
        return [found.get(i) for i in wanted]

    @_translated
    def search(self, queries, *, k=10, rerank=None, where=None, text=None, exclude=None,
               nprobe=None, stages=None, with_keys=False, with_metadata=False,
               with_documents=False):
        """The k nearest stored vectors of each query (among those passing ``where``).

        Parameters
        ----------
        queries : array-like of shape (nq, dim) or (dim,)
        k : int > 0
        rerank : int >= 1 or None. None (the default, when the store keeps originals): ADC
            candidates are reranked exactly against the originals as deep as the codes'
            error requires: every candidate whose estimate is within the error margin of
            the k-th best (at least ``5 * k``, at most ``50 * k``; deeper for queries far
            from what passes a filter). An integer reranks exactly ``k * rerank``
            candidates; 1 ranks by codes alone (the default without originals). Ignored
            before training (search is exact then).
        where : dict or None, a metadata filter (:mod:`rvqstore.filters`): the result is the
            k nearest among the items that pass it, never fewer than min(k, matches). When
            few items pass, their originals are compared exactly instead of scanning the
            codes (``info()["search_plans"]`` counts which plan ran).
        text : str or None, with a single query vector: hybrid search. The vector ranking and
            the keyword ranking of the documents (:meth:`text_search`), the top k of each,
            are fused by reciprocal rank fusion (score = sum of 1 / (60 + rank)); results
            come in fused order with their exact vector distances.
        exclude : sequence of ids or None, left out of every result (e.g. the item a query
            was taken from)
        nprobe : int >= 1 or None, for a partitioned store (``Store.open(partitions=)``):
            a query scans the codes of the cells nearest it until it has scanned ``nprobe``
            average cells' worth of rows (under ``where``, of passing rows). None: the
            store's default, calibrated so that the candidates hold 99% of what scanning
            every code would rank first (recorded by ``train()``/:meth:`calibrate`, else
            chosen by the first such search; ``info()["partitions"]`` says which). Ignored
            by a store that scans every code.
        stages : int in [1, stages] or None: rank the codes by their first ``stages``
            stages only (an RVQ prefix is a coarser code of the same vector: fewer table
            lookups per code, a rougher estimate, so the adaptive rerank reads deeper).
            None: every stage. Ignored before training.
        with_keys, with_metadata, with_documents : bool, also return those of the results

        Returns
        -------
        SearchResult(ids int64 (nq, k), distances float32 (nq, k), keys, metadata,
        documents): 1-D for a 1-D query; padded with id -1 and distance +inf when fewer than
        k vectors pass.
        """
        db = self._live()
        self._learn_dim()
        single = np.ndim(queries) == 1
        q = self._vectors(queries, name="queries", allow_1d=True)
        k = check_k(k)
        ex = None if exclude is None else self._id_array(exclude, "exclude")
        flt = None if where is None else Filter.parse(where)
        adaptive = rerank is None and self.config.keep_originals
        if rerank is None:
            rerank = DEFAULT_RERANK if adaptive else 1
        if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 1:
            raise InvalidInputError(f"rerank must be an integer >= 1, got {rerank!r}")
        if rerank > MAX_K:
            raise InvalidInputError(f"rerank must be at most {MAX_K:,}, got {rerank}")
        if rerank > 1 and not self.config.keep_originals:
            raise OriginalsMissingError("rerank needs the originals; this store does not keep them")
        if nprobe is not None and (isinstance(nprobe, bool) or
                                   not isinstance(nprobe, (int, np.integer)) or nprobe < 1):
            raise InvalidInputError(f"nprobe must be an integer >= 1, got {nprobe!r}")
        if stages is not None and (isinstance(stages, bool) or
                                   not isinstance(stages, (int, np.integer)) or
                                   not 1 <= stages <= self.config.stages):
            raise InvalidInputError(f"stages must be an integer in [1, {self.config.stages}] "
                                    f"(the store's stages), got {stages!r}")
        stages = None if stages is None else int(stages)
        fts = None if text is None else _text_query(text)
        if fts is not None and len(q) != 1:
            raise InvalidInputError(f"text= (hybrid search) takes one query vector, got {len(q)}")
        # the ranking and the results' keys, metadata and documents as of one commit
        with db.read():
            snap = self._current()
            if snap.count == 0:
                raise EmptyStoreError(f"{db.path} holds no vectors")
            index = snap.index
            allow = None if ex is None else ~np.isin(index.ids, ex)
            if flt is not None:
                passing = flt.mask(_snapshot.columns(db, snap))
                allow = passing if allow is None else allow & passing
            if snap.version and allow is not None and self.config.keep_originals and \
                    int(np.count_nonzero(allow & index.live())) <= EXACT_PLAN_ROWS * k * rerank:
                # few rows pass: their exact distances cost less than a scan, and are exact
                self._plans["exact"] += 1
                among = index.ids[allow & index.live()]
                self._plans["originals_read"] += len(among)
                res = self._exact_among(q, among, k)
            elif not snap.version:
                self._plans["exact"] += 1
                res = index.search(q, k=k, allow=allow)
            else:
                self._plans["scan"] += 1
                depth = k * (AUTO_RERANK[1] if adaptive else rerank)
                if nprobe is None:
                    self._calibrate(index)
                # more candidates than rows would only allocate padding
                res = index.search(q, k=max(min(depth, len(index.ids)), 1), allow=allow,
                                   nprobe=nprobe, stages=stages)
                if adaptive:
                    depths = algo.search.rerank_depths(q, res.distances, k=k, metric=self.metric,
                                                       rms_error=index.error_of(stages),
                                                       floor=k * AUTO_RERANK[0],
                                                       z=index.error_z)
                    cut = np.arange(res.ids.shape[1])[None, :] >= depths[:, None]
                    res = SearchResult(np.where(cut, -1, res.ids), res.distances)
                if rerank > 1 or adaptive:
                    self._plans["originals_read"] += int(np.count_nonzero(res.ids >= 0))
                    res = algo.rerank(q, res.ids, self._fetch, k=k, metric=self.metric)
                else:
                    res = _padded(res, k)
            if fts is not None:
                res = self._fused(q, res, fts, k, allow)
            keys, metas, docs = self._extras(res.ids, with_keys, with_metadata, with_documents)
        if single:
            first = lambda rows: None if rows is None else rows[0]  # noqa: E731
            return SearchResult(res.ids[0], res.distances[0], first(keys), first(metas),
                                first(docs))
        return SearchResult(res.ids, res.distances, keys, metas, docs)

    CALIBRATION_QUERIES = 64
    CALIBRATION_TARGET = 0.99
    RECALL_TARGET = 0.97
    ERROR_Z_CHOICES = (1.5, 2.0, 2.5, 3.0)
    """Margins the calibration may choose: never above the flat default (algo.search.ERROR_Z,
    3), which holds on real queries; stored vectors held out as queries overstate it on
    data with near-duplicates (wordnet-minilm: 4 for 97% held out, where 3 gives real
    queries 0.96-0.98), and understate it on mixtures (2 gives held-out vectors 0.973, real
    queries 0.961)."""

    def _calibrate(self, index):
        """Choose a partitioned index's defaults once (per grouping), on stored vectors held
        out of their own answers: their originals, or their decoded codes in a store
        without originals.

        ``nprobe`` reaches CALIBRATION_TARGET of what a scan of every code ranks first
        (:func:`~rvqstore.calibrate_nprobe`). Then the adaptive rerank's margin: the least
        of ERROR_Z_CHOICES at which the default search finds RECALL_TARGET of each held-out
        vector's k nearest (exact, among the scan of every code's top ``k * 50``): the
        codes' error relative to the gaps between neighbours differs between data sets,
        and each standard deviation of margin costs reads."""
        if not isinstance(index, PartitionedCodeIndex) or \
                index.calibration is not None:
            return
        live = np.flatnonzero(index.live())
        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(live, size=min(self.CALIBRATION_QUERIES, len(live)),
                                  replace=False))
        ids = index.ids[rows]
        if self.config.keep_originals:
            queries = self._fetch(ids)
        else:
            queries = index.rq.decode(index.codes[index.positions()[rows]])
        keep = ~np.isnan(queries).any(axis=1)
        queries = np.ascontiguousarray(queries[keep], np.float32)
        own = ids[keep]
        if self.metric == "cosine":
            queries = algo.search.normalize(queries)
        k = 10
        reranks = self.config.keep_originals and len(queries)
        # one scan of every code serves both choices: its top k + 1 for nprobe, its top
        # k * 50 + 1 (the adaptive rerank's deepest) as the margin's candidates
        full = scan_every_code(index, queries, k * AUTO_RERANK[1] + 1 if reranks else k + 1) \
            if len(queries) else None
        index.nprobe, index.calibration = calibrate_nprobe(
            index, queries, own, k=k, target=self.CALIBRATION_TARGET, full=full)
        if reranks:
            index.error_z = self._calibrated_z(index, queries, own, k, full)

    def _calibrated_z(self, index, queries, own, k, full):
        """The least margin (in standard deviations) of ERROR_Z_CHOICES at which the
        adaptive rerank at ``index.nprobe`` finds RECALL_TARGET of the held-out ``queries``'
        k nearest (their own ids ``own`` left out), or comes within half a percent of the
        best any choice finds when none reaches it. ``full``: :func:`scan_every_code` of
        the queries, ``k * 50 + 1`` deep."""
        depth = full.ids.shape[1]
        every = SearchResult(np.where(full.ids >= 0,
                                      index.ids[index.rows[np.maximum(full.ids, 0)]], -1),
                             full.distances)
        near = index.search(queries, k=min(depth, len(index.ids)))
        cache = {}

        def fetch(wanted):
            missing = np.array([i for i in wanted.tolist() if i not in cache], np.int64)
            if len(missing):
                cache.update(zip(missing.tolist(), self._fetch(missing)))
            return np.stack([cache[i] for i in wanted.tolist()])

        def without_own(res):
            ids = np.where(res.ids == own[:, None], -1, res.ids)
            dist = np.where(ids >= 0, res.distances, np.inf).astype(np.float32)
            order = np.argsort(dist, axis=1, kind="stable")
            return SearchResult(np.take_along_axis(ids, order, 1),
                                np.take_along_axis(dist, order, 1))

        truth = algo.rerank(queries, without_own(every).ids, fetch, k=k, metric=self.metric)
        want = [set(t[t >= 0].tolist()) for t in truth.ids]
        near = without_own(near)
        found = {}
        for z in self.ERROR_Z_CHOICES:
            depths = algo.search.rerank_depths(queries, near.distances, k=k, metric=self.metric,
                                               rms_error=index.rms_error,
                                               floor=k * AUTO_RERANK[0], z=z)
            cut = np.arange(near.ids.shape[1])[None, :] >= depths[:, None]
            got = algo.rerank(queries, np.where(cut, -1, near.ids), fetch, k=k,
                              metric=self.metric).ids
            found[z] = sum(len(w & set(g.tolist())) for w, g in zip(want, got)) / \
                max(sum(len(w) for w in want), 1)
        # where the probe's cells cap the recall below the target, the margin that comes
        # within half a percent of the best
        goal = min(self.RECALL_TARGET, max(found.values()) - 0.005)
        index.recall_by_z = found
        return min(z for z in self.ERROR_Z_CHOICES if found[z] >= goal)

    def _fused(self, q, res, fts, k, allow):
        """Reciprocal rank fusion of the vector ranking ``res`` (one query) and the keyword
        ranking of ``fts``, both limited to ``allow``; top k with exact vector distances."""
        vec_ids = [i for i in res.ids[0].tolist() if i >= 0]
        text_ids = self._text_ranking(fts, k, allow)
        score = collections.defaultdict(float)
        for ranking in (vec_ids, text_ids):
            for rank, i in enumerate(ranking):
                score[i] += 1.0 / (RRF_K + rank + 1)
        top = sorted(score, key=lambda i: (-score[i], i))[:k]
        known = dict(zip(res.ids[0].tolist(), res.distances[0].tolist()))
        dist = np.asarray([known.get(i, np.nan) for i in top], np.float32)
        missing = np.flatnonzero(np.isnan(dist))
        if len(missing) and self.config.keep_originals:
            ids = np.asarray([top[j] for j in missing], np.int64)
            order = np.argsort(ids)
            vecs = self._fetch(ids[order])
            exact = algo.search.exact_distances(q, vecs, self.metric)[0]
            dist[missing[order]] = exact
        dist[np.isnan(dist)] = np.inf
        return _padded(SearchResult(np.asarray([top], np.int64), dist[None]), k)

    def _text_ranking(self, words, depth, allow=None):
        """Ids of the best ``depth`` documents for ``words`` (among the index rows ``allow``
        when given), best first."""
        allowed = None if allow is None else np.sort(self._current().index.ids[allow])
        return [i for i, _ in self._keywords.keyword_ranking(self._db, words, depth, allowed)]

    @_translated
    def text_search(self, text, *, k=10, where=None, with_keys=False, with_metadata=False,
                    with_documents=False):
        """Keyword search over the documents alone (SQLite FTS5, BM25 order).

        ``text`` is split into words, any of which may match. Returns a 1-D SearchResult:
        ids best first, and as distances the BM25 scores (smaller is better, as for every
        distance here); padded with -1 / +inf.
        """
        db = self._live()
        fts = _text_query(text)
        k = check_k(k)
        with db.read():  # the ranking and the results as of one commit
            allowed = None if where is None else self._matching_ids(where)
            rows = self._keywords.keyword_ranking(db, fts, k, allowed)
            ids = np.full(k, -1, np.int64)
            dist = np.full(k, np.inf, np.float32)
            if rows:
                ids[:len(rows)], dist[:len(rows)] = zip(*rows)
            extras = self._extras(ids[None], with_keys, with_metadata, with_documents)
        return SearchResult(ids, dist, *(None if e is None else e[0] for e in extras))

    def _extras(self, ids, with_keys, with_metadata, with_documents):
        """(keys, metadata, documents) of the result ids (nq, k), each laid out like them,
        or None where not asked for."""
        db = self._db
        if not (with_keys or with_metadata or with_documents):
            return None, None, None
        found = np.unique(ids[ids >= 0]).tolist()
        with db.read():  # all three as of one commit
            return (_rows_of(ids, db.keys_for_ids(found)) if with_keys else None,
                    _rows_of(ids, _config.stored_metadata(db, found)) if with_metadata else None,
                    _rows_of(ids, _config.stored_documents(db, found)) if with_documents
                    else None)

    def _exact_among(self, q, ids, k):
        """Exact top k of each query among the stored vectors ``ids`` (the filtered plan)."""
        ids = np.unique(ids)
        if not len(ids):
            return _padded(SearchResult(np.empty((len(q), 0), np.int64),
                                        np.empty((len(q), 0), np.float32)), k)
        vectors = self._fetch(ids)
        keep = ~np.isnan(vectors).any(axis=1)  # deleted by another connection meanwhile
        ids, vectors = ids[keep], vectors[keep]
        res = algo.exact_search(vectors, q, k=k, metric=self.metric)
        return SearchResult(np.where(res.ids >= 0, ids[np.maximum(res.ids, 0)], -1),
                            res.distances)

    def _matching_ids(self, where):
        """Ids of the live items that pass ``where``, ascending."""
        flt = Filter.parse(where)
        with self._db.read():  # the snapshot and its metadata columns as of one commit
            snap = self._current()
            index = snap.index
            passing = flt.mask(_snapshot.columns(self._db, snap)) & index.live()
        return np.sort(index.ids[passing])

    @_translated
    def count(self, where=None):
        """How many items the store holds, or how many pass ``where``."""
        return len(self) if where is None else int(len(self.ids(where)))

    @_translated
    def metadata(self, ids=None, *, keys=None):
        """The metadata of items, by id or key (a dict, or None where an item has none)."""
        return self._per_item(ids, keys, _config.stored_metadata)

    @_translated
    def documents(self, ids=None, *, keys=None):
        """The documents of items, by id or key (None where an item has none)."""
        return self._per_item(ids, keys, _config.stored_documents)

    def _per_item(self, ids, keys, read):
        """``read(db, ids)`` ({id: value}) in the order asked, None where absent."""
        db = self._live()
        if (ids is None) == (keys is None):
            raise InvalidInputError("give either ids or keys")
        with db.read():
            ids = _config.resolve(db, ids, keys).tolist()
            stored = read(db, ids)
        return [stored.get(i) for i in ids]

    def _fetch(self, ids):
        """Originals of the sorted unique ``ids`` a rerank asks for."""
        return _snapshot.fetch_originals(self._db, self.config, ids)

    # -- maintenance ------------------------------------------------------------------------

    @_translated
    def compact(self, *, progress=None):
        """Free the space of deleted vectors: rewrite the code blocks, then VACUUM the file."""
        _writes.compact(self._live(), self.config, progress)
        self._invalidate()

    @_translated
    def info(self):
        """Counts, configuration, codebook version and error, and bytes on disk by part."""
        db = self._live()
        with db.read():
            meta = db.meta()
            version = meta_int(meta, "active_version", db.path)
            out = {"path": db.path, "count": db.count(), **dataclasses.asdict(self.config),
                   "trained": bool(version), "codebook_version": version,
                   "next_id": meta_int(meta, "next_id", db.path),
                   "deleted_pending_compact": len(db.tombstones()),
                   "search_plans": dict(self._plans),
                   "bytes": db.bytes_by_part()}
            if version:
                row = db.codebooks_row(version)
                if row is None:
                    raise BadFileError(f"{db.path}: active codebook version {version} is "
                                       "missing: the file is corrupted")
                out["train_mse"] = row["train_mse"]
                out["train_count"] = row["train_count"]
                out["added_sq_error"] = row["added_sq_error"]
                out["trained_at"] = row["created_at"]
                out["added_since_training"] = row["added_count"]
                out["added_mse"] = (row["added_sq_error"] / row["added_count"]
                                    if row["added_count"] else None)
        out["partitions"] = self._partition_info() if version else None
        return out

    def _partition_info(self):
        """How searches group the codes: None when they scan every code."""
        index = self._current().index
        if not isinstance(index, PartitionedCodeIndex):
            return None
        sizes = index.cell_sizes()
        n = int(sizes.sum())
        return {"cells": index.partitions, "stages_per_cell": index.prefix,
                "non_empty": int(np.count_nonzero(sizes)),
                "rows_per_cell": {"mean": float(n / max(np.count_nonzero(sizes), 1)),
                                  "max": int(sizes.max()) if len(sizes) else 0},
                # sum of squared sizes over its value for equal sizes (1.0: balanced)
                "imbalance": float(np.count_nonzero(sizes) * (sizes.astype(np.float64) ** 2).sum()
                                   / max(n, 1) ** 2),
                "ungrouped_rows": len(index.rows) - index.grouped,
                "nprobe": index.nprobe,
                "nprobe_calibrated": index.calibration is not None,
                "calibration_coverage": index.calibration,
                "rerank_error_z": index.error_z}

    @_translated
    def check(self):
        """The store's own consistency check: a list of problems, empty when all is well."""
        return _training.check(self._live(), self.config)

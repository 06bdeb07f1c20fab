"""Sharded stores: ordinary store files that share one set of codebooks, searched as one.

A shard directory holds ``shard-00000.db``, ``shard-00001.db``, ... (each an ordinary
store: ``Store.open`` reads it), ``codebooks.npy`` and ``build.json`` (the plan of the
build that wrote them: settings, codebook fingerprint, rows per shard) and, once every
shard is written, ``manifest.json``. A shard is written under ``NAME.partial`` and renamed
when whole, so a file under its final name is a finished shard: a build that was killed
resumes by writing the shards that are missing (:func:`rvqstore.dask.build`).

Ids are global: a build numbers the rows of all shards as one sequence (or keeps an ``id``
column), so merged results name each vector once.

Routing (:class:`ShardedStore`): a stored key lives where it was written, and a delete
asks every shard for it; a new key goes to shard ``crc32(key as UTF-8) mod shards``. New
rows get ids above every stored id. Retraining fits one new set of codebooks on a sample
drawn from all shards (in proportion to their sizes) and rewrites every shard with it.

Search with the default adaptive rerank is two-phase (:func:`two_phase`): every shard
ranks its codes alone, the estimates are merged, and the merged list is reranked exactly
as deep as one store would rerank it (the margin of the shards' codes), reading the
originals from the shards that hold them: with every code scanned, the answer (and the
originals read) is that of one store holding every vector. With ``rerank=N`` each shard
runs its own search and the per-shard top k are merged by exact distance.
"""

import concurrent.futures
import hashlib
import json
import os
import zlib
from typing import List, NamedTuple, Optional

import numpy as np

from . import _config
from .errors import (ConfigMismatchError, DuplicateError, InvalidInputError, NotTrainedError,
                     RvqstoreError, UnknownIdError)

MANIFEST, PLAN, CODEBOOKS = "manifest.json", "build.json", "codebooks.npy"


class ShardError(RvqstoreError):
    """A shard is missing or unreadable (the message names each one)."""


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.db"


def fingerprint(codebooks: np.ndarray) -> str:
    """sha256 of the codebooks' float32 bytes: equal fingerprints, comparable codes."""
    return hashlib.sha256(np.ascontiguousarray(codebooks, "<f4").tobytes()).hexdigest()


def route(key: str, shards: int) -> int:
    """The shard a new key goes to."""
    return zlib.crc32(key.encode("utf-8")) % shards


# ----------------------------------------------------------------------------- writing

def remove_store_files(path):
    for suffix in ("", "-wal", "-shm", "-journal", "-build"):
        try:
            os.remove(str(path) + suffix)
        except FileNotFoundError:
            pass


def write_shard(path, rq, config, figures, ids, vectors, *, keys=None, metadata=None,
                documents=None, fault=None) -> int:
    """Encode ``vectors`` with the codebooks ``rq`` and write them as an ordinary store at
    ``path``, atomically: built as ``path.partial``, renamed when whole. Returns the rows.
    The one transaction commits without its own fsync (``durable=False``); closing the
    store checkpoints the WAL into the file and syncs it, before the rename (and the
    directory is synced after it).

    config : :class:`rvqstore._config.Config` of the shard (dim, metric, stages...)
    figures : :class:`rvqstore._training.Figures` of the codebooks
    fault : a callable run after the rows are written and before the rename (tests: a
        worker killed there must leave no shard under its final name)
    """
    from . import algo
    from .store import Store

    x = np.asarray(vectors, np.float32)
    if config.metric == "cosine":
        x = algo.normalize(x)
    tmp = str(path) + ".partial"
    remove_store_files(tmp)
    store = Store.open(tmp, dim=config.dim, metric=config.metric, stages=config.stages,
                       codebook_size=config.codebook_size,
                       keep_originals=config.keep_originals, originals=config.originals,
                       block_size=config.block_size, train_beam=config.train_beam,
                       add_beam=config.add_beam, train_sample=config.train_sample,
                       seed=config.seed, durable=False)
    try:
        if not len(x):  # an empty shard: the settings and the codebooks' mark, no rows
            store.set_user_meta("rvqstore.codebooks", fingerprint(rq.codebooks))
            return _finish(store, tmp, path, fault, 0)
        batch = {"ids": np.asarray(ids, np.int64),
                 "codes": rq.encode(x, beam_width=config.train_beam), "keys": keys,
                 "metadata": metadata, "documents": documents}
        if config.keep_originals:
            batch["vectors"] = x
        n = store.import_codes(rq, [batch], train_count=figures.train_count,
                               train_mse=figures.train_mse)
        store.set_user_meta("rvqstore.codebooks", fingerprint(rq.codebooks))
    except BaseException:
        store.close()
        raise
    return _finish(store, tmp, path, fault, n)


def _finish(store, tmp, path, fault, n):
    """Close (checkpoint and sync), then rename ``tmp`` into place and sync the directory."""
    store.close()
    if fault is not None:
        fault()
    os.replace(tmp, path)
    _sync_dir(os.path.dirname(os.path.abspath(path)))
    return n


def _sync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path, value):
    """``value`` as JSON at ``path``, atomically (temp file, fsync, rename)."""
    tmp = str(path) + ".partial"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path, what):
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ShardError(f"{path} is missing: not a finished shard directory") from None
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path} is not a readable {what}: {exc}") from None
    if not isinstance(value, dict):
        raise ShardError(f"{path} is not a {what}")
    return value


def shard_paths(source) -> List[str]:
    """The shard files of a directory (its manifest's list) or a list of paths."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        manifest = read_json(os.path.join(source, MANIFEST), "shard manifest")
        names = manifest.get("shards")
        if not isinstance(names, list) or not all(isinstance(n, dict) and
                                                  isinstance(n.get("file"), str)
                                                  for n in names):
            raise ShardError(f"{source}/{MANIFEST} lists no shards")
        out = []
        for n in names:
            if os.path.basename(n["file"]) != n["file"]:
                raise ShardError(f"{source}/{MANIFEST}: shard file {n['file']!r} is not a "
                                 "plain name in the directory")
            out.append(os.path.join(source, n["file"]))
        return out
    if isinstance(source, (str, os.PathLike)):
        raise ShardError(f"{source} is not a shard directory")
    return [os.fspath(p) for p in source]


# ----------------------------------------------------------------------------- reading

class ShardedResult(NamedTuple):
    """The merged top k: ids int64 (nq, k), distances float32 (nq, k) (1-D for one query),
    padded with -1 / +inf; keys (lists like ids) when asked for; ``partial`` when shards
    were left out (``missing`` names them)."""

    ids: np.ndarray
    distances: np.ndarray
    keys: Optional[list] = None
    partial: bool = False
    missing: tuple = ()


def merge(results, k):
    """The global top k of per-shard ``(ids, distances, keys or None)``, arrays of shape
    (nq, k_i), by distance (then id, so that equal distances come in one order): (ids,
    distances, keys or None)."""
    ids = np.concatenate([r[0] for r in results], axis=1)
    dist = np.concatenate([r[1] for r in results], axis=1).astype(np.float32)
    dist = np.where(ids < 0, np.inf, dist)
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), dist), axis=1)[:, :k]
    out_ids = np.take_along_axis(ids, order, 1)
    out_d = np.take_along_axis(dist, order, 1)
    keys = None
    if all(r[2] is not None for r in results):
        rows = [sum((list(r[2][q]) for r in results), []) for q in range(len(ids))]
        keys = [[row[j] for j in o] for row, o in zip(rows, order.tolist())]
    if out_ids.shape[1] < k:
        pad = k - out_ids.shape[1]
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
        out_d = np.pad(out_d, ((0, 0), (0, pad)), constant_values=np.inf)
        if keys is not None:
            keys = [row + [None] * pad for row in keys]
    out_d[out_ids < 0] = np.inf
    return out_ids, out_d, keys


def search_shards(stores, queries, k, *, where=None, rerank=None, nprobe=None,
                  with_keys=False, each=map):
    """Per-shard (ids, distances, keys or None) of 2-D ``queries`` (``each`` maps the
    search over the stores: map, or a thread pool's)."""
    q = queries

    def one(store):
        if len(store) == 0:
            return (np.full((len(q), k), -1, np.int64), np.full((len(q), k), np.inf, np.float32),
                    [[None] * k for _ in q] if with_keys else None)
        r = store.search(q, k=k, where=where, rerank=rerank, nprobe=nprobe,
                         with_keys=with_keys)
        return r.ids, r.distances, r.keys

    return list(each(one, stores))


def candidates(stores, queries, k, *, where=None, nprobe=None, each=map):
    """Phase one of :func:`two_phase`: every shard's top ``50 k`` by its codes alone,
    merged: (ids, estimates, owner = the index in ``stores`` of the shard holding each)."""
    depth = candidate_depth(k)

    def one(store):
        if len(store) == 0:
            return (np.full((len(queries), 1), -1, np.int64),
                    np.full((len(queries), 1), np.inf, np.float32))
        r = store.search(queries, k=depth, rerank=1, where=where, nprobe=nprobe)
        return r.ids, r.distances

    return merge_candidates(list(each(one, stores)), depth)


def candidate_depth(k):
    """How many candidates phase one takes: the adaptive rerank's deepest (50 k), at most
    MAX_K (what a store gives per query)."""
    from .algo.validate import MAX_K
    from .store import AUTO_RERANK

    return min(k * AUTO_RERANK[1], MAX_K)


def merge_candidates(per, depth):
    """(ids, estimates, owner) of the best ``depth`` of per-part (ids, estimates)."""
    ids = np.concatenate([p[0] for p in per], axis=1)
    est = np.concatenate([p[1] for p in per], axis=1).astype(np.float32)
    owner = np.concatenate([np.full(p[0].shape, j) for j, p in enumerate(per)], axis=1)
    est = np.where(ids < 0, np.inf, est)
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), est),
                       axis=1)[:, :depth]
    return (np.take_along_axis(ids, order, 1), np.take_along_axis(est, order, 1),
            np.take_along_axis(owner, order, 1))


def rerank_merged(queries, ids, est, owner, k, margins, fetch_from, *, dim, metric):
    """Phase two of :func:`two_phase`: the depth the widest of the shards' ``margins``
    asks for, then the exact top k; ``fetch_from(owner, ids)`` serves originals. Returns
    (SearchResult, {id: owner})."""
    from . import algo
    from .store import AUTO_RERANK

    q = _config.as_vectors(queries, dim=dim, metric=metric, name="queries")
    depths = algo.search.rerank_depths(q, est, k=k, metric=metric,
                                       rms_error=max(m["rms_error"] for m in margins),
                                       floor=k * AUTO_RERANK[0],
                                       z=max(m["z"] for m in margins))
    cand = np.where(np.arange(ids.shape[1])[None, :] >= depths[:, None], -1, ids)
    held = dict(zip(ids[cand >= 0].tolist(), owner[cand >= 0].tolist()))

    def fetch(wanted):
        out = np.empty((len(wanted), dim), np.float32)
        at = np.asarray([held[i] for i in wanted.tolist()])
        for j in np.unique(at):
            rows = np.flatnonzero(at == j)
            out[rows] = fetch_from(int(j), wanted[rows])
        return out

    return algo.rerank(q, cand, fetch, k=k, metric=metric), held


def two_phase(stores, queries, k, margins, *, where=None, nprobe=None, with_keys=False,
              each=map):
    """The adaptive rerank of one store, over several: each shard ranks its codes (its top
    ``50 k`` estimates, no rerank), the estimates are merged, the margin of the shards'
    codes (the widest) sets how deep the merged list is reranked, and only those
    candidates' originals are read, from the shards that hold them. With every code
    scanned this reads and returns what one store holding every vector would.
    ``margins``: the shards' :meth:`rvqstore.Store.rerank_margin`."""
    ids, est, owner = candidates(stores, queries, k, where=where, nprobe=nprobe, each=each)
    s0 = stores[0]
    res, held = rerank_merged(queries, ids, est, owner, k, margins,
                              lambda j, wanted: stores[j].get(wanted), dim=s0.dim,
                              metric=s0.metric)
    keys = result_keys(res.ids, held, lambda j, ids: stores[j].keys(ids)) if with_keys else None
    return res.ids, res.distances, keys


def result_keys(ids, held, keys_of):
    """The keys of result ``ids`` (nq, k) as lists like them, asking each holder once per
    query: ``held`` {id: owner}, ``keys_of(owner, ids)``."""
    keys = [[None] * len(row) for row in ids]
    for q, row in enumerate(ids.tolist()):
        for j in set(held[i] for i in row if i >= 0):
            mine = [c for c, i in enumerate(row) if i >= 0 and held[i] == j]
            for c, key in zip(mine, keys_of(j, [row[c] for c in mine])):
                keys[q][c] = key
    return keys


class ShardedStore:
    """Shards searched and written as one store.

    source : a shard directory (its ``manifest.json``) or a list of shard files
    readonly : open the shards without write access (the default; adds, deletes and
        retrain need False)
    allow_partial : a missing or unreadable shard is left out and every result says so
        (``partial``, ``missing``) instead of an error naming it
    threads : how many shards are searched at once (None: one per core, at most the shards)
    store_options : go to each shard's :meth:`rvqstore.Store.open` (e.g. ``partitions=``)
    """

    def __init__(self, source, *, readonly=True, allow_partial=False, threads=None,
                 **store_options):
        from .store import Store

        self.readonly = readonly
        self.source = source
        self.paths = shard_paths(source)
        if not self.paths:
            raise ShardError("no shards given")
        self.stores, self.missing = [], []
        problems = []
        for p in self.paths:
            try:
                if not os.path.exists(p):
                    raise ShardError(f"{p} is missing")
                self.stores.append(Store.open(p, readonly=readonly, create=False,
                                              **store_options))
            except RvqstoreError as exc:
                problems.append(str(exc))
                self.missing.append(p)
                self.stores.append(None)
        if problems and not allow_partial:
            self.close()
            raise ShardError(f"{len(problems)} of {len(self.paths)} shards cannot be read: "
                             + "; ".join(problems[:5]))
        live = [s for s in self.stores if s is not None]
        if not live:
            raise ShardError("no shard can be read: " + "; ".join(problems[:5]))
        marks = {s.user_meta().get("rvqstore.codebooks") for s in live}
        if len(marks) != 1 or None in marks:
            self.close()
            raise ConfigMismatchError("the shards do not share one set of codebooks "
                                      f"({len(marks)} fingerprints): their codes and distances "
                                      "are not comparable")
        self.codebooks = marks.pop()
        self.dim, self.metric = live[0].dim, live[0].metric
        self.threads = threads or min(len(live), os.cpu_count() or 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(self.threads) \
            if self.threads > 1 else None

    @classmethod
    def empty(cls, paths):
        """A ShardedStore none of whose ``paths`` could be read (a Dask actor's share when
        every shard of it is missing and partial answers are allowed)."""
        self = cls.__new__(cls)
        self.readonly, self.paths = True, list(paths)
        self.stores, self.missing = [None] * len(self.paths), list(self.paths)
        self.codebooks = self.dim = self.metric = None
        self.threads, self._pool, self.source = 1, None, None
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for s in getattr(self, "stores", []):
            if s is not None:
                s.close()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown()
            self._pool = None

    def __len__(self):
        return sum(len(s) for s in self.stores if s is not None)

    @property
    def partial(self) -> bool:
        return bool(self.missing)

    def search(self, queries, *, k=10, where=None, rerank=None, nprobe=None,
               with_keys=False) -> ShardedResult:
        """The global k nearest (see :meth:`rvqstore.Store.search` for the arguments), from
        each shard's own top k, merged by distance."""
        single = np.ndim(queries) == 1
        q = np.atleast_2d(np.asarray(queries, np.float32))
        live = [s for s in self.stores if s is not None]
        each = map if self._pool is None else self._pool.map
        margins = None
        if rerank is None and all(s.config.keep_originals for s in live):
            try:
                margins = [s.rerank_margin() for s in live if len(s)]
            except NotTrainedError:
                margins = None
        if margins:
            ids, dist, keys = two_phase(live, q, k, margins, where=where, nprobe=nprobe,
                                        with_keys=with_keys, each=each)
        else:
            ids, dist, keys = merge(search_shards(live, q, k, where=where, rerank=rerank,
                                                  nprobe=nprobe, with_keys=with_keys,
                                                  each=each), k)
        if single:
            ids, dist, keys = ids[0], dist[0], None if keys is None else keys[0]
        return ShardedResult(ids, dist, keys, self.partial, tuple(self.missing))

    def keys(self, ids) -> list:
        """The keys of global ids (None where an id has none; UnknownIdError if none holds it)."""
        ids = [int(i) for i in ids]
        found = {}
        for s in self.stores:
            if s is None:
                continue
            stored = set(s.ids().tolist()) & set(ids)
            if stored:
                at = sorted(stored)
                found.update(zip(at, s.keys(at)))
        unknown = [i for i in ids if i not in found]
        if unknown:
            raise UnknownIdError(f"ids in no shard: {unknown[:5]}")
        return [found[i] for i in ids]

    # -- writing ---------------------------------------------------------------------------

    def _writable(self):
        if self.readonly:
            from .errors import ReadOnlyError

            raise ReadOnlyError("the shards were opened read-only (ShardedStore(..., "
                                "readonly=False) writes)")
        if self.missing:
            raise ShardError(f"cannot write with shards missing: {self.missing[:5]}")

    def _lock(self):
        """An exclusive lock on the shard set for one write (``.write-lock`` beside the
        shards, released by the OS if the process dies): two writers never pick the same
        new ids."""
        import contextlib

        try:
            import fcntl
        except ImportError:  # no flock: one writer at a time is the caller's to ensure
            return contextlib.nullcontext()
        path = os.path.join(os.path.dirname(os.path.abspath(self.paths[0])), ".write-lock")

        @contextlib.contextmanager
        def held():
            with open(path, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        return held()

    def _holders(self, keys):
        """{key: shard index} of the stored keys."""
        out = {}
        for j, s in enumerate(self.stores):
            found = s.ids_for_keys(keys, missing="skip")
            for key, i in zip(keys, found.tolist()):
                if i >= 0:
                    out[key] = j
        return out

    def add(self, vectors, *, keys, metadata=None, documents=None):
        """Add rows, each to the shard its key routes to (``route``); returns their ids.

        Every row is checked before any shard is written, and writers of the same shard
        set take turns (a lock file), so ids are never given twice. Each shard's part is
        one transaction; an I/O failure (disk full) in a later shard leaves the earlier
        shards' parts stored (they are listed in the error)."""
        self._writable()
        x = _config.as_vectors(vectors, dim=self.dim, metric=self.metric)
        keys = _config.key_list(keys, len(x))
        if len(set(keys)) != len(keys):
            raise DuplicateError("keys contain duplicates")
        if metadata is not None:
            _config.metadata_texts(metadata, len(x))  # refuse a bad row before any write
        if documents is not None:
            _config.document_list(documents, len(x))
        with self._lock():
            held = self._holders(keys)
            if held:
                raise DuplicateError(f"keys already stored: {sorted(held)[:5]}")
            top = max((int(s.ids()[-1]) for s in self.stores if len(s)), default=-1)
            ids = np.arange(top + 1, top + 1 + len(x), dtype=np.int64)
            where = np.asarray([route(key, len(self.stores)) for key in keys])
            written = []
            for j in np.unique(where):
                at = np.flatnonzero(where == j)
                try:
                    self.stores[j].add(
                        x[at], ids=ids[at], keys=[keys[i] for i in at],
                        metadata=None if metadata is None else [metadata[i] for i in at],
                        documents=None if documents is None else [documents[i] for i in at])
                except RvqstoreError as exc:
                    if not written:
                        raise
                    raise ShardError(f"{self.paths[j]}: {exc}; the rows of shards "
                                     f"{written} were added already") from exc
                written.append(int(j))
        return ids

    def delete(self, *, keys):
        """Delete the rows of ``keys`` from the shards holding them, all or none (an unknown
        key deletes nothing); returns how many."""
        self._writable()
        keys = _config.key_list(keys, len(list(keys)))
        held = self._holders(keys)
        unknown = [key for key in keys if key not in held]
        if unknown:
            raise UnknownIdError(f"keys in no shard: {unknown[:5]}")
        n = 0
        with self._lock():
            for j in sorted(set(held.values())):
                n += self.stores[j].delete(keys=[key for key in keys if held[key] == j])
        return n

    def retrain(self, *, sample=65536, seed=0, progress=None):
        """Fit one new set of codebooks on a sample drawn from every shard (in proportion to
        their sizes) and rewrite each shard with them (each atomically: a crash leaves every
        shard whole, some on the old codebooks, which a search refuses to mix)."""
        from . import _training
        from .store import Store

        self._writable()
        if not all(s.config.keep_originals for s in self.stores):
            raise InvalidInputError("retraining re-encodes the originals: every shard must "
                                    "keep them")
        rng = np.random.default_rng(seed)
        counts = np.asarray([len(s) for s in self.stores])
        take = np.minimum(counts, np.round(sample * counts / max(counts.sum(), 1)).astype(int))
        parts = []
        for s, t in zip(self.stores, take):
            if t:
                ids = s.ids()
                parts.append(s.get(np.sort(rng.choice(ids, t, replace=False))))
        config = self.stores[0].config
        if not parts:
            raise InvalidInputError("the shards hold no vectors to retrain on")
        rq, mse = _training.train_codebooks(np.concatenate(parts), config, rng, progress)
        figures = _training.Figures(int(take.sum()), mse)
        with self._lock():
            # every new shard written beside the old one first, then all renamed in place:
            # a crash while writing leaves the old set whole
            for j, (path, s) in enumerate(zip(self.paths, self.stores)):
                ids, keys, vecs, metas, docs = [], [], [], [], []
                for batch in s.iter(with_metadata=True, with_documents=True):
                    for into, part in zip((ids, keys, vecs, metas, docs), batch):
                        into.append(part)
                if not ids:  # an empty shard stays an empty shard
                    ids, vecs = [np.zeros(0, np.int64)], [np.zeros((0, config.dim), np.float32)]
                write_shard(path + ".next", rq, config, figures, np.concatenate(ids),
                            np.concatenate(vecs), keys=sum(keys, []),
                            metadata=sum(metas, []) or None, documents=sum(docs, []) or None)
                if progress is not None:
                    progress("rewrite", j + 1, len(self.stores))
            for j, path in enumerate(self.paths):
                self.stores[j].close()
                remove_store_files(path)
                os.replace(path + ".next", path)
                self.stores[j] = Store.open(path)
        self.codebooks = fingerprint(rq.codebooks)
        if isinstance(self.source, (str, os.PathLike)) and os.path.isdir(self.source):
            manifest_path = os.path.join(self.source, MANIFEST)
            manifest = read_json(manifest_path, "shard manifest")
            manifest["codebooks"] = self.codebooks
            write_json(manifest_path, manifest)

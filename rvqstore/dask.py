"""Sharded build and search on Dask (``pip install 'rvqstore[dask]'``: dask, distributed).

:func:`build` trains codebooks once, on a sample drawn from the source (a Dask or numpy
array, a Parquet file or dataset, or a Dask DataFrame: a ``vector``/``embedding`` column and
optional ``id``, ``key``, ``metadata`` and ``document``), then encodes every partition on
the workers, each task writing its own shard file (one writer per file) into a directory
that :class:`rvqstore.shards.ShardedStore` and :class:`DaskShardedStore` search. The shard
layout, the global ids and the routing of later writes are described in
:mod:`rvqstore.shards`.

A build writes ``build.json`` and ``codebooks.npy`` before any shard, each shard under a
temporary name renamed when whole, and ``manifest.json`` last: run it again on the same
directory after a crash or a killed worker and it keeps the finished shards, writes the
rest with the same codebooks, and only then writes the manifest.

dask and distributed are imported by these functions, never by ``import rvqstore``.
"""

import json
import os

import numpy as np

from . import shards as _shards
from .errors import InvalidInputError

FORMAT = "rvqstore-shards"


def _distributed():
    try:
        import dask  # noqa: F401
        import distributed
    except ImportError:
        raise ImportError("sharding on Dask needs dask and distributed: "
                          "pip install 'rvqstore[dask]'") from None
    return distributed


def connect(scheduler="local", *, workers=2, threads_per_worker=1):
    """A ``distributed.Client``: ``"local"`` starts a LocalCluster of ``workers`` processes
    with ``threads_per_worker`` threads each (numba and BLAS limited to as many); anything
    else is a scheduler address."""
    distributed = _distributed()
    if scheduler == "local":
        threads = str(threads_per_worker)
        env = {"NUMBA_NUM_THREADS": threads, "OMP_NUM_THREADS": threads,
               "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        cluster = distributed.LocalCluster(n_workers=workers,
                                           threads_per_worker=threads_per_worker,
                                           processes=True, dashboard_address=":0", env=env)
        return distributed.Client(cluster)
    return distributed.Client(scheduler)


# ----------------------------------------------------------------------------- the source

def _partitions(source, rows_per_shard):
    """(list of delayed partitions, their row counts, kind) of the source."""
    import dask.array as da
    import dask.dataframe as dd

    if isinstance(source, np.ndarray):
        if source.ndim != 2:
            raise InvalidInputError(f"vectors must be 2-D, got shape {source.shape}")
        source = da.from_array(source, chunks=(rows_per_shard or 65536, -1))
    if isinstance(source, (str, os.PathLike)):
        # Arrow-backed columns: a partition's vectors come out as one array, not as a
        # pandas object column of per-row arrays
        source = dd.read_parquet(os.fspath(source), dtype_backend="pyarrow")
    if isinstance(source, da.Array):
        if source.ndim != 2:
            raise InvalidInputError(f"vectors must be 2-D, got shape {source.shape}")
        if rows_per_shard:
            source = source.rechunk((rows_per_shard, -1))
        source = source.rechunk({1: -1})
        return list(source.to_delayed().ravel()), [int(c) for c in source.chunks[0]], "array"
    if isinstance(source, dd.DataFrame):
        if rows_per_shard:
            raise InvalidInputError("rows_per_shard applies to arrays; a DataFrame's partitions "
                                    "are its shards (repartition it first)")
        column = next((c for c in ("vector", "embedding") if c in source.columns), None)
        if column is None:
            raise InvalidInputError(f"the source has no vector column (vector or embedding); "
                                    f"its columns: {', '.join(map(str, source.columns))}")
        lengths = source.map_partitions(len).compute()
        return list(source.to_delayed()), [int(n) for n in lengths], "frame"
    raise InvalidInputError(f"the source must be a numpy or Dask array, a Parquet path or a "
                            f"Dask DataFrame, got {type(source).__name__}")


def _columns(part, kind):
    """(vectors float32, ids or None, keys, metadata, documents) of one partition."""
    vectors = _vectors(part, kind)
    if kind == "array":
        return vectors, None, None, None, None
    from .filters import validate_metadata

    ids = np.asarray(part["id"], np.int64) if "id" in part.columns else None
    keys = [None if _missing(k) else str(k) for k in part["key"]] \
        if "key" in part.columns else None
    metadata = None
    if "metadata" in part.columns:
        metadata = []
        for m in part["metadata"]:
            if _missing(m):
                m = None
            elif isinstance(m, str):
                m = json.loads(m)
            elif not isinstance(m, dict):
                m = dict(m)
            metadata.append(validate_metadata(m))
    documents = [None if _missing(d) else str(d) for d in part["document"]] \
        if "document" in part.columns else None
    return vectors, ids, keys, metadata, documents


def _missing(value):
    """None, NaN or pandas' NA (a null cell of an object or an Arrow column)."""
    import pandas as pd

    return value is None or (not isinstance(value, (dict, list, str)) and bool(pd.isna(value)))


def _vectors(part, kind):
    """The float32 vectors (n, dim) of one partition."""
    if kind == "array":
        return np.asarray(part, np.float32)
    import pandas as pd

    column = "vector" if "vector" in part.columns else "embedding"
    col = part[column]
    if isinstance(col.dtype, pd.ArrowDtype):
        import pyarrow as pa

        lists = pa.array(col.array)
        if isinstance(lists, pa.ChunkedArray):  # a repartitioned or multi-row-group part
            lists = lists.combine_chunks()
        sizes = np.asarray(lists.value_lengths()) if not pa.types.is_fixed_size_list(
            lists.type) else np.full(len(lists), lists.type.list_size)
        if lists.null_count or (len(sizes) and (sizes != sizes[0]).any()):
            raise InvalidInputError(f"column {column!r} must hold lists of one length")
        vectors = np.asarray(lists.flatten().to_numpy(zero_copy_only=False),
                             np.float32).reshape(len(col), -1)
    else:
        vectors = np.asarray([np.asarray(v, np.float32) for v in col], np.float32)
    if vectors.ndim != 2:
        raise InvalidInputError(f"column {column!r} must hold lists of one length")
    return vectors


def _sample_rows(part, kind, rows):
    return _vectors(part, kind)[rows]


# ----------------------------------------------------------------------------- build

def _build_task(part, kind, path, codebooks, config, figures, first_id, threads, fault):
    """One shard: the partition's rows encoded with ``codebooks``, written at ``path``."""
    import numba

    from .algo import ResidualQuantizer

    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, threads)))
    vectors, ids, keys, metadata, documents = _columns(part, kind)
    if ids is None:
        ids = np.arange(first_id, first_id + len(vectors), dtype=np.int64)
    return _shards.write_shard(path, ResidualQuantizer(codebooks), config, figures, ids,
                               vectors, keys=keys, metadata=metadata, documents=documents,
                               fault=fault)


def _config_for(dim, metric, stages, codebook_size, keep_originals, originals):
    from ._config import Config

    c = Config(dim=dim, metric=metric, stages=stages, codebook_size=codebook_size,
               keep_originals=keep_originals, originals=originals)
    c.validate()
    return c


def build(source, out_dir, *, client, metric="l2", stages=16, codebook_size=256,
          keep_originals=True, originals="float32", sample=65536, seed=0,
          rows_per_shard=None, threads_per_task=1, progress=None, _fault=None):
    """Build (or resume building) the shard directory ``out_dir`` from ``source`` on the
    Dask ``client``; returns the manifest (a dict). One shard per partition of the source
    (an array's row chunks, ``rows_per_shard`` rows each if given; a DataFrame's
    partitions); empty partitions make no shard. ``threads_per_task``: numba threads each
    encoding task uses (match the workers' threads).

    ``progress(phase, done, total)``: "sample", "train" (the codebooks' own progress),
    "shards". ``_fault``: (shard number, callable) run by that shard's task after it wrote
    its rows and before it renamed its file (tests kill the worker there).
    """
    from . import _training

    distributed = _distributed()
    import dask

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    parts, lengths, kind = _partitions(source, rows_per_shard)
    n = sum(lengths)
    if n == 0:
        raise InvalidInputError("the source holds no rows")
    plan_path = os.path.join(out_dir, _shards.PLAN)
    books_path = os.path.join(out_dir, _shards.CODEBOOKS)
    settings = {"metric": metric, "stages": stages, "codebook_size": codebook_size,
                "keep_originals": keep_originals, "originals": originals}
    if os.path.exists(plan_path):  # resume: same source, same settings, same codebooks
        plan = _shards.read_json(plan_path, "build plan")
        if plan.get("rows") != lengths or plan.get("settings") != settings:
            raise InvalidInputError(f"{out_dir} holds another build (other partitions or "
                                    "settings): use an empty directory")
        manifest_path = os.path.join(out_dir, _shards.MANIFEST)
        if os.path.exists(manifest_path):  # finished: the shards may have changed since
            return _shards.read_json(manifest_path, "shard manifest")
        codebooks = np.load(books_path, allow_pickle=False)
        if (codebooks.dtype != np.float32 or codebooks.ndim != 3
                or codebooks.shape[:2] != (stages, codebook_size)
                or not np.isfinite(codebooks).all()
                or _shards.fingerprint(codebooks) != plan.get("codebooks")):
            raise InvalidInputError(f"{books_path} does not match {plan_path} and the "
                                    f"settings (float32 codebooks of {stages} x "
                                    f"{codebook_size} x dim, the plan's fingerprint)")
        figures = (plan.get("train_count"), plan.get("train_mse"))
        if isinstance(figures[0], bool) or not isinstance(figures[0], int) or figures[0] < 1 \
                or not isinstance(figures[1], (int, float)) or not np.isfinite(figures[1]) \
                or figures[1] < 0:
            raise InvalidInputError(f"{plan_path} has training figures {figures!r}")
        dim = codebooks.shape[2]
    else:
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(n, min(n, sample), replace=False))
        starts = np.concatenate([[0], np.cumsum(lengths)])
        tasks = []
        for j, part in enumerate(parts):
            rows = take[(take >= starts[j]) & (take < starts[j + 1])] - starts[j]
            if len(rows):
                tasks.append(dask.delayed(_sample_rows)(part, kind, rows))
        if progress is not None:
            progress("sample", 0, len(take))
        x = np.concatenate(client.gather(client.compute(tasks)))
        if progress is not None:
            progress("sample", len(take), len(take))
        dim = x.shape[1]
        config = _config_for(dim, **settings)
        if metric == "cosine":
            from .algo import normalize
            x = normalize(x)
        rq, mse = _training.train_codebooks(x, config, rng, progress)
        codebooks = rq.codebooks
        np.save(books_path + ".partial.npy", codebooks)
        os.replace(books_path + ".partial.npy", books_path)
        plan = {"format": FORMAT, "version": 1, "settings": settings, "dim": dim,
                "rows": lengths, "codebooks": _shards.fingerprint(codebooks),
                "train_count": int(len(x)), "train_mse": mse}
        _shards.write_json(plan_path, plan)
    config = _config_for(dim, **settings)
    figures = _training.Figures(plan["train_count"], plan["train_mse"])
    first = np.concatenate([[0], np.cumsum(lengths)])
    books = dask.delayed(codebooks, pure=True)  # one node of the graph, not one copy per task
    todo = []
    for j, rows in enumerate(lengths):
        path = os.path.join(out_dir, _shards.shard_name(j))
        if rows == 0 or _finished(path, rows, plan["codebooks"]):
            continue
        fault = _fault[1] if _fault is not None and _fault[0] == j else None
        todo.append((j, dask.delayed(_build_task)(parts[j], kind, path, books, config,
                                                  figures, int(first[j]),
                                                  threads_per_task, fault)))
    total = sum(1 for r in lengths if r)
    done = total - len(todo)
    if progress is not None:
        progress("shards", done, total)
    futures = client.compute([t for _, t in todo])
    which = {f.key: j for f, (j, _) in zip(futures, todo)}
    failed, first_error = [], None
    for future in distributed.as_completed(futures):  # every task ends, failed or not
        if future.status == "error":
            failed.append(which[future.key])
            first_error = first_error or future.exception()
            continue
        future.result()
        # forgotten at once: a worker that dies later must not make the scheduler run a
        # finished shard again (its file is what counts, not the task's result)
        future.release()
        done += 1
        if progress is not None:
            progress("shards", done, total)
    if failed:
        raise _shards.ShardError(
            f"the build of {out_dir} stopped: shard(s) {sorted(failed)[:10]} failed "
            f"({type(first_error).__name__}: {first_error}); the finished shards are kept, "
            "run the build again to resume") from first_error
    manifest = {"format": FORMAT, "version": 1, "codebooks": plan["codebooks"], "dim": dim,
                **settings, "count": n,
                "shards": [{"file": _shards.shard_name(j), "rows": rows, "first_id":
                            int(first[j])} for j, rows in enumerate(lengths) if rows]}
    _shards.write_json(os.path.join(out_dir, _shards.MANIFEST), manifest)
    return manifest


def _finished(path, rows, codebooks):
    """Whether the shard at ``path`` is written: a file under its final name is whole (it
    was renamed into place), and must hold its rows with these codebooks; one that does
    not is refused, never overwritten (it is not this build's, or was changed since)."""
    from .store import Store

    if not os.path.exists(path):
        return False
    with Store.open(path, readonly=True, create=False) as s:
        count, mark = len(s), s.user_meta().get("rvqstore.codebooks")
    if count != rows or mark != codebooks:
        raise _shards.ShardError(f"{path} holds {count:,} rows with codebooks "
                                 f"{str(mark)[:16]}...; this build writes {rows:,} with "
                                 f"{codebooks[:16]}...: "
                                 "refused (not overwritten); use an empty directory")
    return True


# ----------------------------------------------------------------------------- search

class ShardServer:
    """A Dask actor on one worker holding its shards open between queries."""

    def __init__(self, paths, allow_partial, store_options):
        try:
            self.store = _shards.ShardedStore(paths, allow_partial=allow_partial, threads=1,
                                              **store_options)
        except _shards.ShardError:
            if not allow_partial:
                raise
            self.store = _shards.ShardedStore.empty(paths)  # every shard here is missing

    def _live(self):
        return [s for s in self.store.stores if s is not None]

    def margins(self):
        """The adaptive rerank's margins of this worker's shards, or None when they cannot
        take part in a two-phase search (untrained, or without originals)."""
        from .errors import NotTrainedError

        live = self._live()
        if not all(s.config.keep_originals for s in live):
            return None
        try:
            return [s.rerank_margin() for s in live if len(s)]
        except NotTrainedError:
            return None

    def candidates(self, queries, k, where, nprobe):
        return _shards.candidates(self._live(), queries, k, where=where, nprobe=nprobe)

    def originals(self, shard, ids):
        return self._live()[shard].get(ids)

    def keys(self, shard, ids):
        return self._live()[shard].keys(ids)

    def search(self, queries, k, where, rerank, nprobe, with_keys):
        live = self._live()
        ids, dist, keys = _shards.merge(_shards.search_shards(
            live, queries, k, where=where, rerank=rerank, nprobe=nprobe,
            with_keys=with_keys), k)
        return ids, dist, keys, tuple(self.store.missing)

    def describe(self):
        return {"missing": list(self.store.missing), "dim": self.store.dim,
                "metric": self.store.metric, "codebooks": self.store.codebooks}

    def close(self):
        self.store.close()


class DaskShardedStore:
    """The shards of ``source`` (a directory or list of files every worker can read)
    searched on a Dask cluster: each worker holds an actor with its share of the shards
    open between queries, and a query goes to each actor directly (no scheduler round
    trip, one call per worker, not per shard); the per-worker top k are merged here."""

    def __init__(self, client, source, *, allow_partial=False, **store_options):
        _distributed()
        paths = _shards.shard_paths(source)
        workers = sorted(client.scheduler_info()["workers"])
        groups = [paths[i::len(workers)] for i in range(len(workers))]
        futures = [client.submit(ShardServer, g, allow_partial, store_options, workers=[w],
                                 actor=True, pure=False)
                   for w, g in zip(workers, groups) if g]
        self.actors = []
        for f in futures:
            try:
                self.actors.append(f.result())
            except BaseException:
                self.close()
                raise
        self.paths = paths
        info = [a.describe().result() for a in self.actors]
        self.missing = tuple(p for i in info for p in i["missing"])
        serving = [i for i in info if i["codebooks"] is not None]
        if not serving:
            self.close()
            raise _shards.ShardError("no shard can be read: " + ", ".join(self.missing[:5]))
        if len({(i["codebooks"], i["dim"], i["metric"]) for i in serving}) != 1:
            self.close()
            from .errors import ConfigMismatchError

            raise ConfigMismatchError("the shards do not share one set of codebooks (across "
                                      "the workers): their codes and distances are not "
                                      "comparable")
        self.dim, self.metric = serving[0]["dim"], serving[0]["metric"]
        self.actors = [a for a, i in zip(self.actors, info) if i["codebooks"] is not None]
        self._margins = None

    def search(self, queries, *, k=10, where=None, rerank=None, nprobe=None,
               with_keys=False) -> "_shards.ShardedResult":
        single = np.ndim(queries) == 1
        q = np.atleast_2d(np.asarray(queries, np.float32))
        margins = None
        if rerank is None:
            if self._margins is None:
                got = [a.margins().result() for a in self.actors]
                self._margins = [m for g in got for m in g] if all(
                    g is not None for g in got) else []
            margins = self._margins
        if margins:
            ids, dist, keys = self._two_phase(q, k, margins, where, nprobe, with_keys)
        else:
            calls = [a.search(q, k, where, rerank, nprobe, with_keys) for a in self.actors]
            got = [c.result() for c in calls]
            ids, dist, keys = _shards.merge([g[:3] for g in got], k)
        missing = self.missing
        if single:
            ids, dist, keys = ids[0], dist[0], None if keys is None else keys[0]
        return _shards.ShardedResult(ids, dist, keys, bool(missing), missing)

    def _two_phase(self, q, k, margins, where, nprobe, with_keys):
        """:func:`rvqstore.shards.two_phase` with each worker's shards behind its actor:
        one call per worker for the candidates, one per worker holding originals to read."""
        got = [c.result() for c in [a.candidates(q, k, where, nprobe) for a in self.actors]]
        ids, est, _ = _shards.merge_candidates([(g[0], g[1]) for g in got],
                                               _shards.candidate_depth(k))
        # owner of each candidate: (actor, shard within the actor), numbered as one list
        owners = {}
        for j, g in enumerate(got):
            owners.update(zip(g[0][g[0] >= 0].tolist(),
                              [(j, int(s)) for s in g[2][g[0] >= 0].tolist()]))
        index = {o: n for n, o in enumerate(sorted(set(owners.values())))}
        owner = np.vectorize(lambda i: index[owners[i]] if i >= 0 else -1,
                             otypes=[np.int64])(ids) if ids.size else ids
        back = {n: o for o, n in index.items()}

        def fetch_from(n, wanted):
            a, s = back[n]
            return self.actors[a].originals(s, wanted).result()

        res, held = _shards.rerank_merged(q, ids, est, owner, k, margins, fetch_from,
                                          dim=self.dim, metric=self.metric)
        keys = _shards.result_keys(
            res.ids, held, lambda n, ids: self.actors[back[n][0]].keys(back[n][1], ids).result()
        ) if with_keys else None
        return res.ids, res.distances, keys

    def close(self):
        for a in self.actors:
            a.close().result()
        self.actors = []

"""Sharded build and search: encoding throughput on 1 and 2 Dask workers, an extrapolation
(on paper) to 100M vectors, and sharded against single-store search on the same vectors.

    python -m benchmarks.sharded ../shared/data/wordnet-minilm --store BIG.db

Build: the dataset's base vectors written as a Parquet dataset of one file per
--rows-per-shard rows (each file a partition, so a shard). The codebooks are
trained once (a first build); the timed builds then resume from its build.json and
codebooks.npy with the shard files removed, so they time encoding and writing alone, on a
LocalCluster of 1 and of 2 worker processes with one thread each (numba and BLAS limited
to one thread by the workers' environment).

Search: --store (a trained store, e.g. the 1M benchmark store) is cut into --shards shards
holding its codes, originals and keys (no re-encoding: the same codebooks and codes), then
the same batch of queries runs on the single store, on ShardedStore (threads over shards)
and on DaskShardedStore (actors on 2 workers). Needs the dask, arrow and bench extras.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from rvqstore import Store
from rvqstore import dask as rdask
from rvqstore import shards as rshards

from .common import Threads, load_dataset, markdown_table


def _timed_build(data, n, out, workers, sample, stages, size, keep_originals=True):
    """Seconds of the shard phase (from the first to the last shard progress report)."""
    marks = {}

    def progress(phase, done, total):
        if phase == "shards":
            marks.setdefault("start", time.perf_counter())
            marks["end"] = time.perf_counter()

    client = rdask.connect("local", workers=workers)
    try:
        t = time.perf_counter()
        rdask.build(data, out, client=client, sample=sample, stages=stages,
                    codebook_size=size, keep_originals=keep_originals, progress=progress)
        total = time.perf_counter() - t
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    return marks["end"] - marks["start"], total


def _clear_shards(out):
    for name in os.listdir(out):
        if name.startswith("shard-") or name == rshards.MANIFEST:
            os.remove(os.path.join(out, name))


def _parquet(base, folder, rows):
    """``base`` as a Parquet dataset of one file per ``rows`` rows (a partition each): the
    workers read their own partitions, as from a real dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    for j, a in enumerate(range(0, len(base), rows)):
        part = np.ascontiguousarray(base[a:a + rows], np.float32)
        table = pa.table({"vector": pa.FixedSizeListArray.from_arrays(
            pa.array(part.reshape(-1)), base.shape[1])})
        pq.write_table(table, os.path.join(folder, f"part-{j:05d}.parquet"))
    return folder


def build_part(args, work):
    base, _, _ = load_dataset(args.dataset, limit=args.build_rows)
    data = _parquet(base, os.path.join(work, "data"), args.rows_per_shard)
    out = os.path.join(work, "build")
    keep = not args.no_originals
    _, first = _timed_build(data, len(base), out, 2, args.sample, 16, 256, keep)
    rows = []
    rates = {}
    for workers in (1, 2) * args.repeats:
        _clear_shards(out)
        shard_s, _ = _timed_build(data, len(base), out, workers, args.sample, 16, 256, keep)
        rates.setdefault(workers, []).append(len(base) / shard_s)
    for workers in (1, 2):
        r = statistics.median(rates[workers])
        rows.append([workers, f"{r:,.0f}", f"{r / statistics.median(rates[1]):.2f}x",
                     ", ".join(f"{x:,.0f}" for x in rates[workers])])
    print(f"\n### Build: {len(base):,} x {base.shape[1]} vectors, 16 stages x 256, "
          f"{'originals kept' if keep else 'codes alone (--no-originals)'}, "
          f"{-(-len(base) // args.rows_per_shard)} shards; first build with training "
          f"{first:.1f} s (2 workers); timed: encode + write only, median of {args.repeats}")
    print(markdown_table(["workers (1 thread each)", "vectors/s", "vs 1 worker", "runs"], rows))
    per_worker = statistics.median(rates[2]) / 2
    eff = statistics.median(rates[2]) / (2 * statistics.median(rates[1]))
    print(f"\n### On paper: 100M vectors at the measured {per_worker:,.0f} vectors/s per worker "
          f"(2-worker rate / 2), assuming the 2-worker efficiency ({eff:.2f}) holds and the "
          "sample + training ({:.0f} s here) stays on one machine".format(first - len(base) /
                                                                          statistics.median(
                                                                              rates[2])))
    table = []
    for n in (1, 2, 8, 32, 128):
        seconds = 100e6 / (per_worker * n)
        table.append([n, f"{seconds / 3600:,.1f} h" if seconds > 5400 else
                      f"{seconds / 60:,.0f} min"])
    print(markdown_table(["workers", "encode + write 100M"], table))


def _cut(store, out, n_shards):
    """Shard files holding ``store``'s rows in id ranges, with its codes (no re-encoding)."""
    os.makedirs(out, exist_ok=True)
    rq = store.quantizer()
    info = store.info()
    mark = rshards.fingerprint(rq.codebooks)
    ids = store.ids()
    bounds = np.linspace(0, len(ids), n_shards + 1).astype(int)
    codes_of = {}
    for i, c, _ in store.iter_codes():
        for a, b in zip(i.tolist(), c):
            codes_of[a] = b
    entries = []
    for j in range(n_shards):
        part = ids[bounds[j]:bounds[j + 1]]
        path = os.path.join(out, rshards.shard_name(j))
        rshards.remove_store_files(path)
        s = Store.open(path, dim=store.dim, metric=store.metric, stages=info["stages"],
                       codebook_size=info["codebook_size"], durable=False)
        batches = ({"ids": part[a:a + 65536],
                    "codes": np.stack([codes_of[i] for i in part[a:a + 65536].tolist()]),
                    "vectors": store.get(part[a:a + 65536]),
                    "keys": store.keys(part[a:a + 65536])}
                   for a in range(0, len(part), 65536))
        s.import_codes(rq, batches, train_count=info["train_count"],
                       train_mse=info["train_mse"], added_count=info["added_since_training"],
                       added_sq_error=info["added_sq_error"])
        s.set_user_meta("rvqstore.codebooks", mark)
        s.calibrate()
        s.close()
        entries.append({"file": rshards.shard_name(j), "rows": int(len(part)),
                        "first_id": int(part[0])})
    rshards.write_json(os.path.join(out, rshards.MANIFEST),
                       {"format": "rvqstore-shards", "version": 1, "codebooks": mark,
                        "shards": entries, "count": int(len(ids))})


def _exact(store, queries, k=10):
    """The true k nearest (squared L2) by numpy over the store's originals."""
    ids = store.ids()
    best_d = np.full((len(queries), k), np.inf)
    best_i = np.full((len(queries), k), -1, np.int64)
    qn = (queries.astype(np.float64) ** 2).sum(1)[:, None]
    for a in range(0, len(ids), 131072):
        part = ids[a:a + 131072]
        x = store.get(part).astype(np.float64)
        d = qn - 2 * queries @ x.T + (x ** 2).sum(1)[None]
        d_all = np.concatenate([best_d, d], 1)
        i_all = np.concatenate([best_i, np.broadcast_to(part, d.shape)], 1)
        top = np.argsort(d_all, axis=1)[:, :k]
        best_d, best_i = np.take_along_axis(d_all, top, 1), np.take_along_axis(i_all, top, 1)
    return best_i


def search_part(args, work):
    _, queries, _ = load_dataset(args.dataset, queries=args.queries)
    out = os.path.join(work, "cut")
    with Store.open(args.store, readonly=True) as single:
        t = time.perf_counter()
        _cut(single, out, args.shards)
        n = len(single)
        truth = _exact(single, queries)
    print(f"\n### Search: {n:,} vectors of {args.store} cut into {args.shards} shards "
          f"({time.perf_counter() - t:.0f} s), batch of {len(queries)} queries, k=10, "
          f"median of {args.repeats}; identical = same 10 ids as the single store; recall = "
          "10-recall@10 against numpy's exact neighbours")
    client = rdask.connect("local", workers=2)
    rows = []
    configs = [("every code", {"partitions": 0}, {"partitions": 0}, {}),
               ("every code, rerank 50", {"partitions": 0}, {"partitions": 0}, {"rerank": 50}),
               ("cells, calibrated", {}, {}, {}),
               ("single cells, shards 256 partitions", {}, {"partitions": 256}, {})]
    try:
        with Threads(2):
            for label, one_opts, shard_opts, kw in configs:
                single = Store.open(args.store, readonly=True, **one_opts)
                seq = rshards.ShardedStore(out, threads=1, **shard_opts)
                par = rshards.ShardedStore(out, threads=2, **shard_opts)
                remote = rdask.DaskShardedStore(client, out, **shard_opts)
                systems = [("single store", lambda: single.search(queries, k=10, **kw)),
                           ("ShardedStore, shards in turn",
                            lambda: seq.search(queries, k=10, **kw)),
                           ("ShardedStore, 2 threads", lambda: par.search(queries, k=10, **kw)),
                           ("DaskShardedStore, 2 workers",
                            lambda: remote.search(queries, k=10, **kw))]
                times = {name: [] for name, _ in systems}
                got = {name: fn() for name, fn in systems}  # warm: codes loaded, cells grouped
                for _ in range(args.repeats):
                    for name, fn in systems:
                        t = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t)
                want = got["single store"].ids
                base = len(queries) / statistics.median(times["single store"])
                for name, _ in systems:
                    qps = len(queries) / statistics.median(times[name])
                    ids = got[name].ids
                    rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
                    rows.append([label, name, f"{qps:,.0f}", f"{qps / base:.2f}x",
                                 f"{(ids == want).all(axis=1).mean():.3f}", f"{rec:.3f}"])
                lone = []
                for q in queries[:50]:
                    t = time.perf_counter()
                    remote.search(q, k=10, **kw)
                    lone.append(time.perf_counter() - t)
                rows.append([label, "DaskShardedStore, one query per call",
                             f"{1 / statistics.median(lone):,.0f}", "", "", ""])
                for x in (single, seq, par, remote):
                    x.close()
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    print(markdown_table(["search", "system", "QPS (median)", "vs single", "identical",
                          "recall"], rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--store", help="a trained store for the search part (omit: no search)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--build-rows", type=int, default=100_000)
    ap.add_argument("--rows-per-shard", type=int, default=12_500)
    ap.add_argument("--sample", type=int, default=32768)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--no-originals", action="store_true",
                    help="build shards of codes alone (less to write)")
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="rvqstore-sharded-")
    try:
        if not args.skip_build:
            build_part(args, work)
        if args.store:
            search_part(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

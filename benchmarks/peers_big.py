"""Peers on a large vector set: faiss IVFPQFastScan + RefineFlat (in RAM) and LanceDB IVF_PQ
(on disk), by probes and refinement, for tables beside the Store's.

    python -m benchmarks.peers_big --dataset ../shared/data/wordnet-minilm [--n 100000]
        [--peers faiss,lancedb] [--queries 200] [--repeats 3]

Both functions take float32 ``base`` and ``queries`` and the exact L2 neighbour ids ``gt``
(int64, (nq, >= 10)), build their index once and return one row (a dict) per setting:
``system``, ``settings``, ``build_s``, ``bytes``, ``recall`` (10-recall@10 against ``gt``),
``qps`` and ``ms_per_query`` (one query per search call; the median of 3 passes, timed in
interleaved rounds that time every setting of the system in turn, ``common.interleaved_runs``),
``cpu_per_wall`` (process CPU time / wall time over those passes: about the cores a search
kept busy), ``threads`` (the thread counts in force) and ``version`` (the library's).

- ``faiss_ivf_fastscan_refine``: ``IndexIVFPQFastScan`` (flat L2 coarse quantizer over
  ``nlist`` lists, default 4 * sqrt(n) rounded to a power of two; ``m`` sub-quantizers of
  4 bits, default dim // 8; residual encoding) wrapped in ``IndexRefineFlat`` (the float32
  originals in RAM, the candidates re-ranked exactly). Trained on the first
  max(100,000, 39 * nlist) vectors (all when fewer), then every vector added; build and
  search at one thread. Searched at each nprobe x k_factor (the refine step re-ranks
  k_factor * k candidates) through ``IndexRefineSearchParameters``. ``bytes`` is the
  serialized index (codes, lists, quantizer and the float32 originals).
- ``lancedb_ivfpq``: a LanceDB table (``id``, ``vector``) in ``folder`` with an IVF_PQ index
  (L2; ``num_partitions`` default sqrt(n), ``num_sub_vectors`` default dim // 8 as in
  benchmarks.filtered, 8 bits each: LanceDB's default), searched through the Python API
  with ``.nprobes(..)`` and, when not None, ``.refine_factor(..)`` (which re-ranks
  refine_factor * k candidates on the stored vectors). ``bytes`` is the table's folder on
  disk (data and index). On small sets LanceDB may train fewer partitions than asked (it
  logs a warning: 78 of 141 at 20,000 vectors); the settings show the number asked.

Threads: numpy/BLAS and faiss are held to one thread and verified (common.Threads, faiss
imported before the limits are set). LanceDB's native pools are sized by the environment
variables of benchmarks.filtered's PEER_THREAD_ENV (LANCE_CPU_THREADS=1,
TOKIO_WORKER_THREADS=1), set before lancedb is first imported (a value already set is kept);
its I/O pool and tokio threads come on top, so it is not a one-thread figure: its
``cpu_per_wall`` shows what it used. ``main`` loads ``--dataset`` (base.npy, queries.npy,
gt_l2.npy; ``--n`` keeps the first N base vectors, the ground truth then recomputed exactly
with numpy) and prints the rows as a markdown table.
"""

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import Threads, describe_threads, interleaved_runs, load_dataset, markdown_table
from .filtered import PEER_THREAD_ENV, folder_bytes

PEERS = ("faiss", "lancedb")
TRAIN_SAMPLE = 100_000


def _pow2(x):
    """The power of two nearest ``x`` (in log scale), at least 1."""
    return 1 << max(0, round(math.log2(max(x, 1))))


def _answers(found, k):
    """(n, k) int64 ids from a list of id arrays, short answers padded with -1."""
    out = np.full((len(found), k), -1, np.int64)
    for i, ids in enumerate(found):
        ids = np.asarray(ids, np.int64).reshape(-1)[:k]
        out[i, :len(ids)] = ids
    return out


def _recall(ids, gt, k):
    """k-recall@k: the share of the true k nearest among the k returned."""
    return float(np.mean([len(set(a[a >= 0].tolist()) & set(g[:k].tolist())) / k
                          for a, g in zip(ids, gt)]))


def _rows(system, searches, settings, queries, gt, k, build_s, repeats):
    """Time ``searches`` ({key: search_one(q) -> ids}) one query per call in interleaved
    rounds and make the rows, in the order of ``settings`` ({key: settings text}); the
    caller fills in ``bytes`` and ``threads``."""
    answers, seconds, cpu = interleaved_runs(
        {key: (lambda i, fn=fn: fn(queries[i:i + 1])) for key, fn in searches.items()},
        len(queries), repeats)
    rows = []
    for key, text in settings.items():
        s = seconds[key]
        rows.append({"system": system, "settings": text, "build_s": build_s, "bytes": None,
                     "recall": _recall(_answers(answers[key], k), gt, k),
                     "qps": len(queries) / s, "ms_per_query": s / len(queries) * 1e3,
                     "cpu_per_wall": cpu[key] / s, "threads": None})
    return rows


def faiss_ivf_fastscan_refine(base, queries, gt, *, nlist=None, m=None, nprobes=(8, 16, 32, 64),
                              k_factors=(4, 10), k=10, repeats=3):
    """faiss IndexIVFPQFastScan (4-bit PQ) + IndexRefineFlat in RAM at one thread: one row
    per (nprobe, k_factor)."""
    import faiss  # before the thread limits, which no runtime may escape

    n, dim = base.shape
    nlist = nlist or _pow2(4 * math.sqrt(n))
    m = m or dim // 8
    with Threads(1, faiss) as threads:
        t0 = time.perf_counter()
        quantizer = faiss.IndexFlatL2(dim)
        ivf = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, m, 4, faiss.METRIC_L2)
        index = faiss.IndexRefineFlat(ivf)
        index.train(np.ascontiguousarray(base[:max(TRAIN_SAMPLE, 39 * nlist)]))
        index.add(np.ascontiguousarray(base))
        build_s = time.perf_counter() - t0
        searches, settings, keep = {}, {}, []
        for nprobe in nprobes:
            for kf in k_factors:
                inner = faiss.SearchParametersIVF(nprobe=nprobe)
                params = faiss.IndexRefineSearchParameters(k_factor=kf, base_index_params=inner)
                keep.append(inner)  # the SWIG object does not own its base_index_params

                def search(q, params=params):
                    return index.search(q, k, params=params)[1][0]

                searches[nprobe, kf] = search
                settings[nprobe, kf] = f"nlist={nlist}, m={m}x4 bit, nprobe={nprobe}, k_factor={kf}"
        rows = _rows("faiss IVFPQFastScan+RefineFlat", searches, settings,
                     queries, gt, k, build_s, repeats)
    nbytes = faiss.serialize_index(index).nbytes
    for r in rows:
        r["bytes"] = int(nbytes)
        r["threads"] = describe_threads(threads.in_force) + " (verified; build and search)"
        r["version"] = faiss.__version__
    return rows


def lancedb_ivfpq(base, queries, gt, folder, *, num_partitions=None, num_sub_vectors=None,
                  nprobes=(10, 20, 50, 100), refine_factors=(None, 10), k=10, repeats=3):
    """LanceDB IVF_PQ on disk in ``folder`` (L2), searched through the Python API: one row
    per (nprobes, refine_factor)."""
    for name, value in PEER_THREAD_ENV.items():  # read when lance's runtimes start
        os.environ.setdefault(name, value)
    preloaded = "lancedb" in sys.modules
    import lancedb
    import pyarrow as pa
    from lancedb.index import IvfPq

    n, dim = base.shape
    num_partitions = num_partitions or max(1, round(math.sqrt(n)))
    num_sub_vectors = num_sub_vectors or dim // 8
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    db = lancedb.connect(str(folder))
    name = "ivf_pq"
    db.drop_table(name, ignore_missing=True)  # a table of an earlier run: no stale files
    data = pa.table({"id": np.arange(n, dtype=np.int64),
                     "vector": pa.FixedSizeListArray.from_arrays(
                         pa.array(np.ascontiguousarray(base, np.float32).reshape(-1)), dim)})
    t0 = time.perf_counter()
    table = db.create_table(name, data)
    table.create_index("vector", config=IvfPq(distance_type="l2", num_partitions=num_partitions,
                                              num_sub_vectors=num_sub_vectors))
    build_s = time.perf_counter() - t0
    del data
    searches, settings = {}, {}
    for nprobe in nprobes:
        for rf in refine_factors:
            def search(q, nprobe=nprobe, rf=rf):
                query = table.search(q[0]).distance_type("l2").nprobes(nprobe)
                if rf is not None:
                    query = query.refine_factor(rf)
                return (query.limit(k).select(["id", "_distance"]).to_arrow()
                        .column("id").to_numpy())

            searches[nprobe, rf] = search
            settings[nprobe, rf] = (f"partitions={num_partitions}, sub_vectors={num_sub_vectors}"
                                    f"x8 bit, nprobes={nprobe}, refine_factor={rf}")
    pools = ", ".join(f"{v}={os.environ.get(v, 'unset (its default)')}"
                      for v in ("LANCE_CPU_THREADS", "LANCE_IO_THREADS", "TOKIO_WORKER_THREADS"))
    if preloaded:
        pools += " (lancedb was imported before this call: its pools are as they were then)"
    with Threads(1) as threads:
        rows = _rows("LanceDB IVF_PQ", searches, settings, queries, gt, k,
                     build_s, repeats)
    nbytes = folder_bytes(folder / f"{name}.lance")
    for r in rows:
        r["bytes"] = int(nbytes)
        r["threads"] = (f"{pools}; I/O pool and tokio threads on top (not limitable to 1); "
                        f"numpy {describe_threads(threads.in_force)}")
        r["version"] = lancedb.__version__
    return rows


def parse_peers(text):
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise SystemExit(f"--peers: unknown {', '.join(unknown)} (choose from {','.join(PEERS)})")
    return names


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True,
                    help="folder with base.npy, queries.npy, gt_l2.npy")
    ap.add_argument("--n", type=int, default=None,
                    help="use only the first N base vectors (ground truth recomputed)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, from "
                                                             f"{','.join(PEERS)}")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--folder", default=None,
                    help="where LanceDB's table goes (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    peers = parse_peers(args.peers)
    for name, value in PEER_THREAD_ENV.items():  # before lancedb is imported
        os.environ.setdefault(name, value)

    base, queries, gt = load_dataset(args.dataset, limit=args.n, queries=args.queries)
    gt = gt.astype(np.int64)
    print(f"# {args.dataset}: {len(base):,} x {base.shape[1]}, {len(queries)} queries; k=10; "
          f"QPS single: one query per call, median of {args.repeats} passes in interleaved "
          f"rounds", flush=True)
    rows = []
    if "faiss" in peers:
        rows += faiss_ivf_fastscan_refine(base, queries, gt, repeats=args.repeats)
        print(f"# faiss built in {rows[-1]['build_s']:.1f} s", flush=True)
    if "lancedb" in peers:
        with tempfile.TemporaryDirectory() as tmp:
            got = lancedb_ivfpq(base, queries, gt, args.folder or tmp, repeats=args.repeats)
        rows += got
        print(f"# LanceDB built in {got[-1]['build_s']:.1f} s", flush=True)
    print()
    print(markdown_table(
        ["system", "settings", "10-recall@10", "ms/query", "QPS single", "CPU / wall",
         "build s", "bytes"],
        [[r["system"], r["settings"], f"{r['recall']:.3f}", f"{r['ms_per_query']:.3f}",
          f"{r['qps']:,.0f}", f"{r['cpu_per_wall']:.2f}", f"{r['build_s']:.1f}",
          f"{r['bytes'] / 2**20:,.1f} MiB"] for r in rows]))
    print()
    for system in dict.fromkeys(r["system"] for r in rows):
        r = next(r for r in rows if r["system"] == system)
        print(f"- {system} {r['version']}; threads: {r['threads']}")


if __name__ == "__main__":
    main()

"""Partitioned codes against scanning every code: recall, originals read and QPS by nprobe.

    python -m benchmarks.partitions DATASET_DIR [--sets dev,mix,clusters] [--n 1000000]
                                                [--work /tmp/rvqstore-partitions]
                                                [--peers faiss,lancedb|none]
                                                [--originals float32|float16]

Sets: ``dev`` is DATASET_DIR's base vectors (real sentence embeddings) with its queries and
exact ground truth. ``mix`` is ``--n`` sparse mixtures of two real base vectors plus small
noise, renormalised (real embeddings' structure at a million vectors), with 200 queries
drawn the same way. ``clusters`` is ``--n`` isotropic Gaussian clusters (1,000 centres), the
easy case for partitions, with 200 queries from the same clusters. Ground truth for the
built sets is exact (numpy, in chunks), computed once and kept beside the store in
``--work``, where the stores are built once and reused (their build times kept in a json).

For each set, one process at one thread (numpy/BLAS and numba, verified): the same store
file opened with ``partitions=0`` (every code scanned) and with ``partitions=K**2`` (cells
of the first two stages), searched one query per call (k=10, default adaptive rerank),
with the calibrated default nprobe and with half and twice it; 10-recall@10, originals read
per query (the rerank's candidates), ms and QPS single (median of 3 interleaved passes).
Then fresh processes (median of 3) for the import, Store.open + first query (which includes
the calibration) and resident memory. On the million-vector sets the peers, when asked:
faiss IndexIVFPQFastScan + IndexRefineFlat (in RAM) and LanceDB IVF_PQ (on disk), from
``benchmarks.peers_big``, on the same vectors, queries and ground truth.
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from rvqstore import Store

from .common import Threads, fresh_processes, interleaved_runs, markdown_table

K_CELLS = 256 * 256
QUERIES = 200
CHUNK = 100_000


def mixtures(base, n, rng):
    """``n`` unit vectors, each w * a + (1 - w) * b + noise for random base vectors a, b."""
    a = rng.integers(len(base), size=n)
    b = rng.integers(len(base), size=n)
    w = rng.uniform(0.5, 1.0, size=(n, 1)).astype(np.float32)
    x = w * base[a] + (1 - w) * base[b]
    x += 0.02 * rng.standard_normal(x.shape).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clusters(n, dim, rng, centres):
    return (centres[rng.integers(len(centres), size=n)]
            + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)).astype(np.float32)


def generated(kind, base, n):
    """(chunks: a function yielding the set's vectors CHUNK at a time, queries)."""
    dim = base.shape[1]
    if kind == "mix":
        make = lambda m, rng: mixtures(base, m, rng)  # noqa: E731
    else:
        centres = np.random.default_rng(7).standard_normal((1000, dim)).astype(np.float32)
        make = lambda m, rng: clusters(m, dim, rng, centres)  # noqa: E731

    def chunks():
        rng = np.random.default_rng(1)
        for start in range(0, n, CHUNK):
            yield make(min(CHUNK, n - start), rng)

    return chunks, make(QUERIES, np.random.default_rng(2))


def exact_truth(chunks, queries, k=10):
    """Exact L2 top k of each query over the vectors ``chunks()`` yields, in order."""
    best_d = np.full((len(queries), 0), np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    start = 0
    for x in chunks():
        d = -2.0 * queries @ x.T + np.einsum("ij,ij->i", x, x)[None, :]
        d = np.concatenate([best_d, d], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(x)),
                                                    (len(queries), len(x)))], axis=1)
        top = np.argsort(d, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(d, top, 1), np.take_along_axis(i, top, 1)
        start += len(x)
    return best_i


def build(path, chunks, dim, originals="float32"):
    """Build the store at ``path`` once (add, then train: encode everything); its build
    figures are kept in ``path.json``."""
    meta = Path(str(path) + ".json")
    if path.exists() and meta.exists():
        return json.loads(meta.read_text())
    path.unlink(missing_ok=True)
    t = time.perf_counter()
    n = 0
    with Store.open(path, dim=dim, stages=16, durable=False, originals=originals) as store:
        for x in chunks():
            store.add(x)
            n += len(x)
        add_s = time.perf_counter() - t
        t = time.perf_counter()
        store.train()
        train_s = time.perf_counter() - t
        store.compact()  # checkpoint: the file size is the store's
    figures = {"n": n, "add_s": add_s, "train_encode_s": train_s,
               "file_bytes": path.stat().st_size}
    meta.write_text(json.dumps(figures))
    return figures


def measure(path, queries, gt, label, flat_too=True):
    """The table rows of one set: flat, and partitioned at the calibrated defaults, at half
    and twice nprobe, with a fixed shallow rerank, by codes alone, ranked by the first 8
    stages (the adaptive rerank reading deeper) and reading originals through mmap."""
    t = time.perf_counter()
    with Store.open(path, partitions=K_CELLS) as w:  # what train() records today
        calibration = w.calibrate()
    calibrate_s = time.perf_counter() - t
    part = Store.open(path, readonly=True, partitions=K_CELLS)
    mapped = Store.open(path, readonly=True, partitions=K_CELLS, mmap_originals=True)
    part.search(queries[0], k=10)
    info = part.info()["partitions"]
    default = info["nprobe"]
    settings = {}
    if flat_too:
        flat = Store.open(path, readonly=True, partitions=0)
        settings["every code"] = (flat, {})
    settings.update({
        f"cells, nprobe {default}, margin {info['rerank_error_z']} (calibrated)": (part, {}),
        f"cells, nprobe {max(default // 2, 1)}": (part, {"nprobe": max(default // 2, 1)}),
        f"cells, nprobe {default * 2}": (part, {"nprobe": default * 2}),
        f"cells, nprobe {default}, rerank 5 (50 read)": (part, {"rerank": 5}),
        f"cells, nprobe {default}, rerank 1 (codes only)": (part, {"rerank": 1}),
        f"cells, nprobe {default}, first 8 stages ranked": (part, {"stages": 8}),
        "cells, calibrated, originals through mmap": (mapped, {}),
    })
    reads = {}

    def search_one(store, kw):
        return lambda i: store.search(queries[i], k=10, **kw).ids

    searches = {name: search_one(s, kw) for name, (s, kw) in settings.items()}
    answers, seconds, cpu = interleaved_runs(searches, len(queries))
    # originals read per query, counted in an untimed pass (info() is not free)
    for name, (s, kw) in settings.items():
        before = s.info()["search_plans"]["originals_read"]
        for x in queries:
            s.search(x, k=10, **kw)
        reads[name] = (s.info()["search_plans"]["originals_read"] - before) / len(queries)
    rows = []
    for name in settings:
        found = np.mean([len(set(a.tolist()) & set(g.tolist())) / 10
                         for a, g in zip(answers[name], gt[:, :10])])
        ms = seconds[name] / len(queries) * 1e3
        rows.append([label, name, f"{found:.3f}", f"{reads[name]:.0f}",
                     f"{ms:.2f}", f"{1e3 / ms:,.0f}", f"{cpu[name] / seconds[name]:.2f}"])
    for s in {id(s): s for s, _ in settings.values()}.values():
        s.close()
    return rows, info, calibrate_s, calibration


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset")
    p.add_argument("--sets", default="dev,mix,clusters")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--work", default="/tmp/rvqstore-partitions")
    p.add_argument("--peers", default="faiss,lancedb",
                   help="on sets of at most 2,000,000 vectors (they hold them in RAM)")
    p.add_argument("--flat", default="yes", choices=["yes", "no"],
                   help="also time the scan of every code (slow at 10M)")
    p.add_argument("--originals", default="float32", choices=["float32", "float16"],
                   help="how the built stores keep originals (float16 halves a 10M file)")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = np.load(Path(args.dataset, "base.npy")).astype(np.float32)
    rows, notes, peer_rows = [], [], []
    for kind in args.sets.split(","):
        if kind == "dev":
            label = f"dev ({len(base):,} real)"
            queries = np.load(Path(args.dataset, "queries.npy")).astype(np.float32)
            gt = np.load(Path(args.dataset, "gt_l2.npy"))[:, :10]
            chunks = lambda: iter([base])  # noqa: E731
        else:
            label = {"mix": "mixtures of real", "clusters": "Gaussian clusters"}[kind]
            label = f"{label} ({args.n:,})"
            chunks, queries = generated(kind, base, args.n)
            truth = work / f"{kind}-{args.n}-gt.npy"
            if not truth.exists():
                np.save(truth, exact_truth(chunks, queries))
            gt = np.load(truth)
        suffix = "" if args.originals == "float32" else f"-{args.originals}"
        path = work / f"{kind}-{args.n if kind != 'dev' else len(base)}{suffix}.db"
        figures = build(path, chunks, base.shape[1], args.originals)
        qfile = work / f"{kind}-queries.npy"
        np.save(qfile, queries)
        with Threads(1) as threads:
            got, info, calibrate_s, calibration = measure(path, queries, gt, label,
                                                          flat_too=args.flat != "no")
        rows += got
        fresh = {}
        for parts in (0, K_CELLS):
            runs, (imp, first) = fresh_processes(path, runs=3, queries=qfile, n_queries=50,
                                                 readonly=True, partitions=parts)
            med = sorted(runs, key=lambda r: r["open_first_query_s"])[1]
            fresh[parts] = (first, med["rss_after"]["VmRSS"], med["index_bytes"], imp)
        notes.append(
            f"- {label}: built in {figures['add_s']:.0f} s add + {figures['train_encode_s']:.0f} s "
            f"train and encode, file {figures['file_bytes'] / 2**20:,.0f} MiB; cells: "
            f"{info['non_empty']:,} non-empty of {info['cells']:,}, {info['rows_per_cell']['mean']:.1f} "
            f"rows on average, largest {info['rows_per_cell']['max']:,}, imbalance "
            f"{info['imbalance']:.2f}; calibrated (Store.calibrate(), {calibrate_s:.1f} s): "
            f"nprobe {info['nprobe']} (coverage {info['calibration_coverage']:.3f}), rerank "
            f"margin {info['rerank_error_z']} (held-out recall by margin: "
            f"{_recalls(calibration)}). "
            f"Fresh process (median of 3, default threads): import {fresh[0][3]:.2f} s; open + "
            f"first query {fresh[0][0]:.2f} s flat, {fresh[K_CELLS][0]:.2f} s partitioned; "
            f"resident after 50 queries {fresh[0][1] / 2**20:,.0f} MiB flat (index "
            f"{fresh[0][2] / 2**20:,.0f} MiB), {fresh[K_CELLS][1] / 2**20:,.0f} MiB "
            f"partitioned (index {fresh[K_CELLS][2] / 2**20:,.0f} MiB)")
        if kind != "dev" and args.peers != "none" and args.n <= 2_000_000:
            from . import peers_big

            x = np.concatenate(list(chunks()))
            if "faiss" in args.peers:
                peer_rows += [[label] + _peer(r) for r in peers_big.faiss_ivf_fastscan_refine(
                    x, queries, gt, nprobes=(16, 32, 64, 128), k_factors=(10, 50))]
            if "lancedb" in args.peers:
                peer_rows += [[label] + _peer(r) for r in peers_big.lancedb_ivfpq(
                    x, queries, gt, work / f"lance-{kind}", nprobes=(20, 50, 100),
                    refine_factors=(10, 50))]
            del x
    print(f"\n# one query per call, k=10, {QUERIES} queries (dev: its own); threads: "
          f"{threads.describe()}\n")
    print(markdown_table(["set", "search", "10-recall@10", "originals read/query", "ms/query",
                          "QPS single", "CPU / wall"], rows))
    print()
    print("\n".join(notes))
    if peer_rows:
        print()
        print(markdown_table(["set", "system", "settings", "10-recall@10", "ms/query",
                              "QPS single", "build s", "bytes"], peer_rows))


def _recalls(calibration):
    return ", ".join(f"{z}: {r:.3f}" for z, r in (calibration["recall_by_z"] or {}).items())


def _peer(r):
    return [r["system"], r["settings"], f"{r['recall']:.3f}", f"{r['ms_per_query']:.2f}",
            f"{r['qps']:,.0f}", f"{r['build_s']:.0f}", f"{r['bytes'] / 2**20:,.0f} MiB"]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()

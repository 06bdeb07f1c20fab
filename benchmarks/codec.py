"""The codec benchmark: the prototype's table on real data, with faiss side by side.

    python -m benchmarks.codec ../shared/data/wordnet-minilm [--no-faiss] [--quick]
        [--repeats 3] [--limit N] [--queries N]

Prints a markdown table: code bytes/vector, 10-recall@10, 1-recall@1, QPS single (one
query per call) and batch, both the median of ``--repeats`` timed passes on 1 thread (BLAS,
OpenMP, numba and faiss limited and verified; the counts in force are printed above the
table), training seconds and encoding rate (default threads, printed too), then the
distortion per stage of RVQ S=16 and the target ratios. faiss, when installed
(``pip install '.[bench]'``), is measured in the same run with the same thread limits.
"""

import argparse
import time

import numpy as np

from rvqstore.algo import ProductQuantizer, ResidualQuantizer, adc_search, exact_search, rerank
from rvqstore.algo.index import PartitionedCodeIndex, calibrate_nprobe

from .common import (Threads, describe_threads, fmt, load_dataset, markdown_table, qps_batch,
                     qps_single, recall, thread_counts)

HEADERS = ["index", "code bytes/vec", "10-recall@10", "1-recall@1", "QPS single", "QPS batch",
           "train s", "encode vec/s", "recall decoded"]


COLUMNS = ["index", "bytes", "r10", "r1", "single", "batch", "train", "enc", "decoded"]


def measure(name, nbytes, search_one, search_all, base_queries, gt, repeats, train_s="",
            enc_rate="", decoded=None, faiss=None):
    with Threads(1, faiss) as threads:
        res = search_all(base_queries)
        single = qps_single(search_one, base_queries, repeats)
        batch = qps_batch(search_all, base_queries, repeats)
    row = dict(index=name, bytes=nbytes, r10=recall(res, gt, 10, 10), r1=recall(res, gt, 1, 1),
               single=single, batch=batch, train=train_s, enc=enc_rate, decoded=decoded,
               threads=threads.describe())
    print("  " + " | ".join(fmt(row[c]) for c in COLUMNS), flush=True)
    return row


def codec_rows(base, queries, gt, args):
    rows = []
    norms = np.einsum("ij,ij->i", base, base)
    flat = lambda q: exact_search(base, q, k=10, vector_norms=norms).ids
    rows.append(measure("exact flat (numpy)", base.shape[1] * 4, flat, flat, queries, gt,
                        args.repeats))

    for M in args.pq:
        t = time.perf_counter()
        pq = ProductQuantizer.train(base, subspaces=M, seed=0)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        codes = pq.encode(base)
        rate = len(base) / (time.perf_counter() - t)
        search = lambda q, pq=pq, codes=codes: adc_search(pq, codes, q, k=10).ids
        rows.append(measure(f"PQ M={M}", M, search, search, queries, gt, args.repeats, train_s,
                            rate))

    distortion = None
    for S in args.stages:
        t = time.perf_counter()
        rq = ResidualQuantizer.train(base, stages=S, seed=0, progressive_dim=True, n_iter=10)
        train_s = time.perf_counter() - t
        for beam in (1, args.beam):
            t = time.perf_counter()
            codes = rq.encode(base, beam_width=beam)
            rate = len(base) / (time.perf_counter() - t)
            norms = rq.norms(codes)
            dec = recall(exact_search(rq.decode(codes), queries, k=10).ids, gt)
            search = lambda q, rq=rq, codes=codes, norms=norms: adc_search(
                rq, codes, q, k=10, bias=norms).ids
            label = f"RVQ S={S} " + ("greedy" if beam == 1 else f"beam {beam}")
            rows.append(measure(label, S + 4, search, search, queries, gt, args.repeats,
                                train_s, rate, dec))
            if S == 16 and beam == 1:
                rows.append(_cells_row(rq, codes, norms, base, queries, gt, args, train_s,
                                       rate, label))
            if S == 16 and beam == args.beam:
                distortion = rq.distortion_per_stage(base, codes)
            if S in args.rerank_stages and beam == args.rerank_beam:
                for factor in args.rerank:
                    def search_rr(q, rq=rq, codes=codes, norms=norms, factor=factor):
                        cand = adc_search(rq, codes, q, k=10 * factor, bias=norms).ids
                        return rerank(q, cand, lambda ids: base[ids], k=10).ids
                    rows.append(measure(f"{label} + rerank x{factor}", S + 4, search_rr,
                                        search_rr, queries, gt, args.repeats, train_s, rate))
    return rows, distortion


def _cells_row(rq, codes, norms, base, queries, gt, args, train_s, rate, label):
    """Codes alone through the partitioned index (cells of the first two stages), at the
    nprobe calibrated as a store does (64 held-out base vectors, 99% of the code scan's
    top 10): the scan a store of this size makes with ``partitions=`` forced."""
    ids = np.arange(len(base), dtype=np.int64)
    index = PartitionedCodeIndex.group("l2", rq, ids, codes, norms)
    held = np.sort(np.random.default_rng(0).choice(len(base), 64, replace=False))
    index.nprobe, _ = calibrate_nprobe(index, base[held], ids[held], k=10)
    search = lambda q: index.search(q, k=10).ids  # noqa: E731
    return measure(f"{label}, cells (nprobe {index.nprobe})", 16 + 4, search, search, queries,
                   gt, args.repeats, train_s, rate)


def faiss_rows(base, queries, gt, args):
    import faiss

    rows = []

    def run(name, index, nbytes, decoded=False, via=None):
        # via: a wrapper (IndexRefineFlat) that trains and fills ``index`` and itself
        with Threads(2, faiss):
            t = time.perf_counter()
            (via or index).train(base)
            train_s = time.perf_counter() - t
            t = time.perf_counter()
            (via or index).add(base)
            rate = len(base) / (time.perf_counter() - t)
        dec = None
        if decoded:  # the stored codes ranked exactly: decode them, brute force
            codes = faiss.vector_to_array(index.codes).reshape(index.ntotal, index.code_size)
            dec = recall(exact_search(index.sa_decode(codes), queries, k=10).ids, gt)
        search = lambda q: index.search(q, 10)[1]
        rows.append(measure(name, nbytes, search, search, queries, gt, args.repeats, train_s,
                            rate, dec, faiss=faiss))
        return index

    d = base.shape[1]
    run("faiss IndexPQ M=16", faiss.IndexPQ(d, 16, 8), 16)
    rq = faiss.IndexResidualQuantizer(d, 16, 8, faiss.METRIC_L2,
                                      faiss.AdditiveQuantizer.ST_norm_float)
    name = f"faiss IndexResidualQuantizer M=16 beam {rq.rq.max_beam_size}"
    refine = faiss.IndexRefineFlat(rq)  # made empty, so both fill together
    refine.k_factor = 10
    run(name, rq, 16 + 4, decoded=True, via=refine)
    search = lambda q: refine.search(q, 10)[1]
    rows.append(measure("faiss IndexRefineFlat k_factor 10 over RQ M=16", 16 + 4,
                        search, search, queries, gt, args.repeats, faiss=faiss))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", help="folder with base.npy, queries.npy, gt_l2.npy")
    p.add_argument("--no-faiss", action="store_true", help="skip the faiss rows")
    p.add_argument("--quick", action="store_true", help="fewer rows, for a smoke run")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N base vectors (ground truth recomputed)")
    p.add_argument("--queries", type=int, default=None, help="use only the first N queries")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per QPS figure (median)")
    p.add_argument("--beam", type=int, default=5)
    args = p.parse_args(argv)
    args.pq = [8, 16, 32] if not args.quick else [16]
    args.stages = [4, 8, 16, 32] if not args.quick else [16]
    args.rerank_stages, args.rerank_beam, args.rerank = (8, 16), 1, (2, 4, 10)

    base, queries, gt = load_dataset(args.dataset, limit=args.limit, queries=args.queries)
    import numba
    import numpy

    print(f"# dataset {args.dataset}: base {base.shape}, queries {queries.shape}")
    print(f"# numpy {numpy.__version__}, numba {numba.__version__}, "
          f"cores {numba.config.NUMBA_NUM_THREADS}; QPS: median of {args.repeats} timed passes",
          flush=True)
    print(f"# default threads (training, encoding): {describe_threads(thread_counts())}",
          flush=True)
    rows, distortion = codec_rows(base, queries, gt, args)
    if not args.no_faiss:
        try:
            import faiss  # noqa: F401
        except ImportError:
            print("# faiss not installed: pip install '.[bench]' for its rows")
        else:
            rows += faiss_rows(base, queries, gt, args)

    print()
    for described in dict.fromkeys(r["threads"] for r in rows):
        print(f"Search threads in force: {described}")
    print()
    print(markdown_table(HEADERS, [[fmt(r[c]) for c in COLUMNS] for r in rows]))
    if distortion is not None:
        print()
        print(markdown_table(["stage", "MSE", "reduction from stage 1"],
                             [[s + 1, f"{m:.4f}", f"{1 - m / distortion[0]:.1%}"]
                              for s, m in enumerate(distortion)]))
    by = {r["index"]: r for r in rows}
    pq16 = by.get("faiss IndexPQ M=16")
    ours = by.get(f"RVQ S=16 beam {args.beam}") or by.get("RVQ S=16 greedy")
    if pq16 and ours:
        print(f"\nQPS single, RVQ S=16 ({ours['index']}) / faiss IndexPQ M=16: "
              f"{ours['single'] / pq16['single']:.2f}x")
    cells = [r for r in rows if r["index"].startswith("RVQ S=16 greedy, cells")]
    if pq16 and cells:
        print(f"QPS single, {cells[0]['index']} / faiss IndexPQ M=16: "
              f"{cells[0]['single'] / pq16['single']:.2f}x at 10-recall@10 "
              f"{cells[0]['r10']:.3f} vs {pq16['r10']:.3f}")


if __name__ == "__main__":
    main()

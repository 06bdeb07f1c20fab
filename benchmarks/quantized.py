"""The quantized form in and out: how long export_quantized and import_quantized take
against training, how large the Parquet files are, and whether the imported store answers
exactly as the exported one (same ids and distances on every query).

    python -m benchmarks.quantized ../shared/data/wordnet-minilm [--limit 100000]
    python -m benchmarks.quantized ../shared/data/wordnet-minilm --store BIG.db

The first form adds the dataset's first ``--limit`` vectors to a fresh store and trains it
(the time to beat); ``--store`` uses a trained store instead (no training timed).
Needs the arrow and bench extras.
"""

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from rvqstore import Store

from .common import load_dataset, markdown_table, thread_counts, describe_threads


def _size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--limit", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--store", help="a trained store to export instead of building one")
    ap.add_argument("--work", help="folder for the files [default: a temporary one]")
    args = ap.parse_args(argv)
    base, queries, _ = load_dataset(args.dataset, limit=args.limit, queries=args.queries)
    work = args.work or tempfile.mkdtemp(prefix="rvqstore-quantized-")
    os.makedirs(work, exist_ok=True)
    rows = []
    try:
        if args.store:
            src = Store.open(args.store, readonly=True)
            label = f"{len(src):,} vectors from {args.store}"
        else:
            path = os.path.join(work, "src.db")
            src = Store.open(path, dim=base.shape[1], durable=False)
            _, t_add = _timed(lambda: src.add(base))
            _, t_train = _timed(src.train)
            rows.append(["add (originals)", f"{t_add:.1f}", "", ""])
            rows.append(["train + encode", f"{t_train:.1f}", f"{_size(path):,}", ""])
            label = f"{len(src):,} vectors of the dataset"
        q = queries[:, :src.dim]
        want = src.search(q, k=10)
        want_codes = src.search(q, k=10, rerank=1)
        for name, with_vectors in (("codes only", False), ("with vectors", True)):
            out = os.path.join(work, name.replace(" ", "-"))
            shutil.rmtree(out, ignore_errors=True)
            _, t_exp = _timed(lambda: src.export_quantized(out, with_vectors=with_vectors))
            dst_path = os.path.join(work, f"{name.replace(' ', '-')}.db")
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(dst_path + suffix):
                    os.remove(dst_path + suffix)
            dst, t_imp = _timed(lambda: Store.import_quantized(out, dst_path, durable=False))
            got = dst.search(q, k=10)
            ref = want if with_vectors else want_codes
            same = (np.array_equal(got.ids, ref.ids)
                    and np.array_equal(got.distances, ref.distances))
            dst.close()
            rows.append([f"export, {name}", f"{t_exp:.1f}", f"{_size(out):,}", ""])
            rows.append([f"import, {name}", f"{t_imp:.1f}", f"{_size(dst_path):,}",
                         f"{'yes' if same else 'NO'} ({len(q)} queries)"])
        src.close()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{label}, dim {base.shape[1]}; {describe_threads(thread_counts())}")
    print(markdown_table(["step", "seconds", "bytes", "same results"], rows))


if __name__ == "__main__":
    main()

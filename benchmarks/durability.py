"""What a durable commit costs: add throughput with Store.open(durable=True) (SQLite
synchronous=FULL, the default) against durable=False (NORMAL), on a trained and an
untrained store, at several batch sizes (one transaction per add call).

    python -m benchmarks.durability ../shared/data/wordnet-minilm [--n 20000] [--repeats 3]

Both settings are timed in alternating rounds on the same data in the same run; the table
gives medians and their ratio.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from rvqstore import Store

from .common import load_dataset


def add_rate(path, x, batch, durable, trained_from):
    """Vectors per second adding ``x`` in calls of ``batch`` to a fresh copy of the store."""
    with Store.open(path, dim=x.shape[1], stages=16, durable=durable) as s:
        t = time.perf_counter()
        for start in range(0, len(x), batch):
            s.add(x[start:start + batch])
        return len(x) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--n", type=int, default=20000, help="vectors added per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    base, _, _ = load_dataset(args.dataset, limit=args.n + 5000)
    train, x = base[:5000], base[5000:5000 + args.n]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        seed = Path(tmp) / "seed.db"
        with Store.open(seed, dim=x.shape[1], stages=16) as s:
            s.add(train)
            s.train()
        for trained in (False, True):
            for batch in (1, 100, 10000):
                n = min(len(x), 500 if batch == 1 else len(x))
                rates = {True: [], False: []}
                for r in range(args.repeats):
                    for durable in (True, False):
                        path = Path(tmp) / f"run-{trained}-{batch}-{durable}-{r}.db"
                        if trained:
                            path.write_bytes(seed.read_bytes())
                        rates[durable].append(add_rate(path, x[:n], batch, durable, seed))
                        path.unlink()
                full, normal = (statistics.median(rates[d]) for d in (True, False))
                rows.append((("trained" if trained else "untrained"), batch, n, full, normal))
                print(f"  {rows[-1]}", flush=True)
    print("\n| store | vectors per add | vectors | durable=True vec/s | durable=False vec/s "
          "| durable / not |")
    print("|---|---|---|---|---|---|")
    for kind, batch, n, full, normal in rows:
        print(f"| {kind} | {batch:,} | {n:,} | {full:,.0f} | {normal:,.0f} | {full / normal:.2f} |")


if __name__ == "__main__":
    main()

"""Shared helpers for the benchmarks: datasets, recall, timing, verified thread limits, and
timing a store's first query in a fresh process."""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

try:
    import threadpoolctl
except ImportError as exc:  # without it the "1 thread" labels would be false
    raise SystemExit(
        "the benchmarks need threadpoolctl to limit BLAS/OpenMP threads: "
        "pip install '.[bench]' (or pip install threadpoolctl)") from exc

REPO = pathlib.Path(__file__).resolve().parents[1]


# -- data ---------------------------------------------------------------------------------

def load_dataset(folder, metric="l2", *, limit=None, queries=None):
    """base, queries, ground truth (nq, 100) from a dataset folder in DESIGN.md's format.

    ``limit`` keeps the first base vectors (the ground truth is then recomputed exactly
    with numpy); ``queries`` keeps the first queries.
    """
    folder = pathlib.Path(folder)
    base = np.load(folder / "base.npy").astype(np.float32)
    qs = np.load(folder / "queries.npy").astype(np.float32)
    gt = np.load(folder / ("gt_ip.npy" if metric in ("ip", "cosine") else "gt_l2.npy"))
    if queries is not None:
        qs, gt = qs[:queries], gt[:queries]
    if limit is not None and limit < len(base):
        base = base[:limit]
        gt = exact_ids(base, qs, min(gt.shape[1], limit), metric)
    return base, qs, gt


def exact_ids(base, queries, k, metric="l2"):
    """Brute-force neighbour ids in plain numpy (independent of rvqstore's kernels)."""
    if metric == "cosine":
        base = base / np.linalg.norm(base, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    norms = np.einsum("ij,ij->i", base, base) if metric == "l2" else 0
    out = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), 256):
        dots = queries[s:s + 256] @ base.T
        d = norms - 2 * dots if metric == "l2" else -dots
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d, part, 1), axis=1)
        out[s:s + 256] = np.take_along_axis(part, order, 1)
    return out


def recall(ids, gt, at=10, of=10):
    """at-recall@of: fraction of the true ``at`` nearest found among the returned ``of``."""
    hits = [len(set(ids[i, :of].tolist()) & set(gt[i, :at].tolist())) for i in range(len(ids))]
    return float(np.mean(hits)) / at


# -- timing -------------------------------------------------------------------------------

def median_time(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def qps_single(search_one, queries, repeats=3):
    """Queries per second, one query per call in a Python loop; median of ``repeats`` runs."""
    def loop():
        for i in range(len(queries)):
            search_one(queries[i:i + 1])
    search_one(queries[:1])  # warm-up (JIT, caches)
    return len(queries) / median_time(loop, repeats)


def interleaved_runs(searches, n, repeats=3):
    """The timing protocol of every search row: ``searches`` maps a name to ``search_one(i)``
    for i in range(n). One untimed pass of each search collects its answers (and warms up
    JIT and caches); then ``repeats`` rounds, each timing one pass of every search in turn,
    so that a noisy spell on the shared machine hits all of them.

    Returns ``answers`` ({name: [search_one(i) for i in range(n)]}), ``seconds`` ({name:
    median wall seconds of its passes}) and ``cpu`` ({name: median process CPU seconds of its
    passes}, every thread of the process counted: cpu / seconds is about the cores a search
    kept busy, below 1 when it waited or other work on the machine had the core).
    """
    answers = {name: [fn(i) for i in range(n)] for name, fn in searches.items()}
    walls = {name: [] for name in searches}
    cpus = {name: [] for name in searches}
    for _ in range(repeats):
        for name, fn in searches.items():
            c, t = time.process_time(), time.perf_counter()
            for i in range(n):
                fn(i)
            walls[name].append(time.perf_counter() - t)
            cpus[name].append(time.process_time() - c)
    return (answers, {name: statistics.median(v) for name, v in walls.items()},
            {name: statistics.median(v) for name, v in cpus.items()})


def single_runs(searches, queries, gt, repeats=3):
    """{name: (10-recall@10, QPS single)} for each ``search_one`` in ``searches`` (a dict),
    each mapping a (1, d) query to (1, 10) ids, timed by ``interleaved_runs`` (one query per
    call; QPS is over each one's median pass)."""
    answers, seconds, _ = interleaved_runs(
        {name: (lambda i, fn=fn: fn(queries[i:i + 1])) for name, fn in searches.items()},
        len(queries), repeats)
    return {name: (recall(np.vstack([np.asarray(a).reshape(1, -1) for a in answers[name]]),
                          gt), len(queries) / seconds[name])
            for name in searches}


def qps_batch(search_all, queries, repeats=3):
    search_all(queries[:2])
    return len(queries) / median_time(lambda: search_all(queries), repeats)


# -- threads ------------------------------------------------------------------------------

def thread_counts(faiss=None):
    """The thread counts in force for this thread, by library: every BLAS/OpenMP runtime
    threadpoolctl finds loaded, numba (launching its threading layer) and, when given, faiss."""
    import numba

    n_numba = numba.get_num_threads()  # launches its threading layer, maybe an OpenMP
    counts = {}
    for lib in threadpoolctl.threadpool_info():
        name = f"{lib['user_api']} {lib['prefix']}"
        if name in counts:  # two copies of one runtime (numpy's and faiss's wheels)
            name += f" ({pathlib.Path(lib['filepath']).name})"
        counts[name] = lib["num_threads"]
    counts[f"numba ({numba.threading_layer()} layer)"] = n_numba
    if faiss is not None:
        counts["faiss omp_get_max_threads"] = faiss.omp_get_max_threads()
    return counts


def describe_threads(counts):
    return ", ".join(f"{name} {n}" for name, n in counts.items())


class Threads:
    """Limit BLAS/OpenMP (threadpoolctl), numba and, when given, faiss to ``n`` threads
    inside a with-block, and verify it: on entry and again on exit (a runtime loaded inside
    the block would escape the limit) every count must be at most ``n``, else RuntimeError.
    ``in_force`` holds the counts verified, for the table headers.
    """

    def __init__(self, n, faiss=None):
        self.n = n
        self.faiss = faiss
        self.in_force = None

    def __enter__(self):
        import numba

        # numba first: launching its threading layer may load an OpenMP runtime that
        # threadpoolctl must then see and limit
        self._numba_prev = numba.get_num_threads()
        if self.faiss is not None:  # before threadpoolctl limits faiss's OpenMP too
            self._faiss_prev = self.faiss.omp_get_max_threads()
        numba.set_num_threads(min(self.n, numba.config.NUMBA_NUM_THREADS))
        self._limits = threadpoolctl.threadpool_limits(self.n)
        if self.faiss is not None:
            self.faiss.omp_set_num_threads(self.n)
        try:
            self.in_force = self._verify("on entry")
        except BaseException:
            self._restore()
            raise
        return self

    def _verify(self, when):
        counts = thread_counts(self.faiss)
        over = {name: n for name, n in counts.items() if n > self.n}
        if over:
            raise RuntimeError(f"thread limit {self.n} not in force {when}: "
                               f"{describe_threads(over)} (all: {describe_threads(counts)})")
        return counts

    def __exit__(self, exc_type, *exc):
        try:
            if exc_type is None:
                self.in_force = self._verify("on exit (changed, or a runtime loaded, "
                                             "inside the block)")
        finally:
            self._restore()

    def _restore(self):
        import numba

        if self.faiss is not None:
            self.faiss.omp_set_num_threads(self._faiss_prev)
        self._limits.restore_original_limits()
        numba.set_num_threads(self._numba_prev)

    def describe(self):
        return describe_threads(self.in_force)


def lancedb_threads():
    """LanceDB's compute threads, by lance-core's rule (LANCE_CPU_THREADS, else the cores
    less LANCE_IO_CORE_RESERVATION (2), at least 1); its I/O threads come on top."""
    if os.environ.get("LANCE_CPU_THREADS"):
        return int(os.environ["LANCE_CPU_THREADS"])
    cpus = os.cpu_count() or 1
    return max(1, cpus - int(os.environ.get("LANCE_IO_CORE_RESERVATION", "2")))


# -- a fresh process ----------------------------------------------------------------------

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import rvqstore
from rvqstore import Store
t_import = time.perf_counter() - t0
a = json.loads(sys.argv[1])

def rss():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon", "RssFile")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out

before = rss()
if a["queries"]:
    q = np.load(a["queries"])[: a["n_queries"]]
else:
    q = np.random.default_rng(1).standard_normal((a["n_queries"], a["dim"])).astype(np.float32)
t1 = time.perf_counter()
store = Store.open(a["path"], readonly=a["readonly"], mmap_originals=a["mmap"],
                   partitions=a.get("partitions"))
store.search(q[0], k=10)
first = time.perf_counter() - t1
t2 = time.perf_counter()
for i in range(1, len(q)):
    store.search(q[i], k=10)
per_query = (time.perf_counter() - t2) / max(len(q) - 1, 1)
after = rss()
index = store.code_index()
print(json.dumps(dict(rvqstore=rvqstore.__file__, import_s=t_import, open_first_query_s=first,
                      query_ms=per_query * 1e3, rss_before=before, rss_after=after,
                      index_bytes=index.nbytes)))
"""


def fresh_process(path, *, queries=None, dim=None, n_queries=1, readonly=False, mmap=False,
                  partitions=None):
    """Time, in a new interpreter, ``import numpy, rvqstore`` and then ``Store.open`` + the
    first ``search`` (k=10, default rerank), as a user meets them; then ``n_queries - 1``
    more queries. ``queries`` is a .npy file (else seeded Gaussian queries of ``dim``).
    Returns the child's measurements (seconds, ms/query, resident bytes, index bytes)."""
    spec = dict(path=str(path), queries=str(queries) if queries else None, dim=dim,
                n_queries=n_queries, readonly=readonly, mmap=mmap, partitions=partitions)
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"fresh process failed:\n{out.stderr}")
    got = json.loads(out.stdout)
    import rvqstore

    if got["rvqstore"] != rvqstore.__file__:  # the child must time the code we benchmark
        raise RuntimeError(f"fresh process imported {got['rvqstore']}, "
                           f"not {rvqstore.__file__}")
    return got


def fresh_processes(path, runs=3, **kw):
    """``runs`` fresh processes: their results, and the medians of import and of open +
    first query, taken separately."""
    got = [fresh_process(path, **kw) for _ in range(runs)]
    return got, (statistics.median(g["import_s"] for g in got),
                 statistics.median(g["open_first_query_s"] for g in got))


# -- output -------------------------------------------------------------------------------

def markdown_table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt(v, digits=3):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if v >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)

"""SIGKILL at random points of add, delete, retrain, compact, and of the writes of metadata
and documents: update, upsert and delete(where=).

A child process runs a fixed, numbered plan of operations on known batches and reports
each operation's number on its own line once the call has returned. The parent kills it at
a seeded random moment and checks what is left in the file: every reported operation is
in, the one in flight is wholly in or wholly out, nothing later is in. "What is in" is each
item's id, key, vector, metadata and document, and the keyword index (``text_search``) and
the filters (``count(where=)``, filtered search) must agree with exactly that. The file
passes ``PRAGMA integrity_check``, FTS5's own check of its index against the documents and
``Store.check()``, and its vectors find themselves (all of them after a retrain or compact,
a sample after the other operations).
"""

import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from rvqstore import ResidualQuantizer, Store
from conftest import read_line

DIM, STAGES, CODEBOOK = 16, 4, 16
BLOCK = 64          # small blocks: a retrain commits its codes in 19+ transactions
TRAIN_SAMPLE = 256  # and trains on a sample, so that encoding is a good part of it
B = 20              # vectors per batch: batch b holds ids b*B .. b*B+B-1
BASE = 60           # batches 0..59 are in the store before the first child starts
KILLS = 6

CENTERS = np.random.default_rng(5).standard_normal((20, DIM)).astype(np.float32)


def batch_ids(b):
    return np.arange(b * B, (b + 1) * B, dtype=np.int64)


def batch_keys(b):
    return [f"b{b}-{j}" for j in range(B)]


def batch_vectors(b, rev=0):
    """The vectors of batch b as revision ``rev`` wrote them, the same in every process (a
    seeded Gaussian mixture)."""
    rng = np.random.default_rng([11, b, rev])
    lab = rng.integers(len(CENTERS), size=B)
    return (CENTERS[lab] + 0.3 * rng.standard_normal((B, DIM))).astype(np.float32)


def batch_metadata(b, rev):
    return [{"batch": b, "rev": rev, "j": j} for j in range(B)]


def batch_documents(b, rev):
    """The documents of batch b as revision ``rev`` wrote them (None: none at all). Their
    words name the batch and the revision; the last item of a batch has no document."""
    if rev is None:
        return [None] * B
    return [f"b{b} r{rev} item{j}" for j in range(B - 1)] + [None]


def step(mode, i):
    """Operation i of a mode's plan: (kind, batch), or ("retrain" | "compact", None).

    delete, delete_where and compact add a fresh batch for each one they delete, so the
    store keeps its size however long the child runs; update and upsert go round the base
    batches (upsert also adds batch BASE + i in the same call).
    """
    if mode == "add":
        return "add", BASE + i
    if mode == "retrain":
        return "retrain", None
    if mode in ("update", "upsert"):
        return mode, i % BASE
    period = 3 if mode == "compact" else 2
    j, phase = divmod(i, period)
    return [("delete_where" if mode == "delete_where" else "delete", j), ("add", BASE + j),
            ("compact", None)][phase]


def state_after(mode, n):
    """What the store holds once operations 0 .. n-1 of the plan are committed:
    {batch: (vectors' revision, metadata's revision, documents' revision or None)}.

    Operation i writes revision i + 1; adds write revision 0 (their batches are new).
    """
    state = {b: (0, 0, 0) for b in range(BASE)}
    for i in range(n):
        kind, b = step(mode, i)
        rev = i + 1
        if kind == "add":
            state[b] = (0, 0, 0)
        elif kind in ("delete", "delete_where"):
            del state[b]
        elif kind == "update":  # both, then the documents alone, then the metadata alone
            v, m, d = state[b]
            state[b] = (v, m if i % 3 == 1 else rev, d if i % 3 == 2 else rev)
        elif kind == "upsert":  # every other one leaves the documents out, which clears them
            state[b] = state[BASE + i] = (rev, rev, rev if i % 2 == 0 else None)
    return state


def touched(mode, i):
    """The batches operation i writes."""
    kind, b = step(mode, i)
    return [] if b is None else [b, BASE + i] if kind == "upsert" else [b]


def run(store, mode, i, progress=None):
    kind, b = step(mode, i)
    rev = i + 1
    if kind == "add":
        store.add(batch_vectors(b), ids=batch_ids(b), keys=batch_keys(b),
                  metadata=batch_metadata(b, 0), documents=batch_documents(b, 0))
    elif kind == "delete":
        store.delete(batch_ids(b))
    elif kind == "delete_where":
        store.delete(where={"batch": b})
    elif kind == "update":
        who = {"ids": batch_ids(b)} if i % 2 == 0 else {"keys": batch_keys(b)}
        new = {"metadata": batch_metadata(b, rev), "documents": batch_documents(b, rev)}
        new.pop({1: "metadata", 2: "documents"}.get(i % 3), None)
        store.update(**who, **new)
    elif kind == "upsert":
        both = (b, BASE + i)
        ids = store.upsert(
            np.concatenate([batch_vectors(c, rev) for c in both]),
            keys=[k for c in both for k in batch_keys(c)],
            metadata=[m for c in both for m in batch_metadata(c, rev)],
            documents=[d for c in both for d in batch_documents(c, rev)] if i % 2 == 0 else None)
        want = np.concatenate([batch_ids(c) for c in both])
        if not np.array_equal(ids, want):  # the plan's ids would no longer hold
            raise RuntimeError(f"upsert {i} gave ids {ids.tolist()}, expected {want.tolist()}")
    elif kind == "retrain":
        store.retrain(progress=progress)
    else:
        store.compact(progress=progress)


def warm_up(store):
    """Load the numba kernels before the kill clock starts, so that kills land among the
    operations rather than in the first one's start-up."""
    x = np.concatenate([batch_vectors(b) for b in range(CODEBOOK)])
    rq = ResidualQuantizer.train(x, stages=STAGES, codebook_size=CODEBOOK, n_iter=2,
                                 progressive_dim=True)
    rq.encode(x)
    store.search(x[:2], k=1)


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_crash import run, step, warm_up
    from rvqstore import Store

    def progress(phase, done, total):
        print("progress", phase, done, flush=True)

    path, mode, i = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = Store.open(path)
    warm_up(store)
    print("ready", flush=True)
    while True:  # until killed; any error ends the process with exit code 1
        print("start", step(mode, i)[0], i, flush=True)
        run(store, mode, i, progress)
        print("done", i, flush=True)  # only now is operation i known to be committed
        i += 1
""")

MODES = ["add", "delete", "retrain", "compact", "update", "upsert", "delete_where"]
SEEDS = dict(zip(MODES, range(1, len(MODES) + 1)))


def kill_plan(mode, rng, kill):
    """When to kill: after the child has printed ``count`` lines starting with ``prefix``,
    wait ``delay`` seconds.

    The first kill comes at a random delay, the second at a random delay after the first
    committed operation; the others wait for a random point of the work that commits: the
    start of an add, delete, update or upsert (each takes a few milliseconds), the encoding
    of a retrain's blocks (one transaction each; most of a retrain is training) or a
    compaction's rewrite (most of a compaction is VACUUM).
    """
    short = mode not in ("retrain", "compact")
    if kill == 0:
        return "ready", 0, rng.uniform(0.0, 0.08 if short else 0.3)
    if kill == 1 or (short and kill % 2):
        return "done", 1, rng.uniform(0.0, 0.08 if short else 0.1)
    if short:
        return f"start {mode}", int(rng.integers(1, 6)), rng.uniform(0.0, 5e-4)
    if mode == "retrain":  # one "encode" line before each block of the new version
        return "progress encode", int(rng.integers(1, BASE * B // BLOCK)), rng.uniform(0, 2e-3)
    return "progress compact", 1, rng.uniform(0.0, 1e-3)


def make_store(path):
    with Store.open(path, dim=DIM, stages=STAGES, codebook_size=CODEBOOK, block_size=BLOCK,
                    train_sample=TRAIN_SAMPLE) as s:
        for b in range(BASE):
            s.add(batch_vectors(b), ids=batch_ids(b), keys=batch_keys(b),
                  metadata=batch_metadata(b, 0), documents=batch_documents(b, 0))
        s.train()


def kill_child(script, path, mode, first, prefix, count, delay):
    """Start the child at operation ``first`` and SIGKILL it ``delay`` s after it has
    printed ``count`` lines starting with ``prefix``; returns the operations it reported
    as committed."""
    err = path.with_name("child.err")
    with open(err, "w") as errf:
        proc = subprocess.Popen([sys.executable, str(script), str(path), mode, str(first)],
                                stdout=subprocess.PIPE, stderr=errf, bufsize=0)
        try:
            assert read_line(proc) == "ready\n", err.read_text()
            lines = []
            while sum(line.startswith(prefix) for line in lines) < count:
                lines.append(read_line(proc))
                assert lines[-1], err.read_text()  # the child stopped by itself
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # the child must have died of our kill: a child that stopped on an error of its own
    # (exit code 1) would leave the file unexercised and prove nothing
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err.read_text())
    # a kill can land halfway through a report: only whole lines count
    whole = ("".join(lines) + out.decode()).split("\n")[:-1]
    reported = [int(line.split()[1]) for line in whole if line.startswith("done ")]
    assert reported == list(range(first, first + len(reported))), reported
    return reported


def self_search(store, ids):
    """Each id's stored vector, searched with rerank, must come back as that id.

    A quarter of the store are candidates: a vector whose codes are wrong ranks anywhere
    and is missed three times in four, while with its own codes (4 stages of 16 codewords)
    it ranked within the first 6% in every trial."""
    res = store.search(store.get(ids), k=1, rerank=max(1, len(store) // 4))
    lost = ids[res.ids[:, 0] != ids]
    assert len(lost) == 0, f"{len(lost)} stored vectors do not find themselves: {lost[:10]}"


def contents(state):
    """(ids, keys, vectors, metadata, documents) of a state, in id order."""
    bs = sorted(state)
    if not bs:
        return np.empty(0, np.int64), [], np.empty((0, DIM), np.float32), [], []
    return (np.concatenate([batch_ids(b) for b in bs]), [k for b in bs for k in batch_keys(b)],
            np.concatenate([batch_vectors(b, state[b][0]) for b in bs]),
            [m for b in bs for m in batch_metadata(b, state[b][1])],
            [d for b in bs for d in batch_documents(b, state[b][2])])


def differences(got, state):
    """The batches where ``got`` (as :func:`contents` lays it out) differs from ``state``,
    with the parts that differ."""
    want = contents(state)
    if not np.array_equal(got[0], want[0]):
        return {"batches": sorted(set((got[0] // B).tolist()) ^ set(state))}
    out = {}
    for n, b in enumerate(sorted(state)):
        rows = slice(n * B, (n + 1) * B)
        parts = [name for name, g, w in zip(("keys", "vectors", "metadata", "documents"),
                                            got[1:], want[1:])
                 if not np.array_equal(np.asarray(g[rows], dtype=object),
                                       np.asarray(w[rows], dtype=object))]
        if parts:
            out[b] = parts
    return out


def fts_integrity_check(path):
    """FTS5's own check of its index structures. (Its comparison with the content table,
    rank 1, does not apply: the store indexes only the rows that have a document, and
    that check expects every row of rvq_vectors. The text_search checks below compare the
    index with the documents instead.)"""
    con = sqlite3.connect(path)
    try:
        con.execute("INSERT INTO rvq_documents_fts (rvq_documents_fts) VALUES ('integrity-check')")
    except sqlite3.DatabaseError as exc:
        raise AssertionError(f"the keyword index is damaged: {exc}") from None
    finally:
        con.close()  # the check writes nothing; closing rolls its transaction back


def check_after_kill(path, mode, done, rng):
    """Check the file after a kill that came with operations < ``done`` reported.

    Returns (whether operation ``done`` is in, the active codebook version).
    """
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    fts_integrity_check(path)
    with Store.open(path, readonly=True) as r:  # as a reader finds it, stale build or not
        version = r.info()["codebook_version"]
        ids = r.ids()
        assert r.search(batch_vectors(0)[0], k=1).ids.shape == (1,)
    # the codes as a partitioned reader groups them: probing every cell, the flat answer
    q = np.stack([batch_vectors(b)[0] for b in (0, 1, 2)])
    with Store.open(path, readonly=True, partitions=CODEBOOK ** 2) as p, \
            Store.open(path, readonly=True, partitions=0) as f:
        a, b = p.search(q, k=10, rerank=1, nprobe=10 ** 9), f.search(q, k=10, rerank=1)
        assert np.array_equal(a.distances, b.distances)
        for ia, ib, d in zip(a.ids, b.ids, b.distances):  # equal codes tie: any order
            assert set(ia[d < d[-1]].tolist()) == set(ib[d < d[-1]].tolist())
    with Store.open(path) as s:  # a writer drops what a killed retrain left
        assert s.check() == []
        assert s.info()["codebook_version"] == version
        assert np.array_equal(s.ids(), ids)
        per_batch = Counter((ids // B).tolist())
        partial = {b: n for b, n in per_batch.items() if n != B}
        assert not partial, f"batches only partly in the store (batch: ids of {B}): {partial}"
        got = (ids, s.keys(ids), s.get(ids), s.metadata(ids), s.documents(ids))
        without, with_it = state_after(mode, done), state_after(mode, done + 1)
        if not differences(got, with_it):
            state = with_it
        else:
            assert not differences(got, without), (
                f"after {done} operations of {mode} the store matches neither state: "
                f"against {done} operations {differences(got, without)}, against "
                f"{done + 1} {differences(got, with_it)}")
            state = without
        metas, docs = got[3], got[4]
        # the keyword index: each revision's word finds exactly the documents holding it
        # now (a stale entry of an updated, replaced or deleted item would show up too)
        for rev in range(done + 2):
            found = s.text_search(f"r{rev}", k=len(ids) + 4 * B).ids
            want = [i for i, d in zip(ids.tolist(), docs) if d and f" r{rev} " in d]
            assert sorted(found[found >= 0].tolist()) == want, f"text_search('r{rev}')"
        # the filters: built from the metadata stored now
        for rev in sorted({m["rev"] for m in metas}):
            assert s.count({"rev": rev}) == sum(m["rev"] == rev for m in metas), rev
        recent = [b for i in (done - 1, done) if i >= 0 for b in touched(mode, i)
                  if b in state]
        for b in recent:
            res = s.search(batch_vectors(b, state[b][0])[0], k=2 * B, where={"batch": b})
            assert sorted(res.ids[res.ids >= 0].tolist()) == batch_ids(b).tolist(), b
            hits = s.text_search(f"b{b}", k=2 * B, where={"rev": state[b][1]}).ids
            want = batch_ids(b)[:-1].tolist() if state[b][2] is not None else []
            assert sorted(hits[hits >= 0].tolist()) == want, b
        have = sorted(state)
        if mode in ("retrain", "compact"):
            self_search(s, ids)  # every code was rewritten: check them all
        else:
            self_search(s, np.unique(np.concatenate(
                [rng.choice(ids, 100, replace=False), batch_ids(have[-1])]
                + [batch_ids(b) for b in recent])))
    con = sqlite3.connect(path)
    versions = con.execute("SELECT version, state FROM rvq_codebooks").fetchall()
    con.close()
    assert versions == [(version, "active")]
    return state == with_it, version


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_keeps_exactly_the_committed_batches(tmp_path, mode):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    path = tmp_path / "k.db"
    make_store(path)
    with Store.open(path, readonly=True) as s:
        version = s.info()["codebook_version"]
    rng = np.random.default_rng(SEEDS[mode])
    first = 0
    for kill in range(KILLS):
        prefix, count, delay = kill_plan(mode, rng, kill)
        reported = kill_child(script, path, mode, first, prefix, count, float(delay))
        done = first + len(reported)
        in_flight_is_in, new_version = check_after_kill(path, mode, done, rng)
        if mode == "retrain":
            # each reported retrain switched once, the one in flight wholly or not at all
            before = version + len(reported)
            assert new_version in (before, before + 1), (version, reported, new_version)
            version = new_version
        # the operation in flight is redone by the next child unless it is in
        first = done + 1 if in_flight_is_in else done
    assert first >= 1  # at least one kill came after a committed operation

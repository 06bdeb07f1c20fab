"""SIGKILL at random points of add, delete, retrain and compact.

A child process runs a fixed, numbered plan of operations on known batches and reports
each operation's number on its own line once the call has returned. The parent kills it at
a seeded random moment and checks the exact ids left in the file: every reported operation
is in, the one in flight is wholly in or wholly out, nothing later is in; and the file
passes ``PRAGMA integrity_check`` and ``Store.check()``, and its vectors find themselves
(all of them after a retrain or compact, a sample after adds and deletes).
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


def batch_vectors(b):
    """The vectors of batch b, the same in every process (a seeded Gaussian mixture)."""
    rng = np.random.default_rng([11, b])
    lab = rng.integers(len(CENTERS), size=B)
    return (CENTERS[lab] + 0.3 * rng.standard_normal((B, DIM))).astype(np.float32)


def step(mode, i):
    """Operation i of a mode's plan: ("add" | "delete", batch) or ("retrain" | "compact", None).

    delete and compact add a fresh batch for each one they delete, so the store keeps its
    size however long the child runs.
    """
    if mode == "add":
        return "add", BASE + i
    if mode == "retrain":
        return "retrain", None
    period = 2 if mode == "delete" else 3
    j, phase = divmod(i, period)
    return [("delete", j), ("add", BASE + j), ("compact", None)][phase]


def batches_after(mode, n):
    """The batches in the store once operations 0 .. n-1 of the plan are committed."""
    present = set(range(BASE))
    for i in range(n):
        kind, b = step(mode, i)
        if kind == "add":
            present.add(b)
        elif kind == "delete":
            present.remove(b)
    return present


def run(store, mode, i, progress=None):
    kind, b = step(mode, i)
    if kind == "add":
        store.add(batch_vectors(b), ids=batch_ids(b), keys=batch_keys(b))
    elif kind == "delete":
        store.delete(batch_ids(b))
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

SEEDS = {"add": 1, "delete": 2, "retrain": 3, "compact": 4}


def kill_plan(mode, rng, kill):
    """When to kill: after the child has printed ``count`` lines starting with ``prefix``,
    wait ``delay`` seconds.

    The first kill comes at a random delay, the second at a random delay after the first
    committed operation; the others wait for a random point of the work that commits: the
    start of an add or delete (each takes about a millisecond), the encoding of a
    retrain's blocks (one transaction each; most of a retrain is training) or a
    compaction's rewrite (most of a compaction is VACUUM).
    """
    short = mode in ("add", "delete")
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
            s.add(batch_vectors(b), ids=batch_ids(b), keys=batch_keys(b))
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


def check_after_kill(path, mode, done, rng):
    """Check the file after a kill that came with operations < ``done`` reported.

    Returns (whether operation ``done`` is in, the active codebook version).
    """
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    with Store.open(path, readonly=True) as r:  # as a reader finds it, stale build or not
        version = r.info()["codebook_version"]
        ids = r.ids()
        assert r.search(batch_vectors(0)[0], k=1).ids.shape == (1,)
    with Store.open(path) as s:  # a writer drops what a killed retrain left
        assert s.check() == []
        assert s.info()["codebook_version"] == version
        assert np.array_equal(s.ids(), ids)
        per_batch = Counter((ids // B).tolist())
        partial = {b: n for b, n in per_batch.items() if n != B}
        assert not partial, f"batches only partly in the store (batch: ids of {B}): {partial}"
        have = sorted(per_batch)
        without, with_it = sorted(batches_after(mode, done)), sorted(batches_after(mode, done + 1))
        assert have in (without, with_it), (
            f"after {done} operations of {mode}: batches {have}, expected {without} "
            f"or {with_it}")
        assert s.keys(ids) == [k for b in have for k in batch_keys(b)]
        assert np.array_equal(s.get(ids), np.concatenate([batch_vectors(b) for b in have]))
        if mode in ("retrain", "compact"):
            self_search(s, ids)  # every code was rewritten: check them all
        else:
            self_search(s, np.concatenate([rng.choice(ids, 100, replace=False),
                                           batch_ids(have[-1])]))
    con = sqlite3.connect(path)
    versions = con.execute("SELECT version, state FROM rvq_codebooks").fetchall()
    con.close()
    assert versions == [(version, "active")]
    return have == with_it, version


@pytest.mark.parametrize("mode", ["add", "delete", "retrain", "compact"])
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

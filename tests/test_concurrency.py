"""Readers in other processes while a writer adds, deletes, trains, compacts and retrains.

The writer runs a fixed plan of operations on whole batches; two read-only processes
search without pause. Whatever a reader sees (through ``ids()``, ``len()`` and a search
that returns every stored vector) must be one of the states the plan passes through, never
a partial batch, and never older than what it saw before; it must never raise, and it must
reach the final state. The parent moves the writer on in steps and lets it go on only when
both readers have seen the step's state, so the readers are searching while every step's
operations commit, with no sleeps.
"""

import subprocess
import sys
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from rvqstore import Store
from conftest import read_line

DIM = 16
B = 10           # vectors per batch: batch b holds ids b*B .. b*B+B-1
INIT = 5         # batches in the store before the writer starts
ROUNDS = 40
STEP = 4         # operations the writer runs between two meetings with the readers
KMAX = 1000      # more than the store ever holds: a search with k=KMAX returns everything

CENTERS = np.random.default_rng(3).standard_normal((12, DIM)).astype(np.float32)


def batch_ids(b):
    return np.arange(b * B, (b + 1) * B, dtype=np.int64)


def batch_vectors(b):
    rng = np.random.default_rng([13, b])
    lab = rng.integers(len(CENTERS), size=B)
    return (CENTERS[lab] + 0.3 * rng.standard_normal((B, DIM))).astype(np.float32)


def plan():
    """The writer's operations: ("add" | "delete", batch) or ("train" | "compact" |
    "retrain", None). Each round adds a batch; every third deletes one from the middle."""
    ops, live, nxt = [], list(range(INIT)), INIT
    for r in range(ROUNDS):
        ops.append(("add", nxt))
        live.append(nxt)
        nxt += 1
        if r % 3 == 1:
            ops.append(("delete", live.pop(len(live) // 2)))
        ops += {12: [("train", None)], 24: [("compact", None)], 32: [("retrain", None)]}.get(r, [])
    assert ops[-1][0] == "add"  # the final state differs from every earlier one
    return ops


def states():
    """The batches stored after each prefix of the plan: states()[i] follows ops[:i]."""
    out = [frozenset(range(INIT))]
    for kind, b in plan():
        if kind == "add":
            out.append(out[-1] | {b})
        elif kind == "delete":
            out.append(out[-1] - {b})
        else:
            out.append(out[-1])
    return out


def apply(store, op):
    kind, b = op
    if kind == "add":
        store.add(batch_vectors(b), ids=batch_ids(b))
    elif kind == "delete":
        store.delete(batch_ids(b))
    else:
        getattr(store, kind)()


def read(path):
    """The reader process: search until the final state is seen, checking every answer.

    Prints "seen i" each time the last step it can have seen grows; an inconsistency raises
    (exit code 1)."""
    all_states = states()
    final = len(all_states) - 1
    where = defaultdict(list)
    for i, s in enumerate(all_states):
        where[s].append(i)
    ever = np.concatenate([batch_ids(b) for b in range(INIT + ROUNDS)])

    def place(ids, lo, what):
        """The earliest step >= lo whose state is exactly ``ids`` in whole batches."""
        per_batch = Counter((np.asarray(ids) // B).tolist())
        partial = {b: n for b, n in per_batch.items() if n != B}
        assert not partial, f"{what}: batches partly seen (batch: ids of {B}): {partial}"
        steps = [i for i in where.get(frozenset(per_batch), []) if i >= lo]
        assert steps, f"{what}: batches {sorted(per_batch)} are no state of step {lo} or later"
        return steps[0]

    q = np.stack([batch_vectors(0)[0], batch_vectors(INIT + ROUNDS - 1)[0]])
    lo, shown, distinct, last = 0, -1, 0, None
    with Store.open(path, readonly=True) as s:
        while lo < final:
            lo = place(s.ids(), lo, "ids()")
            n = len(s)
            assert n % B == 0, f"len() = {n}: a partial batch"
            assert any(len(all_states[i]) * B == n for i in range(lo, final + 1)), n
            res = s.search(q, k=KMAX, rerank=1)
            found = res.ids[res.ids >= 0].reshape(2, -1)  # both rows: every stored id
            assert (np.sort(found[0]) == np.sort(found[1])).all()
            lo = place(found[0], lo, "search(k=KMAX)")
            near = s.search(q, k=5)  # with rerank: reads originals the writer may delete
            assert np.isin(near.ids, ever).all(), near.ids
            distinct += all_states[lo] != last
            last = all_states[lo]
            # the last step with the same state: a train, compact or retrain keeps it
            hi = lo
            while hi < final and all_states[hi + 1] == all_states[lo]:
                hi += 1
            if hi > shown:
                print("seen", hi, flush=True)
                shown = hi
    print("final", distinct, flush=True)


def write(path):
    """The writer process: on "go c" run the plan's operations up to step c, print "at c"."""
    ops = plan()
    done = 0
    with Store.open(path) as s:
        for line in sys.stdin:
            c = int(line.split()[1])
            while done < c:
                apply(s, ops[done])
                done += 1
            print("at", c, flush=True)
            if done == len(ops):
                return


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_concurrency
    getattr(test_concurrency, sys.argv[1])(sys.argv[2])
""")


def test_readers_in_other_processes_see_only_whole_committed_states(tmp_path):
    path = tmp_path / "c.db"
    with Store.open(path, dim=DIM, stages=4, codebook_size=16, block_size=32) as s:
        for b in range(INIT):
            s.add(batch_vectors(b), ids=batch_ids(b))
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    final = len(plan())
    errs = {name: tmp_path / f"{name}.err" for name in ("reader0", "reader1", "writer")}

    def start(role, name):
        return subprocess.Popen([sys.executable, str(script), role, str(path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=open(errs[name], "w"), bufsize=0)

    procs = {"reader0": start("read", "reader0"), "reader1": start("read", "reader1")}
    seen = {}

    def wait_for_readers(c):
        for name in ("reader0", "reader1"):
            while seen.get(name, -1) < c:
                line = read_line(procs[name])
                assert line.startswith("seen "), (name, line, errs[name].read_text())
                seen[name] = int(line.split()[1])

    try:
        wait_for_readers(0)  # both have opened the store and searched it
        procs["writer"] = writer = start("write", "writer")
        for c in list(range(STEP, final, STEP)) + [final]:
            writer.stdin.write(f"go {c}\n".encode())
            assert read_line(writer) == f"at {c}\n", errs["writer"].read_text()
            wait_for_readers(c)
        distinct = []
        for name in ("reader0", "reader1"):
            line = read_line(procs[name])
            assert line.startswith("final "), (name, line, errs[name].read_text())
            distinct.append(int(line.split()[1]))
        for name, p in procs.items():
            assert p.wait(timeout=30) == 0, (name, errs[name].read_text())
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    # each reader met the writer at every step, so it saw at least that many states
    assert min(distinct) >= final // STEP, distinct
    with Store.open(path) as s:
        assert s.check() == []
        assert set((s.ids() // B).tolist()) == states()[-1]

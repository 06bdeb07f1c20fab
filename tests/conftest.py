import os
import select

import numpy as np
import pytest


def clustered(n, d, centers=20, seed=0, spread=0.3):
    """Seeded Gaussian mixture: structured enough for quantizers to learn something."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32)
    lab = rng.integers(centers, size=n)
    return (c[lab] + spread * rng.standard_normal((n, d))).astype(np.float32)


@pytest.fixture
def data():
    return clustered(3000, 32, seed=1)


@pytest.fixture
def queries():
    return clustered(40, 32, seed=2)


@pytest.fixture(scope="session")
def small_rq():
    from rvqstore.algo import ResidualQuantizer

    x = clustered(3000, 32, seed=1)
    return ResidualQuantizer.train(x, stages=6, codebook_size=32, seed=0)


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "vecs.db"


@pytest.fixture
def vecs():
    return clustered(800, 16, centers=12, seed=7)


@pytest.fixture
def trained(store_path, vecs):
    from rvqstore import Store

    s = Store.open(store_path, dim=16, stages=4, codebook_size=32)
    s.add(vecs, keys=[f"item-{i}" for i in range(len(vecs))])
    s.train()
    yield s
    s.close()


def read_line(proc, timeout=60):
    """The next line ``proc`` writes to its (binary, unbuffered) stdout; "" at its end.
    Only whole lines count: a child killed mid-print leaves a line without its newline."""
    buf = b""
    while not buf.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        assert ready, f"no line from the child process in {timeout} s (got {buf!r} so far)"
        byte = os.read(proc.stdout.fileno(), 1)
        if not byte:
            break
        buf += byte
    return buf.decode()

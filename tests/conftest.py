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

"""How deep the exact rerank reads: adaptive by default (every candidate within the codes'
error margin of the k-th estimate), fixed when ``rerank=`` says how many."""

import sqlite3

import numpy as np
import pytest

from rvqstore import BadFileError, Store
from rvqstore.algo.search import ERROR_Z, rerank_depths

N, DIM, TOPICS = 8000, 32, 20


@pytest.fixture(scope="module")
def topics(tmp_path_factory):
    """Unit vectors in 20 clusters with coarse codes (4 stages of 32): each item's metadata
    names its cluster, so filtering on a cluster far from the query is anti-correlated."""
    rng = np.random.default_rng(1)
    c = rng.standard_normal((TOPICS, DIM)).astype(np.float32)
    lab = rng.integers(TOPICS, size=N)
    x = c[lab] + 0.3 * rng.standard_normal((N, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    path = tmp_path_factory.mktemp("rerank") / "t.db"
    with Store.open(path, dim=DIM, stages=4, codebook_size=32) as s:
        s.add(x, metadata=[{"c": int(v)} for v in lab])
        s.train()
    q = x[:30] + 0.01 * rng.standard_normal((30, DIM)).astype(np.float32)
    far = np.argmin(q @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T, axis=1)
    return path, x, lab, q, far


def _recall_and_reads(s, x, lab, q, far, rerank):
    before = dict(s.info()["search_plans"])
    found = []
    for qi, f in zip(q, far):
        rows = np.flatnonzero(lab == f)
        want = rows[np.argsort(((x[rows] - qi) ** 2).sum(1), kind="stable")[:10]]
        got = s.search(qi, k=10, where={"c": int(f)}, rerank=rerank).ids
        found.append(len(set(got.tolist()) & set(want.tolist())) / 10)
    after = s.info()["search_plans"]
    assert after["scan"] - before["scan"] == len(q)  # the clusters are too big to compare exactly
    return np.mean(found), (after["originals_read"] - before["originals_read"]) / len(q)


def test_adaptive_rerank_reads_deep_enough_for_an_anti_correlated_filter(topics):
    path, x, lab, q, far = topics
    with Store.open(path) as s:
        recall, reads = _recall_and_reads(s, x, lab, q, far, None)
        fixed, fixed_reads = _recall_and_reads(s, x, lab, q, far, 5)  # the adaptive floor
    # far from the query, the codes' errors are large against the gaps between the items
    # that pass: five candidates per result miss many, the error margin does not
    assert fixed < 0.8 and fixed_reads == 50
    assert recall >= 0.95 and reads > fixed_reads


def test_adaptive_rerank_is_shallower_near_the_data_than_far_from_it(topics):
    path, x, lab, q, far = topics
    with Store.open(path) as s:
        b = s.info()["search_plans"]["originals_read"]
        s.search(q, k=10)
        near = (s.info()["search_plans"]["originals_read"] - b) / len(q)
        _, far_reads = _recall_and_reads(s, x, lab, q, far, None)
    assert 50 <= near < far_reads <= 500


def test_fixed_rerank_reads_k_times_rerank(topics):
    path, x, _, q, _ = topics
    with Store.open(path) as s:
        b = s.info()["search_plans"]["originals_read"]
        s.search(q[:4], k=10, rerank=3)
        assert s.info()["search_plans"]["originals_read"] - b == 4 * 30


def test_rerank_depths_take_the_candidates_within_the_margin():
    d = np.array([[0.0, 1.0, 1.1, 1.15, 1.5, np.inf],
                  [4.0, 4.0, 4.0, 4.0, 4.0, 4.0]], np.float32)
    q = np.zeros((2, 3), np.float32)
    rms = 0.25 / (2 * ERROR_Z)  # the margin at d_k = 1 is 0.25 for L2
    got = rerank_depths(q, d, k=2, metric="l2", rms_error=rms, floor=1)
    # row 0: k-th estimate 1.0, margin 0.25 -> 1.0, 1.1, 1.15 are in, 1.5 is out
    # row 1: all equal -> all in
    np.testing.assert_array_equal(got, [4, 6])
    np.testing.assert_array_equal(rerank_depths(q, d, k=2, metric="l2", rms_error=0.0,
                                                floor=3), [3, 6])  # the floor
    q_ip = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]], np.float32)  # |q| 5 and 0
    got = rerank_depths(q_ip, d, k=2, metric="ip", rms_error=0.12 / (5 * ERROR_Z), floor=1)
    np.testing.assert_array_equal(got, [3, 6])  # ip: margin z * rms * |q| = 0.12


def test_error_figures_of_the_codebooks_are_checked(topics, tmp_path):
    path, x, *_ = topics
    bad = tmp_path / "bad.db"
    with sqlite3.connect(path) as src, sqlite3.connect(bad) as dst:
        src.backup(dst)
    with sqlite3.connect(bad) as con:
        con.execute("UPDATE rvq_codebooks SET train_mse = -1.0")
    with Store.open(bad) as s, pytest.raises(BadFileError, match="error figures"):
        s.search(x[0], k=3)

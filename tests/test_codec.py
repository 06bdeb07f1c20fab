"""Quality and correctness of the codec: k-means, RVQ, PQ, ADC, rerank."""

import ast
import pathlib

import numpy as np
import pytest

import rvqstore
from rvqstore.algo import (ProductQuantizer, ResidualQuantizer, adc_search, exact_search, kmeans,
                           normalize, rerank)
from rvqstore.errors import DimensionMismatchError, InvalidInputError



def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=np.float32)
    x = (centers[rng.integers(4, size=800)] + 0.1 * rng.standard_normal((800, 2))).astype(np.float32)
    c = kmeans(x, 4, seed=1)
    # each true centre has a learned centroid within 0.1
    gaps = np.linalg.norm(centers[:, None] - c[None], axis=2).min(axis=1)
    assert gaps.max() < 0.1


def test_kmeans_repairs_empty_clusters():
    # 3 distinct points, 5 clusters: k-means++ must reuse points and Lloyd leaves empties
    x = np.repeat(np.eye(3, dtype=np.float32), 50, axis=0)
    c = kmeans(x, 5, seed=0)
    assert np.isfinite(c).all()
    assert len(np.unique(c.round(4), axis=0)) >= 3


def test_kmeans_is_seeded(data):
    np.testing.assert_array_equal(kmeans(data, 8, seed=3), kmeans(data, 8, seed=3))


def test_kmeans_caps_training_points(data):
    # with a cap of 2 points per centroid it trains on 16 rows: still 8 finite centroids
    c = kmeans(data, 8, seed=0, max_points_per_centroid=2)
    assert c.shape == (8, 32) and np.isfinite(c).all()


def test_distortion_falls_stage_by_stage(small_rq, data):
    mse = small_rq.distortion_per_stage(data, small_rq.encode(data))
    assert (np.diff(mse) < 0).all()
    assert mse[-1] < 0.5 * mse[0]


def test_beam_never_worse_than_greedy(small_rq, data):
    greedy = small_rq.distortion_per_stage(data, small_rq.encode(data))[-1]
    last = greedy
    for beam in (2, 4, 8):
        mse = small_rq.distortion_per_stage(data, small_rq.encode(data, beam_width=beam))[-1]
        assert mse <= last * (1 + 1e-6)
        last = mse
    assert last < greedy


def test_refinement_lowers_error(data):
    rq = ResidualQuantizer.train(data, stages=4, codebook_size=16, seed=0)
    codes = rq.encode(data, beam_width=4)
    before = rq.distortion_per_stage(data, codes)[-1]
    refined = rq.refine(data, codes)
    # with the codes fixed, least squares can only lower the error (ridge aside)
    assert refined.distortion_per_stage(data, codes)[-1] < before
    after = refined.distortion_per_stage(data, refined.encode(data, beam_width=4))[-1]
    assert after < before


def test_train_with_beam_and_refinement_runs_and_reports(data):
    seen = []
    rq = ResidualQuantizer.train(data, stages=3, codebook_size=16, beam_width=3, refine_rounds=1,
                                 progress=lambda phase, done, total: seen.append(phase))
    assert rq.codebooks.shape == (3, 16, 32)
    assert {"train", "refine"} <= set(seen)


def test_decode_of_codes_is_sum_of_codewords(small_rq, data):
    codes = small_rq.encode(data[:5])
    manual = sum(small_rq.codebooks[s][codes[:, s]] for s in range(small_rq.stages))
    np.testing.assert_allclose(small_rq.decode(codes), manual, rtol=1e-6)


def _full_estimates(q, codes, bias, metric, quantizer):
    res = adc_search(quantizer, codes, q, k=len(codes), metric=metric, bias=bias)
    est = np.empty(len(codes), np.float32)
    est[res.ids[0]] = res.distances[0]
    return est


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_adc_equals_exact_distance_to_decoded(metric, data, queries):
    x, q = (normalize(data), normalize(queries)) if metric == "cosine" else (data, queries)
    rq = ResidualQuantizer.train(x, stages=5, codebook_size=32, seed=0)
    codes = rq.encode(x)
    bias = rq.norms(codes) if metric == "l2" else None
    decoded = rq.decode(codes)
    for qi in q[:5]:
        est = _full_estimates(qi[None], codes, bias, metric, rq)
        if metric == "l2":
            exact = ((decoded - qi) ** 2).sum(axis=1)
        elif metric == "ip":
            exact = -(decoded @ qi)
        else:
            exact = 1.0 - decoded @ qi  # decoded vectors are not unit: estimate is 1 - <q, x^>
        np.testing.assert_allclose(est, exact, rtol=1e-4, atol=1e-3 * np.abs(exact).max())


def test_l2_estimate_needs_cross_terms(data, queries):
    # the prototype's bug: sum_s ||c_s||^2 instead of ||x^||^2 gives biased estimates
    rq = ResidualQuantizer.train(data, stages=4, codebook_size=16, seed=0)
    codes = rq.encode(data)
    cn = np.einsum("skd,skd->sk", rq.codebooks, rq.codebooks)
    dropped = cn[np.arange(4)[None, :], codes].sum(axis=1).astype(np.float32)
    exact = ((rq.decode(codes) - queries[0]) ** 2).sum(axis=1)
    good = _full_estimates(queries[:1], codes, rq.norms(codes), "l2", rq)
    bad = _full_estimates(queries[:1], codes, dropped, "l2", rq)
    assert np.abs(good - exact).max() < 1e-3 * exact.max()
    assert np.abs(bad - exact).max() > 10 * np.abs(good - exact).max()


def test_batch_search_equals_single(small_rq, data, queries):
    codes = small_rq.encode(data)
    bias = small_rq.norms(codes)
    batch = adc_search(small_rq, codes, queries, k=10, bias=bias)
    for i in range(0, len(queries), 7):
        one = adc_search(small_rq, codes, queries[i:i + 1], k=10, bias=bias)
        np.testing.assert_array_equal(one.ids[0], batch.ids[i])


def test_pq_adc_equals_exact_and_needs_no_norms(data, queries):
    pq = ProductQuantizer.train(data, subspaces=4, codebook_size=16, seed=0)
    codes = pq.encode(data)
    decoded = pq.decode(codes)
    est = _full_estimates(queries[:1], codes, None, "l2", pq)
    exact = ((decoded - queries[0]) ** 2).sum(axis=1)
    np.testing.assert_allclose(est, exact, rtol=1e-4, atol=1e-3)


def test_rvq_beats_pq_at_equal_code_size(data):
    rq = ResidualQuantizer.train(data, stages=4, codebook_size=32, seed=0)
    pq = ProductQuantizer.train(data, subspaces=4, codebook_size=32, seed=0)
    e_rq = rq.distortion_per_stage(data, rq.encode(data))[-1]
    e_pq = pq.distortion_per_stage(data, pq.encode(data))[-1]
    assert e_rq < e_pq


def test_rerank_with_all_candidates_is_exact(small_rq, data, queries):
    codes = small_rq.encode(data)
    approx = adc_search(small_rq, codes, queries, k=len(data), bias=small_rq.norms(codes))
    calls = []

    def fetch(ids):
        calls.append(len(ids))
        return data[ids]

    res = rerank(queries, approx.ids, fetch, k=10)
    truth = exact_search(data, queries, k=10)
    np.testing.assert_array_equal(res.ids, truth.ids)
    np.testing.assert_allclose(res.distances, truth.distances, rtol=1e-4, atol=1e-4)
    assert calls == [len(data)]  # one fetch of the unique candidates for the batch


def test_rerank_pads_short_candidate_lists(data, queries):
    cands = np.full((2, 5), -1, dtype=np.int64)
    cands[0, :2] = [3, 9]
    res = rerank(queries[:2], cands, lambda ids: data[ids], k=4)
    assert sorted(res.ids[0, :2]) == [3, 9]
    assert (res.ids[0, 2:] == -1).all() and np.isinf(res.distances[0, 2:]).all()
    assert (res.ids[1] == -1).all()


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_exact_search_matches_sorting(metric, data, queries):
    res = exact_search(data, queries, k=5, metric=metric)
    ip = queries @ data.T
    full = {"l2": ((queries[:, None] - data[None]) ** 2).sum(-1), "ip": -ip, "cosine": 1 - ip}[metric]
    np.testing.assert_array_equal(res.ids, np.argsort(full, axis=1, kind="stable")[:, :5])


def test_codec_input_errors(small_rq, data):
    bad = data[:10].copy()
    bad[3, 4] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        small_rq.encode(bad)
    with pytest.raises(DimensionMismatchError, match="dim=31"):
        small_rq.encode(data[:, :31])
    with pytest.raises(InvalidInputError, match="empty"):
        small_rq.encode(np.empty((0, 32), np.float32))
    with pytest.raises(InvalidInputError, match="numeric"):
        small_rq.encode(np.array([["a"] * 32]))
    with pytest.raises(InvalidInputError, match="ragged"):
        small_rq.encode([[1.0, 2.0], [1.0]])
    with pytest.raises(InvalidInputError, match="k must be"):
        adc_search(small_rq, small_rq.encode(data[:5]), data[:1], k=0,
                   bias=np.zeros(5, np.float32))
    with pytest.raises(InvalidInputError, match="at least codebook_size"):
        ResidualQuantizer.train(data[:10], stages=2, codebook_size=32)
    with pytest.raises(InvalidInputError, match="stages"):
        ResidualQuantizer.train(data, stages=65)
    with pytest.raises(InvalidInputError, match="zero norm"):
        normalize(np.zeros((2, 3), np.float32))


def test_algo_layer_imports_no_storage():
    """STYLE.md: the math never imports sqlite3, sqlite_utils or zstandard."""
    root = pathlib.Path(rvqstore.__file__).parent / "algo"
    banned = {"sqlite3", "sqlite_utils", "zstandard"}
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"


def test_single_query_table_equals_batch_table(small_rq, queries):
    # one query takes the bfloat16 path, a batch the BLAS path: same codebook values
    one = small_rq.ip_table(queries[:1])
    both = small_rq.ip_table(queries[:2])
    np.testing.assert_allclose(one[0], both[0], rtol=1e-5, atol=1e-5)
    assert small_rq._cache["bf16"] is not None

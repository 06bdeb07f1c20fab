"""Every numba kernel against its plain numpy twin."""

import numpy as np
import pytest

from rvqstore.algo import kernels
from rvqstore.algo.reference import (beam_step_ref, centroid_sums_ref, normal_equations_ref,
                                     scan_topk_ref)

from conftest import clustered


def test_centroid_sums_match_reference():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 7)).astype(np.float32)
    labels = rng.integers(9, size=500)
    sums, counts = kernels.centroid_sums(x, labels, 9)
    rs, rc = centroid_sums_ref(x, labels, 9)
    np.testing.assert_allclose(sums, rs, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(counts, rc)


@pytest.mark.parametrize("beam", [1, 3, 8])
def test_beam_step_matches_decoding_reference(small_rq, beam):
    x = clustered(60, 32, seed=5)
    C = small_rq.codebooks
    cross, cnorm = small_rq._cross_tables()
    dist = np.einsum("ij,ij->i", x, x)[:, None].astype(np.float32)
    codes = np.zeros((len(x), 1, small_rq.stages), dtype=np.uint8)
    for s in range(small_rq.stages):
        xc = x @ C[s].T
        b_out = min(beam, codes.shape[1] * C.shape[1])
        ref_d, ref_c = beam_step_ref(x, C, codes, s, b_out)
        dist, codes = kernels.beam_step(xc, dist, codes, cross[s], cnorm[s], s, b_out)
        np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-3)
        # ties between equal scores may order differently; the best entry must agree
        np.testing.assert_array_equal(codes[:, 0, : s + 1], ref_c[:, 0, : s + 1])


@pytest.mark.parametrize("S", [5, 8, 16, 32])  # 8/16/32 with K=256 are specialised
@pytest.mark.parametrize("K", [256, 16])
@pytest.mark.parametrize("k", [1, 10, 500])
def test_scan_topk_matches_reference(S, K, k):
    rng = np.random.default_rng(K + k + S)
    n = 300
    codes = rng.integers(K, size=(n, S)).astype(np.uint8)
    lut = rng.standard_normal(S * K).astype(np.float32)
    bias = rng.random(n).astype(np.float32)
    bias[::7] = np.inf  # deleted rows are never returned
    d, i = kernels.scan_topk(codes, lut, bias, k)
    rd, ri = scan_topk_ref(codes, lut, bias, k)
    np.testing.assert_allclose(d, rd, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(i, ri)
    assert not np.isin(np.arange(0, n, 7), i).any()


def test_scan_topk_batch_matches_single():
    rng = np.random.default_rng(11)
    n, S, K = 400, 8, 256
    codes = rng.integers(K, size=(n, S)).astype(np.uint8)
    luts = rng.standard_normal((6, S * K)).astype(np.float32)
    bias = rng.random(n).astype(np.float32)
    bd, bi = kernels.scan_topk_batch(codes, kernels.ALL_ROWS, False, luts, bias, 7)
    for q in range(6):
        rd, ri = scan_topk_ref(codes, luts[q], bias, 7)
        np.testing.assert_array_equal(bi[q], ri)
        np.testing.assert_allclose(bd[q], rd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("S", [5, 16])
@pytest.mark.parametrize("share", [0.0, 0.01, 0.3, 1.0])
def test_scan_over_rows_matches_reference_on_those_rows(S, share):
    rng = np.random.default_rng(S + int(share * 100))
    n, K, k = 500, 256, 10
    codes = rng.integers(K, size=(n, S)).astype(np.uint8)
    luts = rng.standard_normal((3, S * K)).astype(np.float32)
    bias = rng.random(n).astype(np.float32)
    bias[::9] = np.inf
    rows = np.flatnonzero(rng.random(n) < share)
    bd, bi = kernels.scan_topk_batch(codes, rows, True, luts, bias, k)
    for q in range(3):
        # the reference scores every row, with the rows outside ``rows`` made +inf
        masked = np.full(n, np.inf, np.float32)
        masked[rows] = bias[rows]
        rd, ri = scan_topk_ref(codes, luts[q], masked, k)
        d, i = kernels.scan_topk_rows(codes, rows, luts[q], bias, k)
        np.testing.assert_array_equal(i, ri)
        np.testing.assert_allclose(d, rd, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(bi[q], ri)
        assert np.isin(i[i >= 0], rows).all()


def test_normal_equations_match_reference():
    rng = np.random.default_rng(4)
    codes = rng.integers(6, size=(80, 3)).astype(np.uint8)
    x = rng.standard_normal((80, 5)).astype(np.float32)
    btb, btx = kernels.normal_equations(codes, x, 6)
    rb, rx = normal_equations_ref(codes, x, 6)
    np.testing.assert_allclose(btb, rb)
    np.testing.assert_allclose(btx, rx, rtol=1e-6, atol=1e-6)


def test_matvec_matches_numpy():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((300, 37)).astype(np.float32)
    v = rng.standard_normal(37).astype(np.float32)
    np.testing.assert_allclose(kernels.matvec(a, v), a @ v, rtol=1e-4, atol=1e-4)


def test_matvec_bf16_matches_numpy_on_rounded_values():
    from rvqstore.algo.quantizers import round_bf16

    rng = np.random.default_rng(9)
    a = round_bf16(rng.standard_normal((200, 48)).astype(np.float32))
    bits = (a.view(np.uint32) >> 16).astype(np.uint16)
    v = rng.standard_normal(48).astype(np.float32)
    np.testing.assert_allclose(kernels.matvec_bf16(bits, v), a @ v, rtol=1e-4, atol=1e-4)


def test_round_bf16_is_nearest_and_idempotent():
    from rvqstore.algo.quantizers import round_bf16

    x = np.array([1.0, 1.00390625, 1.005859375, -3.14159, 1e-20, 0.0], np.float32)
    r = round_bf16(x)
    assert (r.view(np.uint32) & 0xFFFF == 0).all()
    np.testing.assert_array_equal(round_bf16(r), r)
    np.testing.assert_allclose(r, x, rtol=2 ** -8)
    assert r[0] == 1.0 and r[2] == np.float32(1.0078125)  # ties and rounding up


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_scan_topk_split_matches_single(parts):
    rng = np.random.default_rng(parts)
    n, S, K = 1000, 16, 256
    codes = rng.integers(K, size=(n, S)).astype(np.uint8)
    lut = rng.standard_normal(S * K).astype(np.float32)
    bias = rng.random(n).astype(np.float32)
    pd, pi = kernels.scan_topk_split(codes, lut, bias, 10, parts)
    rd, ri = scan_topk_ref(codes, lut, bias, 10)
    flat_d, flat_i = pd.ravel(), pi.ravel()
    order = np.argsort(flat_d, kind="stable")[:10]
    np.testing.assert_array_equal(flat_i[order], ri)


def test_adc_search_split_path_equals_single(monkeypatch):
    from rvqstore.algo import ResidualQuantizer, adc_search, search

    rng = np.random.default_rng(3)
    rq = ResidualQuantizer(rng.standard_normal((4, 16, 8)).astype(np.float32))
    codes = rng.integers(16, size=(5000, 4)).astype(np.uint8)
    bias = rq.norms(codes)
    q = rng.standard_normal((1, 8)).astype(np.float32)
    one = adc_search(rq, codes, q, k=7, bias=bias)
    monkeypatch.setattr(search, "SPLIT_ROWS", 100)
    split = adc_search(rq, codes, q, k=7, bias=bias)
    np.testing.assert_array_equal(one.ids, split.ids)
    np.testing.assert_allclose(one.distances, split.distances)

"""Partitioned codes: the cells of the first RVQ stages, probed near each query.

The kernels are checked against plain numpy; the index against the flat index it must
equal when every cell is probed (same estimates), through appends, deletes and
truncation; the store through ``Store.open(partitions=)``, ``search(nprobe=)``, filters and
other connections' writes.
"""

import numpy as np
import pytest

from rvqstore import Store
from rvqstore.algo import kernels
from rvqstore.algo.index import FlatCodeIndex, PartitionedCodeIndex, calibrate_nprobe
from rvqstore.errors import BadFileError, InvalidInputError

from conftest import clustered


def _indexes(rq, x, metric="l2", prefix=2):
    codes = rq.encode(x)
    norms = rq.norms(codes)
    ids = np.arange(100, 100 + len(x), dtype=np.int64)
    flat = FlatCodeIndex(metric, rq, ids, codes, norms)
    part = PartitionedCodeIndex.group(metric, rq, ids, codes, norms, prefix=prefix)
    return flat, part


def _same(a, b):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.distances, b.distances)


ALL = 10 ** 9  # an nprobe beyond every cell


@pytest.mark.parametrize("prefix", [1, 2])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_probing_every_cell_equals_the_flat_scan(small_rq, data, queries, prefix, metric):
    flat, part = _indexes(small_rq, data, metric, prefix)
    assert part.grouped == len(data) and sorted(part.rows.tolist()) == list(range(len(data)))
    _same(part.search(queries, k=20, nprobe=ALL), flat.search(queries, k=20))
    allow = np.random.default_rng(3).random(len(data)) < 0.2
    _same(part.search(queries, k=20, nprobe=ALL, allow=allow),
          flat.search(queries, k=20, allow=allow))


def test_few_cells_find_most_neighbours_and_scan_less(small_rq, data, queries):
    flat, part = _indexes(small_rq, data)
    want = flat.search(queries, k=10).ids
    got = part.search(queries, k=50, nprobe=len(part.c0) // 8).ids
    found = np.mean([len(set(w) & set(g)) / 10 for w, g in zip(want, got)])
    assert found >= 0.9
    cut = part.search(queries, k=50, nprobe=1).ids
    assert np.mean([len(set(w) & set(g)) / 10 for w, g in zip(want, cut)]) < found


def test_a_selective_filter_visits_more_cells_not_fewer_results(small_rq, data, queries):
    flat, part = _indexes(small_rq, data)
    allow = np.zeros(len(data), bool)
    allow[np.random.default_rng(4).choice(len(data), 15, replace=False)] = True
    res = part.search(queries, k=10, allow=allow, nprobe=1)
    assert (res.ids >= 0).all()  # min(k, 15 passing) = 10 every time
    assert set(res.ids.ravel().tolist()) <= set((100 + np.flatnonzero(allow)).tolist())
    # a probe takes cells until k rows pass: asked for every passing row, it finds them all
    _same(part.search(queries, k=15, allow=allow, nprobe=1),
          flat.search(queries, k=15, allow=allow))


def test_appends_deletes_and_truncation_keep_it_equal_to_flat(small_rq, data, queries,
                                                              monkeypatch):
    import rvqstore.algo.index as index_module

    monkeypatch.setattr(index_module, "REGROUP_ROWS", 500)
    flat, part = _indexes(small_rq, data[:2000])
    for lo, hi in [(2000, 2300), (2300, 3000)]:  # the second regroups
        codes = small_rq.encode(data[lo:hi])
        ids = np.arange(100 + lo, 100 + hi, dtype=np.int64)
        flat.append(ids, codes, small_rq.norms(codes))
        part.append(ids, codes, small_rq.norms(codes))
    assert part.grouped == 3000  # regrouped once the tail passed its limit
    gone = np.arange(100, 3100, 7)
    flat.remove(gone)
    part.remove(gone)
    np.testing.assert_array_equal(part.live(), flat.live())
    _same(part.search(queries, k=15, nprobe=ALL), flat.search(queries, k=15))
    for n in (2900, 1000):
        _same(part.truncated(n).search(queries, k=15, nprobe=ALL),
              flat.truncated(n).search(queries, k=15))


def test_truncating_the_ungrouped_tail_keeps_the_grouping(small_rq, data, queries):
    codes = small_rq.encode(data)
    norms = small_rq.norms(codes)
    ids = np.arange(len(data), dtype=np.int64)
    part = PartitionedCodeIndex.group("l2", small_rq, ids, codes, norms, tail_from=2500)
    flat = FlatCodeIndex("l2", small_rq, ids, codes, norms)
    assert part.grouped == 2500
    cut = part.truncated(2700)
    assert cut.grouped == 2500 and cut.cell_of is part.cell_of  # not regrouped
    _same(cut.search(queries, k=12, nprobe=ALL), flat.truncated(2700).search(queries, k=12))


def test_probe_cells_takes_the_nearest_cells_up_to_the_budget():
    rng = np.random.default_rng(5)
    K, m = 16, 200
    lut = rng.standard_normal(2 * K).astype(np.float32)
    c0, c1 = rng.integers(K, size=m), rng.integers(K, size=m)
    bias = rng.random(m).astype(np.float32)
    weight = rng.integers(0, 20, size=m)
    score = bias + lut[c0] + lut[K + c1]
    order = np.argsort(score, kind="stable")
    order = order[weight[order] > 0]
    for budget in (1, 50, 400, int(weight.sum()), int(weight.sum()) + 10):
        got = set(kernels.probe_cells(lut, K, c0, c1, True, bias, weight, budget).tolist())
        need = np.searchsorted(np.cumsum(weight[order]), budget) + 1
        assert set(order[:need].tolist()) <= got  # the nearest cells reaching the budget
        assert all(weight[j] > 0 for j in got)
        # and nothing beyond one bucket past the last one needed
        width = (score.max() - score.min()) / kernels.PROBE_BUCKETS
        limit = score[order[min(need, len(order)) - 1]] + width
        assert all(score[j] <= limit + 1e-6 for j in got)


def test_scan_over_ranges_matches_numpy():
    rng = np.random.default_rng(6)
    n, S, K = 500, 4, 16
    codes = rng.integers(K, size=(n, S)).astype(np.uint8)
    lut = rng.standard_normal(S * K).astype(np.float32)
    bias = rng.random(n).astype(np.float32)
    rows = rng.permutation(n).astype(np.int64)
    allow = rng.random(n) < 0.5
    starts, ends = np.array([10, 200, 450]), np.array([60, 260, 500])
    d, i = kernels.scan_topk_ranges(codes, starts, ends, allow, rows, lut, bias, 7)
    span = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
    span = span[allow[rows[span]]]
    est = bias[span] + lut[np.arange(S) * K + codes[span]].sum(axis=1)
    best = np.argsort(est, kind="stable")[:7]
    np.testing.assert_array_equal(i, span[best])
    np.testing.assert_allclose(d, est[best], rtol=1e-6)


def test_calibration_reaches_its_target_on_held_out_vectors(small_rq, data):
    flat, part = _indexes(small_rq, data)
    held = np.arange(0, 3000, 50)
    own = part.ids[held]
    full = flat.search(data[held], k=11).ids
    truth = [[i for i in row if i != o][:10] for row, o in zip(full.tolist(), own)]
    chosen = {}
    for target in (0.5, 0.9, 0.99):
        nprobe, reached = calibrate_nprobe(part, data[held], own, k=10, target=target)
        assert reached >= target and 1 <= nprobe <= len(part.c0)
        got = part.search(data[held], k=50, nprobe=nprobe).ids
        found = np.mean([len(set(t) & set(g)) / 10 for t, g in zip(truth, got.tolist())])
        assert found >= target, (target, nprobe, found)  # the probe reaches what it said
        chosen[target] = nprobe
    assert chosen[0.5] < chosen[0.9] <= chosen[0.99] < len(part.c0)


# -- the store -------------------------------------------------------------------------------

@pytest.fixture
def big_store(tmp_path):
    x = clustered(6000, 16, centers=40, seed=11)
    path = tmp_path / "p.db"
    with Store.open(path, dim=16, stages=6, codebook_size=16) as s:
        s.add(x, metadata=[{"u": i % 100} for i in range(len(x))])
        s.train()
    return path, x


def test_store_partitions_forced_by_cells_and_by_partitions(big_store):
    path, x = big_store
    q = x[:30] + 0.01
    with Store.open(path, partitions=0) as flat:
        assert flat.info()["partitions"] is None
        want = flat.search(q, k=10)
        want10 = flat.search(q, k=10, rerank=10)
    for parts, prefix in [(16, 1), (256, 2)]:
        with Store.open(path, partitions=parts) as s:
            res = s.search(q, k=10)
            info = s.info()["partitions"]
            assert info["cells"] == parts and info["stages_per_cell"] == prefix
            assert info["nprobe_calibrated"] and info["calibration_coverage"] >= 0.99
            assert sum(len(set(a) & set(b)) for a, b in zip(res.ids, want.ids)) >= 0.95 * 300
            # every cell, the same rerank depth (the default margin is calibrated per
            # store): the flat answer
            _same(s.search(q, k=10, nprobe=ALL, rerank=10), want10)
            # a filter keeping 1%: as many results as pass, the flat store's answer
            where = {"u": {"$lt": 1}}
            _same(s.search(q, k=10, where=where, nprobe=1), flat_answer(path, q, where))


def flat_answer(path, q, where):
    with Store.open(path, partitions=0) as flat:
        return flat.search(q, k=10, where=where)


def test_store_partitions_are_checked(big_store):
    path, _ = big_store
    for bad in (3, -1, True, 1.5, "16"):
        with pytest.raises(InvalidInputError, match="partitions"):
            Store.open(path, partitions=bad)
    with Store.open(path, partitions=16) as s:
        for bad in (0, -2, 2.0, True):
            with pytest.raises(InvalidInputError, match="nprobe"):
                s.search(np.zeros(16, np.float32), nprobe=bad)


def test_partitioned_reader_sees_other_connections_writes(big_store):
    path, x = big_store
    extra = clustered(500, 16, centers=40, seed=12)
    with Store.open(path, partitions=256) as reader, Store.open(path) as writer:
        reader.search(x[0], k=5)
        new = writer.add(extra)
        res = reader.search(extra[:20], k=1, nprobe=ALL)
        np.testing.assert_array_equal(res.ids[:, 0], new[:20])
        writer.delete(new[:10])
        res = reader.search(extra[:10], k=1, nprobe=ALL)
        assert not set(res.ids[:, 0].tolist()) & set(new[:10].tolist())
        own = reader.add(extra[:5] + 5.0)
        np.testing.assert_array_equal(reader.search(extra[:5] + 5.0, k=1).ids[:, 0], own)


# -- ranking by a prefix of the codes (search(stages=)) -------------------------------------

def _prefix_truth(rq, codes, queries, stages, metric, k):
    """Exact-form ADC of the first ``stages`` stages by decoding them: for L2 the distance
    to the prefix's reconstruction, for inner products minus the inner product."""
    xs = rq.decode(codes, stages)
    if metric == "l2":
        d = ((queries[:, None, :] - xs[None, :, :]) ** 2).sum(axis=2)
    else:
        d = -queries @ xs.T
    return np.sort(d, axis=1)[:, :k]


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("stages", [1, 3, 5])
def test_a_prefix_ranks_by_its_own_reconstruction(small_rq, data, queries, metric, stages):
    flat, part = _indexes(small_rq, data, metric)
    codes = small_rq.encode(data)
    want = _prefix_truth(small_rq, codes, queries, stages, metric, 15)
    for index in (flat, part):
        got = index.search(queries, k=15, nprobe=ALL, stages=stages)
        np.testing.assert_allclose(got.distances, want, rtol=1e-4, atol=1e-3)
    # every stage is the whole code
    _same(flat.search(queries, k=15, stages=6), flat.search(queries, k=15))


def test_a_prefix_never_returns_deleted_rows_and_is_coarser(small_rq, data, queries):
    flat, part = _indexes(small_rq, data)
    for index in (flat, part):
        first = index.search(queries, k=10, nprobe=ALL, stages=2).ids
        gone = np.unique(first[:, :3])
        index.remove(gone)  # after the prefix's terms were computed: they must drop them too
        again = index.search(queries, k=10, nprobe=ALL, stages=2).ids
        assert not np.isin(again, gone).any()
        errors = [index.error_of(s) for s in (1, 2, 4)] + [index.error_of(None)]
        assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1]


def test_store_search_by_a_prefix(big_store):
    path, x = big_store
    q = x[:40] + 0.01
    with Store.open(path, partitions=0) as s:
        full = s.search(q, k=10, rerank=1)
        coarse = s.search(q, k=10, rerank=1, stages=2)
        read = s.info()["search_plans"]["originals_read"]
        s.search(q, k=10)
        whole = s.info()["search_plans"]["originals_read"] - read
        reranked = s.search(q, k=10, stages=2)
        prefix = s.info()["search_plans"]["originals_read"] - read - whole
        assert prefix > 1.5 * whole  # its error margin is the prefix's, wider
        exact = s.search(q, k=10, rerank=50)
        assert not np.array_equal(full.ids, coarse.ids)  # the prefix ranks differently
        # the adaptive rerank reads deeper for the coarser estimate and stays exact-ish
        found = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(reranked.ids, exact.ids)])
        assert found >= 0.95
        for bad in (0, 7, 2.0, True, "2"):
            with pytest.raises(InvalidInputError, match="stages"):
                s.search(q, k=10, stages=bad)


# -- the calibrated nprobe, recorded in the file --------------------------------------------

def test_training_a_partitioned_store_records_its_calibration(tmp_path, monkeypatch):
    import rvqstore.store as store_module

    x = clustered(6000, 16, centers=40, seed=11)
    path = tmp_path / "cal.db"
    with Store.open(path, dim=16, stages=6, codebook_size=16, partitions=256) as s:
        s.add(x)
        info = s.train()["partitions"]
    assert info["nprobe_calibrated"] and 0.9 <= info["calibration_coverage"] <= 1.0

    def no_calibration(*a, **kw):
        raise AssertionError("calibrated again instead of reading the file")

    monkeypatch.setattr(store_module, "calibrate_nprobe", no_calibration)
    with Store.open(path, readonly=True, partitions=256) as r:
        r.search(x[0], k=5)
        got = r.info()["partitions"]
    assert (got["nprobe"], got["calibration_coverage"], got["rerank_error_z"]) == (
        info["nprobe"], info["calibration_coverage"], info["rerank_error_z"])
    with Store.open(path, readonly=True, partitions=16) as r:  # other cells: calibrated anew
        with pytest.raises(AssertionError, match="calibrated again"):
            r.search(x[0], k=5)


def test_a_recorded_calibration_is_read_checked_and_tied_to_its_version(big_store):
    import sqlite3

    path, x = big_store
    with Store.open(path, partitions=256) as s:
        version = s.info()["codebook_version"]

    def record(text):
        con = sqlite3.connect(path)
        con.execute("INSERT OR REPLACE INTO rvq_meta VALUES ('nprobe_calibration', ?)", (text,))
        con.commit()
        con.close()

    def partitions():
        with Store.open(path, readonly=True, partitions=256) as r:
            r.search(x[0], k=5)
            return r.info()["partitions"]

    record(f"{version} 2 7 0.500000 1.250")
    got = partitions()
    assert (got["nprobe"], got["calibration_coverage"], got["rerank_error_z"]) == (7, 0.5, 1.25)
    record(f"{version + 1} 2 7 0.500000 1.250")  # another version's: calibrated anew
    assert partitions()["calibration_coverage"] != 0.5
    for bad in ("1 2 0 0.5 2.0", "x", f"{version} 3 7 0.5 2.0", f"{version} 2 7 1.5 2.0",
                f"{version} 2 7 0.5", f"{version} 2 7 0.5 0.0", f"{version} 2 7 0.5 11.0",
                f"{version} 2 7 0.5 2.0; DROP TABLE rvq_meta"):
        record(bad)
        with pytest.raises(BadFileError, match="nprobe_calibration"):
            partitions()


def test_the_rerank_margin_is_calibrated_to_the_recall_target(big_store, monkeypatch):
    path, x = big_store
    chosen = {}
    for target in (0.0, 0.97, 1.01):
        monkeypatch.setattr(Store, "RECALL_TARGET", target)
        with Store.open(path, partitions=256) as s:
            chosen[target] = s.calibrate()
    choices = Store.ERROR_Z_CHOICES
    recall = chosen[0.97]["recall_by_z"]
    assert list(recall) == list(choices) and max(recall.values()) >= 0.9
    assert chosen[0.0]["error_z"] == choices[0]
    # the least margin reaching the target, or within half a percent of the best
    for target, got in chosen.items():
        goal = min(target, max(recall.values()) - 0.005)
        assert got["error_z"] == min(z for z in choices if recall[z] >= goal)
    assert chosen[0.0]["error_z"] <= chosen[0.97]["error_z"] <= chosen[1.01]["error_z"]


def test_searches_use_the_recorded_margin(big_store):
    import sqlite3

    path, x = big_store
    q = x[::60] + 0.05
    with Store.open(path, partitions=256) as s:
        version = s.info()["codebook_version"]
    reads = {}
    for z in (1.5, 4.0):
        con = sqlite3.connect(path)
        con.execute("INSERT OR REPLACE INTO rvq_meta VALUES ('nprobe_calibration', ?)",
                    (f"{version} 2 40 0.990000 {z}",))
        con.commit()
        con.close()
        with Store.open(path, readonly=True, partitions=256) as r:
            r.search(q, k=10)
            reads[z] = r.info()["search_plans"]["originals_read"]
    assert reads[1.5] < reads[4.0]


@pytest.mark.parametrize("two", [False, True])
@pytest.mark.parametrize("n,head", [(1000, 0), (1000, 700), (1000, 1000),
                                    (140_000, 139_000)])  # split over threads when >= 2
def test_grouping_by_cell_matches_a_stable_argsort(two, n, head):
    from rvqstore.algo.reference import group_by_cell_ref

    rng = np.random.default_rng(5)
    K = 8
    codes = rng.integers(0, K, size=(n, 4), dtype=np.uint8)
    bias = rng.random(n).astype(np.float32)
    ncells = K ** (2 if two else 1)
    counts = kernels.cell_counts(codes, head, K, two, ncells)
    want_codes, want_bias, want_rows, want_cells = group_by_cell_ref(codes, bias, head, K, two)
    np.testing.assert_array_equal(counts, np.bincount(want_cells, minlength=ncells))
    nonempty = np.flatnonzero(counts)
    which = np.full(ncells, -1, np.int64)
    which[nonempty] = np.arange(len(nonempty))
    first = np.zeros(ncells, np.int64)
    first[nonempty] = np.concatenate([[0], np.cumsum(counts[nonempty])[:-1]])
    out_codes, out_bias = np.empty_like(codes), np.empty(n, np.float32)
    rows = np.empty(n, np.int32)
    cell_of = np.empty(head, np.uint16)
    kernels.scatter_by_cell(codes, bias, head, K, two, first, which, out_codes, out_bias,
                            rows, cell_of, 2)
    np.testing.assert_array_equal(out_codes, want_codes)
    np.testing.assert_array_equal(out_bias, want_bias)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(cell_of, which[want_cells])


def test_compact_lays_blocks_out_by_cell_and_answers_the_same(big_store):
    from rvqstore.algo.index import cell_order

    path, x = big_store
    q = x[::97] + 0.02
    with Store.open(path, partitions=256) as s:
        s.delete(list(range(0, 6000, 50)))
        before = s.search(q, k=10, nprobe=ALL, rerank=10)
        flat_before = s.code_index()
        s.compact()
        after = s.search(q, k=10, nprobe=ALL, rerank=10)
        index = s.code_index()
    _same(before, after)
    with Store.open(path, partitions=0, readonly=True) as flat:
        laid = flat.code_index()
    # the file's rows: every live vector once, ascending by cell
    assert sorted(laid.ids.tolist()) == sorted(set(range(6000)) - set(range(0, 6000, 50)))
    np.testing.assert_array_equal(cell_order(laid.codes, 16), np.arange(len(laid.ids)))
    assert not np.array_equal(flat_before.ids, laid.ids)  # they were not in that order
    np.testing.assert_array_equal(index.rows, np.arange(len(index.rows)))


def test_rows_laid_out_by_cell_are_not_moved(small_rq, data, queries):
    from rvqstore.algo.index import cell_order

    codes = small_rq.encode(data)
    order = cell_order(codes, small_rq.codebook_size)
    codes, norms = np.ascontiguousarray(codes[order]), small_rq.norms(codes[order])
    ids = np.arange(len(codes), dtype=np.int64)
    part = PartitionedCodeIndex.group("l2", small_rq, ids, codes, norms)
    assert np.shares_memory(part.codes, codes)  # grouped in place: no copy
    flat = FlatCodeIndex("l2", small_rq, ids, codes, norms)
    _same(part.search(queries, k=20, nprobe=ALL), flat.search(queries, k=20))
    shuffled = PartitionedCodeIndex.group("l2", small_rq, ids[::-1].copy(),
                                          np.ascontiguousarray(codes[::-1]), norms[::-1].copy())
    assert not np.shares_memory(shuffled.codes, codes)
    _same(shuffled.search(queries, k=20, nprobe=ALL),
          FlatCodeIndex("l2", small_rq, ids[::-1].copy(), codes[::-1],
                        norms[::-1].copy()).search(queries, k=20))

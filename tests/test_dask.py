"""Sharded build and search on Dask, on a LocalCluster (processes, 2 workers) the tests start
themselves, over a generated Parquet dataset: the shards hold the codes one store encoded
with the same codebooks would hold, sharded search answers as one store holding every
vector, a worker killed mid-build leaves no shard counted as done and the build resumes,
missing shards are reported, writes route by key.

Outside CI a machine without dask/distributed skips these; CI (.ci/run sets RVQSTORE_CI=1)
installs the extra and fails here if it cannot import it.
"""

import functools
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

if os.environ.get("RVQSTORE_CI"):
    import distributed  # CI installs the extra: missing fails here
else:
    distributed = pytest.importorskip("distributed")
import dask  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from rvqstore import Store  # noqa: E402
from rvqstore import dask as rdask  # noqa: E402
from rvqstore.algo import ResidualQuantizer  # noqa: E402
from rvqstore.cli import main  # noqa: E402
from rvqstore.errors import (ConfigMismatchError, DuplicateError, InvalidInputError,  # noqa: E402
                             ReadOnlyError, UnknownIdError)
from rvqstore.shards import ShardedStore, ShardError, route  # noqa: E402

from conftest import clustered  # noqa: E402

N, DIM, PARTS = 2400, 16, 4
SETTINGS = dict(stages=4, codebook_size=16, sample=1500)


def _cluster(**config):
    with dask.config.set(config):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=":0",
                                           env={"NUMBA_NUM_THREADS": "1",
                                                "OMP_NUM_THREADS": "1"})
    return cluster, distributed.Client(cluster)


@pytest.fixture(scope="module")
def client():
    cluster, c = _cluster()
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A Parquet dataset of PARTS files (keys, metadata, documents): (folder, x, metas)."""
    folder = tmp_path_factory.mktemp("data") / "vectors"
    folder.mkdir()
    x = clustered(N, DIM, centers=10, seed=31)
    metas = [{"n": i, "tag": ["a", "b", "c"][i % 3]} for i in range(N)]
    per = N // PARTS
    for p in range(PARTS):
        rows = range(p * per, (p + 1) * per)
        table = pa.table({
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(x[p * per:(p + 1) * per]
                                                                 .reshape(-1)), DIM),
            "key": [f"k{i}" for i in rows],
            "metadata": [json.dumps(metas[i]) for i in rows],
            "document": [f"text {i}" for i in rows]})
        pq.write_table(table, folder / f"part-{p}.parquet")
    return folder, x, metas


@pytest.fixture(scope="module")
def built(client, dataset, tmp_path_factory):
    folder, x, metas = dataset
    out = tmp_path_factory.mktemp("shards") / "out"
    manifest = rdask.build(str(folder), out, client=client, **SETTINGS)
    return out, manifest


def _one_store(path, out, x, metas):
    """One store holding every vector, encoded with the shards' codebooks."""
    rq = ResidualQuantizer(np.load(out / "codebooks.npy"))
    with Store.open(out / "shard-00000.db", readonly=True) as shard:
        info = shard.info()  # the codebooks' training figures, which set rerank depths
    s = Store.open(path, dim=DIM, stages=4, codebook_size=16)
    s.import_codes(rq, [{"ids": np.arange(N), "codes": rq.encode(x), "vectors": x,
                         "keys": [f"k{i}" for i in range(N)], "metadata": metas}],
                   train_count=info["train_count"], train_mse=info["train_mse"])
    return s, rq


def test_the_shards_hold_the_codes_one_store_would(built, dataset, tmp_path):
    out, manifest = built
    folder, x, metas = dataset
    assert len(manifest["shards"]) == PARTS and manifest["count"] == N
    single, rq = _one_store(tmp_path / "one.db", out, x, metas)
    want = rq.encode(x)
    seen = []
    for entry in manifest["shards"]:
        with Store.open(out / entry["file"], readonly=True) as s:  # an ordinary store
            assert len(s) == entry["rows"] and s.info()["codebook_version"] == 1
            np.testing.assert_array_equal(s.quantizer().codebooks, rq.codebooks)
            for ids, codes, _ in s.iter_codes():
                np.testing.assert_array_equal(codes, want[ids])
                seen.extend(ids.tolist())
            ids = s.ids()
            assert s.keys(ids) == [f"k{i}" for i in ids]
            assert s.metadata(ids) == [metas[i] for i in ids]
            assert s.documents(ids) == [f"text {i}" for i in ids]
    assert sorted(seen) == list(range(N))
    single.close()


def test_sharded_search_equals_one_store(built, dataset, client, tmp_path):
    out, _ = built
    folder, x, metas = dataset
    single, _ = _one_store(tmp_path / "one.db", out, x, metas)
    q = clustered(25, DIM, centers=10, seed=32)
    local = ShardedStore(out)
    remote = rdask.DaskShardedStore(client, out)
    try:
        for where in (None, {"tag": "b"}, {"n": {"$lt": 300}}):
            want = single.search(q, k=10, rerank=50, where=where)
            for sharded in (local, remote):
                got = sharded.search(q, k=10, rerank=50, where=where)
                np.testing.assert_array_equal(got.ids, want.ids)
                np.testing.assert_allclose(got.distances, want.distances, rtol=1e-6)
                assert not got.partial
        # exact: the true nearest by numpy
        d = ((q[:, None, :] - x[None]) ** 2).sum(-1)
        np.testing.assert_array_equal(local.search(q, k=5, rerank=50).ids,
                                      np.argsort(d, axis=1, kind="stable")[:, :5])
        one = remote.search(q[0], k=3, with_keys=True)  # a lone query, 1-D
        assert one.ids.shape == (3,) and one.keys == [f"k{i}" for i in one.ids]
    finally:
        local.close()
        remote.close()
        single.close()


def test_a_killed_worker_leaves_no_finished_shard_and_the_build_resumes(dataset, tmp_path):
    folder, _, _ = dataset
    out = tmp_path / "out"
    cluster, c = _cluster(**{"distributed.scheduler.allowed-failures": 0})
    try:
        with pytest.raises(ShardError, match=r"shard\(s\) \[.*2.*\] failed.*run the build "
                                             "again"):
            rdask.build(str(folder), out, client=c, _fault=(2, functools.partial(os._exit, 1)),
                        **SETTINGS)
        assert not (out / "manifest.json").exists()
        assert not (out / "shard-00002.db").exists()  # the killed task's rows: not done
        # (a task queued on the killed worker fails with it: allowed-failures is 0 here)
        done = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)
                if p.startswith("shard-") and p.endswith(".db")}
        assert done  # the others finished
        with pytest.raises(ShardError, match="manifest"):
            ShardedStore(out)
        manifest = rdask.build(str(folder), out, client=c, **SETTINGS)
        assert manifest["count"] == N and len(manifest["shards"]) == PARTS
        assert {p: os.stat(out / p).st_mtime_ns for p in done} == done  # kept, not redone
        assert not [p for p in os.listdir(out) if ".partial" in p]
        with ShardedStore(out) as s:
            assert len(s) == N
    finally:
        c.close()
        cluster.close()


def test_missing_shards_are_reported_or_marked_partial(built, client, tmp_path):
    import shutil

    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    os.remove(copy / "shard-00001.db")
    with pytest.raises(ShardError, match="shard-00001.db is missing"):
        ShardedStore(copy)
    with pytest.raises(ShardError, match="shard-00001.db is missing"):
        rdask.DaskShardedStore(client, copy)
    with ShardedStore(copy, allow_partial=True) as s:
        res = s.search(np.zeros(DIM, np.float32), k=5)
        assert res.partial and res.missing == (str(copy / "shard-00001.db"),)
    remote = rdask.DaskShardedStore(client, copy, allow_partial=True)
    res = remote.search(np.zeros(DIM, np.float32), k=5)
    assert res.partial and res.missing == (str(copy / "shard-00001.db"),)
    remote.close()
    (copy / "shard-00002.db").write_bytes(b"not a store at all" * 100)
    with pytest.raises(ShardError, match="shard-00002.db"):
        ShardedStore(copy, allow_partial=False)


def test_writes_route_by_key_and_retrain_rewrites_every_shard(built, tmp_path):
    import shutil

    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    new = clustered(40, DIM, centers=10, seed=33)
    keys = [f"new-{i}" for i in range(40)]
    with ShardedStore(copy, readonly=False) as s:
        ids = s.add(new, keys=keys)
        assert ids.tolist() == list(range(N, N + 40))  # above every stored id
        for key, i in zip(keys, ids):
            holder = s.stores[route(key, PARTS)]
            assert holder.ids_for_keys([key]).tolist() == [i]
        with pytest.raises(DuplicateError):
            s.add(new[:1], keys=["k5"])
        with pytest.raises(UnknownIdError):
            s.delete(keys=["k7", "nobody"])
        assert len(s) == N + 40  # all or none
        assert s.delete(keys=["k7", "new-3"]) == 2
        before = s.codebooks
        s.retrain(sample=1000, seed=1)
        assert s.codebooks != before and len(s) == N + 38
        q = new[:5]
        d = ((q[:, None, :] - np.concatenate([s.stores[j].get(s.stores[j].ids())
                                              for j in range(PARTS)])[None]) ** 2).sum(-1)
        all_ids = np.concatenate([st.ids() for st in s.stores])
        got = s.search(q, k=3, rerank=50)
        np.testing.assert_array_equal(got.ids, all_ids[np.argsort(d, axis=1)[:, :3]])
    with ShardedStore(copy) as s, pytest.raises(ReadOnlyError):
        s.retrain()
    # a shard left on other codebooks is refused
    shutil.copy(out / "shard-00000.db", copy / "shard-00000.db")
    with pytest.raises(ConfigMismatchError, match="one set of codebooks"):
        ShardedStore(copy)


def test_cli_builds_on_a_scheduler_and_searches_the_directory(client, dataset, tmp_path):
    folder, x, _ = dataset
    npy = tmp_path / "x.npy"
    np.save(npy, x)
    out = tmp_path / "cli"
    address = client.scheduler.address
    result = CliRunner().invoke(main, ["shard", "build", str(npy), str(out), "--scheduler",
                                       address, "--rows-per-shard", "1000", "--stages", "4",
                                       "--codebook-size", "16", "--sample", "1500"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Built 3 shards of 2,400 vectors in {out}")
    result = CliRunner().invoke(main, ["search", str(out), "--vector", json.dumps(x[7].tolist()),
                                       "-k", "3", "--rerank", "50", "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    with ShardedStore(out) as s:
        want = s.search(x[7], k=3, rerank=50)
    assert [r["id"] for r in rows] == want.ids.tolist() and rows[0]["id"] == 7
    bad = CliRunner().invoke(main, ["search", str(out), "--key", "k1"])
    assert bad.exit_code == 2 and "--key: not with a shard directory" in bad.output
    os.remove(out / "manifest.json")
    gone = CliRunner().invoke(main, ["search", str(out), "--vector", json.dumps(x[7].tolist())])
    assert gone.exit_code == 1 and "manifest.json is missing" in gone.output


def test_the_default_adaptive_rerank_over_shards_reads_and_answers_as_one_store(
        built, dataset, client, tmp_path):
    out, _ = built
    _, x, metas = dataset
    single, _ = _one_store(tmp_path / "one.db", out, x, metas)
    q = clustered(40, DIM, centers=10, seed=34) + 0.5  # off the data: rerank depths vary
    remote = rdask.DaskShardedStore(client, out)
    with ShardedStore(out) as shards:
        for where in (None, {"tag": "c"}):
            want = single.search(q, k=10, where=where)
            for sharded in (shards, remote):
                got = sharded.search(q, k=10, where=where, with_keys=True)
                np.testing.assert_array_equal(got.ids, want.ids)
                np.testing.assert_allclose(got.distances, want.distances, rtol=1e-6)
                assert got.keys == [[f"k{i}" for i in row] for row in got.ids]
        deep = shards.search(q[:2], k=30_000)  # beyond 20,971: 50 k would pass MAX_K
        assert deep.ids.shape == (2, 30_000) and (deep.ids >= 0).sum(axis=1).tolist() == [N, N]
        reads = [s.info()["search_plans"]["originals_read"] for s in shards.stores]
        shards.search(q, k=10)
        read = sum(s.info()["search_plans"]["originals_read"] for s in shards.stores) - sum(reads)
        assert read == 0  # phase one ranks codes alone: the originals come through get()
    remote.close()
    single.close()


def test_a_finished_build_is_left_alone_and_a_foreign_shard_is_not_overwritten(
        built, dataset, client, tmp_path):
    import shutil

    out, _ = built
    folder, x, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with ShardedStore(copy, readonly=False) as s:
        s.add(x[:2] + 1.0, keys=["later-0", "later-1"])
    again = rdask.build(str(folder), copy, client=client, **SETTINGS)  # finished: a no-op
    assert again["count"] == N
    with ShardedStore(copy) as s:
        assert len(s) == N + 2  # the rows added since are still there
    os.remove(copy / "manifest.json")  # an unfinished build whose shard 0 changed since
    with pytest.raises(ShardError, match=r"shard-0000[0-3].db holds 60[12] rows .*refused"):
        rdask.build(str(folder), copy, client=client, **SETTINGS)


def test_retrain_keeps_an_empty_shard_and_a_repartitioned_frame_builds(built, dataset, client,
                                                                       tmp_path):
    import shutil

    import dask.dataframe as dd

    out, _ = built
    folder, x, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with ShardedStore(copy, readonly=False) as s:
        s.delete(keys=s.stores[3].keys(s.stores[3].ids()))
        s.retrain(sample=800)
        assert len(s.stores[3]) == 0 and len(s) == N - N // PARTS
    with ShardedStore(copy) as s:  # one set of codebooks, the manifest says which
        assert json.loads((copy / "manifest.json").read_text())["codebooks"] == s.codebooks
    frame = dd.read_parquet(str(folder), dtype_backend="pyarrow").repartition(npartitions=2)
    manifest = rdask.build(frame, tmp_path / "two", client=client, **SETTINGS)
    assert len(manifest["shards"]) == 2 and manifest["count"] == N


def test_actors_refuse_mixed_codebooks_and_serve_around_a_missing_worker_share(
        built, dataset, client, tmp_path):
    folder, _, _ = dataset
    out, _ = built
    other = tmp_path / "other"
    rdask.build(str(folder), other, client=client, **{**SETTINGS, "seed": 7})
    mixed = [str(out / "shard-00000.db"), str(other / "shard-00001.db")]
    with pytest.raises(ConfigMismatchError, match="across"):
        rdask.DaskShardedStore(client, mixed)
    lonely = [str(out / "shard-00000.db"), str(tmp_path / "gone.db")]  # a worker each
    remote = rdask.DaskShardedStore(client, lonely, allow_partial=True)
    res = remote.search(np.zeros(DIM, np.float32), k=3)
    assert res.partial and res.missing == (str(tmp_path / "gone.db"),) and (res.ids >= 0).all()
    remote.close()


def test_a_resume_checks_the_plan_and_codebooks_it_reads(dataset, client, tmp_path):
    folder, _, _ = dataset
    out = tmp_path / "out"
    rdask.build(str(folder), out, client=client, **SETTINGS)
    os.remove(out / "manifest.json")  # unfinished, as far as a rerun can tell
    books = np.load(out / "codebooks.npy")
    np.save(out / "codebooks.npy", books.astype(np.float64))
    with pytest.raises(InvalidInputError, match="codebooks.npy does not match"):
        rdask.build(str(folder), out, client=client, **SETTINGS)
    np.save(out / "codebooks.npy", books)
    plan = json.loads((out / "build.json").read_text())
    (out / "build.json").write_text(json.dumps({**plan, "train_mse": "lots"}))
    with pytest.raises(InvalidInputError, match="training figures"):
        rdask.build(str(folder), out, client=client, **SETTINGS)

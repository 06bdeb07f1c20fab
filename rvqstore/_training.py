"""Codebook versions: training one, cleaning up after an interrupted one, checking the file.

:func:`fit` trains new codebooks on a sample of the originals, writes them as a
``building`` version, encodes every vector into it in committed batches and switches it
active in one final transaction. :func:`drop_stale_builds` removes what a crashed fit
left behind; :func:`check` verifies the active version's blocks against the vectors.
"""

from typing import NamedTuple, Optional

import numpy as np

from ._config import MAX_META_INT, meta_int, naming, unpack
from . import _snapshot
from ._writes import report, write_blocks
from .algo import ResidualQuantizer
from .errors import (DuplicateError, InvalidInputError, LockedError, NotTrainedError,
                     RvqstoreError)
from .storage import codes as codeblocks
from .storage import pack_codebooks


def fit(db, config, progress):
    """Train, encode everything and switch to the new version (the work of train/retrain).

    Holds the store's build lock throughout, so that no other writer takes the version
    being built for the leftover of a crash and drops it.
    """
    with db.build_lock():
        _fit(db, config, progress)


def _fit(db, config, progress):
    c = config
    n = db.count()
    if n < c.codebook_size:
        raise NotTrainedError(
            f"training needs at least codebook_size={c.codebook_size} vectors, the store has {n}")
    rng = np.random.default_rng(c.seed)
    with db.read():  # one snapshot: ids deleted meanwhile would be missing from the fetch
        all_ids = np.asarray(db.all_ids(), np.int64)
        sample_ids = np.sort(rng.choice(all_ids, min(len(all_ids), c.train_sample),
                                        replace=False))
        blobs = db.fetch_vectors(sample_ids.tolist())
    sample = unpack(db, [blobs[i] for i in sample_ids.tolist()], c, sample_ids.tolist())
    rq, train_mse = train_codebooks(sample, c, rng, progress)
    with db.write():
        version = db.next_version()
        db.insert_codebooks(version, "building", c.stages, c.codebook_size, c.dim,
                            pack_codebooks(rq.codebooks), len(sample), train_mse)
    # encode everything in batches, each committed: a crash leaves a 'building'
    # version that the next writer drops, and the active version untouched
    done, block, last = 0, 0, None
    for ids, blobs in db.iter_vectors(batch=c.block_size):
        report(progress, "encode", done, n)
        cd = rq.encode(unpack(db, blobs, c, ids), beam_width=c.train_beam)
        last = (np.asarray(ids, np.int64), cd, rq.norms(cd))
        with db.write():
            # first_block > 0 appends; block 0 of a brand-new version has nothing to replace
            write_blocks(db, c, version, *last, first_block=block)
        block += 1
        done += len(ids)
    with db.write():
        row = db.codebooks_row(version)
        if row is None or row["state"] != "building":
            raise RvqstoreError(f"{db.path}: codebook version {version} was dropped while it "
                                "was being built; the active version is unchanged")
        # vectors added meanwhile by another connection are encoded here, in the switch
        covered = set(_snapshot.read_codes(db, c, version)[0].tolist())
        live = db.all_ids()
        late = [i for i in live if i not in covered]
        if late:
            blobs = db.fetch_vectors(late)
            cd = rq.encode(unpack(db, [blobs[i] for i in late], c, late), beam_width=c.train_beam)
            new = (np.asarray(late, np.int64), cd, rq.norms(cd))
            if last is not None:  # keep every block but the last one full
                new = tuple(np.concatenate([a, b]) for a, b in zip(last, new))
            write_blocks(db, c, version, *new, first_block=max(block - 1, 0))
        gone = covered - set(live)  # deleted meanwhile
        db.clear_tombstones()
        if gone:
            db.add_tombstones(sorted(gone))
        db.set_codebook_state(version, "active")
        db.drop_versions(keep=version)
        db.set_meta(active_version=version)
        if not c.keep_originals:
            db.clear_originals()
    report(progress, "encode", n, n)


def train_codebooks(sample, config, rng, progress=None):
    """(ResidualQuantizer, mean squared error on the sample) fitted to ``sample`` (float32,
    normalised for cosine) with the store's settings: what train() and a sharded build fit."""
    c = config
    rq = ResidualQuantizer.train(sample, stages=c.stages, codebook_size=c.codebook_size,
                                 beam_width=c.train_beam, seed=rng, progressive_dim=True,
                                 n_iter=10, progress=progress)
    codes = rq.encode(sample, beam_width=c.train_beam)
    return rq, float(((sample - rq.decode(codes)) ** 2).sum(axis=1).mean())


def drop_stale_builds(db):
    """Drop the 'building' versions a crashed fit left, unless a fit is running now."""
    active = meta_int(db.meta(), "active_version", db.path)
    if not db.build_locks or not db.stale_building_versions(active):
        return
    try:
        with db.build_lock():  # no fit runs while we hold it
            active = meta_int(db.meta(), "active_version", db.path)
            stale = db.stale_building_versions(active)
            if stale:
                with db.write():
                    for v in stale:
                        db.drop_version(v)
    except LockedError:
        pass  # a fit is running: its version is not stale


def check(db, config):
    """The store's own consistency check: a list of problems, empty when all is well.

    Beyond SQLite's ``integrity_check`` (pages and indexes) it reads every BLOB the store
    wrote and verifies its CRC, sizes and values: codebooks, code blocks (codes within the
    codebook, finite norms, each live vector coded once) and every original.
    """
    problems = [p for p in db.integrity_check() if p != "ok"]
    with db.read():
        meta = db.meta()
        version = meta_int(meta, "active_version", db.path)
        live = set(db.all_ids())
        dead = set(db.tombstones())
        if version:
            try:
                _snapshot.codec(db, config, version)
            except RvqstoreError as exc:
                problems.append(str(exc))
            seen = []
            for b, block in codeblocks.each_block(db, version, _snapshot.layout(config)):
                if isinstance(block, RvqstoreError):
                    problems.append(f"{db.path}: {block}")
                else:
                    seen.append(block[0])
            ids = np.concatenate(seen) if seen else np.empty(0, np.int64)
            if len(np.unique(ids)) != len(ids):
                problems.append("an id appears twice in the code blocks")
            in_blocks = set(ids.tolist())
            if live - in_blocks:
                problems.append(f"{len(live - in_blocks)} stored vectors have no codes")
            if in_blocks - live - dead:
                problems.append(f"{len(in_blocks - live - dead)} codes belong to no vector")
        if config.keep_originals or not version:
            for ids, blobs in db.iter_vectors():
                for i, blob in zip(ids, blobs):  # one by one: name every bad row
                    try:
                        unpack(db, [blob], config, [i])
                    except RvqstoreError as exc:
                        problems.append(str(exc))
    return problems


def live_codes(db, config):
    """Yield ``(ids, codes, norms)`` of the active version's live vectors, block by block
    (call inside ``db.read()``: one snapshot throughout)."""
    version = meta_int(db.meta(), "active_version", db.path)
    if not version:
        raise NotTrainedError(f"{db.path} is not trained: it has no codes yet")
    dead = np.asarray(sorted(db.tombstones()), np.int64)
    with naming(db.path):
        for ids, codes, norms in codeblocks.iter_codes(db, version, _snapshot.layout(config)):
            if dead.size:
                keep = ~np.isin(ids, dead)
                ids, codes, norms = ids[keep], codes[keep], norms[keep]
            if len(ids):
                yield ids, codes, norms


class Figures(NamedTuple):
    """A codebook version's training figures, carried along with its codebooks."""

    train_count: int
    train_mse: float
    added_count: int = 0
    added_sq_error: float = 0.0
    calibration: Optional[tuple] = None  # (stages per cell, nprobe, coverage, z)


def install(db, config, rq, figures, batches, progress, total=None, next_id=None):
    """Write rows with their given codes into an empty, untrained store as a new active
    codebook version ``rq``, in one transaction (all or nothing): no training, no encoding.

    batches : iterable of (ids int64, keys list, blobs list (None without originals),
        metadata texts or None, documents or None, codes uint8 (n, stages), norms float32),
        each checked by the caller; ids and keys must be new across batches.
    total : the number of rows expected, for progress (None: unknown)
    """
    c = config
    with db.write():
        meta = db.meta()
        if meta_int(meta, "active_version", db.path) or db.count():
            raise InvalidInputError(f"{db.path} holds vectors or codebooks already: codes are "
                                    "imported into an empty, untrained store")
        version = db.next_version()
        db.insert_codebooks(version, "building", rq.stages, rq.codebook_size, rq.dim,
                            pack_codebooks(rq.codebooks), figures.train_count,
                            figures.train_mse)
        if figures.added_count:
            db.record_added_error(version, figures.added_count, figures.added_sq_error)
        pending, block, done, top = [], 0, 0, -1
        for ids, keys, blobs, metas, docs, codes, norms in batches:
            taken = db.existing_ids(ids.tolist())
            if taken:
                raise DuplicateError(f"ids given twice: {sorted(taken)[:5]}")
            named = [k for k in keys if k is not None]
            taken = db.existing_keys(named) if named else ()
            if taken:
                raise DuplicateError(f"keys given twice: {sorted(taken)[:5]}")
            db.insert_vectors(ids.tolist(), keys, blobs, metas, docs)
            pending.append((ids, codes, norms))
            held = sum(len(p[0]) for p in pending)
            if held >= c.block_size:  # write the full blocks, carry the rest
                cat = [np.concatenate(a) for a in zip(*pending)]
                full = held // c.block_size * c.block_size
                write_blocks(db, c, version, *(a[:full] for a in cat), first_block=block)
                block += full // c.block_size
                pending = [tuple(a[full:] for a in cat)]
            done += len(ids)
            top = max(top, int(ids.max()))
            report(progress, "import", done, max(done, total or 0))
        if sum(len(p[0]) for p in pending):
            write_blocks(db, c, version, *(np.concatenate(a) for a in zip(*pending)),
                         first_block=block)
        if not done:
            raise InvalidInputError("no rows to import")
        db.set_codebook_state(version, "active")
        db.set_meta(active_version=version,
                    next_id=min(max(top + 1, next_id or 0), MAX_META_INT))
        if figures.calibration is not None:
            db.set_meta(**{_snapshot.CALIBRATION_KEY:
                           _snapshot.calibration_text(version, *figures.calibration)})
    return done

"""Writing vectors and their codes, inside the transactions the Store opens.

:func:`insert` is the body of an add once the inputs are checked: it numbers the rows,
refuses taken ids and keys, stores the originals and, once trained, encodes the new vectors
and appends their codes to the active version's blocks. :func:`compact` rewrites the blocks
without the deleted vectors.
"""

from dataclasses import replace
from typing import NamedTuple, Optional

import numpy as np

from . import _snapshot
from ._config import MAX_META_INT, Config, meta_int, resolve
from .algo.index import cell_order
from .errors import DimensionMismatchError, DuplicateError, InvalidInputError
from .storage import pack_originals
from .storage import codes as codeblocks


def report(progress, phase, done, total):
    if progress is not None:
        progress(phase, done, total)


def write_blocks(db, config, version, ids, codes, norms, first_block=0):
    codeblocks.write_codes(db, version, ids, codes, norms, config.block_size, first_block)


class Added(NamedTuple):
    """What :func:`add` committed.

    ids : int64 (m,) of the rows written, or None when every key was stored already
    out : int64 (n,) or None, with ``skip_existing_keys``: the stored ids of the rows
        skipped and -1 for the rows written
    x : float32 (m, dim), the rows written
    config : the store's settings afterwards (an add may set the dimension)
    version : int, the active codebook version (0 before training)
    appended : see :func:`insert`
    fresh : bool, the caller's in-memory state was current when the transaction began
    metas : the metadata texts of the rows written, or None
    """

    ids: Optional[np.ndarray]
    out: Optional[np.ndarray]
    x: np.ndarray
    config: Config
    version: Optional[int] = None
    appended: Optional[tuple] = None
    fresh: bool = False
    metas: Optional[list] = None


def add(db, config, x, ids, keys, *, skip_existing_keys, snap, codecs, seen_version, progress,
        metas=None, docs=None):
    """The rows ``x`` (checked; ``ids``, ``keys``, ``metas`` (JSON texts) and ``docs``
    checked or None) in one transaction.

    A store without a dimension yet takes that of ``x`` (``Added.config`` has it).
    """
    with db.write():
        fresh = snap is not None and db.data_version() == seen_version
        meta = db.meta()
        if config.dim is None:
            stored_dim = Config.from_meta(meta, db.path).dim
            if stored_dim is not None and stored_dim != x.shape[1]:
                # another connection set the dimension first
                raise DimensionMismatchError(
                    f"vectors have dim={x.shape[1]}, store has dim={stored_dim}")
            config = replace(config, dim=x.shape[1])
            db.set_meta(dim=x.shape[1])
        out = None
        if keys is not None and skip_existing_keys:
            found = db.ids_for_keys([k for k in keys if k is not None])
            if found:
                out = np.asarray([found.get(k, -1) for k in keys], np.int64)
                new = out < 0
                x, keys = x[new], [k for k, f in zip(keys, new) if f]
                ids = ids[new] if ids is not None else None
                metas = [t for t, f in zip(metas, new) if f] if metas is not None else None
                docs = [t for t, f in zip(docs, new) if f] if docs is not None else None
                if not len(x):
                    return Added(None, out, x, config)
        ids, version, appended = insert(db, config, meta, x, ids, keys, snap=snap, codecs=codecs,
                                        progress=progress, metas=metas, docs=docs)
    report(progress, "add", len(x), len(x))
    return Added(ids, out, x, config, version, appended, fresh, metas)


def upsert(db, config, x, keys, *, metas, docs, snap, codecs, progress):
    """Replace the rows whose key is stored (same id; vector, codes, metadata, document)
    and add the others, in one transaction; returns the ids in the order of ``keys``."""
    with db.write():
        meta = db.meta()
        found = db.ids_for_keys(keys)
        old = [found[k] for k in keys if k in found]
        if old:
            db.delete_vectors(old)
            bump_metadata_epoch(db)
            if meta_int(meta, "active_version"):
                db.add_tombstones(old)  # their codes go when the ids come back below
        next_id = meta_int(meta, "next_id", db.path)
        fresh = np.arange(next_id, next_id + len(keys) - len(old), dtype=np.int64)
        if len(fresh) and next_id > MAX_META_INT - len(fresh):
            raise InvalidInputError(f"{db.path} has no ids left to number new vectors")
        it = iter(fresh.tolist())
        ids = np.asarray([found[k] if k in found else next(it) for k in keys], np.int64)
        insert(db, config, meta, x, ids, keys, snap=snap, codecs=codecs, progress=progress,
               metas=metas, docs=docs)
    return ids


def update(db, ids, keys, *, metas, docs):
    """New metadata texts and/or documents for the rows of ``ids`` or ``keys`` (each list
    None: unchanged), in one transaction; returns the ids."""
    with db.write():
        ids = resolve(db, ids, keys)
        n = len(ids)
        if metas is not None and len(metas) != n or docs is not None and len(docs) != n:
            raise InvalidInputError(f"got {len(metas if metas is not None else docs)} values "
                                    f"for {n} items")
        if metas is not None:
            db.set_metadata(ids.tolist(), metas)
            bump_metadata_epoch(db)
        if docs is not None:
            db.set_documents(ids.tolist(), docs)
    return ids


def bump_metadata_epoch(db):
    """Tell readers that stored rows' metadata changed (inside ``db.write()``): their
    in-memory columns cannot be extended, only rebuilt (see ``_snapshot.load``)."""
    epoch = meta_int(db.meta(), "metadata_epoch", db.path)
    db.set_meta(metadata_epoch=(epoch + 1) % MAX_META_INT)


def insert(db, config, meta, x, ids, keys, *, snap, codecs, progress, metas=None, docs=None):
    """Store the rows ``x`` (inside ``db.write()``); returns ``(ids, version, appended)``.

    ``ids`` None numbers the rows from ``next_id``; ``keys`` may be None. ``appended`` is
    ``(codes, norms)`` of the new rows when they were appended to the active version's
    blocks, None when untrained or when the blocks were rewritten (a deleted id came back).
    """
    m = len(x)
    next_id = meta_int(meta, "next_id", db.path)
    if ids is None:
        if next_id > MAX_META_INT - m:
            raise InvalidInputError(f"{db.path} has no ids left to number {m} new vectors "
                                    f"from (next id {next_id}): give ids explicitly")
        ids = np.arange(next_id, next_id + m, dtype=np.int64)
    else:
        taken = db.existing_ids(ids.tolist())
        if taken:
            raise DuplicateError(f"ids already in the store: {sorted(taken)[:5]}")
    if keys is not None:
        taken = db.existing_keys([k for k in keys if k is not None])
        if taken:
            raise DuplicateError(f"keys already in the store: {sorted(taken)[:5]}")
    version = meta_int(meta, "active_version")
    report(progress, "add", 0, m)
    keep = config.keep_originals or not version
    blobs = pack_originals(x, config.originals) if keep else [None] * m
    db.insert_vectors(ids.tolist(), keys if keys is not None else [None] * m, blobs, metas, docs)
    appended = _append_codes(db, config, codecs.get(db, config, snap, version), version, x,
                             ids, progress) if version else None
    db.set_meta(next_id=min(max(next_id, int(ids.max()) + 1), MAX_META_INT))
    return ids, version, appended


def _append_codes(db, config, rq, version, x, ids, progress):
    codes = rq.encode(x, beam_width=config.add_beam, progress=progress)
    xh = rq.decode(codes)
    norms = np.einsum("ij,ij->i", xh, xh).astype(np.float32)
    db.record_added_error(version, len(x), float(((x - xh) ** 2).sum()))
    dead = set(db.tombstones())
    reused = [i for i in ids.tolist() if i in dead]
    if reused:
        # a deleted id comes back: its old codes must go before the new ones are written
        old_ids, old_codes, old_norms, _ = _snapshot.read_codes(db, config, version)
        keep = ~np.isin(old_ids, np.asarray(reused, np.int64))
        db.clear_tombstones(reused)
        write_blocks(db, config, version, np.concatenate([old_ids[keep], ids]),
                     np.concatenate([old_codes[keep], codes]),
                     np.concatenate([old_norms[keep], norms]))
        return None
    appended = (codes, norms)
    last = codeblocks.read_last_block(db, version, _snapshot.layout(config))
    start_block = 0 if last is None else last[0] + 1
    if last is not None and len(last[1]) < config.block_size:
        # top up the last, partly filled block
        start_block, lids, lcodes, lnorms = last
        ids = np.concatenate([lids, ids])
        codes = np.concatenate([lcodes, codes])
        norms = np.concatenate([lnorms, norms])
    write_blocks(db, config, version, ids, codes, norms, first_block=start_block)
    return appended


def compact(db, config, progress):
    """Rewrite the code blocks without the deleted vectors and in the order of their cells
    (:func:`~rvqstore.algo.index.cell_order`: a partitioned reader then finds them grouped
    and need not move them), then VACUUM the file."""
    with db.write():
        version = meta_int(db.meta(), "active_version", db.path)
        dead = db.tombstones()
        if version:
            report(progress, "compact", 0, 2)
            ids, codes, norms, _ = _snapshot.read_codes(db, config, version)
            keep = ~np.isin(ids, np.asarray(dead, np.int64)) if dead else None
            if keep is not None:
                ids, codes, norms = ids[keep], codes[keep], norms[keep]
            order = cell_order(codes, config.codebook_size)
            if keep is not None or (order != np.arange(len(order))).any():
                write_blocks(db, config, version, ids[order], codes[order], norms[order])
            db.clear_tombstones()
    report(progress, "compact", 1, 2)
    db.vacuum()
    report(progress, "compact", 2, 2)

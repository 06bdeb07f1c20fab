"""The in-memory snapshot of the active version that searches scan.

A :class:`Snapshot` pairs the in-memory index (:mod:`rvqstore.algo.index`: exact over the
originals before training, a flat code index after) with what a reader needs to refresh it
cheaply: the codebook version, the blocks epoch and how many blocks it holds.
:meth:`Store._current` decides when to rebuild one (``PRAGMA data_version``); this module
builds and refreshes it from the file, keeps it in step with the store's own writes, and
reads originals for rerank.
"""

import math
import re
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from ._config import Config, meta_int, naming, parse_metadata, unpack
from .filters import Columns
from .algo import ResidualQuantizer
from .algo.index import ExactIndex, FlatCodeIndex, PartitionedCodeIndex
from .errors import BadFileError
from .storage import unpack_codebooks
from .storage.blobs import unpack_concat
from .storage import codes as codeblocks


@dataclass
class Snapshot:
    """The active version as held in memory.

    version : int, active codebook version (0: untrained, ``index`` is exact)
    epoch : int, the file's ``blocks_epoch`` when the blocks were read
    count : int, live vectors
    nblocks : int, code blocks read (0 when untrained)
    index : ExactIndex, FlatCodeIndex or PartitionedCodeIndex
    columns : the metadata of the index's rows as typed columns, built by the first
        filtered search (None until then)
    metadata_epoch : int, the file's ``metadata_epoch`` (bumped by writes that change
        stored rows' metadata) when ``columns`` were read
    """

    version: int
    epoch: int
    count: int
    nblocks: int
    index: Union[ExactIndex, FlatCodeIndex, PartitionedCodeIndex]
    columns: Optional[Columns] = None
    metadata_epoch: int = 0


AUTO_PARTITION_ROWS = 200_000
"""Stored vectors from which ``partitions=None`` groups the codes into cells (below it a
scan of every code costs about what a partitioned search does; see the README)."""


def cell_prefix(partitions, config, rows):
    """How many leading stages name a vector's cell (None: a flat index) for the store's
    ``partitions`` choice (None: automatic; 0: flat; K or K**2 for codebook size K)."""
    if partitions == 0:
        return None
    if partitions is None:
        return 2 if rows >= AUTO_PARTITION_ROWS and config.stages >= 2 else None
    return 1 if partitions == config.codebook_size else 2


CALIBRATION_KEY = "nprobe_calibration"
"""The meta row that records a partitioned search's calibrated default nprobe:
``"<codebook version> <stages per cell> <nprobe> <coverage> <rerank margin z>"``."""


def calibration_text(version, prefix, nprobe, coverage, error_z):
    return f"{int(version)} {int(prefix)} {int(nprobe)} {float(coverage):.6f} {float(error_z):.3f}"


def recorded_calibration(meta, version, prefix, path):
    """(nprobe, coverage, error_z) the file records for codebook ``version`` and cells of
    ``prefix`` stages, or None when it records none for them; a malformed record is a
    BadFileError."""
    text = meta.get(CALIBRATION_KEY)
    if text is None:
        return None
    got = re.fullmatch(r"([0-9]{1,19}) ([12]) ([0-9]{1,10}) ([01]\.[0-9]{1,9}) "
                       r"([0-9]{1,2}\.[0-9]{1,6})", text) if isinstance(text, str) else None
    if got is None or int(got[3]) < 1 or float(got[4]) > 1.0 or not 0 < float(got[5]) <= 10:
        raise BadFileError(f"{path} has a bad {CALIBRATION_KEY}: {str(text)[:80]!r}")
    if int(got[1]) != version or int(got[2]) != prefix:
        return None
    return int(got[3]), float(got[4]), float(got[5])


def arranged(index, prefix, tail_from):
    """``index`` as the kind ``prefix`` asks for (flat when None), converted if need be."""
    if prefix is None:
        if isinstance(index, PartitionedCodeIndex):
            at = index.positions()
            return FlatCodeIndex(index.metric, index.rq, index.ids, index.codes[at],
                                 None, index.bias[at], index.rms_error)
        return index
    if isinstance(index, PartitionedCodeIndex) and index.prefix == prefix:
        return index
    if isinstance(index, PartitionedCodeIndex):
        index = arranged(index, None, tail_from)
    return PartitionedCodeIndex.group(index.metric, index.rq, index.ids, index.codes,
                                      None, bias=index.bias, rms_error=index.rms_error,
                                      prefix=prefix, tail_from=tail_from)


def load(db, config: Config, old, partitions=None):
    """The snapshot as of now, reusing ``old`` where it still holds (call inside ``db.read()``).
    ``partitions`` is the store's choice of index (see :func:`cell_prefix`).

    Appends by others only touch the last code block and new ones, so a refresh reads
    just those unless the blocks were rewritten (compact, retrain: ``blocks_epoch``). The
    metadata columns are extended the same way (with the metadata of the rows re-read)
    unless stored rows' metadata changed (``metadata_epoch``).
    """
    meta = db.meta()
    version = meta_int(meta, "active_version", db.path)
    epoch = meta_int(meta, "blocks_epoch", db.path)
    meta_epoch = meta_int(meta, "metadata_epoch", db.path)
    count = db.count()
    if not version:
        ids, vecs = load_all_originals(db, config)
        return Snapshot(0, epoch, count, 0, ExactIndex(config.metric, ids, vecs),
                        metadata_epoch=meta_epoch)
    if old is not None and old.version == version and old.epoch == epoch:
        first = max(old.nblocks - 1, 0)
        kept = old.index.truncated(first * config.block_size)
    else:
        first = 0
        kept = FlatCodeIndex(config.metric, codec(db, config, version),
                             *codeblocks.empty(config.stages),
                             rms_error=rms_error(db, config, version))
    ids, codes, norms, nread = read_codes(db, config, version, first)
    if isinstance(kept, FlatCodeIndex) and not len(kept.ids):
        kept.append(ids, codes, norms, own=True)  # takes the arrays just read
    else:
        kept.append(ids, codes, norms)
    dead = db.tombstones()
    if dead:
        kept.remove(np.asarray(dead, np.int64))
    if len(kept.ids) != count + len(dead):
        raise BadFileError(f"{db.path}: the code blocks hold {len(kept.ids)} vectors, the "
                           f"store {count} and {len(dead)} deleted: the file is corrupted")
    nblocks = first + nread
    # the last block stays ungrouped (others' appends rewrite it) unless it is more than an
    # eighth of the rows (a small store, maybe one block: then every row is grouped)
    tail_from = max(nblocks - 1, 0) * config.block_size
    if len(kept.ids) - tail_from > len(kept.ids) // 8:
        tail_from = None
    kept = arranged(kept, cell_prefix(partitions, config, count), tail_from)
    if isinstance(kept, PartitionedCodeIndex) and kept.calibration is None:
        got = recorded_calibration(meta, version, kept.prefix, db.path)
        if got is not None:
            kept.nprobe, kept.calibration, kept.error_z = got
    cols = None
    if first and old.columns is not None and old.metadata_epoch == meta_epoch:
        start = first * config.block_size
        new = kept.ids[start:]
        stored = {i: parse_metadata(t, db.path, i) for i, t in
                  db.metadata_for_ids(new.tolist()).items()}
        cols = old.columns.taken(np.arange(start)).extended(
            [stored.get(i) for i in new.tolist()])
    return Snapshot(version, epoch, count, nblocks, kept, cols, meta_epoch)


def columns(db, snap):
    """The metadata columns of ``snap``'s index rows, read from the file once per snapshot
    (deleted rows and rows without metadata have none)."""
    if snap.columns is None:
        with db.read():
            epoch = meta_int(db.meta(), "metadata_epoch", db.path)
            stored = {i: parse_metadata(t, db.path, i) for i, t in db.all_metadata()}
        snap.columns = Columns.from_dicts([stored.get(i) for i in snap.index.ids.tolist()])
        snap.metadata_epoch = epoch
    return snap.columns


def load_all_originals(db, config):
    ids, parts = [], []
    for bid, bblobs in db.iter_vectors():
        ids += bid
        parts.append(unpack(db, bblobs, config, bid))
    if not ids:
        return np.empty(0, np.int64), np.empty((0, config.dim or 0), np.float32)
    return np.asarray(ids, np.int64), np.concatenate(parts)


def layout(config):
    return codeblocks.Layout(config.stages, config.codebook_size, config.block_size)


def read_codes(db, config, version, first=0):
    """The checked codes of ``version`` from block ``first`` on (see
    :func:`rvqstore.storage.codes.read_codes`); errors name the file."""
    with naming(db.path):
        return codeblocks.read_codes(db, version, layout(config), first)


def codec(db, config, version, *, state="active"):
    """The codec of codebook ``version``, after checking its row against the settings."""
    row = db.codebooks_row(version)
    if row is None or row["state"] != state:
        raise BadFileError(f"{db.path}: codebook version {version} is missing or not {state}: "
                           "the file is corrupted")
    shape = (row["stages"], row["codebook_size"], row["dim"])
    if shape != (config.stages, config.codebook_size, config.dim):
        raise BadFileError(
            f"{db.path}: codebook version {version} has shape {shape}, the store's settings "
            f"say {(config.stages, config.codebook_size, config.dim)}: the file is corrupted")
    try:
        return ResidualQuantizer(unpack_codebooks(row["data"], *shape, row["checksum"]))
    except BadFileError as exc:
        raise BadFileError(f"{db.path}: codebook version {version}: {exc}") from None


def rms_error(db, config, version):
    """The codes' root mean squared error per dimension: from the codebooks' training
    figures and the errors of the vectors added since, whichever is larger."""
    row = db.codebooks_row(version)
    figures = (row["train_mse"], row["added_count"], row["added_sq_error"])
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in figures):
        raise BadFileError(f"{db.path}: codebook version {version} has error figures "
                           f"{figures!r}, not finite numbers >= 0: the file is corrupted")
    mse, added, sq = figures
    if added:
        mse = max(mse, sq / added)
    return math.sqrt(mse / config.dim)


class Codecs:
    """The codec writes encode with, kept across calls: a codec's first encode builds its
    tables (~0.1 s at 16 x 256 x 384), which adds of a few vectors must not pay each time."""

    def __init__(self):
        self._version, self._rq = None, None

    def get(self, db, config, snap, version):
        """The codec of ``version``: the in-memory snapshot's when it matches, else the
        one kept (active versions never change under their number)."""
        if snap is not None and snap.version == version and version:
            return snap.index.rq
        if self._version != version:
            self._rq, self._version = codec(db, config, version), version
        return self._rq


# -- our own writes -------------------------------------------------------------------------

def after_add(snap, config, version, x, ids, appended, metas=None):
    """Extend the in-memory index with our own commit instead of reloading it all.

    ``snap`` is None unless it was current when the commit began. Returns False when it
    cannot be extended (the caller drops it instead).
    """
    if snap is None or snap.version != version or (version and appended is None):
        return False
    if not version and snap.index.vectors.shape[1] != x.shape[1]:
        return False  # loaded before the store had a dimension
    snap.count += len(ids)
    if snap.columns is not None:
        texts = metas if metas is not None else [None] * len(ids)
        snap.columns = snap.columns.extended(
            [None if t is None else parse_metadata(t, "", int(i)) for t, i in zip(texts, ids)])
    if version:
        snap.index.append(ids, *appended)
        snap.nblocks = -(-len(snap.index.ids) // config.block_size)
    else:
        snap.index.append(ids, x)
    return True


def after_delete(snap, version, ids, n):
    """Drop our own deletion of ``ids`` (``n`` rows) in place; False when a reload is due.

    ``snap`` is None unless it was current when the commit began.
    """
    if snap is not None and snap.version == version and version:
        snap.index.remove(ids)  # masked at once, no reload
        snap.count -= n
        return True
    return False


# -- rerank ---------------------------------------------------------------------------------

def fetch_originals(db, config, ids):
    """Originals of the sorted unique ``ids`` a rerank asks for."""
    fmt, dim = config.originals, config.dim
    if fmt != "zstd" and len(ids) <= 900:
        blob = db.fetch_concat(ids.tolist())
        if blob is not None:
            with naming(db.path):
                return unpack_concat(blob, fmt, dim, ids, checked=db.checked)
    # some candidates were deleted by another connection since our arrays were read:
    # NaN rows rank them last and rerank drops them
    blobs = db.fetch_vectors(ids.tolist())
    out = np.full((len(ids), dim), np.nan, np.float32)
    have = [j for j, i in enumerate(ids.tolist()) if i in blobs]
    if have:
        out[have] = unpack(db, [blobs[int(ids[j])] for j in have], config,
                           [int(ids[j]) for j in have])
    return out


"""Code blocks as arrays: read a version's ids, codes and norms, write them back in blocks.

Every block but the last holds ``block_size`` vectors, so block ``b`` starts at row
``b * block_size``; readers rely on it to re-read only the tail after appends. A full
rewrite bumps ``blocks_epoch`` in the meta table so that they know to re-read everything.
Every block read is checked (sizes, CRC, code range, finite norms, its place in the
sequence) before its arrays are used.
"""

from typing import NamedTuple

import numpy as np

from ..errors import BadFileError
from .blobs import pack_block, unpack_block


class Layout(NamedTuple):
    """How a version's blocks must look: ``stages`` codes per vector, each below
    ``codebook_size``, ``block_size`` vectors in every block but the last."""

    stages: int
    codebook_size: int
    block_size: int


def empty(stages):
    return np.empty(0, np.int64), np.empty((0, stages), np.uint8), np.empty(0, np.float32)


def _unpack(row, layout, expect_block, last):
    b, cnt, i, cd, nm, crc = row
    if b != expect_block:
        raise BadFileError(f"code block {expect_block} is missing (found block {b!r}): "
                           "the file is corrupted")
    if not isinstance(cnt, int) or not 0 < cnt <= layout.block_size or \
            (not last and cnt != layout.block_size):
        raise BadFileError(f"code block {b} claims {cnt!r} vectors with block_size="
                           f"{layout.block_size}: the file is corrupted")
    return unpack_block(cnt, layout.stages, i, cd, nm, crc,
                        codebook_size=layout.codebook_size, block=b)


def read_codes(db, version, layout, first=0):
    """(ids int64 (n,), codes uint8 (n, stages), norms float32 (n,), blocks read) of
    ``version`` from block ``first`` on."""
    # block by block into arrays sized for full blocks: one copy of the codes in memory,
    # not the BLOBs of every block and then their concatenation (a fresh page costs a
    # fault: at ten million vectors the copies were a second of a store's first query)
    nblocks = db.count_blocks(version, first)
    cap = nblocks * layout.block_size
    ids, codes, norms = (np.empty(cap, np.int64), np.empty((cap, layout.stages), np.uint8),
                         np.empty(cap, np.float32))
    n = j = 0
    for j, row in enumerate(db.iter_blocks(version, first), start=1):
        if j > nblocks:
            break
        i, c, nm = _unpack(row, layout, first + j - 1, j == nblocks)
        ids[n:n + len(i)], codes[n:n + len(i)], norms[n:n + len(i)] = i, c, nm
        n += len(i)
    if j != nblocks:
        raise BadFileError(f"{nblocks} code blocks counted, {j} read: the file is corrupted")
    return ids[:n], codes[:n], norms[:n], nblocks


def iter_codes(db, version, layout):
    """Yield the checked ``(ids, codes, norms)`` of ``version``'s blocks in order, one
    block at a time (streamed from a cursor: the file's codes never sit in memory whole)."""
    nblocks = db.count_blocks(version, 0)
    j = 0
    for j, row in enumerate(db.iter_blocks(version, 0), start=1):
        if j > nblocks:
            break
        yield _unpack(row, layout, j - 1, j == nblocks)
    if j != nblocks:
        raise BadFileError(f"{nblocks} code blocks counted, {j} read: the file is corrupted")


def each_block(db, version, layout):
    """Yield ``(block number, (ids, codes, norms))`` of ``version``, or the
    ``BadFileError`` of a block that does not pass its checks in place of its arrays."""
    rows = db.read_blocks(version)
    for j, row in enumerate(rows):
        try:
            yield row[0], _unpack(row, layout, j, j == len(rows) - 1)
        except BadFileError as exc:
            yield row[0], exc


def read_last_block(db, version, layout):
    """(block number, ids, codes, norms) of the last block, or None."""
    last = db.last_block(version)
    if last is None:
        return None
    return (last[0], *_unpack(last, layout, last[0], True))


def write_codes(db, version, ids, codes, norms, block_size, first_block=0):
    """Write rows as blocks from ``first_block`` on; from 0 it replaces every block."""
    if first_block == 0:
        db.delete_blocks(version)
        # readers must reload every block, not just the tail
        db.set_meta(blocks_epoch=int(db.meta().get("blocks_epoch", 0)) + 1)
    for b, start in enumerate(range(0, len(ids), block_size), start=first_block):
        sl = slice(start, start + block_size)
        db.write_block(version, b, len(ids[sl]), *pack_block(ids[sl], codes[sl], norms[sl]))

"""Code blocks as arrays: read a version's ids, codes and norms, write them back in blocks.

Every block but the last holds ``block_size`` vectors, so block ``b`` starts at row
``b * block_size``; readers rely on it to re-read only the tail after appends. A full
rewrite bumps ``blocks_epoch`` in the meta table so that they know to re-read everything.
"""

import numpy as np

from ..errors import BadFileError
from .blobs import pack_block, unpack_block


def empty(stages):
    return np.empty(0, np.int64), np.empty((0, stages), np.uint8), np.empty(0, np.float32)


def read_codes(db, version, stages, first=0):
    """(ids int64 (n,), codes uint8 (n, stages), norms float32 (n,), blocks read) of
    ``version`` from block ``first`` on."""
    rows = db.read_blocks(version, first)
    parts = [unpack_block(cnt, stages, i, cd, nm) for _, cnt, i, cd, nm in rows]
    if not parts:
        return (*empty(stages), 0)
    ids, codes, norms = (np.concatenate(p) for p in zip(*parts))
    return ids, codes, norms, len(rows)


def each_block(db, version, stages):
    """Yield ``(block number, (ids, codes, norms))`` of ``version``, or the
    ``BadFileError`` of a block that does not unpack in place of its arrays."""
    for b, cnt, i, cd, nm in db.read_blocks(version):
        try:
            yield b, unpack_block(cnt, stages, i, cd, nm)
        except BadFileError as exc:
            yield b, exc


def read_last_block(db, version, stages):
    """(block number, ids, codes, norms) of the last block, or None."""
    last = db.last_block(version)
    if last is None:
        return None
    return (last[0], *unpack_block(last[1], stages, *last[2:]))


def write_codes(db, version, ids, codes, norms, block_size, first_block=0):
    """Write rows as blocks from ``first_block`` on; from 0 it replaces every block."""
    if first_block == 0:
        db.delete_blocks(version)
        # readers must reload every block, not just the tail
        db.set_meta(blocks_epoch=int(db.meta().get("blocks_epoch", 0)) + 1)
    for b, start in enumerate(range(0, len(ids), block_size), start=first_block):
        sl = slice(start, start + block_size)
        db.write_block(version, b, len(ids[sl]), *pack_block(ids[sl], codes[sl], norms[sl]))

"""Byte framing of the arrays stored in BLOBs: originals, code blocks, codebooks.

All little-endian. Originals come in three formats, chosen per store:
``float32`` (exact), ``float16`` (half the bytes) and ``zstd`` (float32 compressed).
"""

import numpy as np
import zstandard

from ..errors import BadFileError

ORIGINAL_FORMATS = ("float32", "float16", "zstd")

_zc = zstandard.ZstdCompressor(level=3)
_zd = zstandard.ZstdDecompressor()


def pack_originals(vectors, fmt):
    """One BLOB per row of ``vectors`` (n, dim) float32."""
    if fmt == "float16":
        return [r.tobytes() for r in vectors.astype("<f2")]
    rows = [r.tobytes() for r in vectors.astype("<f4")]
    if fmt == "zstd":
        return [_zc.compress(r) for r in rows]
    return rows


def unpack_originals(blobs, fmt, dim):
    """float32 (len(blobs), dim) from BLOBs written by :func:`pack_originals`."""
    if fmt == "zstd":
        blobs = [_zd.decompress(b) for b in blobs]
    dtype = "<f2" if fmt == "float16" else "<f4"
    raw = b"".join(blobs)
    width = dim * np.dtype(dtype).itemsize
    if len(raw) != width * len(blobs):
        raise BadFileError(f"stored originals have {len(raw)} bytes, expected {width * len(blobs)}")
    return np.frombuffer(raw, dtype=dtype).reshape(len(blobs), dim).astype(np.float32)


def pack_block(ids, codes, norms):
    return (np.ascontiguousarray(ids, "<i8").tobytes(), np.ascontiguousarray(codes, np.uint8).tobytes(),
            np.ascontiguousarray(norms, "<f4").tobytes())


def unpack_block(count, stages, ids, codes, norms):
    """Arrays of one code block, refusing blobs whose sizes do not match ``count``."""
    if len(ids) != 8 * count or len(codes) != stages * count or len(norms) != 4 * count:
        raise BadFileError(f"code block of {count} vectors has blob sizes "
                           f"{len(ids)}/{len(codes)}/{len(norms)}: the file is corrupted")
    return (np.frombuffer(ids, "<i8"), np.frombuffer(codes, np.uint8).reshape(count, stages),
            np.frombuffer(norms, "<f4"))


def pack_codebooks(codebooks):
    return np.ascontiguousarray(codebooks, "<f4").tobytes()


def unpack_codebooks(data, stages, size, dim):
    if len(data) != 4 * stages * size * dim:
        raise BadFileError("codebook blob has the wrong size: the file is corrupted")
    return np.frombuffer(data, "<f4").reshape(stages, size, dim).copy()

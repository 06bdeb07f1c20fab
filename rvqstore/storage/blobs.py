"""Byte framing of the arrays stored in BLOBs: originals, code blocks, codebooks.

All little-endian. Originals come in three formats, chosen per store:
``float32`` (exact), ``float16`` (half the bytes) and ``zstd`` (float32 compressed).
Since schema 2 every BLOB's bytes are covered by a CRC-32 (SQLite checks its pages'
structure, not what a BLOB holds): an original carries its CRC in its last 4 bytes, a
code block and a codebook in a column beside them. Reading verifies it, and a mismatch is
a :class:`~rvqstore.errors.BadFileError` naming the row; ``checked=False`` reads files
written before schema 2, which have none.
"""

import zlib

import numpy as np
import zstandard

from ..errors import BadFileError

ORIGINAL_FORMATS = ("float32", "float16", "zstd")
CRC_BYTES = 4
ZSTD_MAX_RATIO = 16
"""A zstd original inflates at most this many times: a crafted file cannot make a reader
allocate more than a small multiple of its size. Rows that compress better (all-zero
vectors, say) are stored raw: real embeddings compress about 1.4x."""

_zc = zstandard.ZstdCompressor(level=3)
_zd = zstandard.ZstdDecompressor()


def checksum(*parts):
    """CRC-32 of the concatenation of ``parts`` (bytes-like)."""
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    return crc


def with_crc(payload):
    """``payload`` followed by its CRC-32 (how originals are stored)."""
    return payload + checksum(payload).to_bytes(CRC_BYTES, "little")


def stored_width(fmt, dim):
    """Bytes of one stored original in a fixed-width format (with its CRC), else None."""
    if fmt == "zstd":
        return None
    return dim * (2 if fmt == "float16" else 4) + CRC_BYTES


def pack_originals(vectors, fmt):
    """One BLOB per row of ``vectors`` (n, dim) float32: the row's bytes, then their CRC-32."""
    if fmt == "float16":
        rows = [r.tobytes() for r in vectors.astype("<f2")]
    else:
        rows = [r.tobytes() for r in vectors.astype("<f4")]
        if fmt == "zstd":
            rows = [zstd_or_raw(r) for r in rows]
    return [with_crc(r) for r in rows]


def zstd_or_raw(raw):
    """``raw`` compressed, unless that does not save bytes or exceeds ``ZSTD_MAX_RATIO``
    (then ``raw`` itself, which readers tell apart by its length)."""
    frame = _zc.compress(raw)
    return frame if len(frame) * ZSTD_MAX_RATIO >= len(raw) and len(frame) < len(raw) else raw


def _payload(blob, checked, what):
    if not checked:
        return blob
    if blob is None or len(blob) < CRC_BYTES:
        raise BadFileError(f"{what} is truncated: the file is corrupted")
    body = memoryview(blob)[:-CRC_BYTES]
    if zlib.crc32(body) != int.from_bytes(blob[-CRC_BYTES:], "little"):
        raise BadFileError(f"{what} fails its checksum: the file is corrupted")
    return body


def _inflate(frame, dim, what):
    """A zstd frame of one original, refused unless it declares exactly ``dim`` floats."""
    want = 4 * dim
    if len(frame) == want:
        return frame  # stored raw (see zstd_or_raw)
    if len(frame) * ZSTD_MAX_RATIO < want:
        raise BadFileError(f"{what} is a {len(frame)}-byte frame for {want} bytes, beyond the "
                           f"{ZSTD_MAX_RATIO}x the store writes: the file is corrupted")
    try:
        size = zstandard.frame_content_size(frame)
        if size != want:
            raise BadFileError(f"{what} claims {size} bytes, a vector has {want}: "
                               "the file is corrupted")
        return _zd.decompress(frame, max_output_size=want)
    except zstandard.ZstdError as exc:
        raise BadFileError(f"{what} does not decompress ({exc}): the file is corrupted") from None


def unpack_originals(blobs, fmt, dim, *, ids=None, checked=True):
    """float32 (len(blobs), dim) from BLOBs written by :func:`pack_originals`.

    ``ids`` name the rows in errors; ``checked=False`` reads rows without a CRC (schema 1).
    """
    name = (lambda j: f"the original of id {ids[j]}") if ids is not None else \
        (lambda j: "a stored original")
    bodies = [_payload(b, checked, name(j)) for j, b in enumerate(blobs)]
    if fmt == "zstd":
        bodies = [_inflate(b, dim, name(j)) for j, b in enumerate(bodies)]
    dtype = "<f2" if fmt == "float16" else "<f4"
    width = dim * np.dtype(dtype).itemsize
    bad = [j for j, b in enumerate(bodies) if len(b) != width]
    if bad:
        raise BadFileError(f"{name(bad[0])} has {len(bodies[bad[0]])} bytes, expected {width}: "
                           "the file is corrupted")
    raw = b"".join(bodies)
    return np.frombuffer(raw, dtype=dtype).reshape(len(blobs), dim).astype(np.float32)


def unpack_concat(blob, fmt, dim, ids, *, checked=True):
    """float32 (len(ids), dim) from the concatenated fixed-width originals of ``ids``."""
    width = stored_width(fmt, dim) - (0 if checked else CRC_BYTES)
    n = len(ids)
    if len(blob) != width * n:
        raise BadFileError(f"stored originals have {len(blob)} bytes, expected {width * n}: "
                           "the file is corrupted")
    rows = np.frombuffer(blob, np.uint8).reshape(n, width)
    if checked:
        # the rerank path: one crc32 call per row on a memoryview slice, compared at once
        mv, crc, body = memoryview(blob), zlib.crc32, width - CRC_BYTES
        got = np.array([crc(mv[o:o + body]) for o in range(0, n * width, width)], np.uint32)
        want = rows[:, -CRC_BYTES:].copy().view("<u4")[:, 0]
        if not np.array_equal(got, want):
            j = int(np.flatnonzero(got != want)[0])
            raise BadFileError(f"the original of id {ids[j]} fails its checksum: "
                               "the file is corrupted")
        rows = rows[:, :-CRC_BYTES]
    dtype = "<f2" if fmt == "float16" else "<f4"
    return np.ascontiguousarray(rows).view(dtype).reshape(n, dim).astype(np.float32)


def pack_block(ids, codes, norms):
    """(ids, codes, norms, checksum) of one code block."""
    parts = (np.ascontiguousarray(ids, "<i8").tobytes(), np.ascontiguousarray(codes, np.uint8).tobytes(),
             np.ascontiguousarray(norms, "<f4").tobytes())
    return (*parts, checksum(*parts))


def unpack_block(count, stages, ids, codes, norms, crc=None, *, codebook_size=256, block=None):
    """Arrays of one code block, refusing blobs whose sizes do not match ``count``, a CRC
    that does not match (when ``crc`` is given), codes outside the codebook and norms
    that are not finite."""
    where = "code block" if block is None else f"code block {block}"
    if not isinstance(count, int) or count < 0:
        raise BadFileError(f"{where} claims {count!r} vectors: the file is corrupted")
    if not all(isinstance(b, bytes) for b in (ids, codes, norms)):
        raise BadFileError(f"{where} holds a value that is not a BLOB: the file is corrupted")
    if len(ids) != 8 * count or len(codes) != stages * count or len(norms) != 4 * count:
        raise BadFileError(f"{where} of {count} vectors has blob sizes "
                           f"{len(ids)}/{len(codes)}/{len(norms)}: the file is corrupted")
    if crc is not None and checksum(ids, codes, norms) != crc:
        raise BadFileError(f"{where} fails its checksum: the file is corrupted")
    i = np.frombuffer(ids, "<i8")
    c = np.frombuffer(codes, np.uint8).reshape(count, stages)
    n = np.frombuffer(norms, "<f4")
    if count and int(c.max()) >= codebook_size:
        raise BadFileError(f"{where} holds codes >= codebook_size={codebook_size}: "
                           "the file is corrupted")
    if count and (i == -1).any():
        raise BadFileError(f"{where} holds id -1 (the padding of results): the file is corrupted")
    if not np.isfinite(n).all():
        raise BadFileError(f"{where} holds norms that are not finite: the file is corrupted")
    return i, c, n


def pack_codebooks(codebooks):
    return np.ascontiguousarray(codebooks, "<f4").tobytes()


def unpack_codebooks(data, stages, size, dim, crc=None):
    """float32 (stages, size, dim) codebooks, refused when the blob's size, CRC (when
    given) or values are wrong."""
    if not isinstance(data, bytes) or len(data) != 4 * stages * size * dim:
        raise BadFileError("codebook blob has the wrong size: the file is corrupted")
    if crc is not None and checksum(data) != crc:
        raise BadFileError("codebook blob fails its checksum: the file is corrupted")
    out = np.frombuffer(data, "<f4").reshape(stages, size, dim).copy()
    if not np.isfinite(out).all():
        raise BadFileError("codebooks hold values that are not finite: the file is corrupted")
    return out

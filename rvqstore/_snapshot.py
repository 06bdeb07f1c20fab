"""The in-memory snapshot of the active version that searches scan.

A snapshot is a dict. Before training: ``version`` 0, ``epoch``, ``count``, ``ids``,
``vectors`` and ``vector_norms`` (exact search over the originals). Once trained:
``version``, ``epoch``, ``count``, ``rq``, ``nblocks``, ``ids``, ``codes``, ``norms`` and
``bias`` (squared code norms for l2, +inf for deleted ids). :meth:`Store._current` decides
when to rebuild one (``PRAGMA data_version``); this module builds and refreshes it from the
file, keeps it in step with the store's own writes, and reads originals for rerank.
"""

import numpy as np

from ._config import meta_int, unpack
from .algo import ResidualQuantizer
from .storage import unpack_codebooks, unpack_originals
from .storage import codes as codeblocks


def load(db, config, old):
    """The snapshot as of now, reusing ``old`` where it still holds (call inside ``db.read()``).

    Appends by others only touch the last code block and new ones, so a refresh reads
    just those unless the blocks were rewritten (compact, retrain: ``blocks_epoch``).
    """
    meta = db.meta()
    version = meta_int(meta, "active_version")
    epoch = meta_int(meta, "blocks_epoch")
    state = {"version": version, "epoch": epoch, "count": db.count()}
    if version:
        stages = config["stages"]
        if old is not None and old["version"] == version and old["epoch"] == epoch:
            state["rq"] = old["rq"]
            first = max(old["nblocks"] - 1, 0)
            kept = [a[: first * config["block_size"]]
                    for a in (old["ids"], old["codes"], old["norms"])]
        else:
            row = db.codebooks_row(version)
            state["rq"] = ResidualQuantizer(unpack_codebooks(
                row["data"], row["stages"], row["codebook_size"], row["dim"]))
            first, kept = 0, codeblocks.empty(stages)
        *tail, nread = codeblocks.read_codes(db, version, stages, first)
        ids, codes, norms = (np.concatenate([k, t]) for k, t in zip(kept, tail))
        state["nblocks"] = first + nread
        bias = norms.copy() if config["metric"] == "l2" else np.zeros(len(ids), np.float32)
        dead = db.tombstones()
        if dead:
            bias[np.isin(ids, np.asarray(dead, np.int64))] = np.inf
        state.update(ids=ids, codes=np.ascontiguousarray(codes), norms=norms, bias=bias)
    else:
        ids, vecs = load_all_originals(db, config)
        state.update(ids=ids, vectors=vecs, vector_norms=np.einsum("ij,ij->i", vecs, vecs))
    return state


def load_all_originals(db, config):
    ids, blobs = [], []
    for bid, bblobs in db.iter_vectors():
        ids += bid
        blobs += bblobs
    if not ids:
        return np.empty(0, np.int64), np.empty((0, config["dim"] or 0), np.float32)
    return np.asarray(ids, np.int64), unpack(blobs, config)


def quantizer(state, version, row):
    """The codec of ``version``, reused from the in-memory state when it matches."""
    if state is not None and state.get("version") == version:
        return state["rq"]
    return ResidualQuantizer(unpack_codebooks(row["data"], row["stages"], row["codebook_size"],
                                              row["dim"]))


# -- our own writes -------------------------------------------------------------------------

def after_add(st, config, version, x, ids, appended):
    """Extend the in-memory arrays with our own commit instead of reloading them all.

    ``st`` is None unless it was current when the commit began. Returns False when it
    cannot be extended (the caller drops it instead).
    """
    if st is None or st["version"] != version or (version and appended is None):
        return False
    st["count"] += len(ids)
    st["ids"] = np.concatenate([st["ids"], ids])
    if version:
        st["nblocks"] = -(-len(st["ids"]) // config["block_size"])
        codes, norms = appended
        st["codes"] = np.ascontiguousarray(np.concatenate([st["codes"], codes]))
        st["norms"] = np.concatenate([st["norms"], norms])
        extra = norms if config["metric"] == "l2" else np.zeros(len(ids), np.float32)
        st["bias"] = np.concatenate([st["bias"], extra])
    else:
        st["vectors"] = np.concatenate([st["vectors"], x])
        st["vector_norms"] = np.concatenate([st["vector_norms"], np.einsum("ij,ij->i", x, x)])
    return True


def after_delete(st, version, ids, n):
    """Mask our own deletion of ``ids`` (``n`` rows) in place; False when a reload is due.

    ``st`` is None unless it was current when the commit began.
    """
    if st is not None and st["version"] == version and version:
        st["bias"][np.isin(st["ids"], ids)] = np.inf  # masked at once, no reload
        st["count"] -= n
        return True
    return False


# -- rerank ---------------------------------------------------------------------------------

def fetch_originals(db, config, ids):
    """Originals of the sorted unique ``ids`` a rerank asks for."""
    fmt, dim = config["originals"], config["dim"]
    if fmt != "zstd" and len(ids) <= 900:
        blob = db.fetch_concat(ids.tolist())
        if blob is not None:
            return unpack_originals([blob], fmt, dim * len(ids)).reshape(len(ids), dim)
    # some candidates were deleted by another connection since our arrays were read:
    # NaN rows rank them last and rerank drops them
    blobs = db.fetch_vectors(ids.tolist())
    out = np.full((len(ids), dim), np.nan, np.float32)
    have = [j for j, i in enumerate(ids.tolist()) if i in blobs]
    if have:
        out[have] = unpack([blobs[int(ids[j])] for j in have], config)
    return out

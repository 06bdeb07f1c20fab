"""Arrow tables and Parquet files in and out (optional extra: ``pip install 'rvqstore[arrow]'``).

pyarrow is imported when one of these functions runs, never by ``import rvqstore``.

The table of a store has one row per stored vector, in id order:

=========  ====================================  ==========================================
column     Arrow type                            holds
=========  ====================================  ==========================================
id         int64                                 the store's id
key        string (null: no key)                 the item's key
vector     fixed_size_list<float32>[dim]         the original vector
metadata   string (null: none)                   the item's metadata as a JSON object
document   string (null: none)                   the item's document
=========  ====================================  ==========================================

Reading (``rvqstore add FILE.parquet``, :func:`read_batches`) takes a ``vector`` column of
fixed-size or variable lists of numbers (``embedding`` is accepted too) and, when present,
``id`` (integers), ``key`` and ``document`` (strings) and ``metadata`` (JSON text or a
struct), batch by batch: a file of any length never sits in memory whole.

The quantized form
------------------
:func:`write_quantized` (``rvqstore export DB --quantized -o DIR``) writes a trained
store's codebooks and every vector's codes to a directory of two Parquet files, so that
another tool can read and decode the codes without training, and :func:`read_quantized`
(``rvqstore import DIR DB``) rebuilds a store from them without training or encoding.

``codebooks.parquet``, one row per codeword, ordered by stage then codeword:

=========  ====================================  ==========================================
column     Arrow type                            holds
=========  ====================================  ==========================================
stage      int16                                 the RVQ stage, 0 .. stages - 1
codeword   int16                                 its number in the stage, 0 .. size - 1
vector     fixed_size_list<float32>[dim]         the codeword
=========  ====================================  ==========================================

``codes.parquet``, one row per stored vector (in the store's block order):

=========  ====================================  ==========================================
column     Arrow type                            holds
=========  ====================================  ==========================================
id         int64                                 the store's id
key        string (null: no key)                 the item's key
codes      fixed_size_list<uint8>[stages]        code of each stage
sq_norm    float32                               ``||x^||^2`` of the decoded vector
vector     fixed_size_list<float32>[dim]         the original (only when exported with them)
metadata   string (null: none)                   the item's metadata as a JSON object
document   string (null: none)                   the item's document
=========  ====================================  ==========================================

A vector decodes as ``x^ = sum over stages s of codebooks[s, codes[s]]`` (for
``metric="cosine"`` the store encodes unit vectors). Both files' schemas carry the key
``rvqstore`` in their key-value metadata: a JSON object with ``format``
(``"rvqstore-quantized"``), ``format_version`` (1), ``rvqstore_version``, ``dim``,
``metric``, ``stages``, ``codebook_size``, ``codebook_version``, ``trained_at``, the
training figures ``train_count``, ``train_mse``, ``added_count``, ``added_sq_error``
(which set the adaptive rerank's depth), ``originals`` (how the store kept them),
``block_size``, ``count`` (rows of codes.parquet), ``with_vectors``, ``next_id`` (the id
the store numbers its next row from) and ``calibration`` (null, or the partitioned search's
recorded default: ``stages_per_cell``, ``nprobe``, ``coverage``, ``rerank_error_z``).
"""

import json

import numpy as np

from .errors import InvalidInputError
from .filters import validate_metadata
from .inputs import Loaded

VECTOR_COLUMNS = ("vector", "embedding")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError("Arrow and Parquet need pyarrow: pip install 'rvqstore[arrow]'") \
            from None
    return pyarrow


def schema(dim):
    """The Arrow schema of a store's table (see the module docstring)."""
    pa = _pyarrow()
    return pa.schema([("id", pa.int64()), ("key", pa.string()),
                      ("vector", pa.list_(pa.float32(), dim)),
                      ("metadata", pa.string()), ("document", pa.string())])


def record_batches(store, *, batch_size=8192):
    """Yield the store's table as ``pyarrow.RecordBatch`` es of ``batch_size`` rows (each
    read as of one commit, as :meth:`Store.iter`)."""
    pa = _pyarrow()
    dim = store.dim or 0
    out = schema(dim)
    for ids, keys, vecs, metas, docs in store.iter(batch_size=batch_size, with_metadata=True,
                                                   with_documents=True):
        flat = pa.array(np.ascontiguousarray(vecs, np.float32).reshape(-1), pa.float32())
        yield pa.RecordBatch.from_arrays(
            [pa.array(ids, pa.int64()), pa.array(keys, pa.string()),
             pa.FixedSizeListArray.from_arrays(flat, dim),
             pa.array([None if m is None else json.dumps(m, ensure_ascii=False)
                       for m in metas], pa.string()),
             pa.array(docs, pa.string())], schema=out)


def to_arrow(store, *, batch_size=8192):
    """The store's table as one ``pyarrow.Table``."""
    pa = _pyarrow()
    return pa.Table.from_batches(list(record_batches(store, batch_size=batch_size)),
                                 schema=schema(store.dim or 0))


def write_parquet(store, path, *, batch_size=8192, progress=None):
    """Write the store's table to the Parquet file ``path``, batch by batch;
    ``progress(phase, done, total)`` as for the Store's long calls."""
    pa = _pyarrow()
    total = len(store)
    done = 0
    with pa.parquet.ParquetWriter(path, schema(store.dim or 0)) as writer:
        for batch in record_batches(store, batch_size=batch_size):
            writer.write_batch(batch)
            done += batch.num_rows
            if progress is not None:
                progress("export", done, total)
    return done


def row_count(path):
    """Rows in the Parquet file ``path`` (from its footer)."""
    pa = _pyarrow()
    try:
        return pa.parquet.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise InvalidInputError(f"{path} is not a Parquet file ({exc})") from None


def read_batches(source, *, batch_size=65536):
    """Yield :class:`~rvqstore.inputs.Loaded` batches of the Parquet file ``source`` (a
    path) or of an Arrow table; bad columns and values are an ``InvalidInputError`` naming
    the column (and the row, counted from 0 over the whole file)."""
    pa = _pyarrow()
    if isinstance(source, (pa.Table, pa.RecordBatch)):
        name = "the Arrow table"
        batches = source.to_batches(max_chunksize=batch_size) \
            if isinstance(source, pa.Table) else [source]
        names = source.schema.names
    else:
        name = str(source)
        try:
            parquet = pa.parquet.ParquetFile(source)
        except (OSError, pa.ArrowException) as exc:
            raise InvalidInputError(f"{name} is not a Parquet file ({exc})") from None
        names = parquet.schema_arrow.names
        batches = parquet.iter_batches(batch_size=batch_size)
    column = next((c for c in VECTOR_COLUMNS if c in names), None)
    if column is None:
        raise InvalidInputError(f"{name} has no vector column (one of "
                                f"{', '.join(VECTOR_COLUMNS)}); its columns: {', '.join(names)}")
    start = 0
    for batch in batches:
        yield _loaded(pa, batch, column, name, start)
        start += batch.num_rows


def _loaded(pa, batch, column, name, start):
    vec = batch.column(column)
    if not (pa.types.is_fixed_size_list(vec.type) or pa.types.is_list(vec.type)
            or pa.types.is_large_list(vec.type)) or not (
            pa.types.is_floating(vec.type.value_type) or pa.types.is_integer(vec.type.value_type)):
        raise InvalidInputError(f"{name}: column {column!r} must be lists of numbers, "
                                f"got {vec.type}")
    if vec.null_count:
        bad = start + next(i for i, v in enumerate(vec.is_null().to_pylist()) if v)
        raise InvalidInputError(f"{name}: row {bad} has no {column}")
    lengths = np.asarray(vec.value_lengths()) if not pa.types.is_fixed_size_list(vec.type) \
        else np.full(len(vec), vec.type.list_size)
    if len(lengths) and (lengths != lengths[0]).any():
        bad = start + int(np.flatnonzero(lengths != lengths[0])[0])
        raise InvalidInputError(f"{name}: row {bad} has {int(lengths[bad - start])} "
                                f"numbers in {column!r}, the first row {int(lengths[0])}")
    dim = int(lengths[0]) if len(lengths) else 0
    values = np.asarray(vec.flatten().to_numpy(zero_copy_only=False), np.float32)
    vectors = values.reshape(len(vec), dim)
    names = batch.schema.names
    ids = keys = metadata = documents = None
    if "id" in names:
        col = batch.column("id")
        if not pa.types.is_integer(col.type) or col.null_count:
            raise InvalidInputError(f"{name}: column 'id' must be integers without nulls, "
                                    f"got {col.type}")
        ids = np.asarray(col.to_numpy(), np.int64)
    if "key" in names:
        keys = _strings(pa, batch.column("key"), "key", name)
    if "document" in names:
        documents = _strings(pa, batch.column("document"), "document", name)
        if all(d is None for d in documents):
            documents = None
    if "metadata" in names:
        metadata = _metadata(pa, batch.column("metadata"), name, start)
    return Loaded(vectors, ids, keys, metadata, documents)


def _metadata(pa, col, name, start):
    """The checked metadata of a column (JSON text, struct or map), or None if all null."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        metadata = []
        for i, text in enumerate(col.to_pylist()):
            try:
                value = None if text is None else json.loads(text)
            except ValueError as exc:
                raise InvalidInputError(f"{name}: row {start + i} metadata is not JSON "
                                        f"({exc})") from None
            metadata.append(value)
    elif pa.types.is_struct(col.type) or pa.types.is_map(col.type):
        metadata = col.to_pylist()
        if pa.types.is_map(col.type):
            metadata = [None if m is None else dict(m) for m in metadata]
    else:
        raise InvalidInputError(f"{name}: column 'metadata' must be JSON text or a "
                                f"struct, got {col.type}")
    for i, meta in enumerate(metadata):
        try:
            metadata[i] = validate_metadata(meta)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{name}: row {start + i}: {exc}") from None
    return None if all(m is None for m in metadata) else metadata


def _strings(pa, col, column, name):
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
            or pa.types.is_null(col.type)):
        raise InvalidInputError(f"{name}: column {column!r} must be text, got {col.type}")
    return col.to_pylist()


def add_batches(store, source, *, upsert=False, skip_existing_keys=False, progress=None,
                batches=None):
    """Add (or with ``upsert``, upsert by key) the rows of a Parquet file or Arrow table
    ``source`` to ``store``, one transaction per batch of :func:`read_batches`, so that a
    file of any length never sits in memory whole; a batch that fails leaves the earlier
    ones stored. ``progress(phase, done, total)`` after each batch. ``batches``: the
    batches already begun (what :func:`read_batches` yielded, the rest to come). Returns
    the rows read."""
    pa = _pyarrow()
    if batches is None:
        batches = read_batches(source)
    total = source.num_rows if isinstance(source, (pa.Table, pa.RecordBatch)) \
        else row_count(source)
    rows = 0
    for batch in batches:
        if upsert and batch.keys is None:
            raise InvalidInputError(f"{source if isinstance(source, str) else 'the rows'}: "
                                    "an upsert replaces by key and the rows have no keys")
        if upsert:
            store.upsert(batch.vectors, keys=batch.keys, metadata=batch.metadata,
                         documents=batch.documents)
        else:
            store.add(batch.vectors, ids=batch.ids, keys=batch.keys, metadata=batch.metadata,
                      documents=batch.documents, skip_existing_keys=skip_existing_keys)
        rows += len(batch.vectors)
        if progress is not None:
            progress("add", rows, total)
    return rows


# ----------------------------------------------------------------------------- quantized

QUANTIZED_FORMAT = "rvqstore-quantized"
QUANTIZED_VERSION = 1
CODEBOOKS_FILE, CODES_FILE = "codebooks.parquet", "codes.parquet"
_HEADER_KEY = b"rvqstore"


def quantized_schemas(dim, stages, with_vectors):
    """(codebooks schema, codes schema) of the quantized form, without the header."""
    pa = _pyarrow()
    books = pa.schema([("stage", pa.int16()), ("codeword", pa.int16()),
                       ("vector", pa.list_(pa.float32(), dim))])
    cols = [("id", pa.int64()), ("key", pa.string()),
            ("codes", pa.list_(pa.uint8(), stages)), ("sq_norm", pa.float32())]
    if with_vectors:
        cols.append(("vector", pa.list_(pa.float32(), dim)))
    cols += [("metadata", pa.string()), ("document", pa.string())]
    return books, pa.schema(cols)


def write_quantized(store, directory, *, with_vectors=None, progress=None):
    """Write ``store``'s codebooks and codes to ``directory`` (created if missing; its two
    files replaced): see the module docstring. ``with_vectors``: also the originals (None:
    when the store keeps them). Returns the rows written. Streams block by block."""
    pa = _pyarrow()
    # the codes' first block opens one read transaction, which the reads below join: the
    # codebooks, the figures and every row are of one commit
    blocks = store.iter_codes()
    try:
        return _write_quantized(pa, store, blocks, next(blocks, None), directory,
                                with_vectors, progress)
    finally:
        blocks.close()  # ends the read transaction, also on an error


def _write_quantized(pa, store, blocks, first, directory, with_vectors, progress):
    import os

    from . import __version__

    rq = store.quantizer()
    info = store.info()
    if with_vectors is None:
        with_vectors = store.config.keep_originals
    if with_vectors and not store.config.keep_originals:
        raise InvalidInputError(f"{store.path} keeps no originals to export")
    S, K, dim = rq.codebooks.shape
    header = {"format": QUANTIZED_FORMAT, "format_version": QUANTIZED_VERSION,
              "rvqstore_version": __version__, "dim": dim, "metric": store.metric,
              "stages": S, "codebook_size": K, "codebook_version": info["codebook_version"],
              "trained_at": info["trained_at"], "train_count": info["train_count"],
              "train_mse": info["train_mse"], "added_count": info["added_since_training"],
              "added_sq_error": info["added_sq_error"], "originals": store.config.originals,
              "block_size": store.config.block_size, "count": info["count"],
              "with_vectors": bool(with_vectors),
              "calibration": store.recorded_calibration(), "next_id": info["next_id"]}
    meta = {_HEADER_KEY: json.dumps(header).encode()}
    books_schema, codes_schema = quantized_schemas(dim, S, with_vectors)
    books_schema, codes_schema = (books_schema.with_metadata(meta),
                                  codes_schema.with_metadata(meta))
    os.makedirs(directory, exist_ok=True)
    flat = pa.array(rq.codebooks.reshape(-1).astype(np.float32), pa.float32())
    table = pa.Table.from_arrays(
        [pa.array(np.repeat(np.arange(S), K), pa.int16()),
         pa.array(np.tile(np.arange(K), S), pa.int16()),
         pa.FixedSizeListArray.from_arrays(flat, dim)], schema=books_schema)
    pa.parquet.write_table(table, os.path.join(directory, CODEBOOKS_FILE))
    done = 0
    with pa.parquet.ParquetWriter(os.path.join(directory, CODES_FILE), codes_schema) as writer:
        for ids, codes, norms in _chain(first, blocks):
            at = ids.tolist()
            cols = [pa.array(ids, pa.int64()), pa.array(store.keys(at), pa.string()),
                    pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1), pa.uint8()),
                                                      S),
                    pa.array(norms, pa.float32())]
            if with_vectors:
                vecs = np.ascontiguousarray(store.get(at), np.float32).reshape(-1)
                cols.append(pa.FixedSizeListArray.from_arrays(pa.array(vecs, pa.float32()),
                                                              dim))
            cols.append(pa.array([None if m is None else json.dumps(m, ensure_ascii=False)
                                  for m in store.metadata(at)], pa.string()))
            cols.append(pa.array(store.documents(at), pa.string()))
            writer.write_batch(pa.RecordBatch.from_arrays(cols, schema=codes_schema))
            done += len(ids)
            if progress is not None:
                progress("export", done, header["count"])
    return done


def _chain(first, rest):
    if first is not None:
        yield first
    yield from rest


def read_quantized_header(directory):
    """The header of the quantized form in ``directory`` (checked: format, version, the
    two files agree), and the codebooks as a ``ResidualQuantizer``."""
    import os

    from .algo import ResidualQuantizer

    pa = _pyarrow()
    headers, tables = [], {}
    for name in (CODEBOOKS_FILE, CODES_FILE):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise InvalidInputError(f"{directory} is not an rvqstore quantized export: it has "
                                    f"no {name}")
        try:
            schema = pa.parquet.read_schema(path)
        except (OSError, pa.ArrowException) as exc:
            raise InvalidInputError(f"{directory} is not an rvqstore quantized export: "
                                    f"{name}: {exc}") from None
        raw = (schema.metadata or {}).get(_HEADER_KEY)
        try:
            header = json.loads(raw) if raw is not None else None
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("format") != QUANTIZED_FORMAT:
            raise InvalidInputError(f"{path} has no rvqstore quantized header: not an "
                                    "export of ours")
        fv = header.get("format_version")
        if not isinstance(fv, int) or fv > QUANTIZED_VERSION:
            raise InvalidInputError(f"{path} is quantized format version {fv!r}; this rvqstore "
                                    f"reads version {QUANTIZED_VERSION}: upgrade rvqstore")
        headers.append(header)
        tables[name] = schema
    if headers[0] != headers[1]:
        raise InvalidInputError(f"{directory}: {CODEBOOKS_FILE} and {CODES_FILE} come from "
                                "different exports (their headers differ)")
    h = headers[0]
    for name, kind in (("dim", int), ("stages", int), ("codebook_size", int), ("count", int),
                       ("train_count", int), ("added_count", int), ("block_size", int)):
        if isinstance(h.get(name), bool) or not isinstance(h.get(name), kind) or h[name] < 0:
            raise InvalidInputError(f"{directory}: header field {name!r} is {h.get(name)!r}")
    S, K, dim = h["stages"], h["codebook_size"], h["dim"]
    want_books, want_codes = quantized_schemas(dim, S, bool(h.get("with_vectors")))
    for name, want in ((CODEBOOKS_FILE, want_books), (CODES_FILE, want_codes)):
        if not tables[name].remove_metadata().equals(want):
            raise InvalidInputError(f"{directory}: {name} does not have the documented "
                                    f"schema for dim={dim}, stages={S}: {tables[name]}")
    if not 1 <= S * K * dim <= 1 << 28:
        raise InvalidInputError(f"{directory}: codebooks of {S} x {K} x {dim} are out of range")
    books = pa.parquet.read_table(os.path.join(directory, CODEBOOKS_FILE))
    stage = books.column("stage").to_numpy()
    word = books.column("codeword").to_numpy()
    if (books.num_rows != S * K or books.column("vector").null_count
            or not np.array_equal(stage, np.repeat(np.arange(S), K))
            or not np.array_equal(word, np.tile(np.arange(K), S))):
        raise InvalidInputError(f"{directory}: {CODEBOOKS_FILE} must hold {S} x {K} codewords "
                                "ordered by stage then codeword")
    vecs = np.asarray(books.column("vector").combine_chunks().flatten().to_numpy(),
                      np.float32).reshape(S, K, dim)
    if not np.isfinite(vecs).all():
        raise InvalidInputError(f"{directory}: codebooks hold values that are not finite")
    return h, ResidualQuantizer(vecs)


def read_quantized(directory, path, *, batch_size=65536, progress=None, **store_options):
    """A new store at ``path`` (which must not exist) rebuilt from the quantized form in
    ``directory``: same ids, keys, codes, codebooks and training figures, so that it
    answers searches as the exported store did; no training, no encoding; one transaction
    (a failure leaves no file). ``store_options`` go to :meth:`Store.open` (the header
    sets dim, metric, stages, codebook_size, block_size, originals; ``keep_originals``
    follows whether the export has vectors). Returns the open store."""
    import os

    from .store import Store

    pa = _pyarrow()
    if os.path.exists(path):
        raise InvalidInputError(f"{path} exists: import builds a new store")
    h, rq = read_quantized_header(directory)
    with_vectors = bool(h.get("with_vectors"))
    options = dict(dim=h["dim"], metric=h["metric"], stages=h["stages"],
                   codebook_size=h["codebook_size"], keep_originals=with_vectors)
    if with_vectors:
        options["originals"] = h["originals"]
    if h["block_size"]:
        options["block_size"] = h["block_size"]
    options.update(store_options)
    codes_path = os.path.join(directory, CODES_FILE)
    store = Store.open(path, **options)
    try:
        parquet = pa.parquet.ParquetFile(codes_path)
        if parquet.metadata.num_rows != h["count"]:
            raise InvalidInputError(f"{codes_path} holds {parquet.metadata.num_rows} rows, its "
                                    f"header says {h['count']}")
        keep = with_vectors and store.config.keep_originals  # keep_originals=False drops them
        store.import_codes(rq, _code_batches(pa, parquet, codes_path, h, keep, batch_size),
                           train_count=h["train_count"], train_mse=h["train_mse"],
                           added_count=h["added_count"], added_sq_error=h["added_sq_error"],
                           calibration=h.get("calibration"), next_id=h.get("next_id"),
                           total=h["count"], progress=progress)
    except BaseException:
        store.close()
        for suffix in ("", "-wal", "-shm", "-journal", "-build"):
            if os.path.exists(str(path) + suffix):
                os.remove(str(path) + suffix)
        raise
    return store


def _code_batches(pa, parquet, name, h, with_vectors, batch_size):
    S = h["stages"]
    start = 0
    for batch in parquet.iter_batches(batch_size=batch_size):
        for col in ("id", "codes", "sq_norm"):
            if batch.column(col).null_count:
                raise InvalidInputError(f"{name}: column {col!r} has nulls (rows from {start})")
        n = batch.num_rows
        codes = np.asarray(batch.column("codes").flatten().to_numpy(), np.uint8).reshape(n, S)
        out = {"ids": np.asarray(batch.column("id").to_numpy(), np.int64), "codes": codes,
               "sq_norms": np.asarray(batch.column("sq_norm").to_numpy(), np.float32),
               "keys": _strings(pa, batch.column("key"), "key", name)}
        if with_vectors:
            vec = batch.column("vector")
            if vec.null_count:
                raise InvalidInputError(f"{name}: column 'vector' has nulls (rows from {start})")
            out["vectors"] = np.asarray(vec.flatten().to_numpy(), np.float32).reshape(n, h["dim"])
        out["metadata"] = _metadata(pa, batch.column("metadata"), name, start)
        docs = _strings(pa, batch.column("document"), "document", name)
        out["documents"] = None if all(d is None for d in docs) else docs
        yield out
        start += n
